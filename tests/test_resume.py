"""Exact resume: `jlora-train` killed with SIGKILL mid-run, then `--resume`, equals an uninterrupted run."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from cli_testing import kill_at_checkpoint, script

from jlora.checkpoint.adapter import load_adapter

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from jlora.cli.train import main; sys.exit(main())"]  # = jlora-train
STEPS, INTERVAL, KILL_AFTER = 24, 4, 8


def _args(out_dir, *extra):
    sets = [
        f"train.steps={STEPS}",
        "train.log_interval=1",
        "train.eval_interval=0",
        f"checkpoint.interval={INTERVAL}",
        "checkpoint.keep=2",
        f"output_dir={out_dir}",
    ]
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

    kill_at_checkpoint(_args(killed), killed, KILL_AFTER, cwd=ROOT, env=env)
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


# ---- issue 13 item 5: resume continues the data stream it saved, or refuses one that differs

TRAIN = script("jlora-train")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _train(out_dir, *sets: str, resume: bool = False) -> subprocess.CompletedProcess:
    base = ["train.log_interval=1", "train.eval_interval=0", f"output_dir={out_dir}"]
    args = [TRAIN, "--config", "configs/tiny-cpu.yaml", *[a for s in (*base, *sets) for a in ("--set", s)]]
    return subprocess.run(args + ["--resume"] * resume, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_resume_with_another_global_batch_continues_at_the_next_row(tmp_path):
    """With lr ~ 0 the weights stay put, so a step's loss says which rows it trained on. 2 steps of 8
    rows, resumed with global_batch 16, must train rows 16..31 next: the second step of a straight run
    of 16-row steps. A step-based position jumped to rows 32..47 (rows 16..31 were never trained)."""
    still = ["optim.lr=1e-30", "optim.warmup_steps=0", "checkpoint.interval=2"]
    first = _train(tmp_path / "a", *still, "train.global_batch=8", "train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _train(tmp_path / "a", *still, "train.global_batch=16", "train.steps=3", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _train(tmp_path / "b", *still, "train.global_batch=16", "train.steps=2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    got, want = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(got) == [1, 2, 3] and sorted(want) == [1, 2]
    np.testing.assert_allclose(got[3], want[2], rtol=0, atol=1e-5)


def test_resume_refuses_a_changed_data_stream(tmp_path):
    """A data file of the same length with other content, another max_seq_len, packing or mask_prompt
    would feed other rows at the saved position: each is one line naming the key, old -> new, and how to
    start over. The checkpoints stay as they were."""
    out = tmp_path / "run"
    first = _train(out, "train.steps=2", "checkpoint.interval=2")
    assert first.returncode == 0, first.stderr[-3000:]
    lines = (ROOT / "data" / "tiny" / "train.jsonl").read_text().splitlines()
    other = tmp_path / "train.jsonl"
    other.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same records, same count, new order
    for change, key, old_new in [
        (f"data.train={other}", "data.train", None),
        ("data.max_seq_len=200", "data.max_seq_len", "256 -> 200"),
        ("data.packing=true", "data.packing", "False -> True"),
        ("data.mask_prompt=false", "data.mask_prompt", "True -> False"),
    ]:
        run = _train(out, "train.steps=4", "checkpoint.interval=2", change, resume=True)
        assert run.returncode == 2, (change, run.stderr[-3000:])
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("jlora-train: error:") and key in last and "--overwrite" in last, (change, last)
        assert old_new is None or old_new in last, (change, last)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2]
