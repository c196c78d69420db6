"""Nothing lost when writing a directory: adapters survive SIGKILL mid-save, and jlora-merge /
jlora-export-peft refuse an --out that would destroy something, and swap their output in whole.
The read-only --out check mounts a tmpfs, which needs root: without it, it fails rather than skips."""

import hashlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from cli_testing import one_line_error, script
from fs_testing import tmpfs

import jlora
from jlora.checkpoint.adapter import load_adapter, save_adapter
from jlora.formats.weights import save_pretrained
from jlora.models.family import param_shapes
from jlora.models.llama import PRESETS

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
CFG = PRESETS["tiny"]
LCFG = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))

# Saves adapters whose every value is i, for i = 0, 1, 2, ... until killed; says when it starts.
SAVER = """
import sys, jax, jax.numpy as jnp, jlora

from jlora.checkpoint.adapter import save_adapter
from jlora.models.llama import PRESETS
from jlora.models.family import param_shapes
cfg, lcfg = PRESETS["tiny"], jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
shapes = jax.eval_shape(lambda p: jlora.split(p, lcfg, jax.random.key(0))[1], param_shapes(cfg))
i = int(sys.argv[2])
while True:
    tree = jax.tree.map(lambda s: jnp.full(s.shape, float(i), s.dtype), shapes)
    print("saving", i, flush=True)
    save_adapter(sys.argv[1], tree, lcfg, base=cfg)
    i += 1
"""


def _adapter_value(path) -> float:
    """The one value every leaf of the adapter at `path` holds (load_adapter checks it is whole)."""
    _, tree = load_adapter(path, base=CFG)
    values = {float(v) for x in jax.tree.leaves(tree) for v in np.unique(np.asarray(x))}
    assert len(values) == 1, f"a mix of two saves: {values}"
    return values.pop()


def test_sigkill_during_save_adapter_leaves_one_whole_adapter(tmp_path):
    path = tmp_path / "adapter"
    shapes = jax.eval_shape(lambda p: jlora.split(p, LCFG, jax.random.key(0))[1], param_shapes(CFG))
    save_adapter(path, jax.tree.map(lambda s: jnp.full(s.shape, -1.0, s.dtype), shapes), LCFG, base=CFG)
    rng, start, seen = random.Random(0), 0, []
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path), str(start)],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout.readline().startswith("saving"), "the saver did not start"
        time.sleep(rng.uniform(0.0, 0.4))  # a save takes ~0.1 s: this lands in the middle of one or another
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        value = _adapter_value(path)  # raises if the adapter is missing, truncated or corrupt
        assert -1 <= value < start + 1000
        seen.append(value)
        start = int(value) + 1000  # the next round's saves are told apart from this one's
    # The next save clears whatever the kills left beside the adapter.
    save_adapter(path, jax.tree.map(lambda s: jnp.full(s.shape, 7.0, s.dtype), shapes), LCFG, base=CFG)
    assert _adapter_value(path) == 7.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "strays left beside the adapter"


# --------------------------------------------------------------------------- jlora-merge / jlora-export-peft --out


def _cli(name, *args):
    return subprocess.run(
        [script(name), *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )


def _digest(directory: pathlib.Path) -> dict:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _model_and_adapter(tmp_path):
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rs.standard_normal(s.shape).astype(s.dtype)), param_shapes(CFG))
    save_pretrained(params, CFG, tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    shapes = jax.eval_shape(lambda p: jlora.split(p, LCFG, jax.random.key(0))[1], params)
    trainable = jax.tree.map(lambda s: jnp.asarray(0.1 * rs.standard_normal(s.shape).astype(s.dtype)), shapes)
    save_adapter(tmp_path / "adapter", trainable, LCFG, base=CFG, params=params)
    return tmp_path / "model", tmp_path / "adapter"


def test_merge_refuses_an_out_that_would_destroy_data(tmp_path):
    model, adapter = _model_and_adapter(tmp_path)
    before = _digest(model)
    base = ["--model", model, "--adapter", adapter, "--out"]
    one_line_error(_cli("jlora-merge", *base, model), str(model), "model", prog="jlora-merge", only_line=True)
    one_line_error(_cli("jlora-merge", *base, model, "--force"), str(model), prog="jlora-merge", only_line=True)
    one_line_error(
        _cli("jlora-merge", *base, model / "merged"), str(model / "merged"), prog="jlora-merge", only_line=True
    )
    assert _digest(model) == before, "the base model was changed"
    one_line_error(_cli("jlora-merge", *base, adapter, "--force"), str(adapter), prog="jlora-merge", only_line=True)
    assert load_adapter(adapter, base=CFG)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line_error(_cli("jlora-merge", *base, busy), str(busy), "--force", prog="jlora-merge", only_line=True)
    assert (busy / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    one_line_error(_cli("jlora-merge", *base, afile), str(afile), "file", prog="jlora-merge", only_line=True)
    one_line_error(_cli("jlora-merge", *base, afile, "--force"), str(afile), "file", prog="jlora-merge", only_line=True)
    assert afile.read_text() == "mine"

    run = _cli("jlora-merge", *base, tmp_path / "merged")
    assert run.returncode == 0, run.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "merged"))
    run = _cli("jlora-merge", *base, busy, "--force")  # --force replaces the dir as a whole
    assert run.returncode == 0, run.stderr[-2000:]
    assert _digest(busy) == _digest(tmp_path / "merged")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_export_peft_out_checks_and_swap(tmp_path):
    model, adapter = _model_and_adapter(tmp_path)
    base = ["--model", model, "--adapter", adapter, "--out"]
    afile = tmp_path / "afile"
    afile.write_text("mine")
    one_line_error(
        _cli("jlora-export-peft", *base, afile), str(afile), "file", prog="jlora-export-peft", only_line=True
    )
    assert afile.read_text() == "mine"
    one_line_error(_cli("jlora-export-peft", *base, adapter), str(adapter), prog="jlora-export-peft", only_line=True)
    assert load_adapter(adapter, base=CFG)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line_error(
        _cli("jlora-export-peft", *base, busy), str(busy), "--force", prog="jlora-export-peft", only_line=True
    )
    assert (busy / "notes.txt").read_text() == "mine"

    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        one_line_error(
            _cli("jlora-export-peft", *base, ro / "peft"),
            str(ro),
            "Read-only",
            prog="jlora-export-peft",
            only_line=True,
        )

    run = _cli("jlora-export-peft", *base, busy, "--force")
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(os.listdir(busy)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"
