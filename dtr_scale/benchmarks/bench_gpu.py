"""One prepared run on one GPU: training throughput and MFU, what the GPU switches cost, how long
a checkpoint blocks the loop, the sampling rate, and whether bf16, compile and resume are correct
on the device.

    dtr-bench gpu [--out DIR] [--budget-s 450] [--smoke]
    python -m dtr_scale.benchmarks.bench_gpu [same options]

Sections, each an entry of DIR/gpu_report.json:

  throughput     DiT-XL/2 and DiT-L/2 with DTR + ANT-UW (the headline), bf16 autocast + torch.compile
                 + TF32 + fused AdamW, at the largest per-GPU batch of 128/64/32 that fits: images/s,
                 MFU (over the GPU's dense bf16 peak in dtr_scale/hardware.py), step time, peak memory; and
                 the same with routing=none: the DTR overhead (target: at most 3% of the step).
  parallel       DDP vs FSDP2 on the one GPU (a one-process group), DiT-XL/2: step time, peak memory.
  activation_checkpointing   off vs on, DiT-XL/2 at the same batch: step time, peak memory.
  checkpoint     the time the loop is blocked by an asynchronous vs a synchronous save of DiT-XL/2
                 with its EMA and AdamW state (target: async < 10% of sync).
  sampling       DDPM-250 with CFG (the evaluator's fp32 sampler) for DiT-XL/2 at batch 256: images/s
                 over the first steps, hence the hours of a 50K-sample evaluation.
  correctness    bf16 vs fp32 loss at steps 0..2 within BF16_TOLERANCE (DiT's zero-initialised output
                 layer makes step 0 alone precision-blind); compile vs eager losses over 5
                 steps (fp32) within COMPILE_TOLERANCE; no host sync in 20 training-loop steps between
                 log steps (torch.cuda.set_sync_debug_mode("error") around them); exact resume (the
                 training loop stopped at step 5 and resumed equals a straight run at step 10, bitwise:
                 losses, weights and EMA).

DIR/calibration_entries.yaml holds the throughput rows as calibration.yaml entries marked measured
(date, GPU, torch version, commit): append them under `throughput` there.

Every section checks the time left of --budget-s first and is reported as skipped when it would
not fit; a section that fails is reported with its error and the others still run; the report is
rewritten after each section, so a run cut short still leaves what it measured.

--smoke runs every section on the CPU with a tiny DiT, compiled with torch.compile's aot_eager
backend (inductor's CPU build takes minutes and is not what a GPU runs), in well under a minute;
the parts that need CUDA (the sync debug mode, a GPU's bf16 peak for MFU) are reported as skipped
with the reason. Figures are reported, never asserted; the correctness checks say ok true/false.

Only torch, numpy, safetensors, tqdm, omegaconf / hydra-core and PyYAML are imported on this
path, so it runs on a bare GPU image with those few wheels carried along.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from dtr_scale.config import TrainConfig, to_train_config
from dtr_scale.hardware import device_peak_tflops, gpu_type_of_device
from dtr_scale.models.cost import dit_shape, forward_macs, model_flops_utilization
from dtr_scale.plan.calibration import model_key
from dtr_scale.provenance import git_state
from dtr_scale.world import World, process_group

REPORT = "gpu_report.json"
ENTRIES = "calibration_entries.yaml"
BF16_TOLERANCE = 2e-2  # relative loss difference bf16 autocast vs fp32, steps 0..2
COMPILE_TOLERANCE = 1e-3  # relative loss difference compiled vs eager, fp32, over 5 steps
SYNC_FREE_STEPS = 20
EVAL_SAMPLES = 50_000


@dataclass(frozen=True)
class Spec:
    """What one run measures: the full GPU run, or the CPU smoke run."""

    device: str
    models: tuple[str, ...]  # the headline models, largest first
    overrides: dict[str, Any]  # model config overrides (the smoke run's tiny DiT)
    batches: tuple[int, ...]  # per-GPU batches tried, largest first
    compile_backend: str  # torch.compile backend
    warmup: int
    steps: int
    check_model: str  # the model of the loop-level checks (sync, resume, compile vs eager)
    check_batch: int
    sample_batch: int
    sample_steps: int  # DDPM steps timed of the 250
    resume: tuple[int, int] = (5, 10)  # the correctness check's stop step and final step
    smoke: bool = False


GPU_SPEC = Spec(device="cuda", models=("DiT-XL/2", "DiT-L/2"), overrides={}, batches=(128, 64, 32),
                compile_backend="inductor", warmup=3, steps=10, check_model="DiT-S/2", check_batch=32,
                sample_batch=256, sample_steps=5)
SMOKE_SPEC = Spec(device="cpu", models=("DiT-S/2",),
                  overrides={"input_size": 8, "num_classes": 10, "depth": 2, "hidden_size": 64, "num_heads": 4},
                  batches=(16, 8), compile_backend="aot_eager", warmup=1, steps=1, check_model="DiT-S/2",
                  check_batch=8, sample_batch=4, sample_steps=2, resume=(2, 4), smoke=True)


def bench_config(spec: Spec, run_dir: Path, model: str, batch: int, *, routing: str = "dtr",
                 precision: str = "bf16", compile: bool = True, activation_checkpointing: bool = False,
                 backend: str = "ddp", steps: int = 10, log_every: int = 10**9, checkpoint_every: int = 10**9,
                 phema: bool = False) -> TrainConfig:
    """The headline training config (DTR + ANT-UW, bf16 + compile + TF32 + fused AdamW) on synthetic latents.
    With the smoke spec, `compile` goes through compile_blocks (aot_eager), not the config's inductor."""
    return to_train_config({
        "model": {"name": model, **spec.overrides}, "routing": {"kind": routing}, "weighting": {"kind": "ant_uw"},
        "data": {"kind": "synthetic", "num_samples": max(2 * batch, 64)},
        "backend": {"name": backend, "precision": precision, "compile": compile and not spec.smoke, "tf32": True,
                    "fused_adamw": True, "activation_checkpointing": activation_checkpointing},
        "checkpoint": {"every": checkpoint_every, "async_save": True, "keep_last": 2},
        "logging": {"every": log_every, "wandb": "disabled"},
        "run_dir": str(run_dir), "steps": steps, "global_batch_size": batch, "world_size": 1,
        "phema_stds": [0.05, 0.10] if phema else [], "sample_at_end": 0, "device": spec.device,
    })


