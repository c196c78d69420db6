"""A DPO `jlora-train` run killed with SIGKILL after a checkpoint, then `--resume`d, equals the uninterrupted run:
the pair stream continues at the saved pair, and the precomputed reference log-probs are read back from the cache
(issue 24)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from cli_testing import kill_at_checkpoint
from test_preference_train import _write_pairs

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from jlora.cli.train import main; sys.exit(main())"]  # = jlora-train
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
STEPS, INTERVAL, KILL_AFTER = 12, 4, 4


def _config(tmp_path) -> pathlib.Path:
    _write_pairs(tmp_path / "train.jsonl", 40, 0)
    cfg = {
        "model": {"path": "tiny"},
        "data": {"train": "train.jsonl", "max_seq_len": 32},
        "objective": "dpo",
        "preference": {"precompute_reference": True},
        "train": {"global_batch": 8, "micro_batch": 8, "steps": STEPS, "log_interval": 1, "eval_interval": 0},
        "optim": {"lr": 1e-2},
        "checkpoint": {"interval": INTERVAL, "keep": 2},
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_then_resume_equals_the_uninterrupted_dpo_run(tmp_path):
    cfg = _config(tmp_path)
    args = lambda out, *extra: [*CLI, "--config", str(cfg), "--set", f"output_dir={out}", *extra]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.run(args(straight), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]

    kill_at_checkpoint(args(killed), killed, KILL_AFTER, cwd=ROOT, env=ENV)
    assert (killed / "reference_logps.npy").is_file()
    run = subprocess.run(args(killed, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resumed from" in run.stdout and "pairs: cached" in run.stdout, run.stdout[-2000:]

    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=0, atol=1e-6)
