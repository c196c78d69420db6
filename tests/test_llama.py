"""Model parity: jlora.Llama vs HF transformers' LlamaForCausalLM (tiny random models and real SmolLM2),
the KV-cached decode path vs the full forward, and preset parameter counts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jlora.formats.weights import read_pretrained
from jlora.models.attention import attention, causal_attention
from jlora.models.family import param_shapes
from jlora.models.llama import PRESETS, Llama, LlamaConfig, init_cache

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# Features are combined so that three compiles cover MHA/GQA/MQA, tied/untied, llama3 rope, biases, sharding.
CASES = {
    "mha_untied_sharded": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied_llama3_rope": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "mqa_biases": dict(num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
}


def tiny_hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random HF model, with weights large enough (std 0.1, norms ~1) that errors show in the logits."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray, **kwargs) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.as_tensor(ids), **kwargs).logits.float().numpy()


@functools.cache  # one jitted forward per config, so tests sharing a config share compiles
def jlora_forward(cfg: LlamaConfig):
    return jax.jit(lambda params, ids, pos=None, seg=None: Llama(cfg).apply({"params": params}, ids, pos, seg))


def random_ids(shape, vocab, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf_on_tiny_checkpoints(case, tmp_path):
    model = tiny_hf_model(**CASES[case])
    sharded = "sharded" in case
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    files = {p.name for p in tmp_path.iterdir()}
    assert ("model.safetensors.index.json" in files) == sharded, files

    cfg, params = read_pretrained(tmp_path)
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    assert cfg.num_key_value_heads == model.config.num_key_value_heads
    assert cfg.rope_type == ("llama3" if "llama3" in case else "default")
    assert ("bias" in params["layers"]["self_attn"]["q_proj"]) == ("bias" in case)
    assert ("bias" in params["layers"]["mlp"]["up_proj"]) == ("bias" in case)
    ids = random_ids((2, 40), TINY["vocab_size"])
    ours = np.asarray(jlora_forward(cfg)(params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    """(HF model, cfg, params) of one tiny GQA checkpoint, shared by the masking and cache tests."""
    path = tmp_path_factory.mktemp("tiny_gqa")
    model = tiny_hf_model(seed=1, num_key_value_heads=2)
    model.save_pretrained(path)
    return (model, *read_pretrained(path))


def padded_batch():
    """ids, segment_ids, positions [3,24]: rows 0 and 2 left-padded (segment 0), row 1 two packed segments."""
    ids = random_ids((3, 24), TINY["vocab_size"], seed=1)
    seg = np.ones_like(ids)
    seg[0, :5], seg[2, :11], seg[1, 10:] = 0, 0, 2
    starts = np.diff(seg, axis=1, prepend=-1) != 0  # a segment (or a run of padding) begins here
    pos = np.arange(24) - np.maximum.accumulate(np.where(starts, np.arange(24), 0), axis=1)
    return ids, seg, np.where(seg > 0, pos, 0)


def test_padding_and_packing_match_hf(tiny_gqa):
    model, cfg, params = tiny_gqa
    ids, seg, positions = padded_batch()
    ours = np.asarray(jlora_forward(cfg)(params, *(jnp.asarray(a, jnp.int32) for a in (ids, positions, seg))))
    # Left-padded rows vs HF's attention_mask, at the real tokens.
    mask = (seg > 0).astype(np.int64)
    theirs = hf_logits(model, ids, attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(positions))
    for row in (0, 2):
        keep = mask[row].astype(bool)
        np.testing.assert_allclose(ours[row, keep], theirs[row, keep], atol=1e-4, rtol=0)
    # Every segment (the padded row's tokens, each packed piece) equals the same tokens run alone.
    for row, lo, hi in [(2, 11, 24), (1, 0, 10), (1, 10, 24)]:
        np.testing.assert_allclose(ours[row, lo:hi], hf_logits(model, ids[row : row + 1, lo:hi])[0], atol=1e-4, rtol=0)


def reference_attention(q, k, v, mask):
    """Plain softmax attention, differentiated by JAX itself: q [B,K,G,T,H], k/v [B,K,S,H]."""
    scores = jnp.where(mask, jnp.einsum("bkgth,bksh->bkgts", q, k), -1e30)
    return jnp.einsum("bkgts,bksh->bkgth", jax.nn.softmax(scores, axis=-1), v)


def test_attention_and_its_gradient_match_plain_softmax():
    b, k, g, t, h = 3, 2, 2, 24, 8
    rng = np.random.default_rng(0)
    q, kk, v, d_out = (
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in [(b, k, g, t, h), (b, k, t, h), (b, k, t, h), (b, k, g, t, h)]
    )
    _, seg, _ = padded_batch()  # left padding (fully masked rows) and two packed segments
    seg = jnp.asarray(seg)
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    mask = (causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))[:, None, None]
    valid = np.asarray(seg > 0)[:, None, None, :, None]  # fully masked (padding) rows are don't-care
    want, want_vjp = jax.vjp(lambda *a: reference_attention(*a, mask), q, kk, v)
    for name, fn in [("one block", attention), ("blocks of 8", functools.partial(causal_attention, block=8))]:
        got, got_vjp = jax.vjp(lambda *a: fn(*a, mask), q, kk, v)
        np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-6, err_msg=name)
        d_pad = jnp.where(valid, d_out, 0)
        for wrt, ours, theirs in zip("qkv", got_vjp(d_pad), want_vjp(d_pad)):
            np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=f"{name}: d{wrt}")


def _count_primitive(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in a jaxpr and all its sub-jaxprs (scan, remat, custom_vjp, ...)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for sub in jax.core.jaxprs_in_params(eqn.params):
            n += _count_primitive(sub, name)
    return n


def test_remat_policies_keep_the_gradients_and_dots_saveable_never_reruns_attention(tiny_gqa):
    _, cfg, params = tiny_gqa
    ids, seg, positions = (jnp.asarray(a, jnp.int32) for a in padded_batch())

    def loss(p, remat):
        logits = Llama(cfg.replace(remat=remat)).apply({"params": p}, ids, positions, seg)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    want = jax.jit(jax.grad(loss), static_argnums=1)(params, "none")
    exps = {}
    for remat in ("full", "dots_saveable"):
        got = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=remat), got, want)
    for remat in ("none", "full", "dots_saveable"):
        exps[remat] = _count_primitive(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, remat).jaxpr, "exp")
    # Softmax exps of the forward pass and of the custom backward; full remat adds a forward rerun,
    # dots_saveable keeps attention's named residuals and so runs exactly what no remat runs.
    assert exps["dots_saveable"] == exps["none"] < exps["full"], exps


def test_blocked_causal_attention_matches_hf_at_256_tokens(tiny_gqa):
    model, cfg, params = tiny_gqa
    ids = random_ids((1, 256), TINY["vocab_size"], seed=2)  # two query blocks of 128 in the forward
    ours = np.asarray(jlora_forward(cfg)(params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=1e-4, rtol=0)


def _decode_step_fn(cfg: LlamaConfig):
    def step(params, cache, ids, pos, seg):
        logits, mutated = Llama(cfg).apply(
            {"params": params, "cache": cache}, ids, pos, seg, decode=True, mutable=["cache"]
        )
        return logits, mutated["cache"]

    return jax.jit(step)


def test_kv_cache_decode_matches_full_forward(tiny_gqa):
    _, cfg, params = tiny_gqa
    ids, seg, pos = (jnp.asarray(a, jnp.int32) for a in padded_batch())
    b, t = ids.shape
    prompt = 8  # row 2's padding and row 1's second segment both cross the prefill boundary
    full = np.asarray(jlora_forward(cfg)(params, ids, pos, seg))

    step = _decode_step_fn(cfg)
    cache = init_cache(cfg, b, t + 4)
    logits, cache = step(params, cache, ids[:, :prompt], pos[:, :prompt], seg[:, :prompt])  # prefill
    chunks = [np.asarray(logits)]
    for i in range(prompt, t):
        logits, cache = step(params, cache, ids[:, i : i + 1], pos[:, i : i + 1], seg[:, i : i + 1])
        chunks.append(np.asarray(logits))
    cached = np.concatenate(chunks, axis=1)
    keep = np.asarray(seg).astype(bool)
    np.testing.assert_allclose(cached[keep], full[keep], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name, published",
    [("llama2-7b", 6.74e9), ("llama3-8b", 8.03e9), ("llama3-70b", 70.55e9), ("smollm2-135m", 134.5e6)],
)
def test_preset_parameter_counts(name, published):
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(PRESETS[name])))
    assert abs(count - published) / published < 0.005, (name, count)


# ---- the real SmolLM2-135M-Instruct (Q4_1 GGUF), against HF transformers reading the same file ----

# "The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor,
# and in the years that followed", by the model's own (gpt2-BPE) tokenizer.
PROMPT = [
    504,
    1463,
    282,
    260,
    4469,
    7057,
    22389,
    800,
    5034,
    30,
    657,
    2585,
    645,
    29465,
    2163,
    260,
    808,
    15870,
    28,
    284,
    281,
    260,
    929,
    338,
    3922,
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    path = pathlib.Path(smollm2_gguf)
    return transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def jlora_smollm2(smollm2_gguf):
    return read_pretrained(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_logits_match_hf(hf_smollm2, jlora_smollm2):
    cfg, params = jlora_smollm2
    ids = np.asarray([PROMPT])
    ours = np.asarray(jlora_forward(cfg)(params, jnp.asarray(ids, jnp.int32)))
    theirs = hf_logits(hf_smollm2, ids)
    assert np.abs(ours - theirs).max() <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_hf(hf_smollm2, jlora_smollm2):
    cfg, params = jlora_smollm2
    new = 16
    with torch.inference_mode():
        ref = hf_smollm2.generate(
            torch.as_tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=cfg.eos_token_id,
        )
    ref = ref[0, len(PROMPT) :].tolist()

    step = _decode_step_fn(cfg)
    cache = init_cache(cfg, 1, len(PROMPT) + new)
    ids = jnp.asarray([PROMPT], jnp.int32)
    pos = jnp.arange(len(PROMPT), dtype=jnp.int32)[None]
    logits, cache = step(params, cache, ids, pos, jnp.ones_like(ids))
    out = []
    for i in range(len(ref)):
        token = int(jnp.argmax(logits[0, -1]))
        out.append(token)
        if token == cfg.eos_token_id:
            break
        one = jnp.full((1, 1), token, jnp.int32)
        logits, cache = step(params, cache, one, jnp.full((1, 1), len(PROMPT) + i, jnp.int32), jnp.ones_like(one))
    assert out == ref
