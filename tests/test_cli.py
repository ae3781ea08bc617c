"""`dtr-scale`: every subcommand answers --help with its options (the Hydra ones with the config
groups and an example), and a wrong config fails before anything starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DTR_SCALE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_without_a_subcommand_it_lists_them():
    out = run().stdout
    for command in ("prep", "train", "eval", "plan", "status", "compare", "export"):
        assert f"dtr-scale {command}" in out


def test_train_help_shows_the_config_groups_and_examples():
    out = run("train", "--help").stdout
    assert "Config groups (group=option):" in out
    groups = {line.split(": ")[0]: set(line.split(": ")[1].split(", ")) for line in out.splitlines()
              if ": " in line and not line.startswith(" ")}
    assert {"dit_b2", "dit_l2", "dit_xl2", "tiny"} <= groups["model"]
    assert {"dtr", "none", "random"} <= groups["routing"] and {"ant_uw", "min_snr", "uniform"} <= groups["weighting"]
    assert {"example_cluster", "local", "none", "slurm_debug"} <= groups["cluster"]
    assert {"ddp", "deepspeed", "fsdp"} <= groups["backend"]
    assert {"base", "dit_l2_dtr_antuw_2m"} <= groups["experiment/dtr_paper"]
    assert "  at_save: false" in out and "  zero_stage: 2" in out  # schema defaults no YAML file repeats
    assert "dtr-scale train experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=my_slurm" in out


@pytest.mark.parametrize("command, expected", [
    ("plan", "Config groups (group=option):"),
    ("eval", "--watch"),
    ("status", "run_dir"),
    ("compare", "sweep folder"),
    ("export", "safetensors"),
    ("prep", "digits"),
])
def test_every_subcommand_has_help(command, expected):
    done = run(command, "--help")
    assert done.returncode == 0 and expected in done.stdout


def test_a_wrong_key_or_value_fails_before_any_work(tmp_path):
    bad_key = run("train", f"run_dir={tmp_path}/a", "+backend.zero_stages=4", cwd=tmp_path)
    assert bad_key.returncode == 2 and "zero_stages" in bad_key.stdout + bad_key.stderr
    bad_value = run("train", f"run_dir={tmp_path}/b", "backend=deepspeed", "backend.zero_stage=4", cwd=tmp_path)
    assert bad_value.returncode == 2
    assert "backend.zero_stage: got 4, DeepSpeed ZeRO has stages 1, 2, 3" in bad_value.stdout + bad_value.stderr
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "jobs.jsonl").exists()
    assert not (tmp_path / "data").exists()  # not even the digits were prepared


def test_version():
    from dtr_scale import __version__

    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"dtr-scale {__version__}"


def test_each_hydra_subcommand_has_its_own_help_with_its_flags_and_every_schema_default():
    plan = run("plan", "--help").stdout
    assert "--gpu TYPE" in plan and "dtr-scale plan [--gpu TYPE] [overrides]" in plan
    assert "  at_save: false" in plan and "  inception: null" in plan  # schema defaults no YAML file repeats
    evaluate = run("eval", "--help").stdout
    assert "--checkpoint" in evaluate and "--retry-failed" in evaluate and "dtr-scale eval run_dir=RUN" in evaluate
    assert "--gpu" not in evaluate and "dtr-scale train:" not in evaluate


@pytest.mark.parametrize("override, reason", [
    ("global_batch_size=257", "global_batch_size: 257 is not divisible by world_size=2"),
    ("backend.precision=fp16", "backend.precision: got 'fp16', expected one of fp32, bf16"),
    ("cluster.gpus_per_node=4", "cluster.tasks_per_node: got 2 with gpus_per_node=4"),
])
def test_plan_explains_a_setting_that_cannot_work_on_stderr(override, reason, tmp_path):
    done = run("plan", override, cwd=tmp_path)
    assert done.returncode == 2 and f"dtr-scale plan: config error: {reason}" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_cluster_null_and_none_both_train_in_this_process(tmp_path):
    for spelling in ("cluster=none", "cluster=null"):
        done = run("train", spelling, "--cfg", "job", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "\ncluster: null\n" in done.stdout


def test_run_dir_after_a_flag_is_an_override_too(tmp_path):
    """run_dir=RUN brings hydra.run.dir=RUN along, beside it: Hydra's parser takes the overrides
    as one run of words, so `--cfg job run_dir=RUN` must not split them."""
    done = run("train", "--cfg", "job", f"run_dir={tmp_path}/run", "steps=7", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"\nrun_dir: {tmp_path}/run\n" in done.stdout and "\nsteps: 7\n" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_users_config_dir_layers_on_the_packaged_configs(tmp_path):
    (tmp_path / "mine" / "cluster").mkdir(parents=True)
    (tmp_path / "mine" / "cluster" / "my_slurm.yaml").write_text("kind: slurm\npartition: gpu_long\n"
                                                                   "gpus_per_node: 8\ntasks_per_node: 8\n")
    done = run("plan", "--config-dir", str(tmp_path / "mine"), "experiment=dtr_paper/dit_l2_dtr_antuw_2m",
               "cluster=my_slurm", "--gpu", "a100_80gb", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "DiT-L/2 on 8 x a100_80gb" in done.stdout and "gpu_long" in done.stdout


def test_a_config_dir_adds_options_and_the_packaged_file_wins_a_shared_name(tmp_path):
    # what README and --help say: give your files new names (Hydra searches --config-dir second)
    (tmp_path / "mine" / "model").mkdir(parents=True)
    for name in ("tiny", "my_tiny"):
        (tmp_path / "mine" / "model" / f"{name}.yaml").write_text("defaults:\n  - tiny\n  - _self_\ndepth: 3\n"
                                                                  if name == "my_tiny" else "depth: 3\n")
    for option, depth in (("tiny", 4), ("my_tiny", 3)):
        done = run("train", "--config-dir", str(tmp_path / "mine"), f"model={option}", "--cfg", "job", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"\n  depth: {depth}\n" in done.stdout


WITHOUT_TORCH = """
import sys
sys.argv = ["dtr-scale", *sys.argv[1:]]
from dtr_scale.cli import main
try:
    main()
