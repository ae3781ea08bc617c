"""Training-step time of the same DiT with routing none vs dtr vs random, in one run.

    python -m dtr_scale.benchmarks.bench_routing [--model DiT-S/2] [--batch 16] [--steps 20]

Steps of the variants are interleaved so machine noise hits all of them alike;
the figure is the ratio of median step times (target: DTR within 3% of vanilla).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dtr_scale.config import WeightingConfig
from dtr_scale.diffusion.gaussian import GaussianDiffusion
from dtr_scale.diffusion.objective import TrainingObjective
from dtr_scale.models import create_model


def make_step(routing: str, args) -> callable:
    torch.manual_seed(0)
    model = create_model(args.model, routing=routing, input_size=args.input_size, depth=args.depth)
    objective = TrainingObjective(GaussianDiffusion.from_schedule("linear"), WeightingConfig(kind="ant_uw"))
    optimizer = torch.optim.AdamW([*model.parameters(), *objective.parameters()], lr=1e-4, weight_decay=0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)

    def step() -> float:
        t = objective.sample_timesteps(args.batch, g)
        noise = torch.randn(x0.shape, generator=g)
        start = time.perf_counter()
        loss = objective(model, x0, y, t, noise).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    variants = ("none", "dtr", "random")
    steps = {v: make_step(v, args) for v in variants}
    times = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for v in variants:
            dt = steps[v]()
            if i >= args.warmup:
                times[v].append(dt)
    base = statistics.median(times["none"])
    print(f"{args.model} depth {args.depth}, latent 4x{args.input_size}x{args.input_size}, batch {args.batch}, "
          f"{args.steps} interleaved steps, {torch.get_num_threads()} threads")
    for v in variants:
        med = statistics.median(times[v])
        print(f"  routing={v:<7} median step {med * 1e3:8.1f} ms   ratio to none {med / base:.3f}")


if __name__ == "__main__":
    main()
