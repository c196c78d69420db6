"""jlora.quant.gguf_blocks: GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K blocks kept as
QuantizedKernels decode to gguf-py's dequantize bit for bit (kernels, embeddings, take_rows), also a param whose
layers mix block types, stacked as one kernel; read_pretrained(quantize="gguf") gives the dense load's values on
a tiny mixed-type file (forward, generation, training that leaves the blocks as they are) and the real SmolLM2
file, and bad input is one line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from jax.sharding import PartitionSpec as P
from lora_testing import save_tiny_hf_llama

import jlora
from jlora.formats.weights import WeightsError, read_pretrained
from jlora.quant import gguf_blocks
from jlora.quant.quantize import (
    QuantizeError,
    dequantize,
    frozen_bytes,
    is_quantized,
    qmatmul,
    quantize_leaf,
    take_rows,
    transposed,
)

BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# Where each block's fp16 scales sit (byte offsets), per llama.cpp's block structs; written out here, not
# taken from gguf_blocks, so random bytes get finite scales exactly where gguf-py reads them.
FP16_AT = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82)}


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def random_fp16(rng, n: int, scale: float) -> np.ndarray:
    """n finite fp16 scales of either sign, spread over magnitudes below `scale`, some exactly zero."""
    d = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 1.0, n) * scale * 2.0 ** -rng.integers(0, 8, n)
    d[rng.random(n) < 0.05] = 0.0
    return d.astype(np.float16)


def gguf_blocks_for(kind: str, rows: int, cols: int, rng, scale: float = 1.0) -> np.ndarray:
    """Raw GGUF data [rows, bytes] of type `kind`: gguf-py's quantizer where it has one, else random bytes
    with finite fp16 scales."""
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32) * scale, T[kind])
    block, size = gguf.GGML_QUANT_SIZES[T[kind]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in FP16_AT[kind]:
        raw[..., at : at + 2] = random_fp16(rng, rows * cols // block, scale).view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_blocks_decode_like_gguf_py(kind):
    rng = np.random.default_rng(BLOCK_TYPES.index(kind))
    rows, cols = 48, 512
    raw = gguf_blocks_for(kind, rows, cols, rng)
    ref = gguf_dequantize(raw, T[kind])  # [rows, cols] float32
    assert ref.shape == (rows, cols) and np.isfinite(ref).all()

    # the fields are the file's bytes, only split: put back together they are the raw data
    fields = gguf_blocks.split_blocks(raw, T[kind])
    joined = np.concatenate(
        [np.asarray(f).reshape(rows, cols // gguf_blocks.LAYOUTS[kind][0], -1).view(np.uint8) for f in fields.values()],
        axis=-1,
    )
    np.testing.assert_array_equal(joined.reshape(rows, -1), raw)

    # a linear weight [out, in] -> kernel [in, out], blocked along in
    kernel = gguf_blocks.gguf_kernel(raw, T[kind])
    assert (kernel.shape, kernel.axis, kernel.fmt) == ((cols, rows), -2, kind)
    assert all(f.shape[:2] == (cols // gguf_blocks.LAYOUTS[kind][0], rows) for f in kernel.fields.values())
    np.testing.assert_array_equal(bits(jax.jit(dequantize)(kernel)), bits(ref.T))  # jitted, as in a train step

    # an embedding table [V, D], blocked along D; take_rows decodes just the gathered rows
    table = gguf_blocks.gguf_kernel(raw, kind, embedding=True)
    assert (table.shape, table.axis) == ((rows, cols), -1)
    np.testing.assert_array_equal(bits(jax.jit(dequantize)(table)), bits(ref))
    ids = rng.integers(0, rows, (3, 5))
    np.testing.assert_array_equal(bits(jax.jit(take_rows)(table, jnp.asarray(ids))), bits(ref[ids]))


MIXES = [("Q8_0", "Q5_0", "Q8_0"), ("Q4_K", "Q6_K", "Q6_K", "Q4_K"), ("Q6_K", "Q4_0", "Q5_K", "Q4_1", "Q5_1", "Q8_0")]


@pytest.mark.parametrize("embedding", [False, True])
@pytest.mark.parametrize("layers", MIXES, ids=["-".join(m) for m in MIXES])
def test_mixed_layers_decode_like_gguf_py(layers, embedding):
    """Per-layer kernels of different block types stack into one kernel that decodes each layer to gguf-py's
    values, whole or sliced one layer at a time, transposed too, at its widest member's bytes per layer."""
    rng = np.random.default_rng(len(layers))
    raws = [gguf_blocks_for(kind, 48, 512, rng) for kind in layers]
    kernels = [gguf_blocks.gguf_kernel(raw, kind, embedding=embedding) for raw, kind in zip(raws, layers)]
    refs = [gguf_dequantize(raw, T[kind]) for raw, kind in zip(raws, layers)]  # [48, 512] each
    refs = np.stack(refs if embedding else [r.T for r in refs])  # [L, M, N]
    q = gguf_blocks.stack_kernels(kernels)
    members = [k for k in gguf_blocks.LAYOUTS if k in layers]
    assert (q.fmt, q.shape, q.stack) == ("|".join(members), refs.shape, (len(layers),))
    widest = max(k.nbytes for k in kernels)
    assert q.nbytes == len(layers) * (widest + 4)  # every layer padded to the widest member, plus its selector

    np.testing.assert_array_equal(bits(jax.jit(dequantize)(q)), bits(refs))
    for i in range(len(layers)):
        one = jax.tree.map(lambda x, i=i: jnp.asarray(x[i]), q)  # as nn.scan and decoding slice it
        assert one.shape == refs.shape[1:]
        np.testing.assert_array_equal(bits(jax.jit(dequantize)(one)), bits(refs[i]))
        np.testing.assert_array_equal(bits(jax.jit(dequantize)(transposed(one))), bits(refs[i].T))

    # the matmul takes its gradient through the decoded layer; the packed kernel gets none
    one = jax.tree.map(lambda x: jnp.asarray(x[1]), q)
    x = jnp.asarray(rng.standard_normal((3, refs.shape[1])), jnp.float32)
    dx, dq = jax.grad(lambda x, q: qmatmul(x, q).sum(), argnums=(0, 1), allow_int=True)(x, one)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(jax.grad(lambda x: (x @ refs[1]).sum())(x)))
    assert all(f.dtype == jax.dtypes.float0 for f in jax.tree.leaves(dq))


