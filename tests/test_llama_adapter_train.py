"""LLaMA-Adapter through the run config and `jlora-train`: method / adapter keys and their one-line errors,
the sharded train step (only prompts and gates move), checkpoints that refuse another method, exact resume
after SIGKILL, and generation from the saved adapter (merge refused)."""

import json
import os
import pathlib
import subprocess

import jax
import numpy as np
import pytest
from cli_testing import kill_at_checkpoint, one_line_error, script

import jlora
from jlora.checkpoint.adapter import load_adapter
from jlora.checkpoint.metadata import AdapterError
from jlora.parallel.sharding import make_mesh
from jlora.peft.llama_adapter import GATE, PROMPT, AdapterConfig
from jlora.peft.lora import LoraConfig
from jlora.train import config as C
from jlora.train.step import init_state, make_optimizer, make_train_step, put_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = script("jlora-train")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
CONFIG = "configs/tiny-cpu-adapter.yaml"
BASE = {"model": {"path": "tiny"}, "data": {"train": "data/tiny/train.jsonl"}}


def test_shipped_config_picks_the_adapter():
    run = C.load(str(ROOT / CONFIG))
    assert run.method == "llama_adapter" and run.method_config == AdapterConfig(len=4, layers=1)
    assert C.from_dict(C.to_dict(run)) == run
    assert C.from_dict(BASE).method_config == LoraConfig()  # LoRA stays the default method


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({"method": "llama_adapter", "adapter": {"len": 0}}, [], "adapter.len: must be a positive integer, got 0"),
        ({"method": "llama_adapter"}, ["adapter.len=-2"], "adapter.len: must be a positive integer, got -2"),
        ({"method": "llama_adapter"}, ["adapter.layers=0"], "adapter.layers: must be a positive integer, got 0"),
        (
            {"method": "llama_adapter", "adapter": {"length": 4}},
            [],
            "unknown key 'adapter.length' (did you mean 'adapter.len'?)",
        ),
        ({"adapter": {"len": 4}}, [], "adapter: is for method: llama_adapter, but this run has method: lora"),
        (
            {"method": "llama_adapter", "lora": {"rank": 4}},
            [],
            "lora: is for method: lora, but this run has method: llama_adapter",
        ),
        ({"method": "prefix"}, [], "method: must be one of 'lora' | 'llama_adapter', got 'prefix'"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(raw, overrides, message):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({**BASE, **raw}, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_layers_beyond_the_model_is_a_one_line_cli_error(tmp_path):
    run = subprocess.run(
        [TRAIN, "--config", CONFIG, "--set", "adapter.layers=3", "--set", f"output_dir={tmp_path}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    one_line_error(run, "adapter.layers: 3 is beyond the model's 2 layers")


def test_sharded_step_moves_only_prompts_and_gates():
    """One jitted step on a data=2 fsdp=2 tensor=2 mesh: the frozen tree comes back bit for bit (it is
    never an output), the gate opens at its first step, and the prompts move once the gate is open."""
    cfg = jlora.PRESETS["tiny"]
    mesh = make_mesh(2, 2, 2)
    optimizer, _ = make_optimizer(C.OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 4)
    state = init_state(
        cfg, AdapterConfig(len=4, layers=1), mesh, jax.random.key(0), optimizer, model_key=jax.random.key(1)
    )
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    attn = state.trainable["layers"]["self_attn"]
    assert attn[PROMPT].shape == (1, 4, cfg.hidden_size) and attn[GATE].shape == (1, 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "targets": np.roll(ids, -1, 1),
        "loss_mask": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), ids.shape).copy(),
        "segment_ids": np.ones_like(ids),
    }
    step = make_train_step(jlora.Llama(cfg), optimizer, state)
    history = [jax.tree.map(np.asarray, state.trainable)]
    for i in range(2):
        state.trainable, state.opt_state, _ = step(
            state.frozen, state.trainable, state.opt_state, put_batch(batch, mesh, 1), jax.random.key(i)
        )
        history.append(jax.tree.map(np.asarray, state.trainable))
    for x, y in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(x, np.asarray(y))
    (g0, g1, g2), (p0, p1, p2) = ([h["layers"]["self_attn"][k] for h in history] for k in (GATE, PROMPT))
    assert np.all(g0 == 0) and np.all(g1 != 0)  # the zero gate gets a gradient
    np.testing.assert_array_equal(p1, p0)  # ... while closed, nothing reaches the prompts
    assert np.abs(p2 - p1).max() > 0  # once open, they train


def _train_args(out_dir, *extra):
    sets = [
        "train.steps=16",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=4",
        "checkpoint.keep=2",
        f"output_dir={out_dir}",
    ]
    return [TRAIN, "--config", CONFIG, *[a for s in sets for a in ("--set", s)], *extra]


def _losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.run(_train_args(straight), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    kill_at_checkpoint(_train_args(killed), killed, 8, cwd=ROOT, env=ENV)
    run = subprocess.run(
        _train_args(killed, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resumed from" in run.stdout + run.stderr
    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, 17))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=0, atol=1e-6)
    acfg_a, a = load_adapter(straight / "adapter")
    acfg_b, b = load_adapter(killed / "adapter")
    assert acfg_a == acfg_b == AdapterConfig(len=4, layers=1)
    assert a["layers"]["self_attn"][GATE].shape == (1, 1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(a["layers"]["self_attn"][GATE])).max() > 0  # it trained

    # the same output_dir resumed as a LoRA run, or with another adapter length, is refused in one line
    lora = subprocess.run(
        [
            TRAIN,
            "--config",
            "configs/tiny-cpu.yaml",
            "--set",
            "train.steps=20",
            "--set",
            f"output_dir={killed}",
            "--resume",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    one_line_error(lora, "made with method llama_adapter, expected method lora")
    longer = subprocess.run(
        _train_args(killed, "--set", "adapter.len=5", "--set", "train.steps=20", "--resume"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    one_line_error(longer, "adapter has adapter.len=4, expected adapter.len=5")
    with pytest.raises(AdapterError, match="made with method llama_adapter, expected method lora"):
        load_adapter(straight / "adapter", expect=LoraConfig())


def test_generate_cli_runs_the_adapter_and_refuses_merge(tmp_path):
    """jlora-generate on an HF-format base with a trained adapter; --merge is one line."""
    from jlora.formats.weights import save_pretrained

    cfg = jlora.PRESETS["tiny"].replace(vocab_size=320)
    params = jlora.init_params(cfg, jax.random.key(0))
    save_pretrained(jax.tree.map(np.asarray, params), cfg, tmp_path / "base")
    _, trainable = jlora.split(params, AdapterConfig(len=4, layers=1), jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.3, trainable)
    jlora.save_adapter(tmp_path / "adapter", trainable, AdapterConfig(len=4, layers=1), cfg)
    out = jlora.generate(
        jlora.Llama(cfg),
        params,
        load_adapter(tmp_path / "adapter", base=cfg)[1],
        [[1, 2, 3]],
        max_new_tokens=8,
        eos_id=(),
    )
    assert out != jlora.generate(jlora.Llama(cfg), params, None, [[1, 2, 3]], max_new_tokens=8, eos_id=())
    merged = subprocess.run(
        [
            script("jlora-generate"),
            "--model",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--merge",
            "--prompt",
            "hi",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert merged.returncode == 2 and "Traceback" not in merged.stderr
    assert "cannot merge a LLaMA-Adapter tree" in merged.stderr.strip().splitlines()[-1]