# ---------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def compile_blocks(model: torch.nn.Module, spec: Spec, cfg: TrainConfig) -> None:
    """The smoke run's compile: each block with aot_eager (the GPU run compiles through the config)."""
    if spec.smoke and cfg.backend.compile is False and spec.compile_backend != "inductor":
        for block in model.blocks:
            block.compile(backend=spec.compile_backend)


def time_training(cfg: TrainConfig, spec: Spec, *, steps: int, warmup: int, compile: bool = True,
                  keep: list | None = None) -> dict[str, Any]:
    """The training loop's own step (train.loop.train_step: draws on the device, forward/backward,
    clipping, the device-masked AdamW step, EMA), on fixed latents: images/s, step time, peak
    memory and losses."""
    from dtr_scale.train.loop import assemble, random_batch, timed_steps

    free_memory()
    world = World(device=torch.device(cfg.device))
    parts = assemble(cfg, world)
    if compile:
        compile_blocks(parts.model, spec, cfg)
    batch = random_batch(cfg, world.device, cfg.global_batch_size)
    _, warm = timed_steps(parts, batch, 0, warmup)
    seconds, timed = timed_steps(parts, batch, warmup, steps)
    losses = [row[0] for row in torch.stack([v.values for v in warm + timed]).tolist()]
    if keep is not None:
        keep.append(parts.backend)
    return {"batch": cfg.global_batch_size, "images_per_s": cfg.global_batch_size * steps / seconds,
            "step_ms": 1e3 * seconds / steps, "peak_memory_gib": peak_memory_gib(cfg.device), "losses": losses}


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def largest_fitting(spec: Spec, run_dir: Path, model: str) -> tuple[TrainConfig, dict[str, Any]]:
    """The headline config at the largest batch of spec.batches that trains without running out of memory."""
    tried = []
    for batch in spec.batches:
        cfg = bench_config(spec, run_dir, model, batch)
        try:
            return cfg, {**time_training(cfg, spec, steps=spec.steps, warmup=spec.warmup), "tried": tried}
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
            if not is_out_of_memory(err):
                raise
        tried.append({"batch": batch, "error": "out of memory"})
        free_memory()  # here, after the except block let go of the failed attempt's tensors
    raise RuntimeError(f"{model}: no batch of {spec.batches} fits on this device")


