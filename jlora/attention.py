"""Softmax attention for the LLaMA blocks, with a memory-lean backward pass.

`attention(q, k, v, mask)` takes the G query heads of each KV head stacked as rows, so both products
are batched matmuls over (B, K). Its custom VJP keeps only the output and the row log-sum-exp and
recomputes the probabilities, instead of saving [B,K,G,T,S] per layer; those residuals carry the
checkpoint name SAVE_NAME, so a remat policy can keep them. `causal_attention` splits the
queries into blocks and skips the keys above the diagonal, for calls without a KV cache (training,
evaluation); cached decoding uses `attention`. Einsum letters as in llama.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

SAVE_NAME = "attention_residual"  # the tensors the backward pass needs, for `jax.checkpoint` policies
MASKED = -1e30  # score of a masked key: exp underflows to exactly 0, and a fully masked row stays finite


def _scores(q, k, mask):
    s = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)  # [B,K,G,T,S]
    return jnp.where(mask, s, MASKED)


def _attention_fwd(q, k, v, mask):
    # Named, so a remat policy can keep the backward's inputs instead of rerunning this forward.
    q, k, v = (checkpoint_name(x, SAVE_NAME) for x in (q, k, v))
    s = _scores(q, k, mask)
    m = jnp.max(s, axis=-1)  # [B,K,G,T]
    e = jnp.exp(s - m[..., None])
    total = jnp.sum(e, axis=-1)
    out = jnp.einsum("bkgts,bksh->bkgth", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = checkpoint_name((out / total[..., None]).astype(v.dtype), SAVE_NAME)
    return out, (q, k, v, mask, out, checkpoint_name(m + jnp.log(total), SAVE_NAME))


def _attention_bwd(res, d_out):
    # The probabilities are recomputed from the saved log-sum-exp instead of being kept per layer.
    q, k, v, mask, out, lse = res
    p = jnp.exp(_scores(q, k, mask) - lse[..., None])  # [B,K,G,T,S] fp32
    d_out32 = d_out.astype(jnp.float32)
    dv = jnp.einsum("bkgts,bkgth->bksh", p, d_out32)
    dp = jnp.einsum("bkgth,bksh->bkgts", d_out, v, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1)[..., None])
    dq = jnp.einsum("bkgts,bksh->bkgth", ds, k.astype(jnp.float32))
    dk = jnp.einsum("bkgts,bkgth->bksh", ds, q.astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T + mask) v for pre-scaled queries q [B,K,G,T,H] (G query heads per KV head),
    keys/values k, v [B,K,S,H] and a boolean mask broadcastable to [B,K,G,T,S]; scores and softmax
    in fp32. The backward pass keeps only the output and the row log-sum-exp of the forward pass."""
    return _attention_fwd(q, k, v, mask)[0]


attention.defvjp(_attention_fwd, _attention_bwd)


ATTENTION_BLOCK = 128  # query rows per causal block


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     block: int = ATTENTION_BLOCK) -> jax.Array:
    """`attention` for a causal call whose queries are keys 0..T-1 (training, prefill from empty):
    query block i only meets keys [0, (i+1)*block), so the products above the diagonal are skipped
    (when T is a multiple of `block`). Same arguments as `attention`."""
    t = q.shape[3]
    if t <= block or t % block:
        return attention(q, k, v, mask)
    outs = [attention(q[:, :, :, i:i + block], k[:, :, :i + block], v[:, :, :i + block], mask[..., i:i + block, :i + block])
            for i in range(0, t, block)]
    return jnp.concatenate(outs, axis=3)
