"""`jlora-demo`: fine-tune the demo model on the demo task, then compare base and fine-tuned on held-out data.

Argument parsing only; the demo is jlora.train.demo.run_demo.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from jlora.cli.help_format import DefaultsHelpFormatter
from jlora.cli.run import add_set_option, run_cli
from jlora.train.config import load
from jlora.train.config_files import check_inputs, find_config
from jlora.train.demo import DEFAULT_CONFIG, DEFAULT_EVAL_LIMIT, has_maker, run_demo
from jlora.train.demo_preference import run_preference_demo, start_point


def main(argv: list[str] | None = None) -> int:
    """`jlora-demo [--config X.yaml] [--set k=v ...] [--eval-limit N]`; bad input: one line on stderr, exit 2."""
    p = argparse.ArgumentParser(
        prog="jlora-demo",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="a YAML run config file, or a shipped config's name (gemma3-270m-demo: the same task on the Gemma 3 "
        "270M base model; smollm2-135m-demo-adapter: with LLaMA-Adapter; smollm2-135m-demo-dpo: DPO from the SFT "
        "demo's adapter)",
    )
    add_set_option(p, "train.steps=20")
    p.add_argument(
        "--eval-limit",
        type=int,
        default=DEFAULT_EVAL_LIMIT,
        metavar="N",
        help="evaluate the first N held-out examples (0: all)",
    )
    a = p.parse_args(argv)
    if a.eval_limit < 0:
        p.error(f"--eval-limit must be >= 0, got {a.eval_limit}")

    command = shlex.join(["jlora-demo", *(sys.argv[1:] if argv is None else argv)])

    def job():
        config = find_config(a.config)
        run = load(config, a.overrides)
        if run.objective != "sft":
            run = start_point(run)  # the SFT demo's adapter, or the base model when it is not there
        check_inputs(run, config, a.overrides, can_write=has_maker)  # before the model's wheels are installed
        # a preference objective has its own before / after: preference accuracy, and generations
        demo = run_demo if run.objective == "sft" else run_preference_demo
        demo(run, eval_limit=a.eval_limit or None, command=command)

    # stopped mid-training by a signal, the same command resumes (checkpoint.resume is on by default)
    return run_cli("jlora-demo", job, resume=command)


if __name__ == "__main__":
    sys.exit(main())
