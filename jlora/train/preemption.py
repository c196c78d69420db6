"""Stopping a training run on SIGTERM or SIGINT without losing its work.

Preemptible VMs, Slurm and Kubernetes send SIGTERM some seconds before they kill a job; a user presses
Ctrl-C. `StopSignals` catches both while jlora's training loop runs (in the main thread only; the handlers
in place before come back afterwards). Before the first step a signal stops the run at once: there is
nothing to save. From then on the loop finishes the step it is on, every process agrees on the step to
stop at (under jax.distributed through jax's preemption service, as orbax's `reached_preemption` does),
saves a checkpoint there and raises `Stopped`, which the CLIs print as one line before exiting with
128 + the signal's number. A second Ctrl-C meanwhile quits at once. Saving is jlora.checkpoint's job.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

import jax
import numpy as np


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal, with where its work was saved (`checkpoint`; None: there was nothing to save).

    A KeyboardInterrupt rather than a JloraError: it is no error, and raised from a handler in the middle of
    loading it must pass through a library's `except Exception` as Ctrl-C's own exception does."""

    def __init__(
        self,
        signum: int,
        *,
        step: int | None = None,
        steps: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        detail: str = "",
    ):
        self.signum, self.step, self.steps, self.checkpoint, self.detail = signum, step, steps, checkpoint, detail
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        """The conventional exit code of a process ended by this signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum

    def line(self, resume: str | None = None) -> str:
        """One line: the signal, the step and where the checkpoint is; with `resume`, the command that resumes."""
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"stopped by {name} {self.detail}".rstrip()
        where = f"stopped by {name} after step {self.step}/{self.steps}: checkpoint saved in {self.checkpoint}"
        return f"{where}; resume with: {resume}" if resume else where


def _say(line: str) -> None:
    """Write a line to stderr from a signal handler: os.write, as the buffered stream may be mid-write."""
    try:
        os.write(2, (line + "\n").encode(errors="replace"))
    except OSError:  # stderr closed: the line is a courtesy
        pass


def preemption_service() -> bool:
    """Whether jax's preemption service holds SIGTERM: jax.distributed is up and the service enabled.

    It installs its own SIGTERM handler in C++, which Python could not put back once replaced; a
    notice on any host then reaches every host, and `reached_preemption(step)` names the step to stop at."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class StopSignals:
    """While entered in the main thread, SIGTERM and SIGINT stop the run gracefully (see the module doc).

    Until the loop calls `start_training()` a signal raises `Stopped` at once, saying `what` was stopped.
    Raised where Python cannot pass it on (a garbage-collector callback, a __del__), it is dropped quietly
    and `check()` / `start_training()` raise it instead. The loop keeps `step` (the step it is on) for the
    note a signal prints and asks `stop_at(step, ...)` after each step. Outside the main thread it does nothing."""

    def __init__(self, what: str = "before training started: nothing to save yet"):
        self.what = what
        self.signum = 0  # the first stop signal received on this process; 0 while none
        self.training = False
        self.step: int | None = None
        self.mid_line = False  # a progress bar is on stderr's last line: a note starts on a new line
        self.service = False
        self._previous: dict[int, object] = {}
        self._unraisable = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self.service = preemption_service()
        caught = (signal.SIGINT,) if self.service else (signal.SIGINT, signal.SIGTERM)
        for s in caught:
            self._previous[s] = signal.signal(s, self._handle)
        self._unraisable, sys.unraisablehook = sys.unraisablehook, self._drop_stopped
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        if self._unraisable is not None:
            sys.unraisablehook, self._unraisable = self._unraisable, None
        self._previous = {}

    def _drop_stopped(self, unraisable) -> None:
        """sys.unraisablehook: a `Stopped` that could not propagate is no error to print; `check` raises it."""
        if not isinstance(unraisable.exc_value, Stopped):
            self._unraisable(unraisable)

    def check(self) -> None:
        """Raise `Stopped` if a signal came (and its exception was lost on the way)."""
        if self.signum:
            raise Stopped(self.signum, detail=self.what)

    def start_training(self) -> None:
        """From here a signal lets the step under way finish, and the loop saves it (see `stop_at`)."""
        self.check()
        self.training = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name, new_line = signal.Signals(signum).name, "\n" if self.mid_line else ""
        if self.signum:  # a stop is under way
            if signum == signal.SIGINT:
                unsaved = f", without saving step {self.step}" if self.training else ""
                _say(f"{new_line}{name} again: quitting at once{unsaved}")
                os._exit(128 + signum)
            return  # a repeated SIGTERM (a launcher may forward it as well as send it): keep saving
        self.signum = signum
        if not self.training:
            raise Stopped(signum, detail=self.what)
        _say(
            f"{new_line}{name}: finishing step {self.step}, then saving a checkpoint "
            "(Ctrl-C again quits at once, without it)"
        )
        if self.service:  # hand a Ctrl-C to jax's preemption service, which tells the other hosts
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_at(self, step: int, reached_preemption: Callable[[int], bool]) -> int:
        """The signal to stop on after `step`, 0 to go on; every process gets the same answer at the same step.

        `reached_preemption` is orbax's CheckpointManager.reached_preemption (jax's preemption sync
        point). Call this after every step, on every process."""
        if self.service:
            return (self.signum or signal.SIGTERM) if reached_preemption(step) else 0
        if jax.process_count() > 1:  # no preemption service: every process shares its flag
            from jax.experimental import multihost_utils

            return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))
        return self.signum


def exit_at_once_on_sigint(code: int = 128 + signal.SIGINT) -> None:
    """For a CLI process that is stopping anyway: a further Ctrl-C (say while jax shuts down) exits at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda _signum, _frame: os._exit(code))
