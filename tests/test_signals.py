"""No work lost to signals (issue 25, item 4): `jlora-train` stopped by SIGTERM (what preemptible VMs, Slurm and
Kubernetes send before a kill) or by Ctrl-C finishes the step under way, saves a checkpoint there, says in one
line where it is and how to resume, and exits 143 / 130; resuming gives the uninterrupted run's losses exactly.
A second Ctrl-C quits at once, a signal before training starts stops at once, and none prints a traceback."""

import gc
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import sys
import threading

from cli_testing import Background, script

from jlora.train.preemption import Stopped, StopSignals

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = script("jlora-train")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
# room for the stops below: under jax.distributed the preemption service names a step some way past the signal
# (its notice goes round the coordination service while steps go on: asked at 6, one run here stopped at 17)
STEPS = 60


def _sets(out_dir) -> list[str]:
    sets = [
        f"train.steps={STEPS}",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=10",
        "checkpoint.keep=2",
        f"output_dir={out_dir}",
    ]
    return ["--config", "configs/tiny-cpu.yaml", *[a for s in sets for a in ("--set", s)]]


def _start(argv: list[str], tmp_path, **env: str) -> Background:
    """`argv` (jlora-train's) in the background, on one CPU device. The runs of a test share compiled programs
    through jax's persistent cache, which gives back the very executables, so their losses compare exactly."""
    return Background(argv, cwd=ROOT, env={**ENV, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), **env})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(out_dir) -> dict[int, float]:
    """step -> loss; a step re-run after a resume overwrites what the stopped run logged."""
    path = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _signal_after(run: Background, out_dir, step: int, signum: int) -> None:
    """Send `signum` once the run has logged `step`."""
    run.wait_until(lambda: max(_losses(out_dir), default=0) >= step, f"step {step} logged")
    run.proc.send_signal(signum)


def _checkpoints(out_dir) -> list[int]:
    return sorted(int(p.name) for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit())


def _last_line(run: Background, code: int) -> str:
    """The run exited `code` with no traceback; its last line on stderr."""
    assert run.finish() == code, f"exit {run.proc.returncode}\n{run.stderr()[-3000:]}"
    assert "Traceback" not in run.stderr(), run.stderr()[-3000:]
    return run.stderr().strip().splitlines()[-1]


def _stopped(run: Background, out_dir, signame: str) -> tuple[int, list[str]]:
    """The run stopped gracefully on `signame`: exit 128 + signal, one line naming the checkpoint of the step
    it stopped after (the last step it logged) and the command that resumes it. Returns (step, that command)."""
    last = _last_line(run, 128 + signal.Signals[signame])
    m = re.fullmatch(rf"jlora-train: stopped by {signame} after step (\d+)/{STEPS}: checkpoint saved in (.+); "
                     r"resume with: (.+)", last)  # fmt: skip
    assert m, last
    step, resume = int(m[1]), shlex.split(m[3])
    assert pathlib.Path(m[2]) == (out_dir / "checkpoints" / str(step)).absolute(), last
    assert _checkpoints(out_dir)[-1] == step and max(_losses(out_dir)) == step
    assert not (out_dir / "adapter").exists()
    assert resume == ["jlora-train", *_sets(out_dir), "--resume"], last
    return step, [TRAIN, *resume[1:]]


def test_sigterm_and_ctrl_c_save_a_checkpoint_and_resume_gives_the_straight_runs_losses(tmp_path):
    straight_dir, out = tmp_path / "straight", tmp_path / "stopped"
    straight = _start([TRAIN, *_sets(straight_dir)], tmp_path)  # alongside the runs stopped below

    run = _start([TRAIN, *_sets(out)], tmp_path)
    _signal_after(run, out, 3, signal.SIGTERM)
    step, resume = _stopped(run, out, "SIGTERM")
    assert step >= 3

    # under jax.distributed (one process here): jax's preemption service holds SIGTERM, a Ctrl-C is handed to it,
    # and the run stops at the step the service names to every host (orbax's reached_preemption)
    cluster = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
    run = _start(resume, tmp_path, **cluster)
    _signal_after(run, out, step + 2, signal.SIGINT)
    step, resume = _stopped(run, out, "SIGINT")
    assert "preemption sync point" in run.stderr()  # orbax's log line: the step came from the service

    # a second Ctrl-C while the first one's checkpoint is under way: out at once, the step unsaved
    run = _start(resume, tmp_path)
    _signal_after(run, out, step + 2, signal.SIGINT)
    run.wait_until(lambda: any("SIGINT: finishing step" in line for line in run.lines), "note of the first SIGINT")
    run.proc.send_signal(signal.SIGINT)
    last = _last_line(run, 130)
    m = re.fullmatch(r"SIGINT again: quitting at once, without saving step (\d+)", last)
    assert m, last
    assert int(m[1]) not in _checkpoints(out) and not (out / "adapter").exists()

    run = _start(resume, tmp_path)
    assert run.finish() == 0, run.stderr()[-3000:]
    assert straight.finish() == 0, straight.stderr()[-3000:]
    want, got = _losses(straight_dir), _losses(out)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert [got[s] for s in want] == [want[s] for s in want]  # exactly


def test_a_signal_before_training_stops_at_once_with_one_line(tmp_path):
    """While the run loads and builds (it holds output_dir's lock by then), there is nothing to save."""
    signals = (signal.SIGTERM, signal.SIGINT)
    runs = {signum: _start([TRAIN, *_sets(tmp_path / signum.name)], tmp_path) for signum in signals}
    for signum, run in runs.items():
        out = tmp_path / signum.name
        run.wait_until((out / ".lock").exists, "lock on output_dir")
        run.proc.send_signal(signum)
    for signum, run in runs.items():
        last = _last_line(run, 128 + signum)
        assert last == f"jlora-train: stopped by {signum.name} before training started: nothing to save yet", last
        out = tmp_path / signum.name
        assert not (out / "checkpoints").exists() or not _checkpoints(out)


def test_stop_signals_are_caught_only_while_entered_and_only_in_the_main_thread():
    """A Python caller's own handlers come back after a run; a run in another thread leaves them alone."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as stop:
        assert all(signal.getsignal(s) != h for s, h in before.items())
        try:
            signal.raise_signal(signal.SIGTERM)
        except Stopped as e:  # before training: at once, nothing saved
            assert e.exit_code == 143 and e.checkpoint is None and stop.signum == signal.SIGTERM
        else:
            raise AssertionError("SIGTERM before training did not stop")
    assert {s: signal.getsignal(s) for s in before} == before

    seen = []

    def in_a_thread():
        with StopSignals():
            seen.append({s: signal.getsignal(s) for s in before})

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [before]


def test_a_stop_lost_in_a_garbage_collector_callback_is_raised_at_the_next_check(monkeypatch):
    """Python drops an exception raised where it cannot propagate (jax's gc callback, a __del__) and prints
    "Exception ignored ... Traceback" through sys.unraisablehook, and the load went on. The stop is not
    passed to that hook, and check() / start_training() raise it."""
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)

    def signal_mid_collection(phase, info):
        if phase == "start":
            signal.raise_signal(signal.SIGTERM)

    with StopSignals() as stop:
        gc.callbacks.append(signal_mid_collection)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(signal_mid_collection)
        assert stop.signum == signal.SIGTERM and printed == []
        try:
            stop.start_training()
        except Stopped as e:
            assert e.exit_code == 143 and e.checkpoint is None
        else:
            raise AssertionError("the lost stop was not raised")
    assert sys.unraisablehook == printed.append
