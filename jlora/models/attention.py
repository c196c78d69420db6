"""Softmax attention for the LLaMA blocks: a memory-lean XLA kernel, and cuDNN flash attention on GPU.

`attention(q, k, v, mask)` takes the G query heads of each KV head stacked as rows, so both products
are batched matmuls over (B, K). Its custom VJP keeps only the output and the row log-sum-exp and
recomputes the probabilities, instead of saving [B,K,G,T,S] per layer; those residuals carry the
checkpoint name SAVE_NAME, so a remat policy can keep them. `causal_attention` splits the
queries into blocks and skips the keys above the diagonal; cached decoding uses `cached_attention`,
over keys kept transposed. `train_attention` is the entry point for calls without a KV cache (training,
evaluation): it picks, at trace time, cuDNN flash attention (`jax.nn.dot_product_attention`) or the
blocked kernel, and owns the layout and mask each one wants. Einsum letters: `jlora.models.layers`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.extend.backend
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jlora.matmul import LOW_PRECISION

SAVE_NAME = "attention_residual"  # the tensors the backward pass needs, for `jax.checkpoint` policies
MASKED = -1e30  # score of a masked key: exp underflows to exactly 0, and a fully masked row stays finite


def _capped(s, softcap):
    """Gemma 2's attention-logit soft-cap: cap * tanh(s / cap), or s without one."""
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _scores(q, k, mask, softcap=None):
    s = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)  # [B,K,G,T,S]
    return jnp.where(mask, _capped(s, softcap), MASKED)


def _softmax_times_v(s, v):
    """softmax of masked fp32 scores s [B,K,G,T,S] over the keys, times v [B,K,S,H]: the output
    [B,K,G,T,H] in v's dtype, and the row max and row total [B,K,G,T] of the exponentials."""
    m = jnp.max(s, axis=-1)  # [B,K,G,T]
    e = jnp.exp(s - m[..., None])
    total = jnp.sum(e, axis=-1)
    out = jnp.einsum("bkgts,bksh->bkgth", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total[..., None]).astype(v.dtype), m, total


def _attention_fwd(q, k, v, mask, softcap):
    # Named, so a remat policy can keep the backward's inputs instead of rerunning this forward.
    q, k, v = (checkpoint_name(x, SAVE_NAME) for x in (q, k, v))
    out, m, total = _softmax_times_v(_scores(q, k, mask, softcap), v)
    out = checkpoint_name(out, SAVE_NAME)
    return out, (q, k, v, mask, out, checkpoint_name(m + jnp.log(total), SAVE_NAME))


def _attention_bwd(softcap, res, d_out):
    # The probabilities are recomputed from the saved log-sum-exp instead of being kept per layer.
    q, k, v, mask, out, lse = res
    raw = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)  # [B,K,G,T,S]
    capped = _capped(raw, softcap)
    p = jnp.exp(jnp.where(mask, capped, MASKED) - lse[..., None])  # [B,K,G,T,S] fp32
    # The products take p and ds in the compute dtype, accumulating in fp32 (as FlashAttention's backward does
    # in bf16): in bf16 they run at XLA:CPU's bf16 GEMM rate, ~1.8x its fp32 one. In fp32 nothing is rounded.
    cd = q.dtype if q.dtype in LOW_PRECISION else jnp.float32
    f32 = {"preferred_element_type": jnp.float32}
    dv = jnp.einsum("bkgts,bkgth->bksh", p.astype(cd), d_out.astype(cd), **f32)
    dp = jnp.einsum("bkgth,bksh->bkgts", d_out, v, **f32)
    ds = p * (dp - jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[..., None])
    if softcap is not None:  # d(cap * tanh(s / cap)) / ds = 1 - tanh^2
        ds = ds * (1 - jnp.square(capped / softcap))
    dq = jnp.einsum("bkgts,bksh->bkgth", ds.astype(cd), k.astype(cd), **f32)
    dk = jnp.einsum("bkgts,bkgth->bksh", ds.astype(cd), q.astype(cd), **f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, softcap: float | None = None) -> jax.Array:
    """softmax(q k^T + mask) v for pre-scaled queries q [B,K,G,T,H] (G query heads per KV head),
    keys/values k, v [B,K,S,H] and a boolean mask broadcastable to [B,K,G,T,S]; scores (soft-capped
    when `softcap` is set) and softmax in fp32. The backward pass keeps only the output and the row
    log-sum-exp of the forward pass."""
    return _attention_fwd(q, k, v, mask, softcap)[0]


