"""Every command README.md shows, run the way a user types it, so README cannot drift from the code.

README's commands are its indented (or fenced) code lines that start with a program of the
project (dtr-scale, dtr-bench, bash install.sh, sbatch, ...), continuation lines joined and
`# comments` dropped. Each must have an entry in COMMANDS saying how it runs here: as written
(with a tiny `steps=` and evaluation size where the real one takes hours), with `--cfg job`
and through `plan` (for a cluster this machine does not have), or with `--help` (synopsis
lines, and commands that need a GPU cluster's data). A command README gains without an entry,
or an entry whose command fails, fails this test.

The placeholders README uses are filled in here: RUN is the shortened main job's run
directory, laid out as a sweep's job (multirun/DATE/TIME/0) so that `compare multirun/DATE/TIME`
runs as written; `cluster=my_slurm` is README's step 2, a copy of example_cluster.yaml in a
directory of the user's configs (`--config-dir`).
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dtr_scale.configs import CONFIG_DIR
from dtr_scale.eval.results import read_results
from dtr_scale.launch.ledger import read_records

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # README's .venv/bin
PROGRAMS = ("dtr-scale ", "dtr-train", "dtr-prep", "dtr-bench", "bash install.sh", ".venv/bin/", "sbatch ",
            "torchrun ", "srun ")
SWEEP = "multirun/2026-01-01/00-00-00"  # README's multirun/DATE/TIME
# The main job, shortened: 20 steps, a checkpoint and an evaluation of 20 samples every 10.
SHORT = ["data.path=digits", "checkpoint.every=10", "checkpoint.keep_every=10", "eval.every=10",
         "eval.num_samples=20", "eval.batch_size=10", "diffusion.sampling_steps=5", "logging.every=5",
         "logging.wandb=disabled"]
MY_CONFIGS = ["--config-dir", "my_configs"]


def readme_commands(text: str) -> list[str]:
    """The command lines in README's code, continuations joined, comments dropped, spaces normalised."""
    lines, commands, fenced = text.splitlines(), [], False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            fenced = not fenced
        elif (fenced or line.startswith("    ")) and line.strip().startswith(PROGRAMS):
            command = line.strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            commands.append(" ".join(re.sub(r"\s+#\s.*$", "", command).split()))
        i += 1
    return commands


