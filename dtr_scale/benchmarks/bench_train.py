"""The training loop's costs on this CPU, each measured within one run of this script.

    python -m dtr_scale.benchmarks.bench_train [--depth 4] [--hidden-size 384] [--input-size 16] [--batch 16] [--out FILE]
    dtr-bench train [same options]

(a) backends: step time (data + forward/backward + optimizer, from the loop's StepTimer)
    of ddp, fsdp and DeepSpeed ZeRO 1/2/3 on 2 gloo processes relative to ddp, median and
    best. All of them run one after another inside the same two processes, in rounds, so
    machine noise hits every backend alike; other processes' load only adds time, so the
    best is the steadier figure on a shared machine.
(b) checkpoints (ddp, same processes): the time the loop is blocked inside
    CheckpointManager.save per checkpoint with checkpoint.async_save=true relative to a
    synchronous save, and the loop's wall time over the same steps (a background write
    competes with training for the CPU).
(c) resume: wall time from spawning a fresh python process to the end of its first
    training step, resuming from a checkpoint and starting fresh, in parts: interpreter
    start, imports, setup (model, backend, loader), checkpoint load, first step.
(d) weightings: mean step time of ant_nash and pcgrad relative to ant_uw (ddp, same
    processes), over 25 steps, so ANT-Nash's solve (every 25 steps) is counted once.

The model is DiT-S/2 with DTR and ANT-UW, shrunk by the options; data are synthetic
latents. Figures are printed (and written as JSON with --out), never asserted.
"""

from __future__ import annotations

