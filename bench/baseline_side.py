"""Long-lived side processes for the decode benches' --baseline (bench/generate_vs_hf.py, serve_vs_peft.py).

With `--baseline DIR` a bench measures jlora twice in the same run: the current checkout's and the one in DIR
(e.g. `git worktree add /tmp/base <commit>`). Each jlora runs in its own side process, `python bench/<script>.py
--side jlora`, the baseline's with PYTHONPATH=DIR so that it imports jlora from there (the current one's with
the environment as it is); both run the same side code, which imports from either package layout.

Why long-lived: a side loads the model and compiles its decode steps once (seconds to minutes), and a timed run
is short. So the parent keeps the side processes open and drives them one timed run at a time over stdin /
stdout: it sends a setup line, the side loads and answers with one `SIDE: {json}` line (the jlora it imported,
its one-time figures), then it answers each request line with one `SIDE: {json}` line that carries its own
timing (the pipe round trip is not in it), and exits when stdin closes. The parent interleaves the requests
round by round (current jlora, baseline jlora, the HF / PEFT peer), so a noisy minute hurts every side alike,
and a warm-up request per shape, which the parent does not count, keeps compiling out of the timings.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn

ROOT = pathlib.Path(__file__).resolve().parent.parent
PREFIX = "SIDE: "
Handler = Callable[[dict], dict]


def short_commit(checkout: str) -> str:
    """The short commit a checkout is at (its path where git cannot say)."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return proc.stdout.strip() or checkout


class SideProcess:
    """One side process, `python SCRIPT --side SIDE`, that answers JSON requests with `SIDE: {json}` lines.

    jlora_from: a checkout whose jlora the side imports (PYTHONPATH); None for this one's. The side must
    report its jlora's `__file__` as "jlora" in its ready line, which is checked to lie in that checkout."""

    def __init__(self, script: str, side: str, setup: dict, label: str, jlora_from: str | None = None):
        env = dict(os.environ)
        if jlora_from:
            env["PYTHONPATH"] = os.pathsep.join([jlora_from, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.label, self.checkout = label, pathlib.Path(jlora_from or ROOT).resolve()
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty side cannot block on it
        self.proc = subprocess.Popen(
            [sys.executable, script, "--side", side],
            cwd=ROOT,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        self.info: dict | None = None
        self._send(setup)

    def ready(self) -> dict:
        """Wait for the side's ready line (it has loaded and checked its jlora) and return it."""
        if self.info is None:
            self.info = self._reply()
            jlora_file = pathlib.Path(self.info["jlora"]).resolve()
            if not jlora_file.is_relative_to(self.checkout):
                self._fail(f"imported {jlora_file}, not the jlora in {self.checkout}")
        return self.info

    def ask(self, request: dict) -> dict:
        """Send one request and return the side's answer."""
        self.ready()
        self._send(request)
        return self._reply()

    def close(self) -> None:
        """Stop the side and drop its stderr."""
        self._stop()
        self.stderr.close()

    def __enter__(self) -> SideProcess:
        """The side itself; leaving the block closes it."""
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the side."""
        self.close()

    def _send(self, message: dict) -> None:
        """Write one JSON line to the side's stdin."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail("exited before its request")

    def _reply(self) -> dict:
        """The JSON of the side's next `SIDE: ` line (other stdout lines are skipped)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        self._fail("exited without an answer")

    def _stop(self) -> int:
        """Close the side's stdin, which ends its loop, and wait for it (a minute, then kill it); its exit status."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def _fail(self, why: str) -> NoReturn:
        """Stop the side and exit this process with the side's last stderr."""
        code = self._stop()
        self.stderr.seek(0)
        sys.exit(
            f"{pathlib.Path(self.proc.args[1]).stem}: the {self.label} side {why} (exit {code}):\n"
            f"{self.stderr.read()[-3000:]}"
        )


def serve_side(start: Callable[[dict], tuple[dict, Handler]]) -> None:
    """A side process's loop: read the setup line, `start(setup)` -> (ready info, handler), print the info, then
    answer each request line with the handler's result, one `SIDE: {json}` line each, until stdin closes."""
    info, handle = start(json.loads(sys.stdin.readline()))
    print(PREFIX + json.dumps(info), flush=True)
    for line in sys.stdin:
        print(PREFIX + json.dumps(handle(json.loads(line))), flush=True)
