"""The plan as text, one section per question: what runs, what the model costs, how long and
in how many jobs, what fits in GPU memory, what lands on disk, what evaluation costs; and
`plan_main`, which prints it (or the ConfigError) for `dtr-scale plan`."""

from __future__ import annotations

import sys

from dtr_scale.config import ConfigError, EvalConfig, TrainConfig
from dtr_scale.plan.calibration import model_key
from dtr_scale.plan.planner import GB, GIB, Plan, make_plan

Rows = list[tuple[str, str]]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h ({seconds / 86400:.1f} days)"


def _amount(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", GB), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _table(rows: Rows, indent: str = "  ") -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows]


def config_summary(cfg: TrainConfig) -> Rows:
    m, r, w, d, o, b, c, e = (cfg.model, cfg.routing, cfg.weighting, cfg.diffusion, cfg.optimizer, cfg.backend,
                              cfg.checkpoint, cfg.eval)
    routing = {"none": "none (vanilla DiT)", "dtr": f"DTR, beta {r.beta:g}, alpha {r.alpha:g}",
               "random": f"random (R-TR), beta {r.beta:g}, seed {r.seed}"}[r.kind]
    weighting = {"uniform": "uniform", "min_snr": f"min-SNR, gamma {w.min_snr_gamma:g} ({d.prediction})",
                 "p2": f"P2, gamma {w.p2_gamma:g}, k {w.p2_k:g}",
                 "ant_uw": f"ANT-UW, UW lr {w.uw_lr:g}, wd {w.uw_weight_decay:g}",
                 "ant_nash": f"ANT-Nash, solved every {w.nash_update_every} steps ({w.nash_max_iter} iterations), "
                             f"grad norm <= {w.nash_max_grad_norm:g}",
                 "pcgrad": "PCGrad over the interval gradients"}[w.kind]
    cluster = cfg.cluster
    where = ("this process" if cluster is None else
             f"{cluster.kind}: {cluster.nodes} node(s) x {cluster.tasks_per_node} tasks"
             + (f", partition {cluster.partition}" if cluster.partition else ""))
    speed = ", ".join(k for k, on in (("compile", b.compile), ("tf32", b.tf32), ("fused AdamW", b.fused_adamw),
                                      ("activation checkpointing", b.activation_checkpointing)) if on) or "none"
    return [
        ("model", f"{model_key(m)}, {m.in_channels}x{m.input_size}x{m.input_size} latents, {m.num_classes} classes, "
                  f"label dropout {m.class_dropout_prob:g}, learn sigma {m.learn_sigma}"),
        ("routing", routing),
        ("weighting", f"{weighting}; {w.num_intervals} {w.intervals} intervals, "
                      f"{'stratified' if w.stratify else 'uniform'} timesteps"),
        ("diffusion", f"{d.schedule} schedule, T {d.num_timesteps}; eval sampler {d.sampler} {d.sampling_steps} "
                      f"steps, CFG {d.cfg_scale:g} ({d.guided_channels} channels)"),
        ("optimizer", f"AdamW lr {o.lr:g}, wd {o.weight_decay:g}, betas {tuple(o.betas)}, constant lr, "
                      f"grad clip {o.grad_clip}; EMA {cfg.ema_decay:g} every step; post-hoc EMA sigma_rel "
                      f"{', '.join(f'{s:g}' for s in cfg.phema_stds) or 'off'}"),
        ("run", f"{cfg.steps:,} steps x global batch {cfg.global_batch_size} = "
                f"{cfg.steps * cfg.global_batch_size / 1e6:,.1f}M images, seed {cfg.seed}"),
        ("parallelism", f"{b.name}{f' ZeRO-{b.zero_stage}' if b.name == 'deepspeed' else ''} x {cfg.world_size} "
                        f"({where}); per-GPU batch {cfg.micro_batch_size} x grad_accum {b.grad_accum}; "
                        f"{b.precision}; {speed}"),
        ("data", f"{cfg.data.kind} {cfg.data.path or ''} ({cfg.data.format}), {cfg.data.num_workers} workers"),
        ("checkpoints", f"every {c.every:,} steps, keep last {c.keep_last}"
                        f"{f' + every {c.keep_every:,}' if c.keep_every else ''}"),
        ("evaluation", f"full protocol {_full_schedule(e)}: {e.num_samples:,} samples; quick protocol "
                       f"{f'every {e.quick.every:,} steps: {e.quick.num_samples:,} samples' if e.quick.every else 'off'}; "
                       f"{e.labels} labels, averaging {', '.join(e.averaging)}, {e.world_size} process(es)"),
    ]


def _full_schedule(e: EvalConfig) -> str:
    if e.milestones is None:
        return f"every {e.every:,} steps"
    return "at " + ", ".join("the last step" if m == -1 else f"{m:,}" for m in e.milestones)


def model_section(plan: Plan) -> list[str]:
    p, macs = plan.params.total, plan.forward_macs
    lines = _table([
        ("parameters", f"{p:,} ({p / 1e6:.1f}M; counted on a meta-device model)"),
        ("forward", f"{macs / 1e9:.2f} GMACs per image = {2 * macs / 1e9:.2f} GFLOPs "
                    f"(MACs = multiply-accumulates, the unit of the DiT paper's 'Gflops')"),
    ])
    return lines + _table([(k, f"{v / 1e9:8.3f} GMACs") for k, v in plan.macs.items()], indent="    ")


def time_section(plan: Plan) -> list[str]:
    t = plan.throughput
    rows = [("GPU type", f"{plan.gpu.name} ({plan.gpu_reason})"),
            ("images/s per GPU", "unknown" if t.images_per_s is None else f"{t.images_per_s:,.0f} training"),
            ("  source", t.source)]
    if plan.step is not None:
        s = plan.step
        rows += [
            ("step", f"{s.seconds * 1e3:,.1f} ms = compute {s.compute_s * 1e3:,.1f} ms + communication "
                     f"{s.communication_s * 1e3:,.1f} ms - {s.hidden_s * 1e3:,.1f} ms overlapped"),
            ("  communication", s.collective),
            ("wall time", f"{_duration(plan.wall_seconds)} for {plan.steps:,} steps on {plan.world_size} GPUs"),
            ("GPU-hours", f"{_amount(plan.training_gpu_hours)} training"),
        ]
    if plan.jobs is not None:
        j = plan.jobs
        verdict = ("NOT enough" if j.configured_requeues < j.needed_requeues else
                   "enough, with slack" if j.configured_requeues >= j.recommended_requeues else
                   f"enough, but short of the {j.recommended_requeues} that leave slack for late preemptions")
        rows += [("SLURM jobs", f"{_plural(j.jobs, 'job')} of {j.job_minutes} min = "
                                f"{_plural(j.needed_requeues, 'time-limit requeue')}"),
                 ("max_requeues", f"{j.configured_requeues} allowed: {verdict}")]
    return _table(rows)


def memory_section(plan: Plan) -> list[str]:
    limit = "not checked" if plan.gpu.memory_gib is None else f"of {plan.gpu.memory_gib:g} GiB: fits"
    return _table([(k, f"{v / GIB:7.2f} GiB") for k, v in plan.memory.parts.items()]
                  + [("total", f"{plan.memory.total / GIB:7.2f} GiB {limit}")])


def storage_section(plan: Plan) -> list[str]:
    ckpt, snap, kept = plan.checkpoint_bytes, plan.phema_snapshot_bytes, plan.checkpoints_kept
    return _table([
        ("latent shards", f"{_size(plan.dataset.bytes)} ({plan.dataset.source})"),
        ("checkpoints", f"{_size(ckpt)} each (model + EMA + {plan.phema_profiles} post-hoc EMA + AdamW) x "
                        f"{kept} kept + 1 being written = {_size((kept + 1) * ckpt)}"),
        ("post-hoc EMA", f"{plan.phema_snapshots} snapshots x {_size(snap)} ({plan.phema_profiles} sigma_rel) = "
                         f"{_size(plan.phema_snapshots * snap)}"),
        ("total", _size(plan.storage_bytes)),
    ])


def evaluation_section(plan: Plan, cfg: TrainConfig) -> list[str]:
    """Each protocol's points and cost, then their sum beside training."""
    rows = []
    names = {"full": "full protocol (FID, sFID, IS, precision, recall)", "quick": "quick protocol (FID alone)"}
    guidance = 2 if cfg.diffusion.cfg_scale > 1 else 1
    for ev in plan.evaluation:
        hours = ev.gpu_hours_per_point
        per_point = "unknown" if hours is None else _amount(hours) + " GPU-hours"
        rows.append((names[ev.protocol], f"{ev.points} points ({_steps(ev.steps)}), {ev.num_samples:,} samples x "
                                         f"{cfg.diffusion.sampling_steps} steps x {guidance} (CFG) x "
                                         f"{len(cfg.eval.averaging)} averaging = {ev.forwards_per_point / 1e6:,.1f}M "
                                         f"forwards, {ev.forwards_per_point * 2 * plan.forward_macs:.3g} FLOPs: "
                                         f"{per_point} each"))
        if ev.gpu_hours is not None:
            rows.append(("  all points", f"{ev.points} x {_amount(hours)} = {_amount(ev.gpu_hours)} GPU-hours "
                                         f"on {plan.gpu.name}"))
    hours = [ev.gpu_hours for ev in plan.evaluation]
    if hours and None not in hours:
        rows.append(("evaluation", f"{_amount(sum(hours))} GPU-hours"))
        if plan.training_gpu_hours is not None:
            rows.append(("run total", f"{_amount(plan.training_gpu_hours + sum(hours))} GPU-hours "
                                      "(training + evaluation)"))
    return _table(rows)


def _steps(steps: list[int]) -> str:
    return ", ".join(f"{s:,}" for s in steps) if len(steps) <= 4 else f"{steps[0]:,}, {steps[1]:,}, ... {steps[-1]:,}"


def intervals_section(plan: Plan, cfg: TrainConfig) -> list[str]:
    """Both SNR clusterings with their objective, the one this run trains with marked."""
    names = {"snr_dp": "ANT's programme (snr_dp)", "snr_optimal": "exact optimum (snr_optimal)"}
    return _table([(names[c.kind], f"cost {c.cost:,.2f} (ANT's code's centre: {c.code_cost:,.2f}), starts "
                                   f"{list(c.bounds[:-1])}{'  <- used' if c.kind == cfg.weighting.intervals else ''}")
                   for c in plan.intervals])


def format_plan(plan: Plan, cfg: TrainConfig) -> str:
    """The plan as text: config, model cost, speed and time, memory, storage, evaluation, warnings."""
    sections = [
        ("config", _table(config_summary(cfg))),
        ("model", model_section(plan)),
        ("speed and time", time_section(plan)),
        (f"memory per GPU ({cfg.backend.name}, per-GPU batch {cfg.micro_batch_size})", memory_section(plan)),
        ("storage (GB = 1e9 bytes)", storage_section(plan)),
        ("evaluation", evaluation_section(plan, cfg)),
    ]
    if plan.intervals:
        sections.insert(1, ("SNR timestep intervals (the ANT paper's objective: sum of |SNR_t - SNR_middle|)",
                            intervals_section(plan, cfg)))
    if plan.warnings:
        sections.append(("warnings", [f"  ! {w}" for w in plan.warnings]))
    lines = [f"dtr-scale plan: {cfg.model.name} on {cfg.world_size} x {plan.gpu.name}"]
    for title, body in sections:
        lines += ["", title, *body]
    return "\n".join(lines)


def plan_main(cfg: TrainConfig, gpu: str | None = None) -> int:
    """Print the plan; 0 when the run can go ahead, 2 (after printing the error) when it cannot."""
    try:
        plan = make_plan(cfg, gpu)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, cfg))
    return 0
