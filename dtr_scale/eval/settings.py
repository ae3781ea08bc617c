"""One evaluation's identity: the settings that, with a checkpoint step and an averaging,
decide a result. From them come the result key (what results.jsonl is deduplicated by), the
samples folder and the sample spec (what decides a samples folder's images), so a new sampler
option is one field here.

No torch: `dtr-scale status` reads results through this module on login nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from dtr_scale.config import ModelConfig, TrainConfig

NOT_IN_KEY = {"in_key": False}  # field metadata: decides the samples, not which result they give
# full: the paper's suite (FID, sFID, IS, precision, recall); quick: FID alone, from fewer samples
PROTOCOLS = ("full", "quick")
# Records stored before protocols existed were all made by the full suite.
KEY_DEFAULTS = {"protocol": "full"}


class EvaluationError(ValueError):
    """A run or setting the evaluator cannot score; the message says what to set."""


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def require_images(cfg: TrainConfig) -> None:
    if cfg.data.kind != "shards":
        raise EvaluationError(f"data.kind={cfg.data.kind} has no images to decode latents into; the evaluator "
                              "scores runs on image datasets (data=digits, or shards prepared with dtr-prep)")


def reference_name(cfg: TrainConfig) -> str:
    """What the samples are compared with: the reference batch's file name, or "digits"."""
    require_images(cfg)
    if cfg.eval.reference:
        return Path(cfg.eval.reference).name
    if cfg.data.embedded:
        return "digits"
    raise EvaluationError("eval.reference is not set: point it at an ADM reference batch (.npz, e.g. "
                          "VIRTUAL_imagenet256_labeled.npz); only the embedded digits are scored without one")


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides the images of a samples folder."""

    weights: str  # which weights drew them, e.g. "step_00000200/ema"
    num_samples: int
    chunk_size: int
    num_classes: int
    latent_shape: tuple[int, int, int]
    labels: str = "balanced"  # balanced | random | classes (the list `classes`, cycled)
    seed: int = 0
    sampler: str = "ddpm"
    sampling_steps: int = 250
    cfg_scale: float = 1.5
    guided_channels: str = "all"
    ddim_eta: float = 0.0
    classes: tuple[int, ...] = ()

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_indices(self, chunk: int) -> np.ndarray:
        import numpy as np  # here: the launch checks read this module without numpy

        return np.arange(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_samples))

    def to_json(self) -> dict:
        data = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as read back
        if not self.classes:  # folders written before `classes` existed still match their spec
            del data["classes"]
        return data


@dataclass(frozen=True)
class EvalSettings:
    """The sampler, the sample count and the reference of an evaluation, read from a config once."""

    sampler: str
    sampling_steps: int
    cfg_scale: float
    guided_channels: str
    ddim_eta: float
    num_samples: int
    labels: str
    seed: int
    reference: str
    protocol: str = "full"
    chunk_size: int = field(default=64, metadata=NOT_IN_KEY)  # a job with another size starts its own folder

    @classmethod
    def of(cls, cfg: TrainConfig, protocol: str = "full") -> EvalSettings:
        """cfg's evaluation settings under `protocol` (full: eval.num_samples samples, quick:
        eval.quick.num_samples); EvaluationError where the run has nothing to score against."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"evaluation protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        d, e = cfg.diffusion, cfg.eval
        return cls(sampler=d.sampler, sampling_steps=d.sampling_steps, cfg_scale=d.cfg_scale,
                   guided_channels=d.guided_channels, ddim_eta=d.ddim_eta,
                   num_samples=e.num_samples if protocol == "full" else e.quick.num_samples,
                   labels=e.labels, seed=e.seed, reference=reference_name(cfg), protocol=protocol,
                   chunk_size=e.batch_size)

    def record_fields(self) -> dict[str, Any]:
        """The settings a result record carries (its key, with the step and the averaging)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("in_key", True)}

    def result_key(self, step: int, averaging: str) -> tuple:
        return (step, averaging, *self.record_fields().values())

    def samples_folder(self, run_dir: str | Path, step: int, averaging: str) -> Path:
        """RUN_DIR/eval/samples/step_00000200-ema-ddpm250-cfg1.5-<hash of the settings>. The protocol
        is left out: it decides the scores, not the images (folders from before it existed stay valid)."""
        drawn = {k: v for k, v in dataclasses.asdict(self).items() if k != "protocol"}
        digest = hashlib.sha1(json.dumps(drawn, sort_keys=True).encode()).hexdigest()[:8]
        name = (f"step_{step:08d}-{averaging.replace(':', '')}-{self.sampler}{self.sampling_steps}"
                f"-cfg{self.cfg_scale:g}-{digest}")
        return eval_dir(run_dir) / "samples" / name

    def sample_spec(self, model: ModelConfig, step: int, averaging: str) -> SampleSpec:
        """What to draw: the model's classes and latent shape, with these settings' sampler and counts."""
        return SampleSpec(weights=f"step_{step:08d}/{averaging}", num_samples=self.num_samples,
                          chunk_size=self.chunk_size, num_classes=model.num_classes,
                          latent_shape=(model.in_channels, model.input_size, model.input_size), labels=self.labels,
                          seed=self.seed, sampler=self.sampler, sampling_steps=self.sampling_steps,
                          cfg_scale=self.cfg_scale, guided_channels=self.guided_channels, ddim_eta=self.ddim_eta)


# What identifies a result: a record with the same values is never computed again.
KEY_FIELDS = ("step", "averaging", *(f.name for f in dataclasses.fields(EvalSettings) if f.metadata.get("in_key", True)))


def record_key(record: dict[str, Any]) -> tuple:
    """A stored result's key (KEY_FIELDS' values): records with equal keys are one result."""
    return tuple(record[name] if name in record else KEY_DEFAULTS[name] for name in KEY_FIELDS)


def record_protocol(record: dict[str, Any]) -> str:
    return record.get("protocol", KEY_DEFAULTS["protocol"])
