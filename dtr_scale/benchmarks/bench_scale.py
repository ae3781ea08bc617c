"""`dtr-bench scale`: the data path, the start-up and the requeue rehearsed at ImageNet's size, in one run.

    dtr-bench scale --fraction 0.05 --out /scratch/scale      # 64,058 images, ~2.1 GB of shards
    dtr-bench scale --fraction 1 --out /scratch/scale         # the real counts: ~42 GB, ~10 min of prep on 2 cores

A synthetic latent dataset with ImageNet's shape and counts (1,281,167 images x `fraction`, 1,000 classes,
4 x 32 x 32 latents of the image and its flip, fp16 posterior mean and std) is written through the project's
own prep (`prepare` + `merge`: chunk writers, per-sample hashes, verified mark, manifest). The images are
made on the fly (a seeded 64 x 64 RGB image per index) and encoded by the pixel autoencoder, whose 64 px
latent has the SD-VAE's 256 px shape. Measured:

    prep      chunks (shards) written per second; bytes on disk against the planner's estimate (plan/storage.py)
    loader    samples/s per process and per loader worker at each world size (processes on this machine,
              integrity checks on), and the bytes one start reads against the bytes its batches hold; then
              world 1 again with the dataset's pages evicted from the page cache first (every read from disk)
    startup   seconds from `python` starting to the first batch: cold (no verified mark: the one full hash)
              and after a requeue (the mark kept)
    requeue   the real model (default DiT-L/2) with AdamW, fp32 on the CPU: a torch.distributed.checkpoint
              async save, a load into a fresh process, the first step after it (one AdamW step on a batch of
              2) against a step before the save, peak host memory; and the time to read the checkpoint's
              bytes into memory, which a load cannot beat

The report goes to OUT/scale_report.json and is printed. Figures are measured, never asserted: on a busy
machine they are lower bounds on what idle cores give.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np

from dtr_scale.benchmarks.bench_data import NoisyPixelAutoencoder
from dtr_scale.config import ConfigError
from dtr_scale.data.integrity import MARK_NAME
from dtr_scale.data.shard_format import read_manifest
from dtr_scale.data_prep.merge import merge
from dtr_scale.data_prep.prepare import PrepSettings, prepare
from dtr_scale.data_prep.sources import ArraySource
from dtr_scale.extras import import_extra
from dtr_scale.plan.storage import IMAGENET_TRAIN_IMAGES, latent_shard_bytes

NUM_CLASSES = 1000
RESOLUTION = 64  # the pixel autoencoder's 64 px latent is 4 x 32 x 32, the SD-VAE's at 256 px
LATENT = (4, 32, 32)
REPORT_NAME = "scale_report.json"
TARGETS = {"bytes_read_per_start_ratio": 1.1, "startup_s": 30.0, "loader_samples_per_s_2_workers": 10_000,
           "load_over_read_ratio": 2.0}


class SyntheticImages:
    """uint8 [n, 64, 64, 3] made per index on demand (never all in memory: 16 GB at full size)."""

    ndim, dtype = 4, np.dtype(np.uint8)

    def __init__(self, count: int) -> None:
        self.shape = (count, RESOLUTION, RESOLUTION, 3)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        return np.random.default_rng(i).integers(0, 256, self.shape[1:], dtype=np.uint8)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def bench_prep(path: str, num_images: int, shard_size: int) -> dict:
    labels = np.arange(num_images) % NUM_CLASSES
    source = ArraySource("scale", SyntheticImages(num_images), labels, [f"n{c:08d}" for c in range(NUM_CLASSES)])
    started = time.perf_counter()
    prepare(source, path, NoisyPixelAutoencoder(), PrepSettings(resolution=RESOLUTION, shard_size=shard_size),
            batch_size=256, progress=False)
    manifest = merge(path)
    seconds = time.perf_counter() - started
    chunks = math.ceil(num_images / shard_size)
    estimate = latent_shard_bytes(num_images, LATENT[0], LATENT[1], 2)
    on_disk = dir_bytes(path)
    return {"images": num_images, "samples": manifest["num_samples"], "classes": manifest["num_classes"],
            "stored_shape": manifest["stored_shape"], "dtype": manifest["dtype"], "chunks": chunks,
            "shards": len(manifest["shards"]), "seconds": seconds, "shards_per_s": len(manifest["shards"]) / seconds,
            "images_per_s": num_images / seconds, "bytes_on_disk": on_disk, "planner_estimate_bytes": estimate,
            "on_disk_over_estimate": on_disk / estimate}


def read_chars(process) -> int:
    """Bytes this process and its live children (loader workers) asked the kernel for (page cache included)."""
    return sum(p.io_counters().read_chars for p in [process, *process.children(recursive=True)])


def cpu_seconds(process) -> float:
    """CPU time of this process and its live children (user + system)."""
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def loader_process(path: str, rank: int, world: int, workers: int, batch: int, steps: int, results) -> None:
    """One rank: build the loader, read `steps` batches after a warm-up, report rate and bytes read."""
    import streaming  # noqa: F401  imported before the count starts: its modules' files are not the dataset's bytes
    import torch

    from dtr_scale.data.loader import build_shard_loader

    torch.set_num_threads(1)
    me = import_extra("psutil").Process()
    before = read_chars(me)
    loader = build_shard_loader(path, format="mds", global_batch_size=batch, rank=rank, world_size=world, seed=0,
                                num_workers=workers)
    warmup = 2 * max(workers, 1)  # start the workers, fill their prefetch queues
    for _ in range(warmup):
        next(loader)
    started, cpu_started = time.perf_counter(), cpu_seconds(me)
    for _ in range(steps):
        next(loader)
    seconds, cpu = time.perf_counter() - started, cpu_seconds(me) - cpu_started
    read = read_chars(me) - before
    loader.close()
    samples = steps * batch // world
    results.put({"rank": rank, "samples_per_s": samples / seconds, "cpu_us_per_sample": cpu / samples * 1e6,
                 "bytes_read": read, "steps_read": warmup + steps})


def evict(path: str) -> None:
    """Drop the dataset's pages from the page cache (clean pages; no privileges needed), as on a node whose
    memory holds less than the dataset."""
    for directory, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def loader_run(path: str, world: int, workers: int, batch: int, steps: int, record: float) -> dict:
    """One start of `world` loader processes, measured."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = [context.Process(target=loader_process, args=(path, r, world, workers, batch, steps, results))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = sorted((results.get(timeout=1800) for _ in procs), key=lambda row: row["rank"])
    for p in procs:
        p.join()
    per_process = [row["samples_per_s"] for row in rows]
    # What the batches hold, with the read-ahead the workers may have done (2 batches each, torch's default).
    held = [(row["steps_read"] + 2 * workers) * batch // world * record for row in rows]
    return {"samples_per_s_total": sum(per_process), "samples_per_s_per_process": float(np.mean(per_process)),
            "samples_per_s_per_worker": float(np.mean(per_process)) / max(workers, 1),
            # On a busy machine the wall clock understates the loader; its CPU time per sample does not.
            "cpu_us_per_sample": float(np.mean([row["cpu_us_per_sample"] for row in rows])),
            "bytes_read_per_start": float(np.mean([row["bytes_read"] for row in rows])),
            "bytes_read_over_bytes_used": float(np.mean([row["bytes_read"] / h for row, h in zip(rows, held)]))}


def bench_loader(path: str, worlds: list[int], workers: int, batch: int, steps: int) -> dict:
    manifest = read_manifest(path)
    record = sum(e["bytes"] for e in manifest["shards"]) / manifest["num_samples"]  # an MDS sample, with framing
    out = {"workers": workers, "global_batch": batch, "steps": steps, "sample_record_bytes": record,
           "by_world": {str(world): loader_run(path, world, workers, batch, steps, record) for world in worlds}}
    evict(path)
    out["evicted_world_1"] = loader_run(path, 1, workers, batch, steps, record)
    return out


STARTUP = textwrap.dedent("""
    import sys, time
    from dtr_scale.data.loader import build_shard_loader
    loader = build_shard_loader(sys.argv[1], format="mds", global_batch_size=256, rank=0, world_size=1, seed=0,
                                num_workers=int(sys.argv[2]))
    next(loader)
    print(time.time())
""")


def start_to_first_batch(path: str, workers: int) -> float:
    started = time.time()
    done = subprocess.run([sys.executable, "-c", STARTUP, path, str(workers)], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split()[-1]) - started


def bench_startup(path: str, workers: int) -> dict:
    os.remove(os.path.join(path, MARK_NAME))  # as on a copy of the dataset, or a dataset version never read here
    cold = start_to_first_batch(path, workers)
    return {"workers": workers, "cold_s": cold, "requeue_s": start_to_first_batch(path, workers)}


REQUEUE = textwrap.dedent("""
    import json, os, resource, sys, time
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from dtr_scale.models import create_model

    name, directory, phase = sys.argv[1:4]
    torch.manual_seed(0)
    model = create_model(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), torch.tensor([1, 2])

    def step():
        started = time.perf_counter()
        model(x, t, y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    out = {"params": sum(p.numel() for p in model.parameters())}
    if phase == "save":
        out["step_s"] = step()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        started = time.perf_counter()
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
        out["save_blocking_s"] = time.perf_counter() - started
        future.result()
        out["save_s"] = time.perf_counter() - started
        out["checksum"] = float(sum(p.double().sum() for p in model.parameters()))
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        started = time.perf_counter()
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        out["load_s"] = time.perf_counter() - started
        out["checksum"] = float(sum(p.double().sum() for p in model.parameters()))
        out["first_step_s"] = step()
        out["load_to_first_step_s"] = out["load_s"] + out["first_step_s"]
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
""")


def requeue_phase(model: str, directory: str, phase: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # DCP warns that it runs without a process group
    done = subprocess.run([sys.executable, "-c", REQUEUE, model, directory, phase], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the requeue rehearsal's {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def read_seconds(directory: str) -> float:
    """Seconds to read every byte of the checkpoint into fresh memory: the floor for any load, which must
    do at least that (the pages of a fresh buffer cost as much to fault in as the copy)."""
    started = time.perf_counter()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        with open(path, "rb", buffering=0) as f:
            f.readinto(bytearray(os.path.getsize(path)))
    return time.perf_counter() - started


def bench_requeue(model: str, directory: str) -> dict:
    saved = requeue_phase(model, directory, "save")
    loaded = requeue_phase(model, directory, "load")
    if saved["checksum"] != loaded["checksum"]:
        raise RuntimeError(f"the loaded {model} differs from the saved one ({loaded['checksum']} != "
                           f"{saved['checksum']}): the checkpoint round trip is broken")
    reading = read_seconds(directory)
    return {"model": model, "params": saved["params"], "checkpoint_bytes": dir_bytes(directory),
            "step_s": saved["step_s"], "save_blocking_s": saved["save_blocking_s"], "save_s": saved["save_s"],
            "load_s": loaded["load_s"], "first_step_after_load_s": loaded["first_step_s"],
            "first_step_over_step_before_save": loaded["first_step_s"] / saved["step_s"],
            "read_bytes_s": reading, "load_over_read_ratio": loaded["load_s"] / reading,
            "peak_rss_bytes": max(saved["peak_rss_bytes"], loaded["peak_rss_bytes"]),
            "peak_rss_save_bytes": saved["peak_rss_bytes"], "peak_rss_load_bytes": loaded["peak_rss_bytes"]}


def prepare_out_dir(out: str) -> None:
    """OUT is new, empty, or an earlier scale run's (whose data and checkpoint are replaced)."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, REPORT_NAME)):
        raise ConfigError(f"--out {out} is not empty and holds no {REPORT_NAME} of an earlier run; give a new or "
                          "empty directory (the benchmark writes gigabytes there and replaces its own files)")
    for name in ("data", "checkpoint"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(out, exist_ok=True)


def per_core(row: dict) -> str:
    """Samples/s one idle core would give; '-' where a run too short for the CPU clock's 10 ms ticks
    measured no CPU time."""
    return f"{1e6 / row['cpu_us_per_sample']:,.0f}" if row["cpu_us_per_sample"] > 0 else "-"


def summary(report: dict) -> list[str]:
    prep, loader, startup = report["prep"], report["loader"], report["startup"]
    lines = [f"prep      {prep['images']:,} images -> {prep['shards']} shards in {prep['seconds']:.0f} s "
             f"({prep['shards_per_s']:.2f} shards/s, {prep['images_per_s']:,.0f} images/s); on disk "
             f"{prep['bytes_on_disk'] / 1e9:.2f} GB = {prep['on_disk_over_estimate']:.3f} x the planner's "
             f"{prep['planner_estimate_bytes'] / 1e9:.2f} GB"]
    runs = [(f"world {world}", row) for world, row in loader["by_world"].items()]
    for name, row in [*runs, ("world 1, from disk (pages evicted)", loader["evicted_world_1"])]:
        lines.append(f"loader    {name}: {row['samples_per_s_total']:,.0f} samples/s in all, "
                     f"{row['samples_per_s_per_process']:,.0f} per process, {row['samples_per_s_per_worker']:,.0f} "
                     f"per worker ({loader['workers']} each); "
                     f"{row['cpu_us_per_sample']:.0f} CPU-us/sample (idle cores: {per_core(row)} samples/s "
                     "each); a start read "
                     f"{row['bytes_read_per_start'] / 1e6:,.1f} MB = {row['bytes_read_over_bytes_used']:.3f} x its "
                     "batches' bytes")
    lines.append(f"startup   to the first batch: cold {startup['cold_s']:.1f} s, after a requeue "
                 f"{startup['requeue_s']:.1f} s")
    if "requeue" in report:
        r = report["requeue"]
        lines.append(f"requeue   {r['model']} ({r['params'] / 1e6:.0f}M params, {r['checkpoint_bytes'] / 1e9:.2f} GB): "
                     f"async save {r['save_s']:.1f} s ({r['save_blocking_s']:.1f} s blocking), load {r['load_s']:.1f} s "
                     f"= {r['load_over_read_ratio']:.2f} x reading its bytes ({r['read_bytes_s']:.1f} s), first step "
                     f"after it {r['first_step_after_load_s']:.1f} s = {r['first_step_over_step_before_save']:.2f} x a "
                     f"step before the save; peak host memory {r['peak_rss_bytes'] / 2**30:.1f} GiB")
    return lines


def world_sizes(text: str) -> list[int]:
    """--world-sizes: positive integers, comma-separated (a bad one is a usage error, exit 2)."""
    try:
        worlds = [int(w) for w in text.split(",")]
    except ValueError:
        worlds = []
    if not worlds or min(worlds) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (1,2,8), got {text!r}")
    return worlds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dtr-bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=1.0, help="of ImageNet's 1,281,167 images (default 1)")
    parser.add_argument("--out", required=True, help="working directory: the dataset, the checkpoint, the report")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per chunk (prep's default)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers per process")
    parser.add_argument("--world-sizes", type=world_sizes, default="1,2,8",
                        help="loader processes on this machine, comma-separated")
    parser.add_argument("--batch", type=int, default=256, help="global batch (the paper's)")
    parser.add_argument("--steps", type=int, default=40, help="timed loader steps per world size")
    parser.add_argument("--model", default="DiT-L/2", help="the requeue rehearsal's model; 'none' skips it")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    logging.basicConfig(level=logging.WARNING)
    prepare_out_dir(args.out)
    data = os.path.join(args.out, "data")
    num_images = max(1, round(IMAGENET_TRAIN_IMAGES * args.fraction))
    report = {"fraction": args.fraction, "cpu_count": os.cpu_count(), "targets": TARGETS,
              "prep": bench_prep(data, num_images, args.shard_size)}
    report["loader"] = bench_loader(data, args.world_sizes, args.workers, args.batch, args.steps)
    report["startup"] = bench_startup(data, args.workers)
    if args.model != "none":
        report["requeue"] = bench_requeue(args.model, os.path.join(args.out, "checkpoint"))
    with open(os.path.join(args.out, REPORT_NAME), "w") as f:
        json.dump(report, f, indent=1)
    print("\n".join(summary(report)))
    print(f"report: {os.path.join(args.out, REPORT_NAME)}")


if __name__ == "__main__":
    main()
