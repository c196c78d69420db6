"""`jlora-demo`: fine-tune the demo model on the demo task, then compare base and fine-tuned on held-out data.

Argument parsing only; the demo is jlora.train.demo.run_demo.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

from jlora.cli.run import add_set_option, run_cli
from jlora.train.config import ConfigError, load
from jlora.train.demo import DEFAULT_CONFIG, DEFAULT_EVAL_LIMIT, run_demo


def main(argv: list[str] | None = None) -> int:
    """`jlora-demo [--config X.yaml] [--set k=v ...] [--eval-limit N]`; bad input: one line on stderr, exit 2."""
    p = argparse.ArgumentParser(prog="jlora-demo", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"a YAML run config (default {DEFAULT_CONFIG}; configs/gemma3-270m-demo.yaml: the same task on "
        "the Gemma 3 270M base model)",
    )
    add_set_option(p, "train.steps=20")
    p.add_argument(
        "--eval-limit",
        type=int,
        default=DEFAULT_EVAL_LIMIT,
        metavar="N",
        help=f"evaluate the first N held-out examples (default {DEFAULT_EVAL_LIMIT}; 0: all)",
    )
    a = p.parse_args(argv)
    if a.eval_limit < 0:
        p.error(f"--eval-limit must be >= 0, got {a.eval_limit}")

    command = shlex.join(["jlora-demo", *(sys.argv[1:] if argv is None else argv)])

    def job():
        if not pathlib.Path(a.config).is_file():
            raise ConfigError(
                f"{a.config}: no such config file (run jlora-demo from the jlora repository root, or pass --config)"
            )
        run_demo(load(a.config, a.overrides), eval_limit=a.eval_limit or None, command=command)

    # stopped mid-training by a signal, the same command resumes (checkpoint.resume is on by default)
    return run_cli("jlora-demo", job, resume=command)


if __name__ == "__main__":
    sys.exit(main())
