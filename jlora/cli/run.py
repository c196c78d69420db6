"""The one error-to-exit-code wrapper every jlora console script runs its job in.

A `JloraError` (bad input: a config, data, weights, an adapter, a mesh) is one line on stderr and exit 2,
as is a failed file operation (a full or read-only disk); a diverged run (`NonFiniteError`) exits 1.
Anything else is a bug in jlora and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from jlora.checkpoint.run_dir import os_error_line
from jlora.errors import JloraError
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


def run_cli(prog: str, job: Callable[[], Any]) -> int:
    """Runs a console script's job: exit 0; 1 when training diverged; 2 with one line on stderr for a bad input."""
    try:
        job()
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