def test_stack_kernels_refuses_what_it_cannot_stack():
    rng = np.random.default_rng(0)
    a = gguf_blocks.gguf_kernel(gguf_blocks_for("Q8_0", 32, 256, rng), "Q8_0")
    b = gguf_blocks.gguf_kernel(gguf_blocks_for("Q6_K", 64, 256, rng), "Q6_K")
    assert gguf_blocks.stack_kernels([a, b]) is None  # another shape: the loader dequantizes
    c = quantize_leaf(jnp.ones((256, 32)), "int8", -2)
    assert gguf_blocks.stack_kernels([a, c]) is None  # not a GGUF block type
    with pytest.raises(QuantizeError, match="mixed format Q8_0[|]int8: needs two or more of Q4_0") as e:
        gguf_blocks.mixed_format(("Q8_0", "int8"))
    assert "\n" not in str(e.value)


# ---- loading a GGUF file ----

TINY = dict(vocab=64, hidden=256, ffn=512, heads=4, kv_heads=2, layers=2)
# Every block type; three Q4_K_M-style params whose layers differ: attn_k (rope-permuted rows), attn_v (a
# 32-block type and a 256-block one, as llama.cpp mixes Q8_0 / Q6_K) and ffn_up. Norms are F32.
TINY_TYPES = {
    "token_embd.weight": "Q8_0",
    "output.weight": "Q6_K",
    "attn_q": "Q4_K",
    "blk.0.attn_k.weight": "Q4_1",
    "blk.1.attn_k.weight": "Q5_0",
    "blk.0.attn_v.weight": "Q8_0",
    "blk.1.attn_v.weight": "Q5_K",
    "attn_output": "Q6_K",
    "ffn_gate": "Q4_K",
    "ffn_down": "Q6_K",
    "blk.0.ffn_up.weight": "Q5_1",
    "blk.1.ffn_up.weight": "Q4_0",
}


