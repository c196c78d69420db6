"""`jlora-train`: fine-tune from a YAML run config (`--config X.yaml --set k=v`), or `--plan` it.

Argument parsing only; the run is jlora.train.loop.train and the plan jlora.train.plan.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from jlora.cli.help_format import DefaultsHelpFormatter
from jlora.cli.run import add_set_option, run_cli
from jlora.train.config import RunConfig, load
from jlora.train.config_files import check_inputs, checkpoint_over_preset, find_config, shipped_configs
from jlora.train.loop import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jlora-train",
        description="LoRA fine-tuning from a YAML run config. Paths in the config are relative to its directory; "
        "output_dir and --set values to the working directory.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help=f"a YAML run config file, or a shipped config's name ({', '.join(shipped_configs())})",
    )
    add_set_option(p, "optim.lr=1e-4")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in output_dir (an error if there is none)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start over; refused if output_dir holds checkpoints of an earlier run (see --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over, first moving an earlier run in output_dir aside to <output_dir>.old-<time>",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="do not train: compile the step on fake CPU devices and print per-device memory, FLOPs, "
        "communication and which accelerators it fits (last line: PLAN: {json})",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="with --plan: devices to plan for (default: the mesh's product)",
    )
    p.add_argument(
        "--devices-per-host",
        type=int,
        default=8,
        metavar="N",
        help="with --plan: devices one host drives, for the host memory of the load (a TPU v5p host: 4)",
    )
    args = p.parse_args(argv)
    if args.devices_per_host < 1:
        p.error(f"--devices-per-host must be >= 1, got {args.devices_per_host}")
    if args.resume and (args.no_resume or args.overwrite):
        p.error("--resume continues the run in output_dir; it cannot go with --no-resume or --overwrite")
    return args


def plan_main(run: RunConfig, devices: int | None, devices_per_host: int = 8) -> None:
    """`--plan`: print jlora.train.plan's report for `run` compiled on fake CPU devices. model.preset gives
    the shape while model.path is not on this machine; once it is, its config.json does."""
    from jlora.train import plan

    run = checkpoint_over_preset(run)
    plan.use_fake_devices(plan.plan_devices(run, devices))
    print(plan.report(plan.plan(run, devices_per_host)), flush=True)


def main(argv: list[str] | None = None) -> int:
    """`jlora-train --config X.yaml [--set k=v ...] [--resume]`; a bad input is one line on stderr, exit 2."""
    args = parse_args(argv)
    if args.plan:  # the config only: data and weights need not be on the machine that plans
        return run_cli(
            "jlora-train", lambda: plan_main(load(args.config, args.overrides), args.devices, args.devices_per_host)
        )
    resume = True if args.resume else (False if args.no_resume or args.overwrite else None)
    # what resumes this run if a signal stops it: the same config and overrides, with --resume
    again = ["jlora-train", "--config", args.config, *[a for s in args.overrides for a in ("--set", s)], "--resume"]

    def job() -> None:
        config = find_config(args.config)
        run = load(config, args.overrides)
        check_inputs(run, config, args.overrides)  # before any weight is read or step compiled
        train(run, resume=resume, overwrite=args.overwrite)

    return run_cli("jlora-train", job, resume=shlex.join(again))


if __name__ == "__main__":
    sys.exit(main())
