"""jlora-train and its output_dir: one run per dir (a lock), no silent mix of an old and a new run
(--no-resume refuses, --overwrite moves the old run aside), a dir that is a file or read-only is one
line, and a disk that fills mid-run stops with one line and resumes from the last whole checkpoint.
Each test drives the real jlora-train in a subprocess. The read-only and full-disk tests mount small
tmpfs file systems, which needs root: without it they fail, they do not skip."""

import contextlib
import os
import pathlib
import signal
import subprocess
import time

import pytest
from cli_testing import one_line_error, script
from fs_testing import tmpfs

from jlora.checkpoint.adapter import load_adapter
from jlora.checkpoint.run_dir import RunDirError, claim

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TRAIN = script("jlora-train")


def _args(out_dir, *extra, steps=4, interval=2, keep=3):
    sets = [
        f"train.steps={steps}",
        "train.log_interval=1",
        "train.eval_interval=0",
        f"checkpoint.interval={interval}",
        f"checkpoint.keep={keep}",
        f"output_dir={out_dir}",
    ]
    return [TRAIN, "--config", "configs/tiny-cpu.yaml", *[a for s in sets for a in ("--set", s)], *extra]


def _train(out_dir, *extra, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_args(out_dir, *extra, **kw), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _steps(out_dir) -> list[int]:
    ckpts = pathlib.Path(out_dir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def _start_long_run(out) -> subprocess.Popen:
    """A jlora-train run on `out` that trains on until killed, returned once it has logged its first step."""
    run = subprocess.Popen(
        _args(out, steps=100000, interval=0), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"the run never started training: {run.stderr.read()[-2000:]}")
        time.sleep(0.1)
    return run


def test_second_run_on_one_output_dir_stops_at_once(tmp_path):
    out = tmp_path / "run"
    first = _start_long_run(out)
    try:
        t0 = time.monotonic()
        second = _train(out)
        err = one_line_error(second, str(out), f"pid {first.pid}", "in use")
        assert time.monotonic() - t0 < 60, "the second run did not stop at once"
        assert first.poll() is None, f"the first run died: {err}"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_no_resume_refuses_checkpoints_overwrite_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    assert _train(out, steps=4).returncode == 0
    assert _steps(out) == [2, 4]
    old_metrics = (out / "metrics.jsonl").read_text()

    assert not (out / ".lock").exists(), "a finished run left its lock file"
    one_line_error(_train(out, "--no-resume", steps=6), str(out), "--overwrite", "--resume")
    assert _steps(out) == [2, 4] and (out / "metrics.jsonl").read_text() == old_metrics
    assert not (out / ".lock").exists(), "a refused run left its lock file"

    run = _train(out, "--no-resume", "--overwrite", steps=6)
    assert run.returncode == 0, run.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1, "the old run was not moved aside"
    assert _steps(aside[0]) == [2, 4] and (aside[0] / "metrics.jsonl").read_text() == old_metrics
    assert not (out / ".lock").exists() and not (aside[0] / ".lock").exists()
    load_adapter(aside[0] / "adapter")
    assert _steps(out) == [2, 4, 6]
    logged = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(logged) == 6, "the new run's metrics are mixed with the old run's"

    run = _train(out, "--resume", steps=6)  # continues the run started last: step 6, not the old run's 4
    assert run.returncode == 0, run.stderr[-3000:]
    assert "at step 6" in run.stdout, run.stdout[-2000:]


def test_output_dir_that_is_a_file_read_only_or_full(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    one_line_error(_train(afile), str(afile), "file")
    assert afile.read_text() == "mine"
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        one_line_error(_train(ro / "run"), str(ro / "run"), "Read-only")
        one_line_error(_train(ro), str(ro), "Read-only")
    with tmpfs(tmp_path / "full", "size=256k") as full:
        with open(full / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        one_line_error(_train(full / "run"), str(full / "run"), "No space left on device")


def test_disk_full_mid_run_then_resume(tmp_path):
    # keep=100: every checkpoint stays, so the run itself fills the 1 MiB disk after a few of them.
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        out = disk / "run"
        run = _train(out, steps=40, interval=1, keep=100)
        one_line_error(run, "No space left on device", "--resume")
        whole = _steps(out)
        assert 0 < whole[-1] < 40, f"the disk did not fill mid-run: checkpoints {whole}"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        run = _train(out, "--resume", steps=40, interval=1, keep=100)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"at step {whole[-1]}" in run.stdout, run.stdout[-2000:]
        assert _steps(out)[-1] == 40
        load_adapter(out / "adapter")


def test_a_finished_adapter_without_checkpoints_is_not_replaced(tmp_path):
    """A finished run whose checkpoints were pruned still counts as a run: a new run there (another lr,
    resuming by default or with --resume) is refused in one line and leaves the adapter and metrics as they
    were; --overwrite moves them aside whole, and the new run's metrics are its own."""
    import shutil

    out = tmp_path / "run"
    assert _train(out, steps=4).returncode == 0
    shutil.rmtree(out / "checkpoints")
    adapter = {p.name: p.read_bytes() for p in (out / "adapter").rglob("*") if p.is_file()}
    metrics = (out / "metrics.jsonl").read_text()
    for extra in ((), ("--resume",)):
        run = _train(out, *extra, "--set", "optim.lr=0.05", steps=2)
        one_line_error(run, str(out), "adapter", "--overwrite")
        assert {p.name: p.read_bytes() for p in (out / "adapter").rglob("*") if p.is_file()} == adapter
        assert (out / "metrics.jsonl").read_text() == metrics
    run = _train(out, "--overwrite", "--set", "optim.lr=0.05", steps=2)
    assert run.returncode == 0, run.stderr[-3000:]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (aside / "metrics.jsonl").read_text() == metrics
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]) == 2


def test_overwrite_moves_only_a_jlora_run(tmp_path):
    """--overwrite moves aside a recognisable jlora run, nothing else: an output_dir that also holds a
    model (config.json, weights) or the training file this run reads is refused in one line, and every
    file in it stays where it was."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # a run once written into the model dir
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    one_line_error(_train(model, "--overwrite", steps=2), str(model), "config.json", "model.safetensors")
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.name != ".lock"} == before
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]

    out = tmp_path / "run"  # an earlier run's dir that now also holds this run's training data
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_bytes((ROOT / "data/tiny/train.jsonl").read_bytes())
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    run = _train(out, "--overwrite", "--set", f"data.train={out / 'data' / 'train.jsonl'}", steps=2)
    one_line_error(run, str(out), "train.jsonl", "reads")
    assert (out / "data" / "train.jsonl").is_file() and not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_the_lock_file_is_removed_however_claim_ends(tmp_path):
    """claim() holds output_dir/.lock (a second claim is refused, naming our pid) and removes it on the way out:
    after the run, after an error in it, and after --overwrite moved an earlier run (and its lock) aside."""
    out = tmp_path / "run"
    with claim(out, fresh=True):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            with claim(out, fresh=True):
                pass
        assert (out / ".lock").exists(), "a refused claim removed the holder's lock"
    assert not (out / ".lock").exists()
    with pytest.raises(KeyError), claim(out, fresh=True):
        raise KeyError("a run that fails")
    assert not (out / ".lock").exists()
    (out / "checkpoints" / "2").mkdir(parents=True)
    with claim(out, fresh=True, overwrite=True) as aside:
        assert (out / ".lock").exists() and not (aside / ".lock").exists()
    assert not (out / ".lock").exists()


def test_a_run_stopped_by_sigterm_leaves_no_lock_file(tmp_path):
    out = tmp_path / "run"
    run = _start_long_run(out)
    try:
        assert (out / ".lock").exists()
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 143, run.stderr.read()
    finally:
        run.kill()
        run.wait()
    assert _steps(out), "the stopped run saved no checkpoint"
    assert not (out / ".lock").exists(), "a run stopped by SIGTERM left its lock file"
