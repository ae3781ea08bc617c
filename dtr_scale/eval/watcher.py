"""Evaluate a run's checkpoints while it trains, without ever blocking it.

The watcher follows RUN_DIR/checkpoints and evaluates every complete checkpoint
(a manifest entry whose files are all there at their recorded sizes; a
`.partial` directory is never in the manifest) that a protocol is due at
(EvalConfig.due_protocols: the full one at eval.milestones, or at multiples of eval.every
without them; the quick one at multiples of eval.quick.every), and, once training has
finished, the last one. Who took which item is
in the work log (dtr_scale.eval.work_log): a restarted watcher skips items that are
done or still in flight and takes over those whose claimant died without a result;
the sampling resumes at the next missing chunk, so nothing is repeated or forgotten.

Two modes: "inline" evaluates in this process (the embedded digits run);
"submit" sends one submitit job per checkpoint (dtr_scale.eval.jobs).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dtr_scale.config import ClusterConfig, TrainConfig, parse_averaging
from dtr_scale.eval.evaluate import evaluate_averaging
from dtr_scale.eval.jobs import submit_items
from dtr_scale.eval.results import read_results, write_report
from dtr_scale.eval.work_log import (WorkItem, all_settled, claim, done_keys, pending, read_events, record_event,
                                     work_items)
from dtr_scale.launch.ledger import ledger_path, read_status
from dtr_scale.train.checkpoint import checkpoint_dir, checkpoint_name, complete_checkpoints, run_dir_of
from dtr_scale.train.phema import snapshot_dir, snapshot_name

MODES = ("inline", "submit")

log = logging.getLogger(__name__)


def due_points(run_dir: str | Path, cfg: TrainConfig, *, finished: bool) -> list[tuple[int, Path, str]]:
    """(step, checkpoint, protocol) of every protocol due at a complete checkpoint, the newest
    one counted as the run's last when training has `finished`."""
    complete = complete_checkpoints(run_dir)
    newest = complete[-1][0] if complete and finished else None
    return [(step, path, protocol) for step, path in complete
            for protocol in cfg.eval.due_protocols(step, cfg.steps, newest_of_finished=step == newest)]


def training_finished(run_dir: str | Path, steps: int) -> bool:
    """No more checkpoints will come: the final step's checkpoint is complete, or the job
    ledger says the run finished or failed."""
    complete = complete_checkpoints(run_dir)
    if complete and complete[-1][0] >= steps:
        return True
    if not ledger_path(run_dir).exists():
        return False
    try:
        return read_status(run_dir)["state"] in ("finished", "failed")
    except FileNotFoundError:  # an empty ledger: no job has started yet
        return False


def snapshots_ready(run_dir: str | Path, item: WorkItem, cfg: TrainConfig) -> bool:
    """A 'phema' item waits for the snapshots of its own step, which the trainer writes just
    after the checkpoint; other items are ready at once."""
    kind, _ = parse_averaging(item.averaging)
    expected = cfg.phema_stds and (cfg.phema_every == 0 or item.step % cfg.phema_every == 0)
    if kind != "phema" or not expected:
        return True
    return all((snapshot_dir(run_dir) / snapshot_name(item.step, std)).exists() for std in cfg.phema_stds)


def evaluate_inline(run_dir: str | Path, item: WorkItem, cfg: TrainConfig, live: set[str], *,
                    progress: bool = False, retry_failed: bool = False) -> dict | None:
    """Claim and evaluate one item here (its claim in `live` meanwhile); a failure is recorded
    (and logged), not raised. An item another evaluator took meanwhile is left to it (None)."""
    token = claim(run_dir, item, live, retry_failed=retry_failed)
    if token is None:
        log.info("step %d %s is taken by another evaluator; moving on", item.step, item.averaging)
        return None
    try:
        return evaluate_averaging(item.checkpoint, item.averaging, cfg, protocol=item.protocol, rank=0, world_size=1,
                                  progress=progress)
    except Exception as err:  # one bad item (e.g. window:k too early) must not stop the watcher
        log.exception("evaluating step %d %s failed", item.step, item.averaging)
        record_event(run_dir, item.key, "failed", error=f"{type(err).__name__}: {err}")
        return None
    finally:
        live.discard(token)


