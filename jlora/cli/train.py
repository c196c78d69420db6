"""`jlora-train`: fine-tune from a YAML run config (`--config X.yaml --set k=v`), or `--plan` it.

Argument parsing only; the run is jlora.train.loop.train and the plan jlora.train.plan.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from jlora.cli.run import add_set_option, run_cli
from jlora.train.config import RunConfig, load
from jlora.train.loop import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jlora-train", description="LoRA fine-tuning from a YAML run config.")
    p.add_argument("--config", required=True, help="a YAML run config, e.g. configs/tiny-cpu.yaml")
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
        help="with --plan: devices one host drives, for the host memory of the load (default 8; a TPU v5p host: 4)",
    )
    args = p.parse_args(argv)
    if args.devices_per_host < 1:
        p.error(f"--devices-per-host must be >= 1, got {args.devices_per_host}")
    if args.resume and (args.no_resume or args.overwrite):
        p.error("--resume continues the run in output_dir; it cannot go with --no-resume or --overwrite")
    return args


def plan_main(run: RunConfig, devices: int | None, devices_per_host: int = 8) -> None:
    """`--plan`: print jlora.train.plan's report for `run` compiled on fake CPU devices."""
    from jlora.train import plan

    plan.use_fake_devices(plan.plan_devices(run, devices))
    print(plan.report(plan.plan(run, devices_per_host)), flush=True)


def main(argv: list[str] | None = None) -> int:
    """`jlora-train --config X.yaml [--set k=v ...] [--resume]`; a bad input is one line on stderr, exit 2."""
    args = parse_args(argv)
    if args.plan:
        return run_cli(
            "jlora-train", lambda: plan_main(load(args.config, args.overrides), args.devices, args.devices_per_host)
        )
    resume = True if args.resume else (False if args.no_resume or args.overwrite else None)
    # what resumes this run if a signal stops it: the same config and overrides, with --resume
    again = ["jlora-train", "--config", args.config, *[a for s in args.overrides for a in ("--set", s)], "--resume"]
    return run_cli(
        "jlora-train",
        lambda: train(load(args.config, args.overrides), resume=resume, overwrite=args.overwrite),
        resume=shlex.join(again),
    )


if __name__ == "__main__":
    sys.exit(main())
