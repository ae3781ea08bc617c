"""`dtr-scale plan`: print what a run will cost, from the same Hydra config as `dtr-scale train`.

    dtr-scale plan experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=example_cluster
    dtr-scale plan --gpu a100_80gb experiment=dtr_paper/400k/dit_xl2_ant_uw_dtr cluster=my_slurm

--gpu names the GPU type (a name in dtr_scale/plan/calibration.yaml) where the cluster config
does not; without either the plan assumes an H100 and says so. Planning writes nothing
(configs/plan.yaml: no output directory, no log file); a setting that cannot work is
explained on stderr with exit status 2.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from dtr_scale.command_line import config_or_exit, flag_parser, run_hydra, split_flags


def main(argv: list[str] | None = None) -> None:
    parser = flag_parser("plan")
    parser.add_argument("--gpu", metavar="TYPE", help="the GPU type (a name in dtr_scale/plan/calibration.yaml) "
                        "where the cluster config does not say; default: h100, said so in the plan")
    flags, rest = split_flags(parser, sys.argv[1:] if argv is None else argv)

    def plan(raw: DictConfig) -> None:
        cfg = config_or_exit(raw, "plan")  # before the planner's imports: a config error needs no torch
        from dtr_scale.plan.report import plan_main

        code = plan_main(cfg, flags.gpu)
        if code:
            sys.exit(code)

    run_hydra("plan", "plan", plan, rest)


if __name__ == "__main__":
    main()