attention.defvjp(_attention_fwd, _attention_bwd)


def cached_attention(
    q: jax.Array, k_t: jax.Array, v: jax.Array, mask: jax.Array, softcap: float | None = None
) -> jax.Array:
    """`attention` over a KV cache whose keys lie transposed, k_t [B,K,H,S]: q [B,K,G,T,H] times k_t is
    then a plain [G*T, H] x [H, S] product per (b, k). XLA:CPU ran it ~1.5x faster than the same product
    against [S, H] keys, which it treats as a transposed operand (SmolLM2's 30 layers at 16 rows and 112
    slots: 13 against 19 ms). For decoding only; no custom gradient."""
    s = jnp.einsum("bkgth,bkhs->bkgts", q, k_t, preferred_element_type=jnp.float32)  # [B,K,G,T,S]
    return _softmax_times_v(jnp.where(mask, _capped(s, softcap), MASKED), v)[0]


ATTENTION_BLOCK = 128  # query rows per causal block


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    block: int = ATTENTION_BLOCK,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """`attention` for a causal call whose queries are keys 0..T-1 (training, prefill from empty):
    query block i only meets keys [0, (i+1)*block), so the products above the diagonal are skipped
    (when T is a multiple of `block`). With a sliding `window` (which `mask` must already apply) the
    blocks wholly before the window are skipped too, so a local layer costs O(T * window), not O(T^2).
    Same arguments as `attention`."""
    t = q.shape[3]
    if t <= block or t % block:
        return attention(q, k, v, mask, softcap)
    outs = []
    for i in range(0, t, block):
        lo = 0 if window is None else max(0, (i - window + 1) // block * block)  # first block the window reaches
        sl = slice(lo, i + block)
        outs.append(
            attention(q[:, :, :, i : i + block], k[:, :, sl], v[:, :, sl], mask[..., i : i + block, sl], softcap)
        )
    return jnp.concatenate(outs, axis=3)


# ---- training attention: cuDNN flash attention where the mask allows, else the blocked kernel ----

TRAIN_IMPLS = ("auto", "blocked", "cudnn")  # the values of ModelConfig.attention
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention has no fp32 kernel
CUDNN_MAX_HEAD_DIM = 128  # Ampere's limit (Hopper takes 256); every LLaMA head fits
# The primitive that jax's cuDNN custom VJP binds in its forward rule. jax gives no public handle to
# it, so `saveable` matches the name: were it renamed, the policy would stop matching and the
# backward pass would rerun the cuDNN forward (slower, still right). tests/test_attention.py checks it.
CUDNN_FWD_PRIMITIVE = "dot_product_attention_fwd_wrapper"


def _platform() -> str:
    """'cuda' on an NVIDIA GPU backend, else the default backend's platform (cpu, tpu, rocm ...)."""
    backend = jax.extend.backend.get_backend()
    return "cuda" if "cuda" in backend.platform_version.lower() else backend.platform


def _cudnn_unsupported(dtype, head_dim: int, platform: str, softcap: float | None = None) -> str | None:
    """Why cuDNN flash attention cannot run these operands here, or None when it can."""
    if softcap is not None:
        return "jax's cuDNN attention has no attention-logit soft-cap (Gemma 2)"
    if platform != "cuda":
        return f"it needs an NVIDIA GPU, and the backend is {platform}"
    if dtype not in CUDNN_DTYPES:
        return f"it computes in bfloat16 / float16, and q, k, v are {dtype or 'of mixed dtypes'}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"its head dim must be a multiple of 8 and at most {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    return None


def resolve_impl(impl: str, dtype, head_dim: int, platform: str | None = None, softcap: float | None = None) -> str:
    """The kernel `train_attention` runs for `impl` (one of TRAIN_IMPLS): "cudnn" or "blocked".

    Static, decided at trace time from the backend (`platform`, default: the default backend's),
    the compute dtype and the head dim. "auto" takes cuDNN on an NVIDIA GPU in bf16/fp16 when the
    head dim fits, else the blocked kernel; "cudnn" insists, with a one-line error where it cannot run.
    """
    if impl not in TRAIN_IMPLS:
        raise ValueError(f"attention={impl!r}: expected one of {', '.join(TRAIN_IMPLS)}")
    if impl == "blocked":
        return "blocked"
    why_not = _cudnn_unsupported(dtype, head_dim, platform or _platform(), softcap)
    if why_not is None:
        return "cudnn"
    if impl == "cudnn":
        raise ValueError(f"attention='cudnn' cannot run: {why_not}; use 'auto' or 'blocked'")
    return "blocked"


def causal_mask(t: int, window: int | None = None) -> jax.Array:
    """[T,S] True where query i may see key j: j <= i, and i - j < window for a local layer."""
    diff = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]  # [T,S]
    return (diff >= 0) if window is None else (diff >= 0) & (diff < window)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """`causal_attention` in the model's layout: q [B,T,N,H] (unscaled; `scale` default 1/sqrt(H)),
    k, v [B,T,K,H] and segment ids [B,T] (0 = padding; equal ids attend to each other, so packed rows
    work) -> [B,T,N,H]. `window`: a local layer's sliding window; `softcap`: the score soft-cap."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    causal = causal_mask(t, window)  # [T,S]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)  # [B,T,S]
    mask = (causal[None] & same)[:, None, None]  # [B,1,1,T,S]
    # Batch dims (b, k) lead every operand, so both products are plain batched matmuls with the
    # G query heads of a KV head stacked as extra rows (no transposes inside the dots).
    scale = 1 / math.sqrt(h) if scale is None else scale
    qg = (q * scale).reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,H]
    out = causal_attention(qg, k, v, mask, window=window, softcap=softcap)  # [B,K,G,T,H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)  # [B,T,N,H]


def sdpa_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    implementation: str = "cudnn",
    scale: float | None = None,
    window: int | None = None,
) -> jax.Array:
    """Causal attention through `jax.nn.dot_product_attention(implementation=...)`, same arguments
    and result as `blocked_attention` (GQA is native there: k, v keep their K heads).

    The mask is causal plus per-row lengths, so a row must hold one sequence followed by padding
    (jlora.train.data without packing). The public API takes no segment ids, so a packed row cannot be
    expressed; rather than attend across its segments, such a row's output is NaN, which makes the
    loss non-finite instead of silently wrong. Outputs at padded queries are 0 (the blocked kernel
    gives another finite value there); nothing downstream reads them.
    """
    t = q.shape[1]
    valid = segment_ids != 0  # [B,T]
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [B]
    right_padded = jnp.all(valid == (jnp.arange(t)[None, :] < lengths[:, None]), axis=1)  # [B]
    one_segment = jnp.all(~valid | (segment_ids == segment_ids[:, :1]), axis=1)  # [B]
    # An all-padding row (evaluation's filler rows) gets length 1 rather than 0, which flash
    # kernels need not handle; its outputs are never read.
    lengths = jnp.maximum(lengths, 1)
    # Named like the blocked kernel's inputs, so a remat policy keeps them instead of rerunning the rope.
    q, k, v = (checkpoint_name(x, SAVE_NAME) for x in (q, k, v))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0),  # keys i-window+1 .. i
        implementation=implementation,
    )  # [B,T,N,H]
    return jnp.where((right_padded & one_segment)[:, None, None, None], out, jnp.nan)


def train_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    impl: str = "auto",
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal self-attention for a call without a KV cache (training, evaluation): q [B,T,N,H]
    (unscaled; `scale` default 1/sqrt(H)), k, v [B,T,K,H], segment ids [B,T] (0 = padding) -> [B,T,N,H];
    `window` a local layer's sliding window, `softcap` Gemma 2's score soft-cap.

    `impl` (ModelConfig.attention) picks the kernel at trace time, see `resolve_impl`. Whether rows
    are packed depends on the data, so no trace-time rule can see it: with packed rows use "blocked"
    (the cuDNN path makes a packed row's output NaN, see `sdpa_attention`).
    """
    dtype = q.dtype if q.dtype == k.dtype == v.dtype else None
    if resolve_impl(impl, dtype, q.shape[-1], softcap=softcap) == "cudnn":
        return sdpa_attention(q, k, v, segment_ids, "cudnn", scale, window)
    return blocked_attention(q, k, v, segment_ids, scale, window, softcap)


_save_named = jax.checkpoint_policies.save_only_these_names(SAVE_NAME)


def saveable(prim, *avals, **params) -> bool:
    """A `jax.checkpoint` policy keeping attention's residuals on both paths: the tensors named
    SAVE_NAME, and the cuDNN forward's outputs (its output and softmax statistics live inside jax's
    custom VJP, where no checkpoint name reaches). OR it into a remat policy (e.g. with
    `save_from_both_policies`) so that the backward pass never reruns the attention forward."""
    return prim.name == CUDNN_FWD_PRIMITIVE or _save_named(prim, *avals, **params)