def write_tiny_gguf(path, types: dict[str, str], seed: int = 0):
    """A random 2-layer llama GGUF (d=256 so K-quant blocks fit); `types` maps tensor names (or their
    per-layer stem) to a block type; norms are F32."""
    rng = np.random.default_rng(seed)
    c = TINY
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c["layers"])
    w.add_context_length(128)
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c["vocab"])
    hd, d = c["hidden"] // c["heads"], c["hidden"]
    shapes = {"token_embd.weight": (c["vocab"], d), "output.weight": (c["vocab"], d)}
    for i in range(c["layers"]):
        shapes.update(
            {
                f"blk.{i}.attn_q.weight": (c["heads"] * hd, d),
                f"blk.{i}.attn_k.weight": (c["kv_heads"] * hd, d),
                f"blk.{i}.attn_v.weight": (c["kv_heads"] * hd, d),
                f"blk.{i}.attn_output.weight": (d, d),
                f"blk.{i}.ffn_gate.weight": (c["ffn"], d),
                f"blk.{i}.ffn_up.weight": (c["ffn"], d),
                f"blk.{i}.ffn_down.weight": (d, c["ffn"]),
                f"blk.{i}.attn_norm.weight": (d,),
                f"blk.{i}.ffn_norm.weight": (d,),
            }
        )
    shapes["output_norm.weight"] = (d,)
    for name, shape in shapes.items():
        kind = types.get(name) or types.get(name.split(".")[2] if name.startswith("blk.") else name)
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            # the K-quants' random bytes get small scales so the model's activations stay tame
            raw = gguf_blocks_for(kind, *shape, rng, scale=0.05 if kind in FP16_AT else 0.1)
            w.add_tensor(name, raw, raw_dtype=T[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_blocks_equal_dense_load(tmp_path):
    """Layer-stacked blocks (q/k rows un-permuted on the fields) dequantize to the dense load bit for bit, also
    where a param's layers mix block types; logits through jlora.apply (nn.scan slices the stack) and greedy
    tokens from jlora.generate (decoding slices it per layer) equal the dense model's."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TINY_TYPES)
    cfg, dense = read_pretrained(path)
    qcfg, quant = read_pretrained(path, quantize="gguf")
    assert qcfg == cfg
    flat_d, flat_q = traverse_util.flatten_dict(dense), traverse_util.flatten_dict(quant)
    assert flat_d.keys() == flat_q.keys()
    kinds = {}
    for key, leaf in flat_q.items():
        if is_quantized(leaf):
            kinds["/".join(key)] = leaf.fmt
            assert leaf.shape == flat_d[key].shape
            np.testing.assert_array_equal(bits(jax.jit(dequantize)(leaf)), bits(flat_d[key]), err_msg="/".join(key))
            for i in range(leaf.stack[0] if leaf.stack else 0):  # one layer, sliced as decoding slices it
                one = jax.tree.map(lambda x, i=i: x[i], leaf)
                np.testing.assert_array_equal(bits(jax.jit(dequantize)(one)), bits(flat_d[key][i]))
        else:
            np.testing.assert_array_equal(leaf, flat_d[key])
    assert kinds == {
        "embed_tokens/embedding": "Q8_0",
        "lm_head/kernel": "Q6_K",
        "layers/self_attn/q_proj/kernel": "Q4_K",
        "layers/self_attn/k_proj/kernel": "Q4_1|Q5_0",
        "layers/self_attn/v_proj/kernel": "Q8_0|Q5_K",
        "layers/self_attn/o_proj/kernel": "Q6_K",
        "layers/mlp/gate_proj/kernel": "Q4_K",
        "layers/mlp/up_proj/kernel": "Q4_0|Q5_1",
        "layers/mlp/down_proj/kernel": "Q6_K",
    }
    assert quant["layers"]["self_attn"]["q_proj"]["kernel"].fields["qs"].shape == (2, 1, 256, 128)  # [L, A, B, 128]
    assert quant["embed_tokens"]["embedding"].fields["qs"].shape == (64, 8, 32)  # [V, D/32, 32]
    # a mix is held at its widest member's bytes per layer: v [256, 128] in cells of 256 values, Q8_0's 8 x 34 bytes
    v = quant["layers"]["self_attn"]["v_proj"]["kernel"]
    assert v.fields["bytes"].shape == (2, 1, 128, 272) and v.fields["which"].ravel().tolist() == [0, 1]

    model = jlora.Llama(cfg)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    want = np.asarray(jax.jit(model.apply)({"params": dense}, ids))
    got = np.asarray(jax.jit(lambda p, x: jlora.apply(model, p, {}, x))(quant, ids))
    assert np.isfinite(want).all() and np.abs(want).max() > 1e-2
    # The random blocks give logits of ~2e3. The dense model runs q/k/v and gate/up as fused GEMMs, the packed
    # one part by part, so fp32 rounding differs (the random model amplifies it to ~3e-4 of the logits' scale):
    # bound the gap relative to that scale, not per element.
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=0)
    # on the same route, a mixed kernel gives exactly what its dequantized values give
    unmix = lambda x: dequantize(x) if is_quantized(x) and "|" in x.fmt else x
    unmixed = jax.tree.map(unmix, quant, is_leaf=is_quantized)
    same = np.asarray(jax.jit(lambda p, x: jlora.apply(model, p, {}, x))(unmixed, ids))
    np.testing.assert_array_equal(bits(got), bits(same))
    prompts = [[5, 9, 33, 2], [7, 7]]
    tokens = [jlora.generate(model, p, None, prompts, max_new_tokens=5) for p in (quant, dense)]
    assert [list(map(int, t)) for t in tokens[0]] == [list(map(int, t)) for t in tokens[1]]


def test_tiny_gguf_mixed_blocks_train_frozen(tmp_path):
    """Two LoRA steps on an 8-device fsdp mesh over the tiny file's blocks: every packed leaf, the mixed ones
    included, is bit-identical afterwards, the adapters move, and losses and adapters equal those of the same
    steps with each mix dequantized (the packed route computes exactly the same)."""
    from jlora.parallel.sharding import make_mesh
    from jlora.train.config import OptimConfig
    from jlora.train.step import make_optimizer, make_train_step, place_state

    cfg, quant = read_pretrained(write_tiny_gguf(tmp_path / "tiny.gguf", TINY_TYPES), quantize="gguf")
    unmix = lambda x: np.asarray(dequantize(x)) if is_quantized(x) and "|" in x.fmt else x
    mesh = make_mesh(data=2, fsdp=4)
    optimizer, _ = make_optimizer(OptimConfig(lr=1e-3), total_steps=10)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8, 17))
    batch = {
        "input_ids": ids[..., :-1],
        "targets": ids[..., 1:],
        "positions": np.broadcast_to(np.arange(16), (1, 8, 16)),
        "segment_ids": np.ones((1, 8, 16), np.int32),
        "loss_mask": np.ones((1, 8, 16), np.float32),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def two_steps(params):
        lcfg = jlora.LoraConfig(rank=4, targets="all-linear")
        frozen, trainable = jlora.split(params, lcfg, jax.random.key(0))
        state = place_state(frozen, trainable, mesh, optimizer)
        before = jax.tree.map(np.asarray, state.frozen)
        step = make_train_step(jlora.Llama(cfg), optimizer, state)
        losses, trainable, opt_state = [], state.trainable, state.opt_state
        for i in range(2):
            trainable, opt_state, metrics = step(state.frozen, trainable, opt_state, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, state.frozen))):
            np.testing.assert_array_equal(a, b)
        return state.frozen, losses, jax.tree.map(np.asarray, trainable)

    frozen, losses, trainable = two_steps(quant)
    mixed = [v for v in traverse_util.flatten_dict(frozen).values() if is_quantized(v) and "|" in v.fmt]
    assert len(mixed) == 3 and all(v.fields["bytes"].sharding.spec != P() for v in mixed)  # split over the mesh
    assert np.isfinite(losses).all()
    assert min(float(np.abs(p).max()) for p in jax.tree.leaves(trainable)) > 0
    _, dense_losses, dense_trainable = two_steps(jax.tree.map(unmix, quant, is_leaf=is_quantized))
    np.testing.assert_array_equal(losses, dense_losses)
    for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(dense_trainable)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_smollm2_gguf_blocks(smollm2_gguf):
    """The real Q4_1 file (Q8_0 embedding): logits equal the dense fp32 load's, at <= 0.2x its bytes."""
    cfg, dense = read_pretrained(jlora.resolve_model_path("smollm2-135m"))
    _, quant = read_pretrained(smollm2_gguf, quantize="gguf")
    fmts = {"/".join(k): v.fmt for k, v in traverse_util.flatten_dict(quant).items() if is_quantized(v)}
    assert fmts["embed_tokens/embedding"] == "Q8_0" and len(fmts) == 8
    assert {v for k, v in fmts.items() if k.startswith("layers/")} == {"Q4_1"}
    assert frozen_bytes(quant) <= 0.2 * frozen_bytes(dense), (frozen_bytes(quant), frozen_bytes(dense))

    model = jlora.Llama(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
    want = np.asarray(jax.jit(model.apply)({"params": dense}, ids))
    got = np.asarray(jax.jit(lambda p, x: jlora.apply(model, p, {}, x))(quant, ids))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


# ---- bad input ----


def test_unsupported_block_type_is_one_line(tmp_path):
    path = write_tiny_gguf(tmp_path / "q2.gguf", {**TINY_TYPES, "blk.1.attn_v.weight": "Q2_K"})
    read_pretrained(path)  # dequantized, Q2_K loads as today
    with pytest.raises(WeightsError) as e:
        read_pretrained(path, quantize="gguf")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "blk.1.attn_v.weight" in msg and "Q2_K" in msg, msg


def test_gguf_quantize_on_hf_dir_is_one_line(tmp_path):
    path = save_tiny_hf_llama(tmp_path / "hf")
    with pytest.raises(WeightsError) as e:
        read_pretrained(path, quantize="gguf")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "int8" in msg and "nf4" in msg, msg
    # what the message offers works: nf4 quantizes the dense load
    _, params = read_pretrained(path, quantize="nf4")
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].fmt == "nf4"
    with pytest.raises(ValueError, match="quantize='q4'"):
        read_pretrained(path, quantize="q4")
