"""`dtr-scale`: one command for the whole workflow.

    dtr-scale prep   images|merge|verify|digits ...   latent shards from images (dtr-prep)
    dtr-scale train  [hydra overrides]                train, here or as a SLURM/local job (dtr-train)
    dtr-scale eval   run_dir=RUN [hydra overrides]    score a run's checkpoints, or watch it
    dtr-scale plan   [--gpu TYPE] [hydra overrides]   what a run will cost, before submitting it
    dtr-scale status RUN_DIR                          jobs, checkpoint, throughput, provenance, results
    dtr-scale compare RUN_DIR... | SWEEP_DIR          several runs' results: one table, one plot
    dtr-scale export CHECKPOINT OUT.safetensors       the EMA weights for a vanilla DiT
    dtr-scale sample --weights PATH [classes=[1,2]] ... a PNG grid and ADM .npz from any DiT weights
    dtr-scale --version

`dtr-scale SUBCOMMAND --help` shows each one's options. train, eval and plan share
Hydra's command line: key=value, group=option, --cfg job, --config-dir DIR, -m.

Exit status: 0 done, 1 a failure while working, 2 a usage or config error (found before
anything is written or submitted); either failure is one line on stderr naming the key or file
and the fix. --verbose (or HYDRA_FULL_ERROR=1) prints the traceback as well.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path



def _prep() -> None:
    from dtr_scale.data_prep.cli import main

    main()


def _train() -> None:
    from dtr_scale.run import main

    main()


def _eval() -> None:
    from dtr_scale.eval.cli import main

    main()


def _plan() -> None:
    from dtr_scale.plan.cli import main

    main()


def _compare() -> None:
    from dtr_scale.eval.compare import main

    main()


def _status() -> None:
    # Polled from login nodes: this path reads JSON files and never imports torch.
    parser = argparse.ArgumentParser(prog="dtr-scale status", description="Show a run's jobs, its last complete "
                                     "checkpoint, throughput, provenance and evaluation results.")
    parser.add_argument("run_dir", help="the run's directory (its run_dir)")
    args = parser.parse_args()
    from dtr_scale.eval.results import results_table
    from dtr_scale.status import format_status, run_status

    try:
        status = run_status(args.run_dir)
    except FileNotFoundError as err:  # a path that is no run: a usage error
        print(f"dtr-scale status: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_status(status, results_table(args.run_dir)))
    sys.exit(1 if status["state"] == "failed" else 0)


def export_source_problem(path: Path) -> str | None:
    """Why `path` is neither a checkpoint directory (RUN/checkpoints/step_N, beside the run's
    manifest) nor a run directory, or None. Whether the checkpoint is complete is checked later."""
    from dtr_scale.train.manifest import MANIFEST

    wanted = ("name a checkpoint directory (RUN/checkpoints/step_N) or a run directory (RUN: its latest "
              "complete checkpoint is exported)")
    if not path.exists():
        return f"{path} does not exist; {wanted}"
    if not path.is_dir():
        return f"{path} is a file, not a checkpoint; {wanted}"
    if (path / "checkpoints").is_dir() or (path.parent.name == "checkpoints" and (path.parent / MANIFEST).is_file()):
        return None
    return (f"{path} is neither a checkpoint directory (its parent is no run's checkpoints/ with {MANIFEST}) "
            f"nor a run directory (it has no checkpoints/); {wanted}")


def _export() -> None:
    parser = argparse.ArgumentParser(prog="dtr-scale export", description="Write a checkpoint's EMA weights with "
                                     "the official DiT parameter names: OUT.safetensors, and OUT.pt beside it, which "
                                     "DiT's own find_model loads (a routed model's mask tables ride along under "
                                     "'routing'; a vanilla DiT ignores them).")
    parser.add_argument("checkpoint", help="a checkpoint directory (RUN/checkpoints/step_N) or a run dir (its latest)")
    parser.add_argument("out", help="the .safetensors file to write (the .pt goes beside it)")
    args = parser.parse_args()
    problem = export_source_problem(Path(args.checkpoint))
    if problem:  # before torch: a wrong path is named at once, never blamed on a crash while writing
        print(f"dtr-scale export: {problem}", file=sys.stderr)
        sys.exit(2)
    from dtr_scale.eval.sample import dit_checkpoint_path, export_ema
    from dtr_scale.train.checkpoint import CheckpointError, latest_checkpoint

    source = Path(args.checkpoint)
    if (source / "checkpoints").is_dir():
        source = latest_checkpoint(source)
        if source is None:
            sys.exit(f"dtr-scale export: {args.checkpoint} has no complete checkpoint")
    try:
        out = export_ema(source, args.out)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"dtr-scale export: {err}")
    print(out)
    print(dit_checkpoint_path(out))


def _sample() -> None:
    from dtr_scale.eval.sample_cli import main

    main()


# These parse --verbose themselves (command_line.run_hydra, data_prep.cli); for the others it is taken off here.
OWN_VERBOSE = ("train", "eval", "plan", "prep")
COMMANDS: dict[str, Callable[[], None]] = {
    "prep": _prep, "train": _train, "eval": _eval, "plan": _plan, "status": _status, "compare": _compare,
    "export": _export, "sample": _sample,
}


def main() -> None:
    from dtr_scale.command_line import errors_reported, take_verbose

    if sys.argv[1:2] == ["--version"]:
        from dtr_scale import __version__

        print(f"dtr-scale {__version__}")
        return
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    command = sys.argv.pop(1)
    if command not in COMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"dtr-scale: unknown command {command!r}; the commands are {', '.join(COMMANDS)} "
              f"(`dtr-scale COMMAND --help` for each)", file=sys.stderr)
        sys.exit(2)
    verbose, args = take_verbose(sys.argv[1:])
    sys.argv = [f"dtr-scale {command}", *args, *(["--verbose"] if verbose and command in OWN_VERBOSE else [])]
    with errors_reported(command, verbose):
        COMMANDS[command]()


if __name__ == "__main__":
    main()
