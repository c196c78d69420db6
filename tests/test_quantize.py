"""QLoRA: int8 / nf4 frozen bases (jlora.quant.quantize) under fp32 adapters.

The NF4 table is checked against the paper's construction, round trips against each format's error
bound, the routed forward against the dense forward of the same dequantized weights, the train step
against "only adapters move", the compiled step against a dense copy of the kernels, and the
PEFT export of a QLoRA-trained adapter against the real `peft` library on the dequantized base."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from lora_testing import is_pair, randomize, save_tiny_hf_llama

import jlora
from jlora.models.family import init_params
from jlora.models.llama import PRESETS, Llama
from jlora.parallel.sharding import make_mesh
from jlora.quant.quantize import (
    NF4_CODE,
    QuantizeError,
    dequantize,
    frozen_bytes,
    is_quantized,
    quantize,
    quantize_leaf,
    take_rows,
)
from jlora.train import plan
from jlora.train.config import ConfigError, OptimConfig, from_dict
from jlora.train.step import make_optimizer, make_train_step, place_state, quantize_frozen

CFG = PRESETS["tiny"].replace(vocab_size=256, hidden_size=128, intermediate_size=256, tie_word_embeddings=True)


def _dequantized(tree):
    return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def _quantized_leaves(tree) -> dict:
    flat = traverse_util.flatten_dict(tree)
    return {k: v for k, v in flat.items() if is_quantized(v)}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_nf4_code_is_the_papers_normal_float():
    """QLoRA appendix E: 8 positive and 7 negative N(0,1) quantiles at offset 0.9677 (= 1/2 (1/32 + 1/30)
    away from the tails), plus an exact 0, normalised to [-1, 1]."""
    import torch

    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.sort(torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])).values
    code = (code / code.abs().max()).numpy()
    np.testing.assert_allclose(NF4_CODE, code, atol=2e-7)
    assert NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0


def test_nf4_equals_bitsandbytes_bit_for_bit():
    """bitsandbytes (what PEFT's QLoRA uses) quantizes a torch Linear weight [out, in] in blocks of 64 along
    `in`; jlora's kernel is [in, out] blocked along `in`: the same blocks, so the same dequantized values."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, get_4bit_type, quantize_4bit

    np.testing.assert_array_equal(get_4bit_type("nf4", device="cpu").numpy(), NF4_CODE)
    w = (np.random.default_rng(0).standard_t(4, size=(384, 256)) * 0.02).astype(np.float32)  # [out, in]
    packed, state = quantize_4bit(torch.from_numpy(w), quant_type="nf4", blocksize=64)
    theirs = dequantize_4bit(packed, state).numpy()
    ours = np.asarray(dequantize(quantize_leaf(jnp.asarray(w.T), "nf4", -2))).T
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("axis", [-2, -1])
def test_round_trip_errors_are_within_each_formats_bound(axis):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_t(4, size=(3, 128, 192)) * 0.02, jnp.float32)  # heavy tails, like real kernels
    w = w.at[0, :, 5].set(0.0).at[1, :64, :].set(0.0)  # all-zero columns and blocks must stay exactly zero
    blocks = lambda x: (
        jnp.swapaxes(x.reshape(3, 2, 64, 192), -1, -2) if axis == -2 else x.reshape(3, 128, 3, 64)
    )  # [.., A, B, 64]

    int8 = dequantize(quantize_leaf(w, "int8", axis))
    absmax_channel = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
    assert bool(jnp.all(jnp.abs(int8 - w) <= absmax_channel / 254 * (1 + 1e-6)))

    half_gap = float(np.max(np.diff(NF4_CODE))) / 2  # the farthest a value can be from its nearest code
    absmax_block = jnp.max(jnp.abs(blocks(w)), axis=-1, keepdims=True)
    nf4 = dequantize(quantize_leaf(w, "nf4", axis))
    assert bool(jnp.all(jnp.abs(blocks(nf4) - blocks(w)) <= absmax_block * half_gap * (1 + 1e-6)))
    assert float(jnp.mean(jnp.abs(nf4 - w))) < 0.15 * float(jnp.mean(jnp.abs(w)))  # ~4 bits of a t(4) sample

    q = quantize_leaf(w, "nf4", axis, double_quant=True)
    dq = dequantize(q)
    # block scales rounded up to 1/255 of their column's largest: the bound grows by that step at most
    step = jnp.max(absmax_block, axis=-3, keepdims=True) / 255
    assert bool(jnp.all(jnp.abs(blocks(dq) - blocks(w)) <= (absmax_block + step) * half_gap * (1 + 1e-6)))
    for deq in (int8, nf4, dq):
        assert bool(jnp.all(jnp.where(w == 0, deq == 0, True)))
    assert q.fields["absmax_q"].dtype == jnp.uint8 and q.fields["codes"].dtype == jnp.uint8


