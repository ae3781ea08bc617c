"""A run's evaluation results: RUN_DIR/eval/results.jsonl, one record per (checkpoint step,
averaging, sampler settings), and what is made from it: a markdown table, a plot of the main
metric (FID, or digits-FD on the embedded digits) against training step, and wandb logs.

Each record is appended with one O_APPEND write, so a crash loses at most the record being
written, and readers skip a line cut short by a killed writer.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from dtr_scale.config import TrainConfig

RESULTS_NAME = "results.jsonl"
PLOT_NAME = "results.png"
# What identifies a result: a record with the same values is never computed again.
KEY_FIELDS = ("step", "averaging", "sampler", "sampling_steps", "cfg_scale", "guided_channels", "ddim_eta",
              "num_samples", "labels", "seed", "reference")
METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "digits_fd", "class_accuracy")
MAIN_METRICS = ("fid", "digits_fd")  # the first one the records have is what the plot shows
SETTINGS_COLUMNS = ("step", "averaging", "sampler", "sampling_steps", "cfg_scale", "num_samples", "reference")

log = logging.getLogger(__name__)


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def results_path(run_dir: str | Path) -> Path:
    return eval_dir(run_dir) / RESULTS_NAME


def record_key(record: dict[str, Any]) -> tuple:
    return tuple(record[name] for name in KEY_FIELDS)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single write (O_APPEND: concurrent writers do not interleave);
    after a line torn by a killed writer, on a line of its own, so only the torn one is lost."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if torn else "") + json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn line (a writer killed mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is cut short (a writer was killed); skipping it", path, number)
    return records


def append_result(run_dir: str | Path, record: dict[str, Any]) -> None:
    missing = [name for name in KEY_FIELDS if name not in record]
    if missing:
        raise KeyError(f"an evaluation record needs {', '.join(missing)} to be told apart from the others")
    append_jsonl(results_path(run_dir), record)


def read_results(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(results_path(run_dir))


def find_result(run_dir: str | Path, key: tuple) -> dict[str, Any] | None:
    """The stored record with this key, if any (the latest, should a race have written two)."""
    matches = [r for r in read_results(run_dir) if record_key(r) == key]
    return matches[-1] if matches else None


def main_metric(records: list[dict[str, Any]]) -> str:
    for name in MAIN_METRICS:
        if any(r.get(name) is not None for r in records):
            return name
    raise ValueError(f"none of the records has a main metric ({', '.join(MAIN_METRICS)}); nothing to plot")


def format_metric(name: str, value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if name in ("precision", "recall", "class_accuracy") else f"{value:.2f}"


def results_table(run_dir: str | Path) -> str:
    """The results as a markdown table, sorted by step (then averaging); "" when there are none."""
    records = sorted(read_results(run_dir), key=lambda r: (r["step"], r["averaging"], str(record_key(r))))
    if not records:
        return ""
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in records)]
    header = [*SETTINGS_COLUMNS, *metrics, "wall_s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [str(r[c]) for c in SETTINGS_COLUMNS] + [format_metric(m, r.get(m)) for m in metrics]
        lines.append("| " + " | ".join([*cells, f"{r.get('wall_s', 0.0):.1f}"]) + " |")
    return "\n".join(lines)


def series_label(record: dict[str, Any], vary: bool) -> str:
    """A plot line's name: the averaging, plus the sampler settings when several are present."""
    if not vary:
        return record["averaging"]
    return (f"{record['averaging']} {record['sampler']}-{record['sampling_steps']} cfg {record['cfg_scale']} "
            f"n={record['num_samples']}")


def metric_series(records: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """{line name: [(step, value), ...] sorted by step} for one metric."""
    vary = len({record_key(r)[2:] for r in records}) > 1
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get(metric) is not None:
            series.setdefault(series_label(r, vary), []).append((int(r["step"]), float(r[metric])))
    return {name: sorted(points) for name, points in series.items()}


def plot_series(series: dict[str, list[tuple[int, float]]], metric: str, title: str, path: str | Path) -> Path:
    """A PNG of one metric against training step, one line per series, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_results(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """A PNG of the main metric against training step, one line per averaging (RUN_DIR/eval/results.png)."""
    records = read_results(run_dir)
    metric = main_metric(records)
    return plot_series(metric_series(records, metric), metric, f"{metric} of {Path(run_dir).name}",
                       path if path is not None else eval_dir(run_dir) / PLOT_NAME)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """RUN_DIR/eval/results.md (the table) and results.png (the plot), rewritten from the records."""
    table = eval_dir(run_dir) / "results.md"
    tmp = table.with_name(f".{table.name}.tmp-{os.getpid()}")
    tmp.write_text(results_table(run_dir) + "\n")
    os.replace(tmp, table)
    return table, plot_results(run_dir)


def wandb_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A record's metrics under eval/<averaging>/<metric>, with the training step as x axis."""
    values: dict[str, float] = {"train_step": record["step"]}
    values.update({f"eval/{record['averaging']}/{m}": record[m] for m in METRICS if record.get(m) is not None})
    return values


def log_to_wandb(run_dir: str | Path, cfg: TrainConfig, records: list[dict[str, Any]]) -> None:
    """Log records to the run's evaluation wandb run (cfg.logging.wandb: offline by default,
    nothing when disabled); one wandb run per run dir, resumed by every evaluation."""
    if cfg.logging.wandb == "disabled" or not records:
        return
    import wandb

    directory = eval_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    id_file = directory / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    # create_new: an inline evaluation beside the trainer's own wandb run must not log into it
    run = wandb.init(project=cfg.logging.project, dir=str(directory), id=id_file.read_text().strip(),
                     resume="allow", mode=cfg.logging.wandb, name=f"{Path(run_dir).name}-eval", job_type="eval",
                     reinit="create_new", settings=wandb.Settings(silent=True))
    run.define_metric("train_step")
    run.define_metric("eval/*", step_metric="train_step")  # evaluations arrive out of step order
    for record in records:
        run.log(wandb_metrics(record))
    run.finish()
