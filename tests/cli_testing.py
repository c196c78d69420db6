"""Checks shared by the tests that drive a jlora console script in a subprocess."""

import pathlib
import subprocess
import sys


def script(name: str) -> str:
    """The path of console script `name`, installed next to the interpreter running the tests (any venv)."""
    return str(pathlib.Path(sys.executable).parent / name)


def one_line_error(run: subprocess.CompletedProcess, *needles: str, prog: str = "jlora-train",
                   only_line: bool = False) -> str:
    """The run failed with exit 2 and a `PROG: error:` line naming each needle, no traceback; with
    `only_line`, that line is all of stderr. Returns the line."""
    assert run.returncode == 2, f"exit {run.returncode}\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    err = run.stderr.strip()
    last = err.splitlines()[-1] if err else ""
    assert last.startswith(f"{prog}: error:") and (not only_line or err == last), run.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last
