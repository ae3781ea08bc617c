"""The framework's own cost per training step, on the CPU: the training loop against a bare loop.

    dtr-bench overhead [--rounds 5] [--steps 40] [--warmup 3] [--depth 4] [--hidden-size 128] [--out FILE]
    python -m dtr_scale.benchmarks.bench_overhead [same options]

The loop is `train.loop.train` as a user runs it: `train_step` (draws, forward/backward,
clipping, the masked AdamW step, EMA, post-hoc EMA) inside everything around it (the
prefetcher, the stop agreement, checkpoint and snapshot checks, the host check and metrics
line at log steps, the progress bar). The bare loop is forward, backward and AdamW on the
same model, objective, optimizer and batch size, nothing else. Overhead = loop step time -
bare step time. The default model is the embedded default's (`model=tiny`: DiT-S/2's code at
depth 4, width 128, 4 heads, latents 4x8x8, batch 64), the smallest anyone trains, where the
fixed per-step work weighs most; `--hidden-size 384 --heads 6 --input-size 16 --batch 16` is
`dtr-bench train`'s DiT-S/2 at depth 4.

Both run in this process, interleaved step by step: train() polls its stop request before
every step, and each poll runs one bare step, so the two share the machine's noise. A loop
step is the time from the end of one poll to the start of the next; its setup and its final
checkpoint fall outside (checkpoint.every is past the run; logging.every is the project's
default, 50, so log steps are counted at their share). Each round is a fresh run and gives
the median step times after --warmup steps; reported are each round's figures and the
overhead's median and spread (min, max) over rounds, in ms and in % of the bare step. Target: at most 2 ms or 3 % of the step, whichever is larger. Figures are
printed (and written as JSON with --out), never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dtr_scale.config import TrainConfig, to_train_config

TARGET_MS = 2.0
TARGET_FRACTION = 0.03


def bench_config(args: argparse.Namespace, run_dir: Path) -> TrainConfig:
    """A small DiT with DTR + ANT-UW and the project's defaults for everything around the step
    (post-hoc EMA, logging every 50 steps, the NaN policy), on synthetic latents."""
    return to_train_config({
        "model": {"name": "DiT-S/2", "input_size": args.input_size, "in_channels": 4, "num_classes": 10,
                  "depth": args.depth, "hidden_size": args.hidden_size, "num_heads": args.heads},
        "routing": {"kind": "dtr"}, "weighting": {"kind": "ant_uw"},
        "data": {"kind": "synthetic", "num_samples": 1024},
        "checkpoint": {"every": 10**9, "keep_last": 1},
        "logging": {"wandb": "disabled"},
        "run_dir": str(run_dir), "steps": args.warmup + args.steps + 1, "global_batch_size": args.batch,
        "world_size": 1, "sample_at_end": 0,
    })


def bare_step(cfg: TrainConfig) -> Callable[[], None]:
    """One step of forward, backward and AdamW on the configured model and objective, with one
    fixed batch and one fixed draw."""
    from dtr_scale.train.components import DiffusionTrainModule, build_model, build_objective, build_optimizer
    from dtr_scale.train.loop import draw_step, random_batch

    torch.manual_seed(cfg.seed)
    model, objective = build_model(cfg), build_objective(cfg)
    module = DiffusionTrainModule(model, objective)
    optimizer = build_optimizer(model, objective, cfg)
    x0, y = random_batch(cfg, torch.device("cpu"), cfg.global_batch_size)
    draws = draw_step(cfg, objective, 0, 0, 1)

    def step() -> None:
        module(x0, y, draws.t, draws.noise, draws.drop)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def paired_step_ms(cfg: TrainConfig, warmup: int) -> tuple[float, float]:
    """Median ms of a step of train() and of a bare step, in pairs: train() polls its stop request
    before every step, and each poll runs one bare step, so the two alternate step by step and
    share the machine's noise. A loop step is the time from the end of one poll to the start of
    the next. Pairs after `warmup` steps."""
    from dtr_scale.train.loop import train

    bare, marks = bare_step(cfg), []

    def poll() -> bool:
        began = time.perf_counter()
        bare()
        marks.append((began, time.perf_counter()))
        return False

    train(cfg, stop_requested=poll)
    marks = marks[warmup:]
    loop_ms = [1e3 * (nxt[0] - cur[1]) for cur, nxt in zip(marks, marks[1:])]
    bare_ms = [1e3 * (end - began) for began, end in marks[:-1]]
    return statistics.median(loop_ms), statistics.median(bare_ms)


def overhead_figures(loop_ms: list[float], bare_ms: list[float]) -> dict[str, Any]:
    """Per-round overheads and their median and spread, against the target max(2 ms, 3 %)."""
    overhead = [a - b for a, b in zip(loop_ms, bare_ms)]
    median, bare = statistics.median(overhead), statistics.median(bare_ms)
    target = max(TARGET_MS, TARGET_FRACTION * bare)
    return {"loop_step_ms": loop_ms, "bare_step_ms": bare_ms, "overhead_ms": overhead,
            "median_loop_step_ms": statistics.median(loop_ms), "median_bare_step_ms": bare,
            "median_overhead_ms": median, "spread_overhead_ms": [min(overhead), max(overhead)],
            "median_overhead_percent": 100 * median / bare,
            "target_ms": target, "within_target": median <= target}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    loop_ms, bare_ms = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_overhead-") as tmp:
        for r in range(args.rounds):
            loop, bare = paired_step_ms(bench_config(args, Path(tmp) / f"round-{r}"), args.warmup)
            loop_ms.append(loop)
            bare_ms.append(bare)
    return {"args": vars(args), "threads": torch.get_num_threads(), **overhead_figures(loop_ms, bare_ms)}


def print_table(results: dict[str, Any]) -> None:
    a = results["args"]
    print(f"DiT-S/2 depth {a['depth']}, hidden {a['hidden_size']}, {a['heads']} heads, latent 4x{a['input_size']}x{a['input_size']}, "
          f"batch {a['batch']}, DTR + ANT-UW, CPU, {results['threads']} thread(s); "
          f"{a['rounds']} rounds x {a['steps']} steps")
    for i, (loop, bare, over) in enumerate(zip(results["loop_step_ms"], results["bare_step_ms"],
                                               results["overhead_ms"])):
        print(f"    round {i}: loop {loop:8.2f} ms  bare {bare:8.2f} ms  overhead {over:6.2f} ms")
    low, high = results["spread_overhead_ms"]
    print(f"overhead per step: median {results['median_overhead_ms']:.2f} ms (spread {low:.2f} .. {high:.2f}), "
          f"{results['median_overhead_percent']:.1f}% of the bare step {results['median_bare_step_ms']:.2f} ms; "
          f"target <= {results['target_ms']:.2f} ms: {'met' if results['within_target'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dtr-bench overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps must be >= 2, --warmup >= 0 and --rounds >= 1")
    torch.set_num_threads(args.threads)
    results = measure(args)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