def test_take_rows_decodes_the_same_rows_as_dequantize():
    table = jnp.asarray(np.random.default_rng(1).normal(size=(256, 128)), jnp.float32)
    ids = jnp.array([[0, 255, 7], [3, 3, 128]])
    for method, dq in (("int8", False), ("nf4", False), ("nf4", True)):
        q = quantize_leaf(table, method, -1, double_quant=dq)
        np.testing.assert_array_equal(take_rows(q, ids), dequantize(q)[ids])


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_routed_forward_equals_the_dense_forward_of_the_dequantized_weights(params, method):
    """jlora.apply multiplies packed kernels (qmatmul, take_rows, the tied head's attend) and adds LoRA;
    the plain model on the dequantized tree with the adapter merged is the reference."""
    q = quantize(params, method)
    assert set(_quantized_leaves(q)) == {
        k for k in traverse_util.flatten_dict(params) if k[-1] in ("kernel", "embedding")
    }
    lcfg = jlora.LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"))  # (merged, an embedding adapter
    # would change the tied head too)
    frozen, trainable = jlora.split(q, lcfg, jax.random.key(1))
    trainable = randomize(trainable)
    model, ids = Llama(CFG), jnp.arange(24).reshape(2, 12) * 7 % CFG.vocab_size
    routed = jlora.apply(model, frozen, trainable, ids)
    reference = model.apply({"params": jlora.merge(_dequantized(frozen), trainable)}, ids)
    np.testing.assert_allclose(routed, reference, atol=2e-5, rtol=2e-5)
    merged = jlora.merge(frozen, trainable)  # quantized="dequantize": every leaf dense
    assert not _quantized_leaves(merged)
    np.testing.assert_allclose(model.apply({"params": merged}, ids), reference, atol=2e-5, rtol=2e-5)
    requantized = jlora.merge(frozen, trainable, quantized="requantize")
    assert set(_quantized_leaves(requantized)) == set(_quantized_leaves(frozen))
    err = jnp.max(jnp.abs(model.apply({"params": requantized}, ids) - reference))
    assert 0 < float(err) < 0.5  # requantizing the merged kernels rounds again, within the format's error


