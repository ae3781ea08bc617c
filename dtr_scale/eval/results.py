"""A run's evaluation results: RUN_DIR/eval/results.jsonl, one record per (checkpoint step,
averaging, sampler settings), and what is made from it: a markdown table, a plot of every
metric (FID, sFID, IS, precision, recall, or digits-FD and class accuracy on the embedded digits)
against training step, and wandb logs.

Each record is appended with one O_APPEND write, so a crash loses at most the record being
written, and readers skip a line cut short by a killed writer. A record is appended under
the evaluation lock only if its key is not there yet, so each result is stored once.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dtr_scale.config import TrainConfig
from dtr_scale.eval.grids import write_checkpoint_strip
from dtr_scale.eval.settings import KEY_DEFAULTS, KEY_FIELDS, PROTOCOLS, eval_dir, record_key, record_protocol
from dtr_scale.extras import import_extra
from dtr_scale.io import append_jsonl, atomic_write_text, read_jsonl
from dtr_scale.plots.figure import Curve, Panel, draw_panels
from dtr_scale.provenance import collect_provenance
from dtr_scale.wandb_run import open_wandb_run

RESULTS_NAME = "results.jsonl"
LOCK_NAME = ".lock"
PLOT_NAME = "results.png"
METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "digits_fd", "class_accuracy")
MAIN_METRICS = ("fid", "digits_fd")  # the first one the records have is what the plot shows
TRAINING_GPU_HOURS = "GPU-hours of training"
SETTINGS_COLUMNS = ("step", "averaging", "sampler", "sampling_steps", "cfg_scale", "num_samples", "reference")

log = logging.getLogger(__name__)


def results_path(run_dir: str | Path) -> Path:
    return eval_dir(run_dir) / RESULTS_NAME


@contextmanager
def eval_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold RUN_DIR/eval/LOCK_NAME exclusively: the short critical sections in which an
    evaluator claims an item or stores a result, so two evaluators never both do it. A POSIX
    record lock (fcntl), which NFS and Lustre honour and the kernel drops when the holder dies."""
    path = eval_dir(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as err:
            raise OSError(f"cannot lock {path} ({err}): its filesystem does not support file locks, so two "
                          "evaluators of this run could do the same work; mount it with locking (NFS: lockd, "
                          "Lustre: -o flock) or run one evaluator at a time on a local disk") from err
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def append_result(run_dir: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Store `record` unless a record with its key is there already (written by another
    evaluator meanwhile); returns the stored one (`record` itself when it carries its provenance
    and was stored). Each key is written once."""
    missing = [name for name in KEY_FIELDS if name not in record and name not in KEY_DEFAULTS]
    if missing:
        raise KeyError(f"an evaluation record needs {', '.join(missing)} to be told apart from the others")
    if not record.get("provenance"):  # code and hardware; a record that has it is stored as it is
        record = {**record, "provenance": collect_provenance()}
    with eval_lock(run_dir):
        stored = find_result(run_dir, record_key(record))
        if stored is not None:
            log.warning("step %s %s was scored by another evaluator meanwhile; keeping its record",
                        record["step"], record["averaging"])
            return stored
        append_jsonl(results_path(run_dir), record)
    return record


def read_results(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(results_path(run_dir))


def find_result(run_dir: str | Path, key: tuple) -> dict[str, Any] | None:
    """The stored record with this key, if any."""
    matches = [r for r in read_results(run_dir) if record_key(r) == key]
    return matches[-1] if matches else None


def main_metric(records: list[dict[str, Any]]) -> str:
    for name in MAIN_METRICS:
        if any(r.get(name) is not None for r in records):
            return name
    raise ValueError(f"none of the records has a main metric ({', '.join(MAIN_METRICS)}); nothing to plot")


def last_evaluation(run_dir: str | Path) -> dict[str, Any] | None:
    """The result of the newest evaluated step (the last stored one at that step) with its main
    metric: {"step", "averaging", "metric", "value", "time", "text"}; None before any result."""
    records = [r for r in read_results(run_dir) if any(r.get(m) is not None for m in MAIN_METRICS)]
    if not records:
        return None
    newest = max(reversed(records), key=lambda r: r["step"])  # reversed: the last stored wins a tie
    metric, step, averaging = main_metric([newest]), newest["step"], newest["averaging"]
    how = averaging if record_protocol(newest) == "full" else f"{averaging}, {record_protocol(newest)} protocol"
    return {"step": step, "averaging": averaging, "metric": metric, "value": newest[metric], "time": newest.get("time"),
            "text": f"{metric} {format_metric(metric, newest[metric])} at step {step} ({how})"}


def format_metric(name: str, value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if name in ("precision", "recall", "class_accuracy") else f"{value:.2f}"


PROTOCOL_HEADINGS = {
    "full": "Full protocol (the paper's: FID, sFID, IS, precision, recall)",
    "quick": "Quick protocol (FID from fewer samples: a progress curve, not comparable with the full protocol's FID)",
}


def results_table(run_dir: str | Path) -> str:
    """The results as markdown, sorted by step (then averaging); "" when there are none. Each
    protocol has a table of its own under its heading, so a quick FID never sits in a column of
    the paper's numbers (one table without a heading when every result is the full protocol's)."""
    records = sorted(read_results(run_dir), key=lambda r: (r["step"], r["averaging"], str(record_key(r))))
    protocols = protocols_of(records)
    if protocols == ["full"]:
        return records_table(records)
    return "\n\n".join(f"## {PROTOCOL_HEADINGS[p]}\n\n" + records_table([r for r in records if record_protocol(r) == p])
                       for p in protocols)


def records_table(records: list[dict[str, Any]]) -> str:
    """One markdown table of these records: their settings, the metrics any of them has, wall time."""
    if not records:
        return ""
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in records)]
    header = [*SETTINGS_COLUMNS, *metrics, "wall_s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [str(r[c]) for c in SETTINGS_COLUMNS] + [format_metric(m, r.get(m)) for m in metrics]
        lines.append("| " + " | ".join([*cells, f"{r.get('wall_s', 0.0):.1f}"]) + " |")
    floors = {r["digits_fd_floor"] for r in records if r.get("digits_fd_floor") is not None}
    if floors:
        lines.append(f"\ndigits-FD floor {max(floors):.2f}: the digits-FD between two halves of the real digits "
                     "(the mean over random halvings): what real digits score against real digits")
    return "\n".join(lines)


def series_label(record: dict[str, Any], vary: bool) -> str:
    """A plot line's name: the averaging, plus the sampler settings when several are present."""
    if not vary:
        return record["averaging"]
    return (f"{record['averaging']} {record['sampler']}-{record['sampling_steps']} cfg {record['cfg_scale']} "
            f"n={record['num_samples']}")


def metric_series(records: list[dict[str, Any]], metric: str, x: str = "step") -> dict[str, list[tuple[float, float]]]:
    """{line name: [(x, value), ...] sorted by x} for one metric; x is a record field (the
    training step, or the training's GPU-hours up to the checkpoint), records without it are left out."""
    vary = len({record_key(r)[2:] for r in records}) > 1
    series: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.get(metric) is not None and r.get(x) is not None:
            series.setdefault(series_label(r, vary), []).append((r[x] if x == "step" else float(r[x]), float(r[metric])))
    return {name: sorted(points) for name, points in series.items()}


def protocols_of(records: list[dict[str, Any]]) -> list[str]:
    return sorted({record_protocol(r) for r in records}, key=PROTOCOLS.index)


def series_panel(records: list[dict[str, Any]], metric: str, title: str, x: str = "step") -> Panel | None:
    """One panel of `metric` against x (the step, or gpu_hours), a line per averaging; None when
    no record has both."""
    curves = [Curve(name, *zip(*points)) for name, points in metric_series(records, metric, x).items()]
    if not curves:
        return None
    return Panel(title, curves, metric, xlabel="training step" if x == "step" else TRAINING_GPU_HOURS)


def result_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """Per protocol (the full one first; the quick one's titles say so, never mixed into the
    full one's): the main metric against training step and against the GPU-hours the training
    had spent (time to FID, where the records carry it), then every other metric against step."""
    main = main_metric(records)  # raises when no record has a metric to draw
    panels = []
    for protocol in protocols_of(records):
        group = [r for r in records if record_protocol(r) == protocol]
        suffix = "" if protocol == "full" else f" ({protocol} protocol)"
        ordered = [series_panel(group, main, main + suffix),
                   series_panel(group, main, f"{main}{suffix} against GPU-hours", x="gpu_hours"),
                   *(series_panel(group, m, m + suffix) for m in METRICS if m != main)]
        panels += [p for p in ordered if p is not None]
    return panels


def plot_results(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """A PNG of every metric the evaluations produced against training step, one panel per
    metric and one line per averaging (RUN_DIR/eval/results.png)."""
    return draw_panels(result_panels(read_results(run_dir)), f"evaluation of {Path(run_dir).name}",
                       path if path is not None else eval_dir(run_dir) / PLOT_NAME)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """RUN_DIR/eval/results.md (the table), results.png (the plot) and samples_by_step.png (the
    same samples at each checkpoint), rewritten from the records."""
    table = eval_dir(run_dir) / "results.md"
    atomic_write_text(table, results_table(run_dir) + "\n")
    write_checkpoint_strip(run_dir, read_results(run_dir))
    return table, plot_results(run_dir)


def wandb_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A record's metrics under eval/<averaging>/<metric> (the quick protocol's under
    eval_quick/...), with the training step as x axis, and the GPU-hours training had spent."""
    prefix = "eval" if record_protocol(record) == "full" else f"eval_{record_protocol(record)}"
    values: dict[str, float] = {"train_step": record["step"]}
    if record.get("gpu_hours") is not None:
        values["train_gpu_hours"] = record["gpu_hours"]
    values.update({f"{prefix}/{record['averaging']}/{m}": record[m] for m in METRICS if record.get(m) is not None})
    return values


def log_to_tensorboard(run_dir: str | Path, cfg: TrainConfig, records: list[dict[str, Any]]) -> None:
    """With logging.tensorboard, the records' metrics under wandb's names in RUN_DIR/tensorboard/eval
    (a run of its own beside training's), at their checkpoints' training steps."""
    if not cfg.logging.tensorboard or not records:
        return
    from dtr_scale.train.metrics import TENSORBOARD_DIR, open_tensorboard

    writer = open_tensorboard(Path(run_dir) / TENSORBOARD_DIR / "eval")
    for record in records:
        for name, value in wandb_metrics(record).items():
            if name != "train_step":
                writer.add_scalar(name, value, global_step=record["step"])
    writer.close()


def log_to_wandb(run_dir: str | Path, cfg: TrainConfig, records: list[dict[str, Any]]) -> None:
    """Log records to the run's evaluation wandb run (cfg.logging.wandb: offline by default,
    nothing when disabled); one wandb run per run dir, resumed by every evaluation."""
    if cfg.logging.wandb == "disabled" or not records:
        return
    wandb = import_extra("wandb")
    # create_new: an inline evaluation beside the trainer's own wandb run must not log into it
    run = open_wandb_run(eval_dir(run_dir), cfg.logging, f"{Path(run_dir).name}-eval", job_type="eval",
                         reinit="create_new", settings=wandb.Settings(silent=True))
    run.define_metric("train_step")
    run.define_metric("eval/*", step_metric="train_step")  # evaluations arrive out of step order
    run.define_metric("eval_quick/*", step_metric="train_step")
    run.define_metric("samples/*", step_metric="train_step")
    for record in records:
        grid = Path(record["samples"]).with_name("grid.png") if record.get("samples") else None  # beside the npz
        pictures = {f"samples/{record['averaging']}": wandb.Image(str(grid))} if grid and grid.is_file() else {}
        run.log(wandb_metrics(record) | pictures)
    run.finish()