finally:
    print("imported:", *(name for name in ("torch", "submitit", "numpy") if name in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("args, code, error", [
    (["train", "--help"], 0, None),
    (["train", "--cfg", "job"], 0, None),
    (["train", "model.bogus=1"], 2, "Could not override 'model.bogus'. To append to your config use +model.bogus=1"),
    (["train", "model=dit_xxl"], 2, "In 'train': Could not find 'model/dit_xxl'"),  # Hydra's own composition error
    (["train", "routing.beta=0"], 2, "routing.beta"),  # a value the schema refuses
    (["train", "global_batch_size=36"], 2, "global_batch_size: per-rank batch 18 (= 36 / world_size 2"),
    (["train", "data.embedded=false", "data.path=nowhere", "eval.inline=false"], 2,  # a launch check
     "data.path: no manifest.json at {tmp_path}/nowhere"),
    (["plan", "--help"], 0, None),
    (["plan", "--cfg", "job"], 0, None),
    (["plan", "global_batch_size=257"], 2, "global_batch_size: 257 is not divisible by world_size=2"),
    (["plan", "model.bogus=1"], 2, "Could not override 'model.bogus'"),
    (["plan", "model=dit_xxl"], 2, "In 'train': Could not find 'model/dit_xxl'"),  # plan.yaml extends train.yaml
    (["eval", "--help"], 0, None),
    (["eval", "--cfg", "job"], 0, None),
    (["eval", "model.bogus=1"], 2, "Could not override 'model.bogus'"),
])
def test_help_the_config_and_config_errors_answer_without_importing_torch(args, code, error, tmp_path):
    """Login nodes: these answer in a fraction of the 3 s that importing torch and DCP takes, with
    one line on stderr for an error, and write nothing."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    *lines, imported = done.stderr.splitlines()
    assert imported == "imported:"  # neither torch, submitit nor numpy
    if error is None:
        assert lines == [] and done.stdout
    else:
        [line] = lines
        assert line.startswith(f"dtr-scale {args[0]}: config error: {error.format(tmp_path=tmp_path)}"), line
    assert list(tmp_path.iterdir()) == []


def test_the_imagenet_presets_launch_checks_answer_without_torch_or_numpy(tmp_path):
    # every problem on a line of its own: the data, and the evaluation it would run with no reference batch
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "train", "data=imagenet256", "data.path=nowhere"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    *lines, imported = done.stderr.splitlines()
    assert done.returncode == 2 and imported == "imported:", done.stderr
    assert [line.split(": ")[2] for line in lines] == ["data.path", "eval.reference is not set"]
    assert all(line.startswith("dtr-scale train: config error: ") for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_eval_without_a_run_says_so_without_importing_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "eval"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "dtr-scale eval: config error: run_dir: name the run to evaluate, e.g. `dtr-scale eval run_dir=runs/my_run`",
        "imported:"]


HYDRA_MAIN_OR_RUN_HYDRA = """
import logging, sys
from hydra.core.hydra_config import HydraConfig

def task(cfg):
    logging.getLogger("dtr_scale").info("job %s, run dir %s", HydraConfig.get().job.name, cfg.run_dir)

which, *args = sys.argv[1:]
if which == "hydra.main":
    import hydra
    sys.argv = ["dtr-scale train", *args]
    hydra.main(config_path="pkg://dtr_scale.configs", config_name="train", version_base="1.3")(task)()
else:
    from dtr_scale.command_line import run_hydra
    run_hydra("train", "train", task, args)
"""


def test_a_run_composed_once_gets_what_hydra_main_gives_it(tmp_path):
    """Composing once (hydra.main composes a run's config twice) keeps Hydra's run: the same .hydra/
    files, HydraConfig inside the task, the job's log file, and the same --cfg job text."""
    def run_with(which: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", HYDRA_MAIN_OR_RUN_HYDRA, which, *args], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)

    run_dir, overrides = tmp_path / "run", ["cluster=none", "logging.wandb=disabled", "model=dit_b2"]
    # run_hydra adds hydra.run.dir=RUN for run_dir=RUN itself; hydra.main is given it
    assert run_with("hydra.main", f"hydra.run.dir={run_dir}", f"run_dir={run_dir}", *overrides).returncode == 0
    hydras = {path.name: path.read_text() for path in (run_dir / ".hydra").iterdir()}
    hydras_log = (run_dir / "train.log").read_text()
    shutil.rmtree(run_dir)
    ours = run_with("run_hydra", f"run_dir={run_dir}", *overrides)
    assert ours.returncode == 0, ours.stderr
    assert {path.name: path.read_text() for path in (run_dir / ".hydra").iterdir()} == hydras
    assert sorted(hydras) == ["config.yaml", "hydra.yaml", "overrides.yaml"] and "model: dit_b2" in hydras["hydra.yaml"]
    [line] = (run_dir / "train.log").read_text().splitlines()
    assert line.endswith(f"[dtr_scale][INFO] - job train, run dir {run_dir}") and hydras_log.endswith(line[25:] + "\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    shown = [run_with(which, "--cfg", "job", *overrides) for which in ("hydra.main", "run_hydra")]
    assert shown[0].returncode == shown[1].returncode == 0 and "  name: DiT-B/2\n" in shown[0].stdout
    assert shown[1].stdout == shown[0].stdout


def test_what_composing_once_does_not_answer_goes_to_hydra_main():
    from dtr_scale.command_line import hydra_args, runs_once

    for args in (["steps=5"], ["--cfg", "job", "steps=5"], ["steps=5", "--cfg", "all", "--resolve", "-p", "model"],
                 ["-m", "--help"], ["--config-dir", "mine", "cluster=my_slurm"]):
        assert runs_once(hydra_args(args)), args
    for args in (["-m", "seed=1,2"], ["hydra.mode=MULTIRUN", "seed=1,2"], ["--info", "searchpath"], ["--hydra-help"],
                 ["-cn", "eval"], ["--resolve"], ["--run", "--cfg", "job"], ["--shell-completion"]):
        assert not runs_once(hydra_args(args)), args


COUNTED_LAUNCH_CHECKS = """
import logging, sys
import dtr_scale.preflight as preflight
import dtr_scale.run as run
from hydra.core.hydra_config import HydraConfig

checks = preflight.launch_problems
def counted(cfg):
    print("launch checks of", cfg.run_dir, flush=True)
    return checks(cfg)
preflight.launch_problems = counted
# What is counted is the command's path to training, not training itself: each job logs instead.
run.run_training = lambda cfg: logging.getLogger("dtr_scale").info("training %s", cfg.run_dir)
sys.argv = ["dtr-scale", "train", *sys.argv[1:]]
from dtr_scale.cli import main
main()
"""


def test_the_launch_checks_run_once_per_launch(tmp_path):
    """Before the run directory is made (Hydra's callback), not a second time in the job: a remote
    dataset's manifest is fetched once. A multirun checks each job once, in its own directory."""
    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", COUNTED_LAUNCH_CHECKS, *args, "cluster=none", "data=synthetic",
                               "logging.wandb=disabled"], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    single = train(f"run_dir={tmp_path}/run")
    assert single.returncode == 0, single.stderr
    assert [line for line in single.stdout.splitlines() if line.startswith("launch checks")] == [
        f"launch checks of {tmp_path}/run"]
    assert (tmp_path / "run" / "train.log").read_text().endswith(f"[dtr_scale][INFO] - training {tmp_path}/run\n")
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").is_file()
    sweep = train("-m", "seed=1,2")
    assert sweep.returncode == 0, sweep.stderr
    [day] = (tmp_path / "multirun").iterdir()
    [time] = day.iterdir()
    assert [line for line in sweep.stdout.splitlines() if line.startswith("launch checks")] == [
        f"launch checks of {time}/0", f"launch checks of {time}/1"]
    for job in ("0", "1"):
        assert (time / job / "train.log").read_text().endswith(f"[dtr_scale][INFO] - training {time}/{job}\n")


def test_an_unknown_command_is_named_and_exits_2():
    done = run("bogus")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1] == ("dtr-scale: unknown command 'bogus'; the commands are prep, train, eval, "
                                            "plan, status, compare, export, sample (`dtr-scale COMMAND --help` for each)")


def test_model_name_alone_is_refused_naming_the_preset(tmp_path):
    done = run("train", "model.name=DiT-XL/2", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr == (
        "dtr-scale train: config error: model.name=DiT-XL/2: the name alone keeps the default model group's depth, "
        "width and latent size (model=tiny); select the preset with model=dit_xl2 instead\n")
    assert list(tmp_path.iterdir()) == []
    with_group = run("train", "model=dit_xl2", "model.name=DiT-XL/4", "--cfg", "job", cwd=tmp_path)
    assert with_group.returncode == 0 and "  name: DiT-XL/4\n  input_size: 32\n" in with_group.stdout  # on a preset


def test_hydras_own_errors_are_one_line_exit_2_and_full_with_verbose(tmp_path):
    done = run("train", "model=dit_xxl", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("dtr-scale train: config error: In 'train': Could not find 'model/dit_xxl'")
    assert "dit_xl2" in done.stderr and "`dtr-scale train --help` lists the groups and keys" in done.stderr
    verbose = run("train", "model=dit_xxl", "--verbose", cwd=tmp_path)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_batch_split_message_names_the_multiple_that_works(tmp_path):
    done = run("train", "global_batch_size=36", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.endswith(
        "choose a global_batch_size that is a multiple of world_size x grad_accum x num_intervals = 16\n")
    assert run("train", "global_batch_size=32", "--cfg", "job", cwd=tmp_path).returncode == 0


def test_a_failure_while_working_is_one_line_exit_1_and_the_traceback_comes_with_verbose(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "manifest.json").write_text('{"step": ')
    done = run("status", str(tmp_path / "run"))
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"dtr-scale status: error: CheckpointError: {tmp_path}/run/checkpoints/manifest.json "
                                  f"is damaged")
    assert done.stderr.endswith("(rerun with --verbose to print it)\n")
    for verbose in (run("status", str(tmp_path / "run"), "--verbose"),
                    subprocess.run([DTR_SCALE, "status", str(tmp_path / "run")], capture_output=True, text=True,
                                   timeout=60, env={**os.environ, "HYDRA_FULL_ERROR": "1"})):
        assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
        assert "dtr_scale.train.manifest.CheckpointError" in verbose.stderr


def test_status_of_a_path_that_is_no_run_is_a_usage_error(tmp_path):
    done = run("status", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and done.stderr.startswith(f"dtr-scale status: no run directory at {tmp_path}/nowhere")


HYDRAS_OWN_HELP = """
import sys, hydra
sys.argv = ["dtr-scale train", *sys.argv[1:]]
hydra.main(config_path="pkg://dtr_scale.configs", config_name="train", version_base="1.3")(lambda cfg: None)()
"""


def test_the_fast_help_prints_what_hydras_own_help_prints(tmp_path):
    """--help lists the groups itself (Hydra's listing copies its repository per group: 2 s); same text."""
    (tmp_path / "mine" / "cluster").mkdir(parents=True)
    (tmp_path / "mine" / "cluster" / "my_slurm.yaml").write_text("kind: slurm\ngpus_per_node: 8\n")
    args = ["--config-dir", str(tmp_path / "mine"), "cluster=my_slurm", "world_size=8", "model=dit_b2", "--help"]
    hydras = subprocess.run([sys.executable, "-c", HYDRAS_OWN_HELP, *args], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    ours = run("train", *args, cwd=tmp_path)
    assert hydras.returncode == ours.returncode == 0
    assert "cluster: example_cluster, local, my_slurm, none" in ours.stdout and "  hidden_size: null" in ours.stdout
    assert ours.stdout == hydras.stdout


PREP_SPELLINGS = [[str(Path(sys.executable).parent / "dtr-prep")], [DTR_SCALE, "prep"]]


@pytest.mark.parametrize("prep", PREP_SPELLINGS, ids=["dtr-prep", "dtr-scale prep"])
def test_prep_follows_the_exit_status_convention(prep, tmp_path):
    def prep_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prep, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)

    nothing = prep_run("verify", str(tmp_path / "nowhere"))  # a usage error: no dataset at the path
    assert nothing.returncode == 2 and nothing.stderr.startswith(
        f"dtr-scale prep: config error: no manifest.json at {tmp_path}/nowhere: the dataset is not prepared")
    assert len(nothing.stderr.splitlines()) == 1 and not (tmp_path / "nowhere").exists()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text('{"shards": [')  # damage found while working
    damaged = prep_run("verify", str(tmp_path / "data"))
    [line] = damaged.stderr.splitlines()
    assert damaged.returncode == 1 and line.endswith("(rerun with --verbose to print it)")
    assert line.startswith(f"dtr-scale prep: error: CorruptFileError: {tmp_path}/data/manifest.json is not valid JSON")
    verbose = prep_run("verify", str(tmp_path / "data"), "--verbose")
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


DTR_BENCH = str(Path(sys.executable).parent / "dtr-bench")


def test_bench_names_an_unknown_benchmark_and_a_failure_in_one_line(tmp_path):
    unknown = subprocess.run([DTR_BENCH, "bogus"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and unknown.stdout == "" and unknown.stderr == (
        "dtr-bench: unknown benchmark 'bogus'; the benchmarks are data, eval, gpu, overhead, reliability, routing, "
        "scale, train (`dtr-bench NAME --help` for each)\n")
    failing = ["routing", "--model", "DiT-Q/2", "--steps", "1"]  # fails inside the benchmark, not in its arguments
    failed = subprocess.run([DTR_BENCH, *failing], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert failed.returncode == 1 and failed.stderr.startswith(
        "dtr-bench routing: error: ValueError: unknown model 'DiT-Q/2'")
    assert len(failed.stderr.splitlines()) == 1 and failed.stderr.endswith("(rerun with --verbose to print the traceback)\n")
    verbose = subprocess.run([DTR_BENCH, *failing, "--verbose"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
