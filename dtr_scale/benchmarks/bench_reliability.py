"""Kill trials: SIGKILL a training run at a random point, resume it, compare with a run
that was never killed.

    python -m dtr_scale.benchmarks.bench_reliability [--trials 32] [--steps 8] [--seed 0] [--out FILE]
    dtr-bench reliability [same options]

Each trial draws 1 or 2 processes, asynchronous or synchronous saves, and a kill point:

    step    a random step, just after its optimizer update (before its metrics line)
    save    inside the write of a random checkpoint, after its first tensor is on disk
    commit  just after a random checkpoint's commit (before anything else of that step)

With 2 processes one rank is killed and the other is killed as soon as the first is
found dead (a lost node). The run is then resumed on the same number of processes and
trained to the end. Reported, over all trials: how many ended bit-equal to the
uninterrupted run (model and EMA weights, and every logged loss), metrics.jsonl lines
duplicated or missing, post-hoc EMA snapshots of the grid missing, and trials whose
"latest" checkpoint was unreadable after the kill. Figures are printed (and written as
JSON with --out), never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVERY = 2
KILL_POINTS = ("step", "save", "commit")


def trial_config(run_dir: Path, *, steps: int, world_size: int, async_save: bool) -> dict:
    return {
        "model": {"name": "DiT-S/2", "input_size": 8, "in_channels": 4, "num_classes": 4,
                  "depth": 2, "hidden_size": 64, "num_heads": 4},
        "routing": {"kind": "dtr"}, "weighting": {"kind": "ant_uw", "num_intervals": 4},
        "optimizer": {"lr": 1e-3}, "data": {"kind": "synthetic", "num_samples": 256},
        "run_dir": str(run_dir), "steps": steps, "global_batch_size": 16, "ema_decay": 0.9, "sample_at_end": 0,
        "world_size": world_size, "phema_stds": [0.05, 0.10],
        "checkpoint": {"every": EVERY, "keep_last": 100, "async_save": async_save},
        "logging": {"every": 1, "wandb": "disabled"},
    }


# --- the child: one rank of a run, killing itself at the chosen point -------------------

def arm(kill: dict) -> None:
    """Patch the trainer so that this process SIGKILLs itself at kill['point'] of kill['step']."""
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    step = kill["step"]
    if kill["point"] == "step":
        from dtr_scale.train.backends.torch_dist import TorchBackend

        real_step, done = TorchBackend.step, {"n": 0}

        def step_then_die(self):
            real_step(self)
            done["n"] += 1
            if done["n"] == step:
                die()

        TorchBackend.step = step_then_die
    elif kill["point"] == "save":
        from torch.distributed.checkpoint import filesystem

        from dtr_scale.train.checkpoint import checkpoint_name

        real_write_item, partial = filesystem._write_item, f"{checkpoint_name(step)}.partial"

        def write_then_die(transforms, stream, *args, **kwargs):
            result = real_write_item(transforms, stream, *args, **kwargs)
            if partial in Path(stream.name).parts:
                stream.flush()
                die()
            return result

        filesystem._write_item = write_then_die
    else:
        from dtr_scale.train.checkpoint import CheckpointManager

        real_commit = CheckpointManager._commit

        def commit_then_die(self, at, *args):
            real_commit(self, at, *args)
            if at == step:
                die()

        CheckpointManager._commit = commit_then_die


def child(spec_path: str) -> None:
    import torch

    from dtr_scale.config import to_train_config
    from dtr_scale.train.loop import train

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    if spec.get("kill") and int(os.environ.get("RANK", 0)) == spec["kill"]["rank"]:
        arm(spec["kill"])
    train(to_train_config(spec["config"]))


def run(config: dict, workdir: Path, name: str, kill: dict | None = None, timeout: float = 600) -> list[int]:
    """Run `config` on its world size as child processes; their exit codes. Once one rank dies
    of SIGKILL the others are killed too."""
    spec = workdir / f"{name}.json"
    spec.write_text(json.dumps({"config": config, "kill": kill}))
    n = config["world_size"]
    port = _free_port()
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}
        with open(workdir / f"{name}.{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "dtr_scale.benchmarks.bench_reliability", "--child", str(spec)],
                                          env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode == -signal.SIGKILL for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return [p.returncode for p in procs]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- comparing a resumed run with the uninterrupted one ---------------------------------

def final_state(run_dir: Path) -> dict:
    from dtr_scale.eval.sample import load_model
    from dtr_scale.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir, contents=True)
    return {f"{which}.{k}": v for which in ("model", "ema")
            for k, v in load_model(path, use_ema=which == "ema")[0].state_dict().items()}


def judge(run_dir: Path, reference: Path, config: dict) -> dict:
    import torch

    from dtr_scale.config import to_train_config
    from dtr_scale.train.metrics import read_metrics
    from dtr_scale.train.phema import snapshot_inventory

    logged = [r["step"] for r in read_metrics(run_dir)]
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    want_losses = {r["step"]: r["loss"] for r in read_metrics(reference)}
    got, want = final_state(run_dir), final_state(reference)
    cfg, steps = to_train_config(config), config["steps"]
    return {
        "bit_equal": losses == want_losses and all(torch.equal(got[k], want[k]) for k in want),
        "duplicated_lines": len(logged) - len(set(logged)),
        "missing_lines": len(set(range(1, steps + 1)) - set(logged)),
        "lost_snapshots": len(snapshot_inventory(run_dir, cfg, steps).missing),
    }


def latest_readable(run_dir: Path) -> bool:
    from dtr_scale.train.checkpoint import CheckpointError, latest_checkpoint

    try:
        path = latest_checkpoint(run_dir, contents=True)
        return path is None or final_state(run_dir) is not None
    except CheckpointError:
        return False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    trials = []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_reliability-") as tmp:
        work = Path(tmp)
        references: dict[int, Path] = {}
        for i in range(args.trials):
            n, async_save, point = rng.choice((1, 2)), rng.choice((True, False)), rng.choice(KILL_POINTS)
            at = rng.randrange(1, args.steps) if point == "step" else rng.randrange(EVERY, args.steps, EVERY)
            kill = {"point": point, "step": at, "rank": rng.randrange(n)}
            if n not in references:  # the numbers do not depend on async or sync saves
                references[n] = work / f"reference-{n}"
                codes = run(trial_config(references[n], steps=args.steps, world_size=n, async_save=True), work,
                            f"reference-{n}")
                if codes != [0] * n:
                    sys.exit(f"the reference run on {n} process(es) failed ({codes}); see {work}/reference-{n}.*.log")
            run_dir = work / f"trial-{i}"
            config = trial_config(run_dir, steps=args.steps, world_size=n, async_save=async_save)
            killed = run(config, work, f"trial-{i}-killed", kill)
            trial = {"processes": n, "async_save": async_save, **kill, "killed": -signal.SIGKILL in killed,
                     "latest_readable": latest_readable(run_dir)}
            resumed = run(config, work, f"trial-{i}-resumed")
            trial["resumed_ok"] = resumed == [0] * n
            if trial["resumed_ok"]:
                trial.update(judge(run_dir, references[n], config))
            trials.append(trial)
            print(json.dumps(trial), flush=True)
    ok = [t for t in trials if t["resumed_ok"]]
    summary = {
        "trials": len(trials),
        "killed": sum(t["killed"] for t in trials),
        "one_process": sum(t["processes"] == 1 for t in trials),
        "two_processes": sum(t["processes"] == 2 for t in trials),
        "async_saves": sum(t["async_save"] for t in trials),
        "killed_in_a_save": sum(t["point"] == "save" for t in trials),
        "resumed": len(ok),
        "bit_equal": sum(t["bit_equal"] for t in ok),
        "duplicated_metric_lines": sum(t["duplicated_lines"] for t in ok),
        "missing_metric_lines": sum(t["missing_lines"] for t in ok),
        "lost_snapshots": sum(t["lost_snapshots"] for t in ok),
        "latest_unreadable": sum(not t["latest_readable"] for t in trials),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "trials": trials}, indent=1))


if __name__ == "__main__":
    main()
