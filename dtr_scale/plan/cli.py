"""`dtr-scale plan`: print what a run will cost, from the same Hydra config as `dtr-scale train`.

    dtr-scale plan experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=example_cluster
    dtr-scale plan --gpu a100_80gb experiment=dtr_paper/400k/dit_xl2_ant_uw_dtr cluster=my_slurm

--gpu names the GPU type (a name in dtr_scale/plan/calibration.yaml) where the cluster config
does not; without either the plan assumes an H100 and says so.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dtr_scale.plan.report import plan_main
from dtr_scale.train.cli import CONFIG_DIR, config_or_exit

# Planning writes nothing: no Hydra output directory, no log file.
QUIET_HYDRA = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled")


def pop_gpu_flag(argv: list[str]) -> str | None:
    """Remove `--gpu TYPE` / `--gpu=TYPE` from argv (Hydra would reject it); the type, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--gpu="):
            del argv[i]
            return arg.split("=", 1)[1]
        if arg == "--gpu":
            if i + 1 >= len(argv):
                sys.exit("dtr-scale plan: --gpu needs a GPU type, e.g. --gpu h100")
            gpu = argv[i + 1]
            del argv[i:i + 2]
            return gpu
    return None


def main() -> None:
    gpu = pop_gpu_flag(sys.argv)
    sys.argv[1:1] = QUIET_HYDRA

    @hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
    def plan(raw: DictConfig) -> None:
        sys.exit(plan_main(config_or_exit(raw), gpu))

    plan()


if __name__ == "__main__":
    main()