# Only the standard library at import time: the resume child (c) imports this module
# first and times the imports of torch and dtr_scale itself.
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dtr_scale.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {
    "ddp": {"name": "ddp"},
    "fsdp": {"name": "fsdp"},
    "zero1": {"name": "deepspeed", "zero_stage": 1},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    # partition even the small tensors, as ZeRO-3 does with a large model's
    "zero3": {"name": "deepspeed", "zero_stage": 3,
              "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
}
WORLD_SIZE = 2
WEIGHTINGS = ("ant_uw", "ant_nash", "pcgrad")
WEIGHTING_STEPS = 25  # ANT-Nash solves every 25 steps: one solve per timed window


def bench_config(args: argparse.Namespace, run_dir: Path, *, world_size: int, steps: int,
                 backend: dict | None = None, every: int = 10**9, async_save: bool = True,
                 weighting: str = "ant_uw") -> TrainConfig:
    """The benchmark's DiT, data and logging; one metrics record per step."""
    from dtr_scale.config import to_train_config

    return to_train_config({
        "model": {"name": "DiT-S/2", "input_size": args.input_size, "num_classes": 10, "depth": args.depth,
                  "hidden_size": args.hidden_size, "num_heads": args.heads},
        "routing": {"kind": "dtr"}, "weighting": {"kind": weighting},
        "data": {"kind": "synthetic", "num_samples": 4096},
        "backend": backend or {"name": "ddp"},
        "checkpoint": {"every": every, "async_save": async_save, "keep_last": 1},
        "logging": {"every": 1, "wandb": "disabled"},
        "run_dir": str(run_dir), "steps": steps, "global_batch_size": args.batch, "world_size": world_size,
        "phema_stds": [], "sample_at_end": 0,
    })


# --- (a) and (b): jobs in one pair of gloo processes -------------------------------------

def _jobs_worker(rank: int, configs: list[TrainConfig], port: int) -> None:
    """train() each config in turn on this rank, dropping each run's checkpoints after it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from dtr_scale.train.loop import train
    from dtr_scale.world import World, process_group

    torch.set_num_threads(1)  # 2 processes on 2 cores
    with process_group(World.from_env(), "cpu"):  # one group for all the runs; train() uses it
        for cfg in configs:
            train(cfg)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(Path(cfg.run_dir) / "checkpoints")  # a few hundred MB each otherwise


def run_jobs(configs: list[TrainConfig]) -> None:
    import torch.multiprocessing as mp

    from dtr_scale.train.local import free_port

    mp.spawn(_jobs_worker, args=(configs, free_port()), nprocs=WORLD_SIZE, join=True)


def compute_ms(record: dict) -> float:
    """One step's time without its checkpoint phase."""
    return (record["time_data_ms"] + record["time_forward_backward_ms"] + record["time_mtl_ms"]
            + record["time_optimizer_ms"])


def loop_ms(record: dict) -> float:
    return compute_ms(record) + record["time_checkpoint_ms"]


def blocked_per_save_ms(records: list[dict], every: int) -> list[float]:
    """Time blocked in each save but the last: the loop's final save is always synchronous."""
    saves = [r["checkpoint_blocked_s"] for r in records if r["step"] % every == 0]
    return [1e3 * (b - a) for a, b in zip([0.0, *saves], saves)][:-1]


def backend_figures(runs: dict[str, list[str]], warmup: int) -> dict[str, dict]:
    from dtr_scale.train.metrics import read_metrics

    step_ms = {name: [compute_ms(r) for d in dirs for r in read_metrics(d)[warmup:]] for name, dirs in runs.items()}
    median, best = statistics.median(step_ms["ddp"]), min(step_ms["ddp"])
    return {name: {"median_step_ms": statistics.median(t), "ratio_to_ddp": statistics.median(t) / median,
                   "best_step_ms": min(t), "best_ratio_to_ddp": min(t) / best, "step_ms_all": t}
            for name, t in step_ms.items()}


def weighting_figures(runs: dict[str, list[str]], warmup: int) -> dict[str, dict]:
    """Mean step time per weighting (a mean, not a median: ANT-Nash's one solve step counts)."""
    from dtr_scale.train.metrics import read_metrics

    step_ms = {name: [statistics.mean(compute_ms(r) for r in read_metrics(d)[warmup:]) for d in dirs]
               for name, dirs in runs.items()}
    base = statistics.mean(step_ms["ant_uw"])
    return {name: {"mean_step_ms": statistics.mean(t), "ratio_to_ant_uw": statistics.mean(t) / base,
                   "mean_step_ms_per_round": t} for name, t in step_ms.items()}


def checkpoint_figures(runs: dict[str, list[str]], every: int) -> dict[str, dict | float]:
    from dtr_scale.train.metrics import read_metrics

    out: dict[str, dict | float] = {}
    for mode, dirs in runs.items():
        records = [read_metrics(d) for d in dirs]
        blocked = [ms for r in records for ms in blocked_per_save_ms(r, every)]
        # every step and save of the run; the final synchronous save, after waiting for any
        # background write, ends both modes alike
        wall = [sum(loop_ms(x) for x in r) for r in records]
        out[mode] = {"blocked_ms_per_save": statistics.median(blocked), "blocked_ms_best": min(blocked),
                     "blocked_ms_all": blocked,
                     "loop_s": statistics.median(wall) / 1e3, "loop_s_all": [w / 1e3 for w in wall]}
    out["blocked_ratio"] = out["async"]["blocked_ms_per_save"] / out["sync"]["blocked_ms_per_save"]
    out["loop_ratio"] = out["async"]["loop_s"] / out["sync"]["loop_s"]
    return out


# --- (c): a fresh process to its first step -----------------------------------------------

class FirstStepDone(Exception):
    """Raised from the stop callback once the first step is complete, to leave train()."""


def first_step_child(spawned: float, started: float, config_path: str) -> None:
    """In the child: train until the first step is done; print the time stamps as one JSON line."""
    stamps = {"spawn": spawned, "python": started}
    from dtr_scale.train import loop
    from dtr_scale.train.checkpoint import CheckpointManager
    from dtr_scale.train.components import config_from_dict

    stamps["imports"] = time.time()
    load_latest = CheckpointManager.load_latest

    def timed_load_latest(self):
        stamps["setup"] = time.time()
        meta = load_latest(self)
        stamps["load"] = time.time()
        return meta

    polls = []

    def stop_after_first_step() -> bool:  # polled before every step
        polls.append(time.time())
        if len(polls) == 2:
            raise FirstStepDone
        return False

    CheckpointManager.load_latest = timed_load_latest
    try:
        loop.train(config_from_dict(json.loads(Path(config_path).read_text())), stop_requested=stop_after_first_step)
    except FirstStepDone:
        stamps["first_step"] = polls[-1]
    print(json.dumps(stamps))


def time_first_step(config_path: Path, threads: int) -> dict[str, float]:
    """Seconds from spawning a python process that trains `config_path` to its first step, in parts."""
    code = ("import sys, time; started = time.time(); from dtr_scale.benchmarks.bench_train import first_step_child; "
            "first_step_child(float(sys.argv[1]), started, sys.argv[2])")
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-c", code, repr(spawned), str(config_path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"the first-step child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stamps = json.loads(proc.stdout.strip().splitlines()[-1])
    order = ["spawn", "python", "imports", "setup", "load", "first_step"]
    parts = {later: stamps[later] - stamps[earlier] for earlier, later in zip(order, order[1:])}
    return {**parts, "total": stamps["first_step"] - stamps["spawn"]}


def resume_figures(args: argparse.Namespace, root: Path) -> dict[str, dict]:
    """Median parts over --resume-repeats children, resuming from a 1-process checkpoint and fresh."""
    from dtr_scale.train.components import config_to_dict
    from dtr_scale.train.local import stop_after
    from dtr_scale.train.loop import train

    resumed = bench_config(args, root / "resume", world_size=1, steps=10**6)
    train(resumed, stop_requested=stop_after(2))  # the checkpoint to resume from, at step 2
    configs = {"resume": resumed, "fresh": bench_config(args, root / "fresh", world_size=1, steps=10**6)}
    for name, cfg in configs.items():
        (root / f"{name}.json").write_text(json.dumps(config_to_dict(cfg)))
    runs = {name: [] for name in configs}
    for _ in range(args.resume_repeats):  # alternating, so load from other processes hits both alike
        for name in configs:
            runs[name].append(time_first_step(root / f"{name}.json", args.resume_threads))  # none writes a checkpoint
    timings = {name: {**{part: statistics.median(r[part] for r in rs) for part in rs[0]}, "runs": rs}
               for name, rs in runs.items()}
    timings["checkpoint_mb"] = sum(f.stat().st_size for f in (root / "resume" / "checkpoints").rglob("*")
                                   if f.is_file()) / 2**20
    return timings


# --- the run ---------------------------------------------------------------------------

def distributed_figures(args: argparse.Namespace, root: Path) -> tuple[dict, dict, dict]:
    """(a), (b) and (d) in one spawn of 2 processes, rounds interleaved."""
    configs, backend_runs, ckpt_runs = [], {name: [] for name in BACKENDS}, {"async": [], "sync": []}
    weighting_runs = {name: [] for name in WEIGHTINGS}
    ckpt_steps = args.ckpt_every * (args.saves + 1)
    for i in range(args.rounds):
        for name, backend in BACKENDS.items():
            configs.append(bench_config(args, root / f"{name}-{i}", world_size=WORLD_SIZE,
                                        steps=args.warmup + args.steps, backend=backend))
            backend_runs[name].append(configs[-1].run_dir)
        for mode in ckpt_runs:
            configs.append(bench_config(args, root / f"ckpt-{mode}-{i}", world_size=WORLD_SIZE, steps=ckpt_steps,
                                        every=args.ckpt_every, async_save=mode == "async"))
            ckpt_runs[mode].append(configs[-1].run_dir)
        for name in WEIGHTINGS:
            configs.append(bench_config(args, root / f"weighting-{name}-{i}", world_size=WORLD_SIZE,
                                        steps=args.warmup + WEIGHTING_STEPS, weighting=name))
            weighting_runs[name].append(configs[-1].run_dir)
    run_jobs(configs)
    return (backend_figures(backend_runs, args.warmup), checkpoint_figures(ckpt_runs, args.ckpt_every),
            weighting_figures(weighting_runs, args.warmup))


def print_table(args: argparse.Namespace, results: dict) -> None:
    print(f"DiT-S/2 depth {args.depth}, hidden {args.hidden_size}, latent 4x{args.input_size}x{args.input_size}, "
          f"global batch {args.batch}, {results['params_m']:.1f}M params, CPU, {os.cpu_count()} cores")
    print(f"(a) step time on {WORLD_SIZE} gloo processes, {args.rounds} rounds x {args.steps} steps:")
    for name, r in results["backends"].items():
        print(f"    {name:<6} median {r['median_step_ms']:8.1f} ms  ratio to ddp {r['ratio_to_ddp']:.3f}   "
              f"best {r['best_step_ms']:8.1f} ms  ratio to ddp {r['best_ratio_to_ddp']:.3f}")
    c = results["checkpoint"]
    print(f"(b) checkpoint, ddp x{WORLD_SIZE}, every {args.ckpt_every} steps ({results['resume']['checkpoint_mb']:.0f} MB):")
    for mode in ("sync", "async"):
        print(f"    {mode:<6} blocked per save: median {c[mode]['blocked_ms_per_save']:7.1f} ms, "
              f"best {c[mode]['blocked_ms_best']:7.1f} ms   "
              f"loop {c[mode]['loop_s']:6.2f} s for {(args.saves + 1) * args.ckpt_every} steps and their saves")
    print(f"    async / sync: blocked {c['blocked_ratio']:.3f}, loop wall time {c['loop_ratio']:.3f}")
    print(f"(c) fresh process to end of first step, 1 process, {args.resume_threads} thread(s) "
          f"(median of {args.resume_repeats}), seconds:")
    parts = ("python", "imports", "setup", "load", "first_step", "total")
    print("           " + "".join(f"{p:>11}" for p in parts))
    for name in ("fresh", "resume"):
        print(f"    {name:<6} " + "".join(f"{results['resume'][name][p]:11.2f}" for p in parts))
    print(f"    resume / fresh total: {results['resume']['resume']['total'] / results['resume']['fresh']['total']:.3f}")
    print(f"(d) weightings on ddp x{WORLD_SIZE}, mean over {WEIGHTING_STEPS} steps x {args.rounds} rounds:")
    for name, r in results["weighting"].items():
        print(f"    {name:<8} {r['mean_step_ms']:8.1f} ms  ratio to ant_uw {r['ratio_to_ant_uw']:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="global batch, split over the 2 processes")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per backend and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ckpt-every", type=int, default=3)
    parser.add_argument("--saves", type=int, default=3, help="timed checkpoints per mode and round")
    parser.add_argument("--resume-repeats", type=int, default=3)
    # OpenMP threads that wait for each other slow down many-fold when other processes take
    # the cores (a first step of 0.5 s became 4 s with 2 threads on this shared 2-core machine)
    parser.add_argument("--resume-threads", type=int, default=1, help="torch threads of the (c) processes")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from dtr_scale.models import create_model

    model = create_model("DiT-S/2", input_size=args.input_size, num_classes=10, depth=args.depth,
                         hidden_size=args.hidden_size, num_heads=args.heads)
    results = {"args": vars(args), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_train-") as tmp:
        results["backends"], results["checkpoint"], results["weighting"] = distributed_figures(args, Path(tmp))
        results["resume"] = resume_figures(args, Path(tmp))
    print_table(args, results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