def process(run_dir: str | Path, items: list[WorkItem], cfg: TrainConfig, *, mode: str,
            cluster: ClusterConfig | None, stop: Callable[[], bool], progress: bool,
            retry_failed: bool = False) -> list[dict]:
    """Evaluate (inline) or submit (submit) the items; the records made here."""
    if mode == "submit":
        submit_items(run_dir, items, cfg, cluster, retry_failed=retry_failed)
        return []
    records, live = [], set()
    for item in items:
        if stop():
            break
        record = evaluate_inline(run_dir, item, cfg, live, progress=progress, retry_failed=retry_failed)
        if record is not None:
            records.append(record)
    return records


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"watcher mode {mode!r} is not one of {', '.join(MODES)}")


def sweep(run_dir: str | Path, cfg: TrainConfig, *, mode: str = "inline", finished: bool | None = None,
          cluster: ClusterConfig | None = None, retry_failed: bool = False, stop: Callable[[], bool] | None = None,
          progress: bool = False) -> list[dict]:
    """One pass over the checkpoints there now: evaluate (inline) or submit every pending due
    item; returns the records made here. `finished` (default: whether training has finished)
    adds the newest checkpoint and stops waiting for post-hoc EMA snapshots still to come."""
    check_mode(mode)
    finished = training_finished(run_dir, cfg.steps) if finished is None else finished
    items = work_items(due_points(run_dir, cfg, finished=finished), cfg)
    todo = [i for i in pending(run_dir, items, retry_failed=retry_failed) if finished or snapshots_ready(run_dir, i, cfg)]
    return process(run_dir, todo, cfg, mode=mode, cluster=cluster, stop=stop or (lambda: False), progress=progress,
                   retry_failed=retry_failed)


def watch(run_dir: str | Path, cfg: TrainConfig, *, mode: str = "inline", cluster: ClusterConfig | None = None,
          poll_s: float = 10.0, max_wait_s: float | None = None, stop: Callable[[], bool] | None = None,
          wait_for_jobs: bool = False, retry_failed: bool = False, progress: bool = False) -> list[dict]:
    """Evaluate `run_dir`'s due checkpoints as they appear, with the evaluation settings of
    `cfg` (cfg.steps is the run's last step). Polls every poll_s seconds; returns the records
    made in this process when training has finished and every due item is evaluated (submit
    mode: submitted, or with wait_for_jobs, evaluated), when `stop()` is true, or after
    max_wait_s seconds."""
    check_mode(mode)
    stop = stop or (lambda: False)
    deadline = time.monotonic() + max_wait_s if max_wait_s is not None else None
    records: list[dict] = []
    while True:
        finished = training_finished(run_dir, cfg.steps)  # read before listing, so the final checkpoint is listed
        records += sweep(run_dir, cfg, mode=mode, finished=finished, cluster=cluster, retry_failed=retry_failed,
                         stop=stop, progress=progress)
        retry_failed = False  # this watcher's own failures are not retried in a loop
        items = work_items(due_points(run_dir, cfg, finished=finished), cfg)
        if finished and all_settled(run_dir, items, wait_for_jobs=mode == "inline" or wait_for_jobs):
            log.info("training finished and its checkpoints are evaluated; the watcher stops")
            return records
        if stop() or (deadline is not None and time.monotonic() >= deadline):
            return records
        time.sleep(poll_s)


def points_at(step: int, checkpoint: Path, cfg: TrainConfig) -> list[tuple[int, Path, str]]:
    """The protocols due at one checkpoint asked for by name (the full one where none is due)."""
    protocols = cfg.eval.due_protocols(step, cfg.steps, newest_of_finished=step == cfg.steps) or ["full"]
    return [(step, checkpoint, protocol) for protocol in protocols]


def trigger(checkpoint: str | Path, cfg: TrainConfig, *, mode: str = "inline",
            cluster: ClusterConfig | None = None, progress: bool = False, retry_failed: bool = False) -> list[dict]:
    """Evaluate (or submit) one checkpoint now, e.g. from the trainer right after it saved;
    items already done or in flight are skipped (failed ones too, unless retry_failed).
    Returns the records made inline."""
    check_mode(mode)
    checkpoint = Path(checkpoint)
    run_dir = run_dir_of(checkpoint)
    step = dict((p.name, s) for s, p in complete_checkpoints(run_dir)).get(checkpoint.name)
    if step is None:
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint of {run_dir} (not in its manifest, or "
                                "its files do not match it); trigger an evaluation after the checkpoint is committed")
    items = pending(run_dir, work_items(points_at(step, checkpoint, cfg), cfg), retry_failed=retry_failed)
    return process(run_dir, items, cfg, mode=mode, cluster=cluster, stop=lambda: False, progress=progress,
                   retry_failed=retry_failed)