# ---------------------------------------------------------------------------- sections


class Bench:
    """Runs the sections under one time budget and keeps the report on disk up to date."""

    def __init__(self, spec: Spec, out: Path, budget_s: float, commit: str | None):
        self.spec, self.out, self.budget_s = spec, out, budget_s
        self.start = time.perf_counter()
        self.work = Path(tempfile.mkdtemp(prefix="dtr-bench-gpu-"))
        self.report: dict[str, Any] = {"meta": run_meta(spec, commit), "skipped": {}, "errors": {}}
        self.headline: dict[str, TrainConfig] = {}  # model -> its config at the largest batch that fits
        macs = {model: forward_macs(dit_shape(bench_config(spec, self.work, model, 8).model)) for model in spec.models}
        self.macs = macs
        self.peak = device_peak_tflops(torch.device(spec.device))

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, section: Callable[[], Any], need_s: float) -> None:
        if self.left_s() < need_s:
            self.report["skipped"][name] = (f"time budget: {self.left_s():.0f} s left of {self.budget_s:.0f}, "
                                            f"needs ~{need_s:.0f}")
        else:
            began = time.perf_counter()
            try:
                self.report[name] = section()
            except Exception as err:  # one broken section must not cost the others' figures
                self.report["errors"][name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            finally:
                free_memory()
            self.report.setdefault("section_s", {})[name] = round(time.perf_counter() - began, 2)
        self.report["meta"]["wall_s"] = round(time.perf_counter() - self.start, 2)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / REPORT).write_text(json.dumps(self.report, indent=1))
        entries = calibration_entries(self.report, self.spec)
        (self.out / ENTRIES).write_text(yaml.safe_dump(entries, sort_keys=False, width=200))

    def mfu(self, model: str, images_per_s: float) -> float | None:
        return None if self.peak is None else model_flops_utilization(images_per_s, self.macs[model], self.peak)

    # sections ------------------------------------------------------------------

    def throughput(self) -> list[dict[str, Any]]:
        rows = []
        for model in self.spec.models:
            if rows and self.left_s() < 0.5 * self.budget_s:  # the largest model came first: keep time for the rest
                self.report["skipped"][f"throughput.{model}"] = f"time budget: {self.left_s():.0f} s left"
                continue
            cfg, dtr = largest_fitting(self.spec, self.work / "throughput", model)
            self.headline[model] = cfg
            none = time_training(replace(cfg, routing=replace(cfg.routing, kind="none")), self.spec,
                                 steps=self.spec.steps, warmup=self.spec.warmup)
            rows.append({
                "model": model, "model_key": model_key(cfg.model), "routing": "dtr", "weighting": "ant_uw",
                "switches": "bf16 + compile + tf32 + fused AdamW", **without_losses(dtr),
                "mfu": self.mfu(model, dtr["images_per_s"]),
                "routing_none": {**without_losses(none), "mfu": self.mfu(model, none["images_per_s"])},
                "dtr_overhead": dtr["step_ms"] / none["step_ms"] - 1,
            })
        return rows

    def largest(self) -> TrainConfig:
        model = self.spec.models[0]
        if model not in self.headline:  # throughput did not run: the smallest batch tried
            self.headline[model] = bench_config(self.spec, self.work / "throughput", model, self.spec.batches[-1])
        return self.headline[model]

    def parallel(self) -> dict[str, Any]:
        cfg = self.largest()
        out = {"model": cfg.model.name, "batch": cfg.global_batch_size}
        # DDP and FSDP2 wrap only inside a process group: one of this process alone
        with process_group(World(device=torch.device(cfg.device)), cfg.device, alone=True):
            for name in ("ddp", "fsdp"):
                run = replace(cfg, backend=replace(cfg.backend, name=name))
                timed = time_training(run, self.spec, steps=self.spec.steps, warmup=self.spec.warmup)
                out[name] = without_losses(timed)
        out["fsdp_vs_ddp_step_time"] = out["fsdp"]["step_ms"] / out["ddp"]["step_ms"]
        return out

    def activation_checkpointing(self) -> dict[str, Any]:
        cfg = self.largest()
        out = {"model": cfg.model.name, "batch": cfg.global_batch_size}
        for name, on in (("off", False), ("on", True)):
            run = replace(cfg, backend=replace(cfg.backend, activation_checkpointing=on))
            out[name] = without_losses(time_training(run, self.spec, steps=self.spec.steps, warmup=self.spec.warmup))
        out["on_vs_off_step_time"] = out["on"]["step_ms"] / out["off"]["step_ms"]
        return out

    def checkpoint(self) -> dict[str, Any]:
        cfg = self.largest()
        kept: list = []
        time_training(replace(cfg, backend=replace(cfg.backend, compile=False)), self.spec, steps=1, warmup=0,
                      compile=False, keep=kept)  # AdamW state exists after a step
        backend, root = kept[0], self.work / "checkpoint"
        synchronize(cfg.device)
        began = time.perf_counter()
        backend.save(root / "sync")
        sync_s = time.perf_counter() - began
        began = time.perf_counter()
        future = backend.save(root / "async", asynchronous=True)
        async_blocked_s = time.perf_counter() - began
        future.result()
        async_total_s = time.perf_counter() - began
        size = sum(p.stat().st_size for p in (root / "sync").rglob("*") if p.is_file())
        return {"model": cfg.model.name, "bytes": size, "sync_blocked_s": sync_s, "async_blocked_s": async_blocked_s,
                "async_total_s": async_total_s, "async_vs_sync_blocked": async_blocked_s / sync_s}

    def sampling(self) -> dict[str, Any]:
        from dtr_scale.diffusion.sampling import guided_model_fn
        from dtr_scale.train.components import build_diffusion, build_model

        cfg = bench_config(self.spec, self.work / "sampling", self.spec.models[0], self.spec.batches[-1])
        device = torch.device(cfg.device)
        model = build_model(cfg).to(device).eval()
        diffusion = build_diffusion(cfg).respaced(cfg.diffusion.sampling_steps)
        labels = torch.randint(0, cfg.model.num_classes, (self.spec.sample_batch,), device=device)
        model_fn, copies = guided_model_fn(model, labels, cfg.diffusion.cfg_scale)
        shape = (copies * len(labels), cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        x = torch.randn(shape, device=device)

        def one_step(i: int) -> None:
            nonlocal x
            t = torch.full((len(x),), diffusion.num_timesteps - 1 - i, device=device, dtype=torch.long)
            x = diffusion.p_sample(model_fn, x, t, torch.randn_like(x))

        with torch.no_grad():
            one_step(0)  # warm-up
            synchronize(cfg.device)
            began = time.perf_counter()
            for i in range(1, 1 + self.spec.sample_steps):
                one_step(i)
            synchronize(cfg.device)
        per_step = (time.perf_counter() - began) / self.spec.sample_steps
        images_per_s = len(labels) / (per_step * diffusion.num_timesteps)
        tf32 = cfg.device == "cuda" and torch.backends.cuda.matmul.allow_tf32
        return {"model": cfg.model.name, "sampler": f"ddpm-{diffusion.num_timesteps}",
                "cfg_scale": cfg.diffusion.cfg_scale,
                "batch": len(labels), "precision": "fp32 (TF32 matmuls)" if tf32 else "fp32",
                "steps_timed": self.spec.sample_steps,
                "step_s": per_step, "images_per_s": images_per_s,
                "eval_50k_hours": EVAL_SAMPLES / images_per_s / 3600}

    def correctness(self) -> dict[str, Any]:
        out = {"bf16_vs_fp32": self.bf16_vs_fp32(), "compile_vs_eager": self.compile_vs_eager()}
        if self.spec.device == "cuda":
            out["no_host_sync"] = self.no_host_sync()
        else:
            self.report["skipped"]["correctness.no_host_sync"] = "needs CUDA (torch.cuda.set_sync_debug_mode)"
        out["resume"] = self.resume()
        return out

    def bf16_vs_fp32(self) -> dict[str, Any]:
        cfg = bench_config(self.spec, self.work / "bf16", self.spec.models[0], self.spec.batches[-1], compile=False)
        losses = {}
        for precision in ("fp32", "bf16"):
            run = replace(cfg, backend=replace(cfg.backend, precision=precision, tf32=False))
            losses[precision] = time_training(run, self.spec, steps=3, warmup=0, compile=False)["losses"]
        diff = max(abs(b - a) / abs(a) for a, b in zip(losses["fp32"], losses["bf16"]))
        return {"model": cfg.model.name, **losses, "max_relative_difference": diff, "tolerance": BF16_TOLERANCE,
                "ok": diff <= BF16_TOLERANCE}

    def compile_vs_eager(self) -> dict[str, Any]:
        cfg = bench_config(self.spec, self.work / "compile", self.spec.check_model, self.spec.check_batch,
                           precision="fp32")
        cfg = replace(cfg, backend=replace(cfg.backend, tf32=False))
        eager = time_training(replace(cfg, backend=replace(cfg.backend, compile=False)), self.spec, steps=5, warmup=0,
                              compile=False)["losses"]
        compiled = time_training(cfg, self.spec, steps=5, warmup=0)["losses"]
        diff = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
        return {"model": cfg.model.name, "eager": eager, "compiled": compiled,
                "compile_backend": self.spec.compile_backend,
                "max_relative_difference": diff, "tolerance": COMPILE_TOLERANCE, "equal": diff <= COMPILE_TOLERANCE}

    def loop_config(self, name: str, steps: int, **kwargs: Any) -> TrainConfig:
        return bench_config(self.spec, self.work / name, self.spec.check_model, self.spec.check_batch, steps=steps,
                            compile=not self.spec.smoke, phema=True, **kwargs)

    def no_host_sync(self) -> dict[str, Any]:
        """The training loop between two log steps under torch.cuda.set_sync_debug_mode("error"):
        steps 2..21 (after the first steps' one-time work), logged at 0 and 23."""
        from dtr_scale.train.loop import train

        first, last = 2, 2 + SYNC_FREE_STEPS
        cfg = self.loop_config("sync", steps=last + 1, log_every=last + 1)
        polls = {"n": 0}

        def guard() -> bool:  # polled before every step (one process): switches the debug mode
            step = polls["n"]
            polls["n"] += 1
            torch.cuda.set_sync_debug_mode("error" if first <= step < last else "default")
            return False

        try:
            train(cfg, stop_requested=guard)
            return {"steps": SYNC_FREE_STEPS, "ok": True}
        except RuntimeError as err:
            return {"steps": SYNC_FREE_STEPS, "ok": False, "error": str(err).splitlines()[0], "at_step": polls["n"] - 1}
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def resume(self) -> dict[str, Any]:
        """The training loop stopped after step 5 and resumed to 10 equals a straight run to 10, bitwise."""
        from dtr_scale.train.loop import train
        from dtr_scale.train.metrics import read_metrics

        stop_at, steps = self.spec.resume
        straight = self.loop_config("resume_straight", steps=steps, log_every=1, checkpoint_every=stop_at)
        split = self.loop_config("resume_split", steps=steps, log_every=1, checkpoint_every=stop_at)
        train(straight)
        polls = {"n": 0}

        def stop_after() -> bool:  # polled before every step (one process)
            polls["n"] += 1
            return polls["n"] > stop_at

        stopped = train(split, stop_requested=stop_after)
        train(split)
        a, b = final_state(straight), final_state(split)
        weights_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        losses = [[r["loss"] for r in read_metrics(c.run_dir)] for c in (straight, split)]
        return {"model": straight.model.name, "stopped_at": stopped.step, "steps": steps,
                "losses_equal": losses[0] == losses[1], "weights_equal": weights_equal,
                "equal": weights_equal and losses[0] == losses[1]}


def without_losses(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "losses"}


def final_state(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Model and EMA tensors of the run's latest checkpoint, by name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from dtr_scale.train.checkpoint import latest_checkpoint

    out = Path(cfg.run_dir) / "final.pt"
    dcp_to_torch_save(latest_checkpoint(cfg.run_dir), out)
    state = torch.load(out, weights_only=True)
    return {f"{part}.{k}": v for part in ("module", "ema") for k, v in state[part].items()}


# ---------------------------------------------------------------------------- report


def run_meta(spec: Spec, commit: str | None) -> dict[str, Any]:
    device_name = torch.cuda.get_device_name() if spec.device == "cuda" else "cpu"
    git = git_state()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": spec.device,
            "device_name": device_name,
            "gpu_type": "cpu" if spec.device == "cpu" else gpu_type_of_device(device_name),
            "bf16_peak_tflops": device_peak_tflops(torch.device(spec.device)),
            "torch": str(torch.__version__), "commit": commit or git["commit"],
            "uncommitted_changes": None if commit else git["dirty"], "smoke": spec.smoke}


def calibration_entries(report: dict[str, Any], spec: Spec) -> list[dict[str, Any]]:
    """The throughput rows as calibration.yaml `throughput` entries, marked measured."""
    meta = report["meta"]
    entries = []
    for row in report.get("throughput", []):
        precision = "bf16"
        command = "dtr-bench gpu --smoke" if spec.smoke else "dtr-bench gpu"
        source = (f"measured on {meta['device_name']}, {meta['date']}: {command}, "
                  f"DTR + ANT-UW at per-GPU batch {row['batch']}, {row['switches']}, torch {meta['torch']}, "
                  f"commit {meta['commit'] or 'unknown'}")
        entries.append({"gpu": meta["gpu_type"] or f"unknown ({meta['device_name']}: add it to dtr_scale/hardware.py)",
                        "model": row["model_key"], "precision": precision, "compile": True,
                        "images_per_s": round(row["images_per_s"], 1), "source": source,
                        "measured": {"date": meta["date"], "device_name": meta["device_name"], "torch": meta["torch"],
                                     "commit": meta["commit"], "batch": row["batch"], "mfu": row["mfu"],
                                     "peak_memory_gib": row["peak_memory_gib"]}})
    return entries


def run(spec: Spec, out: Path, budget_s: float, commit: str | None = None) -> dict[str, Any]:
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dtr-bench gpu: no CUDA device here; run it on a GPU machine, or --smoke on a CPU")
    bench = Bench(spec, out, budget_s, commit)
    scale = 0.02 if spec.smoke else 1.0  # rough seconds each section needs, for the budget
    try:
        bench.run("throughput", bench.throughput, 150 * scale)
        bench.run("correctness", bench.correctness, 60 * scale)
        bench.run("checkpoint", bench.checkpoint, 45 * scale)
        bench.run("sampling", bench.sampling, 20 * scale)
        bench.run("activation_checkpointing", bench.activation_checkpointing, 40 * scale)
        bench.run("parallel", bench.parallel, 40 * scale)
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)  # checkpoints of DiT-XL/2: tens of GB
    return bench.report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dtr-bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-gpu", help="directory for gpu_report.json and calibration_entries.yaml")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="seconds the whole run may take; sections that would not fit are skipped")
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU with a tiny DiT")
    parser.add_argument("--commit", default=None,
                        help="the commit measured, for a copy of the checkout without .git (default: git's)")
    args = parser.parse_args(argv)
    spec = SMOKE_SPEC if args.smoke else GPU_SPEC
    report = run(spec, Path(args.out), args.budget_s, args.commit)
    print(json.dumps({k: report[k] for k in ("meta", "skipped", "errors")}, indent=1))
    print(f"report: {Path(args.out) / REPORT}; calibration entries: {Path(args.out) / ENTRIES}")


if __name__ == "__main__":
    main()
