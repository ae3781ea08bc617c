"""Class-conditional samples to files: resumable, splittable across ranks and jobs, bit for bit.

Sample i has its label (i % num_classes, or row i of one seeded random draw) and
its own noise generator, seeded by (seed, i). Indices are cut into fixed chunks;
a chunk is sampled, decoded to images and written atomically as one file. A
preempted or re-split job skips the chunks already on disk, so every index is
sampled exactly once and the images do not depend on who sampled them. Rank r of
w takes chunks r, r + w, ...; rank 0 merges them into the ADM `.npz`
(arr_0 uint8 [N, H, W, 3], arr_1 labels) and an image grid.

    FOLDER/spec.json            the SampleSpec the chunks belong to
    FOLDER/chunk-000003.npz     images, labels, indices of chunk 3
    FOLDER/samples.npz          the merged ADM batch (the chunks are removed then)
    FOLDER/grid.png             one class per column (for small class counts)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dtr_scale.rng import step_seed
from dtr_scale.diffusion.gaussian import GaussianDiffusion
from dtr_scale.diffusion.sampling import Noise, sample_latents
from dtr_scale.eval.grids import labelled_grid, save_png
from dtr_scale.eval.settings import SampleSpec
from dtr_scale.io import atomic_write, atomic_write_json, read_json
from dtr_scale.world import World

SPEC_FILE = "spec.json"
SAMPLES_NPZ = "samples.npz"
GRID_PNG = "grid.png"
RANDOM_LABELS_STREAM = 1  # seed key of the random-label draw; per-index noise seeds use (seed, i)
GRID_MAX_CLASSES = 16  # up to this many classes the grid has one column per class
GRID_ROWS = 8

Decoder = Callable[[torch.Tensor], torch.Tensor]  # latents [N, C, h, w] -> uint8 images [N, H, W, 3]
log = logging.getLogger(__name__)


class SampleFolderError(RuntimeError):
    """A samples folder that belongs to other settings, or lacks chunks; the message says what to do."""


def class_labels(spec: SampleSpec, indices: np.ndarray) -> np.ndarray:
    """The label of each sample index: balanced i % K, classes[i % len(classes)], or entry i of
    one seeded draw for all N (DiT's sample_ddp draws random labels), so a label never depends
    on the split."""
    if spec.labels == "balanced":
        return (np.asarray(indices) % spec.num_classes).astype(np.int64)
    if spec.labels == "classes":
        return np.asarray(spec.classes, dtype=np.int64)[np.asarray(indices) % len(spec.classes)]
    generator = torch.Generator().manual_seed(step_seed(spec.seed, RANDOM_LABELS_STREAM))
    return torch.randint(spec.num_classes, (spec.num_samples,), generator=generator).numpy()[indices]


def indexed_noise(seed: int, indices: np.ndarray) -> Noise:
    """Noise whose row k comes from sample indices[k]'s own generator, seeded by (seed, i):
    sample i's noise is the same in any batch."""
    generators = [torch.Generator().manual_seed(step_seed(seed, int(i))) for i in indices]
    return lambda size: torch.stack([torch.randn(size[1:], generator=g) for g in generators])


def sample_indexed_latents(model: torch.nn.Module, diffusion: GaussianDiffusion, spec: SampleSpec,
                           indices: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Latents [n, *latent_shape] of the samples `indices`, by running the respaced `diffusion`
    backwards with classifier-free guidance; every draw comes from the sample's own generator."""
    labels = torch.from_numpy(class_labels(spec, indices)).to(device)
    return sample_latents(model, diffusion, labels, shape=spec.latent_shape, cfg_scale=spec.cfg_scale,
                          guided_channels=spec.guided_channels, sampler=spec.sampler, eta=spec.ddim_eta,
                          noise=indexed_noise(spec.seed, indices))


def chunk_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:06d}.npz"


def rank_chunks(num_chunks: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_chunks, world_size))


def missing_chunks(folder: Path, spec: SampleSpec) -> list[int]:
    return [c for c in range(spec.num_chunks) if not chunk_path(folder, c).exists()]


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    # a killed writer leaves a stray tmp file, never a short npz under the real name
    atomic_write(path, lambda f: np.savez(f, **arrays))