def dtr_scale(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "dtr-scale"), *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    if ok:
        assert done.returncode == 0, f"dtr-scale {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def argv(command: str, program: str = "dtr-scale") -> list[str]:
    """A README command's arguments after `program` (from inside `sbatch --wrap "..."` too)."""
    words = shlex.split(command)
    if words[0] == "sbatch":
        words = shlex.split(next(w.split("=", 1)[1] if w.startswith("--wrap=") else words[words.index(w) + 1]
                                 for w in words if w.startswith("--wrap")))
    if words[0].endswith(program):
        return words[1:]
    return words[words.index(next(w for w in words if w.endswith(program))) + 1:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A user's directory: their own configs (README step 2) beside the runs."""
    root = tmp_path_factory.mktemp("readme")
    (root / "my_configs" / "cluster").mkdir(parents=True)
    shutil.copy(Path(CONFIG_DIR) / "cluster" / "example_cluster.yaml", root / "my_configs" / "cluster" / "my_slurm.yaml")
    return root


@pytest.fixture(scope="module")
def install() -> None:
    """`bash install.sh`, once: idempotent, it must succeed on a machine already set up."""
    done = subprocess.run(["bash", "install.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ready (torch" in done.stdout


@pytest.fixture(scope="module")
def main_run(workspace) -> Path:
    """README's main job (`dtr-scale train`: the digits, 2 processes through the local launcher,
    evaluation beside it), shortened to 10 steps; RUN for the commands that follow."""
    run_dir = workspace / SWEEP / "0"
    dtr_scale("train", f"run_dir={run_dir}", "steps=10", *SHORT, cwd=workspace)
    return run_dir


def fill(command: str, run_dir: Path) -> str:
    return (command.replace("RUN/checkpoints/step_02000000", f"{run_dir}/checkpoints/step_00000020")
            .replace("run_dir=RUN", f"run_dir={run_dir}").replace("multirun/DATE/TIME", SWEEP))


def main_job(command: str, workspace: Path, install: None, main_run: Path) -> None:
    results = [(r["step"], r["averaging"], r["num_samples"]) for r in read_results(main_run)]
    assert (10, "ema", 20) in results  # scored beside training
    assert (main_run / ".hydra" / "config.yaml").exists() and (main_run / "provenance.jsonl").exists()
    assert [r["state"] for r in read_records(main_run)][:2] == ["running", "finished"]


def whole_suite(command: str, workspace: Path, install: None, main_run: Path) -> None:
    done = subprocess.run([str(BIN / "python"), "-m", "pytest", "-q", "--collect-only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.search(r"\d+ tests collected", done.stdout)


def help_of(command: str, workspace: Path, install: None, main_run: Path) -> None:
    """A synopsis line, or a command that needs a cluster's data: its subcommand answers --help."""
    words = shlex.split(command)
    program, args = ("dtr-scale", argv(command)) if words[0] == "sbatch" else (words[0], words[1:])
    keep = 2 if args[0] == "prep" and args[1].isalpha() else 1  # prep's own subcommands have their own help
    done = subprocess.run([str(BIN / program), *args[:keep], "--help"], cwd=workspace, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert re.search(r"usage|Config groups", done.stdout, re.IGNORECASE), done.stdout


def composed_and_planned(command: str, workspace: Path, install: None, main_run: Path) -> None:
    """A run for a GPU cluster, or each run of a sweep: the config it composes (--cfg job), and
    `plan` accepts it (once per configuration: seeds do not change what plan checks)."""
    args = [a for a in argv(command) if a not in ("-m",)]
    swept = [a for a in args if "," in a and "=" in a and "[" not in a]
    choices = [[f"{a.split('=')[0]}={v}" for v in a.split("=", 1)[1].split(",")] if a in swept else [a]
               for a in args]
    firsts = {c[0] for c in choices}
    for variant in itertools.product(*choices):
        extra = MY_CONFIGS if any(a == "cluster=my_slurm" for a in variant) else []
        shown = dtr_scale(variant[0], *extra, *variant[1:], "--cfg", "job", cwd=workspace)
        assert "model:" in shown.stdout
        first_seed = all(a in firsts for a in variant if a.startswith("seed="))
        if variant[0] == "train" and first_seed:
            dtr_scale("plan", *extra, *variant[1:], cwd=workspace)  # the values, checked


def planned(command: str, workspace: Path, install: None, main_run: Path) -> None:
    args = argv(command)
    extra = MY_CONFIGS if "cluster=my_slurm" in args else []
    before = sorted(workspace.iterdir())
    done = dtr_scale(args[0], *extra, *args[1:], cwd=workspace)
    assert "GPU-hours" in done.stdout and sorted(workspace.iterdir()) == before  # planning writes nothing


def plan_refuses(command: str, workspace: Path, install: None, main_run: Path) -> None:
    done = dtr_scale(*argv(command), cwd=workspace, ok=False)
    assert done.returncode == 2 and done.stdout == ""
    assert "dtr-scale plan: config error: global_batch_size: 257 is not divisible by world_size=2" in done.stderr


def shown_config(command: str, workspace: Path, install: None, main_run: Path) -> None:
    done = dtr_scale(*argv(fill(command, main_run)), "--cfg", "job", cwd=workspace)
    assert "model:" in done.stdout


def in_process(command: str, workspace: Path, install: None, main_run: Path) -> None:
    """`cluster=none`: trained in this process, no job ledger."""
    args = [a.replace("steps=200", "steps=4") for a in argv(command)]
    run_dir = workspace / "in_process"
    done = dtr_scale(*args, f"run_dir={run_dir}", *SHORT, "checkpoint.every=2", "eval.every=2", cwd=workspace)
    assert "training finished at step 4" in done.stderr + done.stdout
    assert not (run_dir / "jobs.jsonl").exists() and (run_dir / "checkpoints" / "step_00000004").is_dir()


def resumed(command: str, workspace: Path, install: None, main_run: Path) -> None:
    """`run_dir=RUN` resumes RUN, and Hydra's outputs go there, not to a new runs/DATE/TIME."""
    args = [a.replace("steps=5000", "steps=20") for a in argv(fill(command, main_run))]
    dtr_scale(*args, *SHORT, cwd=workspace)
    jobs = [(r["state"], r["start_step"], r.get("end_step")) for r in read_records(main_run)]
    assert jobs[:4] == [("running", 0, None), ("finished", 0, 10), ("running", 10, None), ("finished", 10, 20)]
    assert "steps: 20" in (main_run / ".hydra" / "config.yaml").read_text()
    assert (main_run / "train.log").exists() and not (workspace / "runs").exists()


def evaluated(command: str, workspace: Path, install: None, main_run: Path) -> None:
    """`eval` with a group override (diffusion=linear: that group's settings, then keys on top)."""
    if not (main_run / "checkpoints" / "step_00000020").is_dir():
        resumed("dtr-scale train run_dir=RUN steps=5000", workspace, install, main_run)
    dtr_scale(*argv(fill(command, main_run)), "eval.num_samples=20", "eval.batch_size=10", cwd=workspace)
    raw = [r for r in read_results(main_run) if r["averaging"] == "raw"]
    assert [(r["step"], r["sampling_steps"], r["num_samples"]) for r in raw] == [(20, 5, 20)]


def exported(command: str, workspace: Path, install: None, main_run: Path) -> None:
    if not (main_run / "checkpoints" / "step_00000020").is_dir():
        resumed("dtr-scale train run_dir=RUN steps=5000", workspace, install, main_run)
    dtr_scale(*argv(fill(command, main_run)), cwd=workspace)
    assert (workspace / "dit_l2_dtr_antuw_2m.safetensors").stat().st_size > 0


def compared(command: str, workspace: Path, install: None, main_run: Path) -> None:
    done = dtr_scale(*argv(fill(command, main_run)), cwd=workspace)
    assert (workspace / SWEEP / "comparison.md").exists() and "plot:" in done.stdout


def status_shown(command: str, workspace: Path, install: None, main_run: Path) -> None:
    done = dtr_scale(*[str(main_run) if a == "RUN" else a for a in argv(command)], cwd=workspace)
    assert "code       dtr-scale" in done.stdout and "hardware   " in done.stdout


Runner = Callable[[str, Path, None, Path], None]
COMMANDS: dict[str, Runner] = {
    # Two commands for a fresh machine
    "bash install.sh && .venv/bin/dtr-scale train": main_job,
    "bash install.sh && .venv/bin/python -m pytest -q": whole_suite,
    # One command: dtr-scale (the synopsis)
    "dtr-scale prep images|merge|verify|digits ... latent shards from images": help_of,
    "dtr-scale train [overrides] train here, or as a local / SLURM job": help_of,
    "dtr-scale eval run_dir=RUN [--watch] [--submit] [overrides]": help_of,
    "dtr-scale plan [overrides] [--gpu TYPE] what a run will cost, before submitting it": help_of,
    "dtr-scale status RUN_DIR jobs, requeues, checkpoint, throughput, results": help_of,
    "dtr-scale compare RUN_DIR... | SWEEP_DIR several runs in one table and one plot": help_of,
    "dtr-scale export CHECKPOINT|RUN_DIR OUT.safetensors": help_of,
    "dtr-scale sample --weights PATH [overrides] images from any weights: a grid and an ADM npz": help_of,
    "dtr-scale train model=dit_l2 routing=dtr weighting=ant_uw global_batch_size=256 world_size=8 "
    "backend=fsdp backend.precision=bf16 device=cuda cluster=my_slurm": composed_and_planned,
    "dtr-scale train --cfg job": shown_config,
    # On a cluster: the paper's runs
    'sbatch --array=0-63 --wrap "dtr-scale prep images /data/imagenet/train /data/latents/in256 '
    '--autoencoder sd-vae-ft-ema --vae-weights /models/sd-vae-ft-ema"': help_of,
    "dtr-scale prep merge /data/latents/in256": help_of,
    "dtr-scale plan experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=my_slurm data.path=/data/latents/in256": planned,
    "dtr-scale train experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=my_slurm data.path=/data/latents/in256":
        composed_and_planned,
    'sbatch --wrap "dtr-scale eval run_dir=RUN --watch --submit '
    'eval.inception=/models/pt_inception-2015-12-05-6726825d.pth"': shown_config,
    "dtr-scale export RUN/checkpoints/step_02000000 dit_l2_dtr_antuw_2m.safetensors": exported,
    # The released DiT-XL/2 (needs its weights, the VAE and a GPU): the commands answer --help
    "dtr-scale eval --weights DiT-XL-2-256x256.pt --autoencoder sd-vae-ft-ema model=dit_xl2 routing=none "
    "data=imagenet256 diffusion.guided_channels=first3 eval.labels=random eval.num_samples=50000 "
    "eval.reference=VIRTUAL_imagenet256_labeled.npz eval.inception=pt_inception-2015-12-05-6726825d.pth "
    "device=cuda run_dir=runs/dit_xl2_released": help_of,
    "dtr-scale sample --weights DiT-XL-2-256x256.pt --autoencoder sd-vae-ft-ema model=dit_xl2 routing=none "
    "classes=[207,360,387,974] num_samples=8 diffusion.cfg_scale=4.0 diffusion.sampler=ddpm "
    "diffusion.sampling_steps=250 seed=0 out=samples/xl2 device=cuda": help_of,
    # Launching the way clusters do: the config each rank composes
    "torchrun --standalone --nproc_per_node=8 --no-python dtr-scale train cluster=none world_size=8 "
    "run_dir=runs/my_run experiment=dtr_paper/dit_l2_dtr_antuw_2m": shown_config,
    "srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 dtr-scale train cluster=none world_size=16 "
    "run_dir=runs/my_run experiment=dtr_paper/dit_l2_dtr_antuw_2m": shown_config,
    # The paper in miniature
    "dtr-scale train -m seed=0,1,2 experiment=miniature/vanilla,miniature/dtr,miniature/dtr_antuw,"
    "miniature/dtr_nash": composed_and_planned,
    "dtr-scale compare multirun/DATE/TIME": compared,
    # Benchmarks
    "dtr-bench train": help_of,
    "dtr-bench eval": help_of,
    "dtr-bench routing": help_of,
    "dtr-bench data": help_of,
    "dtr-bench reliability": help_of,
    "dtr-bench gpu": help_of,
    "dtr-bench overhead": help_of,
    "dtr-bench scale --fraction 0.05": help_of,  # tests/test_bench_scale.py runs it at a tiny fraction
    # The user's path through the rest of README's text (lines README is to show as commands)
    "dtr-scale train cluster=none world_size=1 steps=200": in_process,
    "dtr-scale train run_dir=RUN steps=5000": resumed,
    # tests/train/test_resume_from.py runs resume_from=STEP|PATH through dtr-scale train
    "dtr-scale train run_dir=RUN steps=5000 resume_from=2000": shown_config,
    "dtr-scale train run_dir=RUN2 resume_from=RUN/superseded/after_step_00002000/checkpoints/step_00003000": shown_config,
    "dtr-scale train experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=my_slurm data.path=/data/latents/in256 "
    "eval.at_save=true": composed_and_planned,
    "dtr-scale eval run_dir=RUN --checkpoint 20 diffusion=linear diffusion.sampling_steps=5 eval.averaging=[raw]":
        evaluated,
    "dtr-scale plan experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=example_cluster": planned,
    "dtr-scale plan global_batch_size=257": plan_refuses,
    "dtr-scale status RUN": status_shown,
}


def test_every_command_readme_shows_is_run_here():
    missing = [c for c in readme_commands(README.read_text()) if c not in COMMANDS]
    assert missing == [], "README shows commands this test does not run; add each to COMMANDS:\n" + "\n".join(missing)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_readme_command_works(command, request):
    runner = COMMANDS[command]
    workspace = request.getfixturevalue("workspace")
    # Only the commands that need the install or the main job's run wait for them.
    install = request.getfixturevalue("install") if runner in (main_job, whole_suite) else None
    needs_run = runner in (main_job, resumed, evaluated, exported, compared, status_shown)
    main_run = request.getfixturevalue("main_run") if needs_run else workspace / SWEEP / "0"
    runner(command, workspace, install, main_run)
