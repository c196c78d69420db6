"""PiSSA adapters are self-contained (issue 13, item 13). PiSSA trains on W_res = W - s*A0@B0, which no
adapter file carries; saved or exported as trained, an adapter applied to the base on disk counts the
top-r singular part twice. `pissa_to_lora` writes the equivalent rank-2r plain LoRA, so a freshly loaded
base + the saved adapter gives the training-time logits: loaded by jlora, merged by jlora-merge, exported by
jlora-export-peft into the real `peft`, and out of a jlora-train run."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from lora_testing import save_tiny_hf_llama
from peft import PeftModel
from transformers import LlamaForCausalLM

import jlora
from jlora.checkpoint.adapter import load_adapter, save_adapter
from jlora.checkpoint.metadata import AdapterError
from jlora.formats.peft_adapter import PeftError, export_peft
from jlora.formats.weights import read_pretrained

IDS = np.random.RandomState(0).randint(0, 128, (2, 9))
ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = {
    name: [sys.executable, "-c", f"import sys; from jlora.{mod} import {fn}; sys.exit({fn}())"]
    for name, mod, fn in [
        ("merge", "cli.adapters", "merge_main"),
        ("export", "cli.adapters", "export_main"),
        ("train", "cli.train", "main"),
    ]
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = save_tiny_hf_llama(tmp_path_factory.mktemp("base"))
    return path


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits.numpy()


def _trained_pissa(params, cfg, lcfg):
    """(frozen W_res, the initial pair tree, the tree after 2 Adam steps, their training-time logits)."""
    model = jlora.Llama(cfg)
    frozen, initial = jlora.split(params, lcfg, jax.random.key(0))
    ids = jnp.asarray(IDS)

    def loss(t):
        logits = jlora.apply(model, frozen, t, ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

    opt = optax.adam(3e-2)
    trainable, state = initial, opt.init(initial)
    for _ in range(2):
        updates, state = opt.update(jax.grad(loss)(trainable), state)
        trainable = optax.apply_updates(trainable, updates)
    want = np.asarray(jlora.apply(model, frozen, trainable, ids))
    return frozen, initial, trainable, want


def test_pissa_adapter_saved_loaded_merged_and_exported_gives_the_training_logits(base, tmp_path):
    cfg, params = read_pretrained(base)
    lcfg = jlora.LoraConfig(
        rank=4,
        alpha=8,
        targets=("q_proj", "v_proj", "down_proj"),
        init="pissa",
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 4.0},
    )
    frozen, initial, trainable, want = _trained_pissa(params, cfg, lcfg)
    naive = np.asarray(jlora.apply(jlora.Llama(cfg), params, trainable, jnp.asarray(IDS)))
    assert np.abs(naive - want).max() > 1e-2  # the trained pair alone on W counts the top-r part twice

    # Saved or exported as trained, the adapter would be wrong outside this process: both refuse.
    with pytest.raises(AdapterError, match="pissa_to_lora") as err:
        save_adapter(tmp_path / "raw", trainable, lcfg, base=cfg, params=params)
    assert "\n" not in str(err.value)
    with pytest.raises(PeftError, match="pissa_to_lora"):
        export_peft(tmp_path / "raw-peft", trainable, lcfg, cfg)

    lcfg2, adapter = jlora.pissa_to_lora(trainable, initial, lcfg)
    assert lcfg2.init == "lora" and lcfg2.rank == 8 and dict(lcfg2.rank_pattern) == {"v_proj": 4}
    save_adapter(tmp_path / "adapter", adapter, lcfg2, base=cfg, params=params)
    _, fresh = read_pretrained(base)  # a freshly loaded base: W as on disk, not W_res
    _, loaded = load_adapter(tmp_path / "adapter", base=cfg, params=fresh)
    got = np.asarray(jlora.apply(jlora.Llama(cfg), fresh, loaded, jnp.asarray(IDS)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    common = ["--model", str(base), "--adapter", str(tmp_path / "adapter")]
    for name in ("merge", "export"):
        run = subprocess.run(
            [*CLI[name], *common, "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_allclose(
        _hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "merge")), want, atol=1e-5, rtol=0
    )
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "export")
    np.testing.assert_allclose(_hf_logits(peft_model), want, atol=1e-5, rtol=0)


def test_jlora_train_saves_a_pissa_run_as_its_plain_lora_equivalent(tmp_path):
    """2 steps of jlora-train with lora.init=pissa: the adapter's first rank-r half is the trained pair, the
    second the split's (A0, -B0), and on the random base as initialised it gives that pair's W_res logits."""
    out = tmp_path / "run"
    run = subprocess.run(
        [
            *CLI["train"],
            "--config",
            str(ROOT / "configs/tiny-cpu.yaml"),
            "--set",
            "lora.init=pissa",
            "--set",
            "train.steps=2",
            "--set",
            "train.eval_interval=0",
            "--set",
            f"output_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lcfg2, adapter = load_adapter(out / "adapter")
    assert lcfg2.init == "lora" and lcfg2.rank == 8
    meta = json.loads((out / "adapter" / "metadata" / "metadata").read_text())
    cfg = jlora.LlamaConfig(
        **{
            k: v
            for k, v in meta["base"]["config"].items()
            if k in jlora.LlamaConfig.__dataclass_fields__ and k != "rope_scaling"
        }
    )
    params = jlora.init_params(cfg, jax.random.key(0))  # the run's model.seed: the base it trained on
    load_adapter(out / "adapter", base=cfg, params=params)  # its fingerprint is of the base, not of W_res
    lcfg = jlora.LoraConfig(rank=4, init="pissa")
    frozen, initial = jlora.split(params, lcfg, jax.random.key(0))
    pairs = lambda t: jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, jlora.LoraPair))
    trained = jax.tree.map(
        lambda p: p.replace(a=p.a[..., :4], b=p.b[..., :4, :]), adapter, is_leaf=lambda x: isinstance(x, jlora.LoraPair)
    )
    for full, start in zip(pairs(adapter), pairs(initial)):
        np.testing.assert_allclose(np.asarray(full.a[..., 4:]), np.asarray(start.a), atol=1e-6)
        np.testing.assert_allclose(np.asarray(full.b[..., 4:, :]), -np.asarray(start.b), atol=1e-6)
    ids = jnp.asarray(IDS)
    model = jlora.Llama(cfg)
    want = np.asarray(jlora.apply(model, frozen, trained, ids))
    np.testing.assert_allclose(np.asarray(jlora.apply(model, params, adapter, ids)), want, atol=1e-4, rtol=0)
