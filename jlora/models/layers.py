"""Layers every family shares: dtypes, rotary embeddings, RMSNorm, projections and the remat policies.

A family's module is built from these plus `jlora.models.attention` (the attention kernels) and
`jlora.models.fused` (several projections of one input as one matmul). Nothing here knows a family's
parameter names, LoRA, weights on disk or meshes: activations are pinned by logical dim names through
`jlora.parallel.sharding.constrain`.

Einsum letters, used in every shape comment of the package:
  B batch, T query sequence, S key sequence, D model width, N query heads, K kv heads,
  G query heads per kv head (N = K*G), H head dim, F ffn width, V vocab, L layers, R LoRA rank.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jlora.matmul import dense_dot_general, matmul
from jlora.models import attention as attn
from jlora.parallel.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PROJ_NAME = "projection"  # the output of each projection, for remat policies
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,
    # Each projection's output plus attention's inputs and outputs: the backward pass then reruns
    # only cheap elementwise work, never the attention forward or the rotary embedding. Saving by
    # name, not every dot, keeps one copy per projection: an adapter's (x@A)@B routed into the
    # projection is part of the named sum and is not kept again at full width.
    "dots_saveable": _policies.save_from_both_policies(_policies.save_only_these_names(PROJ_NAME), attn.saveable),
}
ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [H/2] in float64 math, with llama3 / linear scaling as HF computes them."""
    h = head_dim
    inv = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    scaling = dict(scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(inv_freq: np.ndarray, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B,T,1,H] of positions [B,T] in float32, for `apply_rope`.

    Computed once per model call and shared by every layer: fused into each layer's rotation, the
    trig functions were recomputed per head and per layer, ~8x the cost of the rotation itself on CPU.
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B,T,1,H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate x [B,T,N,H] by the `rope_tables` (cos, sin), HF's rotate_half layout (halves, not interleaved)."""
    cos, sin = rope
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf permute of q/k rows: its interleaved rope -> HF rotate_half."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute of q/k rows (HF rotate_half -> its interleaved rope); inverse of `unpermute_rope_rows`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. LLaMA's scales by w in the input dtype (HF casts before the weight);
    Gemma's (`plus_one`) scales by 1 + w in fp32 and casts after, with w initialised to 0."""

    eps: float
    param_dtype: Any = jnp.float32
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


def dense(features: int, bias: bool, name: str, dtype: str, param_dtype: str) -> nn.Dense:
    """An nn.Dense with HF's normal(0.02) init, in the config's compute and param dtypes; its product is `matmul`."""
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=DTYPES[dtype],
        param_dtype=DTYPES[param_dtype],
        kernel_init=nn.initializers.normal(0.02),
        dot_general=dense_dot_general,
        name=name,
    )


class Embed(nn.Embed):
    """nn.Embed whose `attend` (a tied output head, x [..., D] @ table.T) is a `matmul`, as nn.Dense's product is:
    flax's own is a plain dot, which in bf16 runs at XLA:CPU's fp32 rate or below."""

    def attend(self, query: jax.Array) -> jax.Array:
        query, table = self.promote_dtype(query, self.embedding, dtype=self.dtype)
        return matmul(query, table.T)


def projected(y: jax.Array, *dims: str | None) -> jax.Array:
    """A projection's output, pinned to the mesh by logical dims and named for the remat policy."""
    return checkpoint_name(constrain(y, *dims), PROJ_NAME)