def evaluate_at_save(cfg: TrainConfig, checkpoint: Path, step: int) -> None:
    """eval.at_save, called by the trainer (rank 0) once `checkpoint` is complete: submit an
    evaluation job when a protocol is due at its step (the last step always is)."""
    if not cfg.eval.due_protocols(step, cfg.steps, newest_of_finished=step == cfg.steps):
        return
    try:
        trigger(checkpoint, cfg, mode="submit", cluster=cfg.cluster)
    except Exception as err:  # an evaluation that cannot be submitted must not stop training
        log.warning("could not submit the evaluation of %s (%s: %s); `dtr-scale eval run_dir=%s` scores it later",
                    checkpoint, type(err).__name__, err, cfg.run_dir)


def at_save_hook(cfg: TrainConfig) -> Callable[[Path, int], None] | None:
    """The trainer's on_checkpoint hook for cfg (None without eval.at_save); it pickles, so a
    submitted or spawned trainer takes it along."""
    return functools.partial(evaluate_at_save, cfg) if cfg.eval.at_save else None


def resolve_checkpoint(run_dir: str | Path, checkpoint: str) -> Path:
    """A checkpoint directory, or a step number of the run ("200" -> RUN_DIR/checkpoints/step_00000200)."""
    if checkpoint.isdigit():
        return checkpoint_dir(run_dir) / checkpoint_name(int(checkpoint))
    return Path(checkpoint)


def run_eval(cfg: TrainConfig, *, checkpoint: str | None = None, watch_run: bool = False, mode: str = "inline",
             poll_s: float = 10.0, max_wait_s: float | None = None, progress: bool = True,
             retry_failed: bool = False) -> list[dict]:
    """Evaluate cfg.run_dir with cfg.eval's settings and return the records made here.

    checkpoint: that checkpoint only (a directory, or a step number of the run).
    watch_run:  follow the run, evaluating due checkpoints as they appear, until training has
                finished and they are all evaluated (mode "inline": here; "submit": one
                submitit job per checkpoint on cfg.cluster, or local processes).
    neither:    one pass over the due checkpoints there now, the newest included.
    retry_failed: take items whose earlier attempt failed again.
    The table (RUN_DIR/eval/results.md) and plot (results.png) are rewritten at the end."""
    run_dir = Path(cfg.run_dir)
    if checkpoint is not None:
        records = trigger(resolve_checkpoint(run_dir, checkpoint), cfg, mode=mode, progress=progress,
                          retry_failed=retry_failed)
    elif watch_run:
        records = watch(run_dir, cfg, mode=mode, poll_s=poll_s, max_wait_s=max_wait_s, progress=progress,
                        retry_failed=retry_failed)
    else:
        records = sweep(run_dir, cfg, mode=mode, finished=True, progress=progress, retry_failed=retry_failed)
    if read_results(run_dir):
        table, plot = write_report(run_dir)
        log.info("evaluation results in %s and %s:\n%s", table, plot, table.read_text())
    return records


@dataclass(frozen=True)
class Failure:
    step: int
    averaging: str
    error: str
    protocol: str = "full"


def failures(run_dir: str | Path, cfg: TrainConfig, checkpoint: str | Path | None = None) -> list[Failure]:
    """The items (of `checkpoint`, else every due one and the newest) whose last attempt failed
    and that have no result: what `dtr-scale eval` lists and --retry-failed tries again."""
    if checkpoint is not None:
        steps = dict((p.name, s) for s, p in complete_checkpoints(run_dir))
        name = Path(checkpoint).name
        points = points_at(steps[name], Path(checkpoint), cfg) if name in steps else []
    else:
        points = due_points(run_dir, cfg, finished=True)
    done = done_keys(run_dir)
    last, _ = read_events(run_dir)
    return [Failure(item.step, item.averaging, last[item.key].get("error", "?"), item.protocol)
            for item in work_items(points, cfg)
            if item.key not in done and item.key in last and last[item.key]["event"] == "failed"]


def failures_message(failed: list[Failure]) -> str:
    """What `dtr-scale eval` prints (to stderr, exiting non-zero) when items failed."""
    lines = [f"  step {f.step} {f.averaging}{'' if f.protocol == 'full' else f' ({f.protocol} protocol)'}: {f.error}"
             for f in failed]
    return (f"dtr-scale eval: {len(failed)} evaluation(s) failed:\n" + "\n".join(lines) +
            "\nfix the cause and run the same command with --retry-failed to evaluate them again")
