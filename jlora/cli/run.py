"""The one error-to-exit-code wrapper every jlora console script runs its job in.

A `JloraError` (bad input: a config, data, weights, an adapter, a mesh) is one line on stderr and exit 2,
as is a failed file operation (a full or read-only disk); a diverged run (`NonFiniteError`) exits 1.
A run stopped by SIGTERM or SIGINT (jlora.train.preemption.Stopped) is one line saying where its checkpoint
is and how to resume, and exits 128 + the signal (143, 130); a Ctrl-C anywhere else is one line and 130.
Anything else is a bug in jlora and keeps its traceback. Every job runs with jax's persistent compilation
cache on (`jlora.cli.compile_cache`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from jlora.checkpoint.run_dir import os_error_line
from jlora.cli.compile_cache import enable_compile_cache
from jlora.errors import JloraError
from jlora.train.preemption import Stopped, exit_at_once_on_sigint
from jlora.train.step import NonFiniteError


def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    """The `--set KEY=VALUE` option (repeatable) that overrides a run config's fields, into `overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {example} (repeatable)",
    )


class UsageError(JloraError, ValueError):
    """Command-line arguments that do not go together; one line."""


def run_cli(prog: str, job: Callable[[], Any], *, resume: str | None = None) -> int:
    """Runs a console script's job: exit 0; 1 when training diverged; 2 with one line on stderr for a bad input;
    128 + the signal when a signal stopped it (the line names `resume`, the command that resumes the run).
    The persistent compilation cache is on for the job (`jlora.cli.compile_cache`)."""
    enable_compile_cache()
    try:
        job()
    except Stopped as e:
        exit_at_once_on_sigint()  # the process is ending: a further Ctrl-C need not wait for jax to shut down
        print(f"{prog}: {e.line(resume)}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop: nothing was under way that a stop could save
        exit_at_once_on_sigint()
        print(f"{prog}: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    except NonFiniteError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except JloraError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a path the user gave that is not there
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk mid-run: the file and the cause, not a traceback
        print(f"{prog}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    return 0
