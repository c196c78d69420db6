"""Fused projections (jlora.models.fused): q/k/v and gate/up run as one matmul each, the params keep HF's names, and
LoRA / DoRA / dropout / per-row adapter stacks on any part give what separate projections give. HF and PEFT
parity of the fused model live in test_llama.py and test_lora.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params
from lora_testing import randomize

import jlora.infer.decode
import jlora.models.decoder
from jlora import split
from jlora.infer.decode import forward, init_decode_cache, per_layer
from jlora.infer.generate import Generator
from jlora.infer.lora_stack import AdapterStack
from jlora.models.family import init_params
from jlora.models.llama import Llama, LlamaConfig
from jlora.peft.lora import LoraConfig
from jlora.peft.routing import apply

CFG = LlamaConfig(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=20,
)
KEY = lambda i: jax.random.key(i, impl="rbg")


def frozen_matmul_shapes(fn, *args) -> list[tuple[int, ...]]:
    """The shapes of every dot_general's second operand in fn's jaxpr, sub-jaxprs (scan, remat) included."""
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.invars[1].aval.shape))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def test_qkv_and_gate_up_are_one_matmul_each_and_params_keep_hf_names():
    params = jax.eval_shape(lambda: init_params(CFG, KEY(0)))
    layer = params["layers"]
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    ids = jnp.zeros((2, 5), jnp.int32)
    shapes = frozen_matmul_shapes(lambda p: Llama(CFG).apply({"params": p}, ids), params)
    d, q, kv, f = 48, 4 * 20, 2 * 20, 112
    assert (d, q + 2 * kv) in shapes and (d, 2 * f) in shapes  # the fused kernels
    assert not {(d, q), (d, kv), (d, f)} & set(shapes)  # and no separate q / k / v / gate / up matmul


@pytest.fixture
def unfused(monkeypatch):
    """Run the model's projections separately, as under tensor parallelism (heads / mlp split over devices)."""

    def use():
        monkeypatch.setattr(jlora.models.decoder, "shards", lambda dim: 2)

    return use


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_every_part_equals_separate_projections(dora, unfused):
    params = init_params(CFG, KEY(0))
    lcfg = LoraConfig(rank=4, alpha=8, targets="all-linear", use_dora=dora, dropout=0.1)
    frozen, trainable = split(params, lcfg, KEY(1))
    trainable = randomize(trainable, seed=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)), jnp.int32)

    def loss_and_grads():
        def loss(t):
            logits = apply(Llama(CFG), frozen, t, ids, rngs={"dropout": KEY(3)})
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(trainable)  # traced anew each time: `unfused` takes effect

    fused = loss_and_grads()
    assert (48, 4 * 20 + 4 * 20) in frozen_matmul_shapes(lambda t: apply(Llama(CFG), frozen, t, ids), trainable)
    unfused()
    separate = loss_and_grads()
    for x, y in zip(jax.tree.leaves(fused), jax.tree.leaves(separate)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6, rtol=1e-5)


def test_per_row_adapter_stack_on_k_v_and_up_equals_separate_projections(unfused):
    params = init_params(CFG, KEY(0))
    stack = AdapterStack(CFG, capacity=2, max_rank=4, targets=("k_proj", "v_proj", "up_proj"))
    for i, targets in enumerate([("k_proj", "up_proj"), ("v_proj",)]):
        _, trainable = split(params, LoraConfig(rank=2 + 2 * i, targets=targets), KEY(4 + i))
        stack.add(f"a{i}", randomize(trainable, seed=5 + i))
    gen = Generator(Llama(CFG), params, stack=stack)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, (3, 7)), jnp.int32)
    positions, segments = jnp.broadcast_to(jnp.arange(7), (3, 7)), jnp.ones((3, 7), jnp.int32)

    def logits(names, frozen):  # the decode model's prefill, unjitted, one adapter (or the base) per row
        cache = init_decode_cache(CFG, 3, 8)
        return forward(gen.model, frozen, stack.rows(names), cache, ids, positions, segments, False)[0]

    fused = logits(["a0", None, "a1"], gen.frozen)  # q/k/v and gate/up joined ahead of time (prefuse)
    assert "qkv" in gen.frozen["layer_0"]["self_attn"] and "gate_up" in gen.frozen["layer_0"]["mlp"]
    unfused()
    separate = logits(["a0", None, "a1"], per_layer(params, CFG.num_hidden_layers))  # each part its own kernel
    np.testing.assert_allclose(np.asarray(fused), np.asarray(separate), atol=2e-6, rtol=1e-5)
    base = logits([None, None, None], gen.frozen)
    assert not np.allclose(np.asarray(fused[0]), np.asarray(base[0]), atol=1e-3)  # the adapters did act
    assert not np.allclose(np.asarray(fused[2]), np.asarray(base[2]), atol=1e-3)
    np.testing.assert_allclose(np.asarray(fused[1]), np.asarray(base[1]), atol=2e-6, rtol=1e-5)


def test_decode_layout_splits_wide_kernels_into_column_blocks_and_equals_the_model(monkeypatch):
    """Generator lays gate/up and the head out as column blocks (on CPU, 2 per core, kernels >= 2048 wide);
    its prefill logits equal the training model's, so the blocks are multiplied and joined in order."""
    monkeypatch.setattr(jlora.infer.decode, "_cores", lambda: 2)
    cfg = CFG.replace(vocab_size=4096, intermediate_size=1024)
    params = init_params(cfg, KEY(0))
    gen = Generator(Llama(cfg), params)
    gate_up, head = gen.frozen["layer_1"]["mlp"]["gate_up"]["kernel"], gen.frozen["head"]["kernel"]
    assert [b.shape for b in gate_up] == [(48, 512)] * 4 and [b.shape for b in head] == [(48, 1024)] * 4
    assert "lm_head" not in gen.frozen and gen.frozen["layer_1"]["self_attn"]["qkv"]["kernel"].shape == (48, 160)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 4096, (2, 6)), jnp.int32)
    positions, segments = jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), jnp.int32)
    ours = forward(gen.model, gen.frozen, {}, init_decode_cache(cfg, 2, 8), ids, positions, segments, True)[0]
    reference = Llama(cfg).apply({"params": params}, ids)[:, -1]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=2e-5, rtol=1e-5)