def open_sample_folder(folder: str | Path, spec: SampleSpec) -> Path:
    """Create `folder` for `spec`, or check that it already holds samples of `spec`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SPEC_FILE
    if path.exists():
        found = read_json(path)
        if found != spec.to_json():
            raise SampleFolderError(f"{folder} holds samples of other settings ({found}, not {spec.to_json()}); "
                                    "delete it or sample into another folder")
        return folder
    atomic_write_json(path, spec.to_json())  # ranks starting together write the same text
    return folder


def generate_chunks(model: torch.nn.Module, diffusion: GaussianDiffusion, spec: SampleSpec, folder: str | Path,
                    decode: Decoder, *, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                    max_chunks: int | None = None, progress: bool = False) -> list[int]:
    """Sample, decode and write this rank's chunks (rank, rank + world_size, ...) that are not on
    disk yet; `max_chunks` stops after that many (a job cut short). Returns the chunks written."""
    folder = open_sample_folder(folder, spec)
    todo = [c for c in rank_chunks(spec.num_chunks, rank, world_size) if not chunk_path(folder, c).exists()]
    todo = todo[:max_chunks] if max_chunks is not None else todo
    model = model.to(device).eval()
    start = time.perf_counter()
    for chunk in tqdm(todo, desc=f"sampling {spec.weights} (rank {rank})", disable=None if progress else True):
        if (folder / SAMPLES_NPZ).exists():  # merged by another evaluator meanwhile: its chunks are all there
            break
        indices = spec.chunk_indices(chunk)
        images = decode(sample_indexed_latents(model, diffusion, spec, indices, device)).cpu().numpy()
        write_npz_atomic(chunk_path(folder, chunk), images=images, labels=class_labels(spec, indices), indices=indices)
    if todo:
        seconds = time.perf_counter() - start
        count = sum(len(spec.chunk_indices(c)) for c in todo)
        log.info("rank %d sampled %d images in %d chunks (%.1f images/s) into %s", rank, count, len(todo),
                 count / seconds, folder)
    return todo


def wait_for_chunks(folder: str | Path, spec: SampleSpec, *, timeout_s: float, poll_s: float = 5.0) -> None:
    """Block until every chunk is on disk (the other ranks' too) or another evaluator has merged
    them into samples.npz (and removed them), or raise after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (missing := missing_chunks(Path(folder), spec)) and not (Path(folder) / SAMPLES_NPZ).exists():
        if time.monotonic() > deadline:
            raise SampleFolderError(f"{folder}: chunks {missing[:10]} (of {len(missing)} missing) did not appear "
                                    f"within {timeout_s:.0f} s; a rank may have died: run the evaluation again "
                                    "to sample them (finished chunks are kept)")
        time.sleep(poll_s)


def read_chunks(folder: str | Path, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 3], labels [N]) of all chunks, in index order."""
    folder = Path(folder)
    missing = missing_chunks(folder, spec)
    if missing:
        raise SampleFolderError(f"{folder} lacks chunks {missing[:10]} ({len(missing)} of {spec.num_chunks}); "
                                "run the sampling again to fill them in")
    images, labels = [], []
    for chunk in range(spec.num_chunks):
        with np.load(chunk_path(folder, chunk)) as data:
            if not np.array_equal(data["indices"], spec.chunk_indices(chunk)):
                raise SampleFolderError(f"{chunk_path(folder, chunk)} holds other indices than chunk {chunk} of "
                                        f"{spec.chunk_size}; delete the folder and sample again")
            images.append(data["images"])
            labels.append(data["labels"])
    return np.concatenate(images), np.concatenate(labels)


def grid_order(labels: np.ndarray, num_classes: int) -> list[int]:
    """Which samples the grid shows, row by row: for few classes the r-th sample of each class
    in column = class (-1 where a class has run out); otherwise the first rows x 8 samples."""
    if num_classes > GRID_MAX_CLASSES:
        return list(range(min(len(labels), GRID_ROWS * 8)))
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    rows = min(GRID_ROWS, max(len(members) for members in by_class))
    return [int(by_class[c][r]) if r < len(by_class[c]) else -1 for r in range(rows) for c in range(num_classes)]


def write_grid(path: str | Path, images: np.ndarray, labels: np.ndarray, num_classes: int) -> Path:
    """The samples in grid_order, enlarged (nearest-neighbour) and captioned by class."""
    columns = num_classes if num_classes <= GRID_MAX_CLASSES else 8
    image, _ = labelled_grid(images, labels, grid_order(labels, num_classes), columns)
    return save_png(image, path)


def merge_samples(folder: str | Path, spec: SampleSpec, *, keep_chunks: bool = False) -> Path:
    """Merge the chunks into FOLDER/samples.npz (ADM: arr_0 uint8 [N, H, W, 3], arr_1 labels) and
    FOLDER/grid.png; the chunks are removed afterwards unless keep_chunks. Idempotent."""
    folder = open_sample_folder(folder, spec)
    npz = folder / SAMPLES_NPZ
    if npz.exists():
        return npz
    images, labels = read_chunks(folder, spec)
    write_grid(folder / GRID_PNG, images, labels, spec.num_classes)
    write_npz_atomic(npz, arr_0=images, arr_1=labels)
    if not keep_chunks:
        for chunk in range(spec.num_chunks):
            chunk_path(folder, chunk).unlink(missing_ok=True)
    for stray in folder.glob(".chunk-*.tmp-*"):  # left by writers killed mid-chunk
        stray.unlink(missing_ok=True)
    log.info("merged %d samples into %s", len(images), npz)
    return npz


def load_samples(npz: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(arr_0 images, arr_1 labels) of an ADM sample batch."""
    with np.load(npz) as data:
        return data["arr_0"], data["arr_1"]


def generate_samples(model: torch.nn.Module, diffusion: GaussianDiffusion, spec: SampleSpec, folder: str | Path,
                     decode: Decoder, *, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                     wait_timeout_s: float = 6 * 3600.0, progress: bool = False) -> Path | None:
    """This rank's chunks, then on rank 0 (after the other ranks' chunks are on disk) the merged
    samples.npz, whose path is returned; other ranks return None. Already merged: nothing to do."""
    npz = Path(folder) / SAMPLES_NPZ
    if npz.exists():
        open_sample_folder(folder, spec)
        return npz if rank == 0 else None
    generate_chunks(model, diffusion, spec, folder, decode, rank=rank, world_size=world_size, device=device,
                    progress=progress)
    if rank != 0:
        return None
    wait_for_chunks(folder, spec, timeout_s=wait_timeout_s)
    return merge_samples(folder, spec)


def distributed_position(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else this process's place (RANK / WORLD_SIZE)."""
    here = World.from_env() if rank is None or world_size is None else None
    place = World(rank=here.rank if rank is None else rank, size=here.size if world_size is None else world_size)
    return place.rank, place.size
