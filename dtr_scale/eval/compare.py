"""`dtr-scale compare`: several runs' evaluation results side by side (tables and a plot),
e.g. the runs of the paper in miniature, three seeds each:

    dtr-scale train -m seed=0,1,2 experiment=miniature/vanilla,miniature/dtr,miniature/dtr_antuw,miniature/dtr_nash
    dtr-scale compare multirun/DATE/TIME            # its runs: the numbered subfolders

Runs are grouped by the settings that differ between their configs (routing, weighting, ...)
except the seed: a group is one configuration trained from several seeds, shown as the mean and
standard deviation over its seeds at each step (a band in the plot). Only results with the same
sampler settings are compared (the most common settings, unless told), each evaluation protocol
on its own (the full one first), and the main metric is also drawn against the GPU-hours the
runs had trained (time to FID).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dtr_scale.eval.results import (METRICS, TRAINING_GPU_HOURS, format_metric, main_metric, protocols_of,
                                    read_results, results_path)
from dtr_scale.eval.saved_config import saved_run_config
from dtr_scale.eval.settings import KEY_FIELDS, eval_dir, record_key, record_protocol
from dtr_scale.io import atomic_write_text
from dtr_scale.plots.figure import Curve, Panel, draw_panels

NAMING_KEYS = ("model.name", "routing.kind", "weighting.kind", "routing.beta", "routing.alpha",
               "weighting.num_intervals", "optimizer.lr", "global_batch_size", "seed")
STD_DDOF = 1  # the sample standard deviation over seeds (n - 1 in the denominator)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among `paths`: a path with evaluation results, or a sweep folder's subfolders that have them."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if results_path(path).exists():
            runs.append(path)
        elif path.is_dir():
            runs += sorted((p for p in path.iterdir() if results_path(p).exists()), key=_folder_order)
    if not runs:
        raise FileNotFoundError(f"no evaluated run under {', '.join(map(str, paths))} (looked for eval/results.jsonl)")
    return runs


def _folder_order(path: Path) -> tuple:
    """Hydra's sweep subfolders 0, 1, ..., 10 in number order."""
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _setting(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _label(dotted: str) -> str:
    """routing.kind -> routing, routing.beta -> beta, seed -> seed."""
    group, _, leaf = dotted.rpartition(".")
    return group if leaf in ("kind", "name") else leaf


def _varying(configs: dict[Path, dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if len({repr(_setting(c, k)) for c in configs.values()}) > 1]


def run_groups(runs: list[Path]) -> dict[str, list[Path]]:
    """{group name: its runs}: runs that differ only in their seed form one group, named by the
    settings that differ between groups; with nothing but seeds differing, one group "all runs"."""
    configs = {run: saved_run_config(run) for run in runs}
    varying = _varying(configs, tuple(k for k in NAMING_KEYS if k != "seed"))
    if not varying and not _varying(configs, ("seed",)):
        return {run.name: [run] for run in runs}  # the same config and seed: repeats, kept apart
    groups: dict[str, list[Path]] = {}
    for run in runs:
        name = ", ".join(f"{_label(k)} {_setting(configs[run], k)}" for k in varying) or "all runs"
        groups.setdefault(name, []).append(run)
    return groups


def common_settings(records: list[dict[str, Any]]) -> tuple:
    """The sampler settings (everything of a result's key but the step) most records share."""
    return Counter(record_key(r)[1:] for r in records).most_common(1)[0][0]


def seed_statistics(values_by_run: list[dict[int, float]]) -> list[tuple[int, float, float | None, int]]:
    """(step, mean, standard deviation (ddof 1; None for one value), number of runs) per step,
    over the runs that have a value at that step."""
    steps = sorted({step for values in values_by_run for step in values})
    rows = []
    for step in steps:
        values = np.array([v[step] for v in values_by_run if step in v], dtype=float)
        std = float(np.std(values, ddof=STD_DDOF)) if len(values) > 1 else None
        rows.append((step, float(np.mean(values)), std, len(values)))
    return rows


def format_spread(metric: str, mean: float, std: float | None) -> str:
    return format_metric(metric, mean) + (f" ± {format_metric(metric, std)}" if std is not None else "")


def metric_table(metric: str, stats: dict[str, list[tuple[int, float, float | None, int]]],
                 seeds: dict[str, int], described: str) -> str:
    """One row per step, one column per group: mean ± std over its seeds."""
    header = [f"{name} ({seeds[name]} seed{'s' if seeds[name] > 1 else ''})" for name in stats]
    lines = [f"{metric}, mean ± std over seeds ({described})", "",
             "| step | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for step in sorted({row[0] for rows in stats.values() for row in rows}):
        cells = []
        for rows in stats.values():
            found = [r for r in rows if r[0] == step]
            cells.append(format_spread(metric, found[0][1], found[0][2]) if found else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences(metric: str, stats: dict[str, list[tuple[int, float, float | None, int]]]) -> str:
    """At the last step every group reached: each group against the first, and whether the
    difference of means exceeds the spread (larger than the two standard deviations added,
    i.e. the mean ± std bands do not overlap)."""
    common = set.intersection(*({row[0] for row in rows} for rows in stats.values()))
    if len(stats) < 2 or not common:
        return ""
    step = max(common)
    at = {name: next(r for r in rows if r[0] == step) for name, rows in stats.items()}
    (base, base_row), *others = at.items()
    lines = [f"{metric} at step {step}, against {base}:"]
    for name, row in others:
        diff = row[1] - base_row[1]
        if row[2] is None or base_row[2] is None:
            verdict = "one seed: the spread is unknown"
        else:
            spread = row[2] + base_row[2]
            verdict = (f"exceeds the spread ({spread:.3g})" if abs(diff) > spread
                       else f"within the spread ({spread:.3g}): not distinguishable from seed noise")
        lines.append(f"  {name}: {diff:+.3g}, {verdict}")
    return "\n".join(lines)


def protocol_comparison(groups: dict[str, list[Path]], records: dict[Path, list[dict[str, Any]]],
                        protocol: str) -> tuple[list[str], list[Panel]]:
    """The tables, notes and panels of one protocol's results (the sampler settings most of them
    share): every metric against step, and the main metric against the GPU-hours training had
    spent (time to FID, where the records carry it). Titles name the quick protocol."""
    settings = common_settings([r for rs in records.values() for r in rs])
    chosen = {run: [r for r in rs if record_key(r)[1:] == settings] for run, rs in records.items()}
    first = main_metric([r for rs in chosen.values() for r in rs])
    metrics = [first] + [m for m in METRICS if m != first and any(r.get(m) is not None
                                                                   for rs in chosen.values() for r in rs)]
    described = ", ".join(f"{'sampling seed' if k == 'seed' else k} {v}" for k, v in zip(KEY_FIELDS[1:], settings))
    suffix = "" if protocol == "full" else f" ({protocol} protocol)"
    seeds = {name: len(members) for name, members in groups.items()}

    def statistics(field: str) -> dict[str, list[tuple[int, float, float | None, int]]]:
        stats = {name: seed_statistics([{int(r["step"]): float(r[field]) for r in chosen[run] if r.get(field) is not None}
                                        for run in members]) for name, members in groups.items()}
        return {name: rows for name, rows in stats.items() if rows}

    texts, panels, notes = [], [], []
    for metric in metrics:
        stats = statistics(metric)
        texts.append(metric_table(metric + suffix, stats, seeds, described))
        notes.append(differences(metric + suffix, stats))
        panels.append(Panel(metric + suffix, [Curve(name, [r[0] for r in rows], [r[1] for r in rows],
                                                    [r[2] or 0.0 for r in rows]) for name, rows in stats.items()], metric))
        if metric == first:
            panels += time_to_metric_panel(metric + suffix, stats, statistics("gpu_hours"))
    return texts + [n for n in notes if n], panels


def time_to_metric_panel(title: str, stats: dict[str, list[tuple[int, float, float | None, int]]],
                         hours: dict[str, list[tuple[int, float, float | None, int]]]) -> list[Panel]:
    """The metric's mean over seeds against the mean GPU-hours the seeds had trained by each step
    (none where no record carries GPU-hours)."""
    curves = []
    for name, rows in stats.items():
        spent = {row[0]: row[1] for row in hours.get(name, [])}
        points = [(spent[row[0]], row[1], row[2] or 0.0) for row in rows if row[0] in spent]
        if points:
            curves.append(Curve(name, *map(list, zip(*points))))
    return [Panel(f"{title} against GPU-hours", curves, title, xlabel=TRAINING_GPU_HOURS)] if curves else []


def compare(runs: list[Path], out_dir: Path) -> tuple[str, Path]:
    """Markdown tables (one per metric and protocol: a row per step, a column per group of seeds)
    and a plot of every metric with mean ± std bands, the main one also against the GPU-hours
    spent; the full protocol first, the quick one's apart; written to OUT_DIR/comparison.md and
    comparison.png."""
    groups = run_groups(runs)
    records = {run: read_results(run) for run in runs}
    texts, panels = [], []
    for protocol in protocols_of([r for rs in records.values() for r in rs]):
        own = {run: [r for r in rs if record_protocol(r) == protocol] for run, rs in records.items()}
        protocol_texts, protocol_panels = protocol_comparison(groups, own, protocol)
        texts += protocol_texts
        panels += protocol_panels
    text = "\n\n".join(texts)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "comparison.md", text + "\n")
    plot = draw_panels(panels, f"{len(groups)} configurations, {len(runs)} runs: mean ± std over seeds",
                       out_dir / "comparison.png")
    return text, plot


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
