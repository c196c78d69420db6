"""Checks shared by the tests that drive a jlora console script in a subprocess."""

import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable


def script(name: str) -> str:
    """The path of console script `name`, installed next to the interpreter running the tests (any venv)."""
    return str(pathlib.Path(sys.executable).parent / name)


def one_line_error(
    run: subprocess.CompletedProcess, *needles: str, prog: str = "jlora-train", only_line: bool = False
) -> str:
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


def kill_at_checkpoint(args: list[str], run_dir: pathlib.Path, step: int, **popen) -> None:
    """Start `args` (a jlora-train run writing `run_dir`) and SIGKILL it as soon as checkpoint `step` is saved,
    checking that it was still running: the adapter is not written yet, so resume has work to do."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / str(step)).is_dir():  # orbax renames the tmp dir when a save completes
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "adapter").exists(), "the run finished before SIGKILL: nothing was interrupted"


class Background:
    """A console script running in the background, its stderr collected line by line as it comes (tqdm's
    carriage returns end lines too), so a test can act on what it has printed or written so far."""

    def __init__(self, args: list[str], **popen):
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Poll `done` until it holds; fails if the script ends first (or after 10 minutes)."""
        deadline = time.monotonic() + 600
        while not done():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what}"
            time.sleep(0.02)

    def finish(self) -> int:
        """Wait for the script to end; its exit code."""
        self.proc.wait(timeout=600)
        self._reader.join(timeout=60)
        return self.proc.returncode

    def stderr(self) -> str:
        return "".join(self.lines)
