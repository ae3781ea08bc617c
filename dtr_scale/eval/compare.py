"""`dtr-scale compare`: several runs' evaluation results side by side (one table, one plot),
e.g. the three runs of the paper in miniature:

    dtr-scale train -m experiment=miniature/vanilla,miniature/dtr,miniature/dtr_antuw
    dtr-scale compare multirun/DATE/TIME            # its runs: the numbered subfolders

Runs are named by what differs between their configs (routing, weighting, ...); only results
with the same sampler settings are compared (the most common settings, unless told).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from dtr_scale.eval.results import (KEY_FIELDS, eval_dir, format_metric, main_metric, plot_series, read_results,
                                    record_key, results_path)
from dtr_scale.eval.cli import saved_run_config

NAMING_KEYS = ("model.name", "routing.kind", "weighting.kind", "routing.beta", "routing.alpha",
               "weighting.num_intervals", "optimizer.lr", "global_batch_size", "seed")


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among `paths`: a path with evaluation results, or a sweep folder's subfolders that have them."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if results_path(path).exists():
            runs.append(path)
        elif path.is_dir():
            runs += sorted((p for p in path.iterdir() if results_path(p).exists()), key=lambda p: p.name)
    if not runs:
        raise FileNotFoundError(f"no evaluated run under {', '.join(map(str, paths))} (looked for eval/results.jsonl)")
    return runs


def _setting(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def run_names(runs: list[Path]) -> dict[Path, str]:
    """Each run named by the settings that differ between the runs (its folder name if none do)."""
    configs = {run: saved_run_config(run) for run in runs}
    varying = [k for k in NAMING_KEYS if len({repr(_setting(c, k)) for c in configs.values()}) > 1]
    if not varying:
        return {run: run.name for run in runs}
    return {run: ", ".join(f"{_label(k)} {_setting(configs[run], k)}" for k in varying) for run in runs}


def _label(dotted: str) -> str:
    """routing.kind -> routing, routing.beta -> beta, seed -> seed."""
    group, _, leaf = dotted.rpartition(".")
    return group if leaf in ("kind", "name") else leaf


def common_settings(records: list[dict[str, Any]]) -> tuple:
    """The sampler settings (everything of a result's key but the step) most records share."""
    return Counter(record_key(r)[1:] for r in records).most_common(1)[0][0]


def compare(runs: list[Path], out_dir: Path) -> tuple[str, Path]:
    """A markdown table (one row per step, one column per run) and a plot of the main metric."""
    names = run_names(runs)
    records = {run: read_results(run) for run in runs}
    settings = common_settings([r for rs in records.values() for r in rs])
    chosen = {run: [r for r in rs if record_key(r)[1:] == settings] for run, rs in records.items()}
    metric = main_metric([r for rs in chosen.values() for r in rs])
    series = {names[run]: sorted((int(r["step"]), float(r[metric])) for r in rs if r.get(metric) is not None)
              for run, rs in chosen.items()}
    steps = sorted({step for points in series.values() for step, _ in points})
    described = ", ".join(f"{k} {v}" for k, v in zip(KEY_FIELDS[1:], settings))
    lines = [f"{metric} ({described})", "", "| step | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
    for step in steps:
        cells = [format_metric(metric, dict(points).get(step)) for points in series.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(table + "\n")
    plot = plot_series(series, metric, f"{metric} of {len(series)} runs", out_dir / "comparison.png")
    return table, plot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dtr-scale compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories, or a sweep folder holding them")
    parser.add_argument("--out", help="where comparison.md and comparison.png go (default: the single sweep "
                                      "folder given, else the current directory)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
    except FileNotFoundError as err:
        sys.exit(f"dtr-scale compare: {err}")
    default_out = Path(args.paths[0]) if len(args.paths) == 1 and not results_path(args.paths[0]).exists() else Path()
    table, plot = compare(runs, Path(args.out) if args.out else default_out)
    print(table)
    print(f"\nplot: {plot}")
    for run in runs:
        print(f"  {run}: {eval_dir(run) / 'results.md'}")


if __name__ == "__main__":
    main()