def test_qlora_step_trains_only_the_adapters_and_matches_the_dequantized_step(params):
    """On an 8-device fsdp mesh: the nf4 frozen leaves are bit-identical after two steps, the adapters
    move, and the losses and adapters equal a dense step on the dequantized base."""
    mesh = make_mesh(data=2, fsdp=4)
    lcfg = jlora.LoraConfig(rank=4, targets="all-linear")
    optimizer, _ = make_optimizer(OptimConfig(lr=1e-2), total_steps=10)
    batch = {
        "input_ids": np.arange(8 * 32).reshape(1, 8, 32) % CFG.vocab_size,
        "positions": np.broadcast_to(np.arange(32), (1, 8, 32)),
        "segment_ids": np.ones((1, 8, 32), np.int32),
        "loss_mask": np.ones((1, 8, 32), np.float32),
    }
    batch["targets"] = np.roll(batch["input_ids"], -1, axis=-1)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def two_steps(frozen, quantized):
        f, t = jlora.split(frozen, lcfg, jax.random.key(2))
        state = place_state(f, t, mesh, optimizer)
        if quantized:
            quantize_frozen(state, "nf4")
        before = jax.tree.map(np.asarray, state.frozen)
        step = make_train_step(Llama(CFG), optimizer, state)
        losses, trainable, opt_state = [], state.trainable, state.opt_state
        for i in range(2):
            trainable, opt_state, metrics = step(state.frozen, trainable, opt_state, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        return state, before, trainable, losses

    state, before, trainable, losses = two_steps(params, quantized=True)
    q = _quantized_leaves(state.frozen)
    assert {k: v.fmt for k, v in q.items() if k[0] == "embed_tokens"} == {("embed_tokens", "embedding"): "int8"}
    assert len(q) == 8 and all(v.fmt == "nf4" for k, v in q.items() if k[0] != "embed_tokens")  # kernels in 4 bits
    codes = q[("layers", "mlp", "gate_proj", "kernel")].fields["codes"]
    assert codes.sharding.spec[1:3] == ("fsdp", None) or "fsdp" in str(codes.sharding.spec)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, state.frozen))):
        np.testing.assert_array_equal(a, b)
    moved = [float(jnp.max(jnp.abs(p.b))) for p in jax.tree.leaves(trainable, is_leaf=is_pair)]
    assert min(moved) > 0
    _, _, dense_trainable, dense_losses = two_steps(_dequantized(quantize(params, "nf4")), quantized=False)
    np.testing.assert_allclose(losses, dense_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(dense_trainable)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _plan_run(quantize_method: str):
    return from_dict(
        {
            "model": {
                "path": "unused",
                "preset": "tiny",
                "quantize": quantize_method,
                "overrides": {
                    "num_hidden_layers": 4,
                    "hidden_size": 512,
                    "intermediate_size": 1536,
                    "vocab_size": 4096,
                    "num_attention_heads": 8,
                    "num_key_value_heads": 4,
                },
            },
            "data": {"train": "unused.jsonl", "max_seq_len": 256},
            "lora": {"rank": 8, "targets": ["q_proj", "v_proj"]},
            "train": {"global_batch": 4, "micro_batch": 4, "remat": "none"},
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        }
    )


@pytest.mark.slow
def test_compiled_qlora_step_holds_no_dense_copy_of_the_kernels():
    """remat none, the worst case: a dense kernel needed by the backward pass would be saved per layer.
    qmatmul saves the packed kernel and dequantizes again, so the quantized step's temp exceeds the
    dense step's by less than one layer's dense kernels plus the head (dequantized once for the loss),
    and its peak (arguments + temp) is far below the dense step's."""
    mem, frozen = {}, {}
    for method in ("none", "nf4"):
        compiled, state, cfg, _ = plan.compile_step(_plan_run(method), devices=jax.devices()[:1])
        mem[method], frozen[method] = compiled.memory_analysis(), state.frozen
    dense_kernels = {
        k: int(np.prod(v.shape)) * 4 for k, v in traverse_util.flatten_dict(frozen["none"]).items() if len(v.shape) >= 2
    }
    all_kernels = sum(dense_kernels.values())
    one_layer = sum(v // cfg.num_hidden_layers for k, v in dense_kernels.items() if k[0] == "layers")
    head = dense_kernels[("embed_tokens", "embedding")]
    extra = mem["nf4"].temp_size_in_bytes - mem["none"].temp_size_in_bytes
    assert extra < one_layer + head < all_kernels / 2, (extra, one_layer, head, all_kernels)
    peak = {m: v.argument_size_in_bytes + v.temp_size_in_bytes for m, v in mem.items()}
    assert peak["nf4"] < peak["none"] - all_kernels / 2, peak
    assert frozen_bytes(frozen["nf4"]) < 0.2 * frozen_bytes(frozen["none"])


def test_peft_loads_a_qlora_adapter_on_the_dequantized_base(tmp_path):
    """Trained on an nf4 base, exported as PEFT: the real peft library on the dequantized base gives
    jlora's logits (2e-3, the issue's budget)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    save_tiny_hf_llama(tmp_path / "base")
    cfg, params = jlora.load_pretrained(tmp_path / "base")
    frozen, trainable = jlora.split(
        quantize(params, "nf4"), jlora.LoraConfig(rank=4, targets="all-linear"), jax.random.key(0)
    )
    trainable = randomize(trainable, std=0.2)
    lcfg = jlora.LoraConfig(rank=4, targets="all-linear")
    jlora.export_peft(tmp_path / "peft", trainable, lcfg, cfg)
    base = _dequantized(frozen)
    jlora.save_pretrained(base, cfg, tmp_path / "dequantized")
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "dequantized"), tmp_path / "peft").eval()
    ids = np.arange(20).reshape(2, 10) * 5 % cfg.vocab_size
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(jlora.apply(Llama(cfg), frozen, trainable, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4


def test_bad_quantize_input_is_one_line(params):
    with pytest.raises(QuantizeError, match=r"^layers\.mlp\.down_proj\.kernel \(2, 96, 128\): nf4 needs dim 96 "):
        quantize({"layers": {"mlp": {"down_proj": {"kernel": jnp.zeros((2, 96, 128))}}}}, "nf4")
    with pytest.raises(QuantizeError, match="quantize method 'nf3'"):
        quantize(params, "nf3")
    with pytest.raises(jlora.LoraError, match="pissa .* needs a dense base, not a nf4 one"):
        jlora.split(quantize(params, "nf4"), jlora.LoraConfig(rank=4, init="pissa"), jax.random.key(0))
    base = {"train": "x.jsonl"}
    with pytest.raises(
        ConfigError,
        match=r"^model\.quantize: gguf keeps a GGUF file's own blocks, but model\.path "
        r"'ckpt/llama' is not a \.gguf file",
    ):
        from_dict({"model": {"path": "ckpt/llama", "quantize": "gguf"}, "data": base})
    with pytest.raises(ConfigError, match=r"^model\.double_quant: .* needs quantize: nf4, not int8"):
        from_dict({"model": {"path": "m.gguf", "quantize": "int8", "double_quant": True}, "data": base})
    with pytest.raises(ConfigError, match=r"model\.quantize"):
        from_dict({"model": {"path": "m.gguf", "quantize": "nf5"}, "data": base})


@pytest.mark.slow
def test_smollm2_qlora_on_the_gguf_files_own_blocks(smollm2_gguf):
    """The shipped Q4_1 file trained as it is stored: two steps on an 8-device mesh move only the adapters,
    the Q4_1 / Q8_0 blocks are bit-identical afterwards, and the loss goes down."""
    cfg, params = jlora.load_pretrained(smollm2_gguf, quantize="gguf")
    assert {v.fmt for v in _quantized_leaves(params).values()} == {"Q4_1", "Q8_0"}
    mesh = make_mesh(data=2, fsdp=4)
    optimizer, _ = make_optimizer(OptimConfig(lr=3e-3), total_steps=10)
    frozen, trainable = jlora.split(params, jlora.LoraConfig(rank=8, targets=("q_proj", "v_proj")), jax.random.key(0))
    state = place_state(frozen, trainable, mesh, optimizer)
    before = jax.tree.map(np.asarray, state.frozen)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8, 65))
    batch = {
        "input_ids": ids[..., :-1],
        "targets": ids[..., 1:],
        "positions": np.broadcast_to(np.arange(64), (1, 8, 64)),
        "segment_ids": np.ones((1, 8, 64), np.int32),
        "loss_mask": np.ones((1, 8, 64), np.float32),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step = make_train_step(Llama(cfg), optimizer, state)
    losses, trainable, opt_state = [], state.trainable, state.opt_state
    for i in range(3):
        trainable, opt_state, metrics = step(state.frozen, trainable, opt_state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, state.frozen))):
        np.testing.assert_array_equal(a, b)
    assert min(float(jnp.max(jnp.abs(p.b))) for p in jax.tree.leaves(trainable, is_leaf=is_pair)) > 0


def test_generate_and_adapter_checkpoints_work_on_a_quantized_base(params, tmp_path):
    """KV-cached generation routes the packed kernels too (greedy tokens equal the dequantized base's), and an
    adapter saved against a quantized base loads back against it (its fingerprint samples the decoded values)."""
    q = quantize(params, "int8")
    lcfg = jlora.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
    frozen, trainable = jlora.split(q, lcfg, jax.random.key(3))
    trainable = randomize(trainable, std=0.3)
    model, prompts = Llama(CFG), [[5, 9, 33, 2], [7, 7]]
    ours = jlora.generate(model, frozen, trainable, prompts, max_new_tokens=6, temperature=0.0)
    dense = jlora.generate(model, _dequantized(frozen), trainable, prompts, max_new_tokens=6, temperature=0.0)
    assert [list(map(int, o)) for o in ours] == [list(map(int, o)) for o in dense]
    jlora.save_adapter(tmp_path / "adapter", trainable, lcfg, base=CFG, params=frozen)
    _, loaded = jlora.load_adapter(tmp_path / "adapter", base=CFG, params=frozen)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(a, b)
    _, again = jlora.load_adapter(tmp_path / "adapter", base=CFG, params=_dequantized(frozen))  # same values
    assert len(jax.tree.leaves(again)) == len(jax.tree.leaves(trainable))
