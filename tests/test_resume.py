"""Exact resume: `jlora-train` killed with SIGKILL mid-run, then `--resume`, equals an uninterrupted run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from jlora.checkpoint import load_adapter

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from jlora.trainer import main; sys.exit(main())"]  # = jlora-train
STEPS, INTERVAL, KILL_AFTER = 24, 4, 8


def _args(out_dir, *extra):
    sets = [f"train.steps={STEPS}", "train.log_interval=1", "train.eval_interval=0", f"checkpoint.interval={INTERVAL}",
            "checkpoint.keep=2", f"output_dir={out_dir}"]
    return [*CLI, "--config", "configs/tiny-cpu.yaml", *[a for s in sets for a in ("--set", s)], *extra]


def _losses(out_dir) -> dict[int, float]:
    """step -> loss; a step re-run after the resume overwrites what the killed run logged."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.run(_args(straight), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]

    proc = subprocess.Popen(_args(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / str(KILL_AFTER)).is_dir():  # orbax renames the tmp dir when a save completes
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run finished before SIGKILL: nothing was interrupted"
    logged_before = max(_losses(killed))
    assert logged_before < STEPS

    run = subprocess.run(_args(killed, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resumed from" in run.stdout + run.stderr

    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=0, atol=1e-6)

    _, a = load_adapter(straight / "adapter")
    _, b = load_adapter(killed / "adapter")
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
