"""The LLaMA family's flax.linen module: causal GQA attention with rope, a SwiGLU MLP, scanned blocks.

`Llama` is LlamaForCausalLM: RMSNorm, rotary embeddings in HF's rotate_half convention, attention with
positions / segment masking and a KV cache, and the `nn.scan`-stacked blocks. The same module decodes:
with `unrolled=True` its layers are `layer_{i}` over per-layer weight buffers and its head is always a
matmul (`jlora.infer.decode` lays the weights out for that). It knows nothing about LoRA, weights on disk
or meshes: it only names its activations' dims logically for `constrain` ("batch", "heads", "mlp") and
names the projection outputs the "dots_saveable" remat policy keeps. Shape letters: `jlora.models.layers`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import attention as attn
from jlora.models.fused import FusedDense
from jlora.models.layers import (
    DTYPES,
    REMAT_POLICIES,
    RMSNorm,
    apply_rope,
    dense,
    projected,
    rope_inv_freq,
    rope_tables,
)
from jlora.models.llama.config import LlamaConfig
from jlora.parallel.sharding import constrain, shards


def inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies [H/2] of `cfg` (its theta and rope scaling)."""
    return rope_inv_freq(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))


def _dense(cfg: LlamaConfig, features: int, bias: bool, name: str) -> nn.Dense:
    return dense(features, bias, name, cfg.dtype, cfg.param_dtype)


class Attention(nn.Module):
    cfg: LlamaConfig
    decode: bool = False
    kv_projections = ("k_proj", "v_proj")  # what methods routed into `extra_attention` may read

    @nn.compact
    def __call__(self, x, rope, segment_ids):
        cfg = self.cfg
        b, t, _ = x.shape
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        heads = ("batch", None, "heads")
        parts = [
            _dense(cfg, f, cfg.attention_bias, name)
            for f, name in ((n * h, "q_proj"), (k * h, "k_proj"), (k * h, "v_proj"))
        ]
        q, kk, v = (projected(y, *heads) for y in FusedDense(parts, shards("heads") == 1, name="qkv")(x))
        q, kk, v = q.reshape(b, t, n, h), kk.reshape(b, t, k, h), v.reshape(b, t, k, h)  # [B,T,N|K,H]
        q, kk = apply_rope(q, rope), apply_rope(kk, rope)

        if not self.decode:  # training / evaluation: cuDNN flash attention or the blocked kernel, by cfg.attention
            out = attn.train_attention(q, kk, v, segment_ids, cfg.attention)  # [B,T,N,H]
        else:
            if not self.has_variable("cache", "k"):
                raise ValueError("decode=True needs a KV cache: pass {'cache': jlora.init_cache(...)}")
            ck, cv = self.variable("cache", "k", None), self.variable("cache", "v", None)
            cseg, cidx = self.variable("cache", "segment_ids", None), self.variable("cache", "index", None)
            start, slots = cidx.value, cv.value.shape[2]
            if t > slots:  # static: refuse here, before dynamic_update_slice fails deep inside jax
                raise ValueError(
                    f"decode=True: a call of {t} tokens does not fit a KV cache of {slots} slots; "
                    f"make the cache longer (init_cache max_len >= prompt + new tokens)"
                )
            # The cache is kept in the layouts attention reads (keys [B,K,H,S], values [B,K,S,H]): only the
            # call's new keys and values are transposed, not the whole cache in every layer at every token.
            new_k, new_v = kk.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B,K,H,T], [B,K,T,H]
            ck.value = jax.lax.dynamic_update_slice(ck.value, new_k.astype(ck.value.dtype), (0, 0, 0, start))
            cv.value = jax.lax.dynamic_update_slice(cv.value, new_v.astype(cv.value.dtype), (0, 0, start, 0))
            cseg.value = jax.lax.dynamic_update_slice(cseg.value, segment_ids.astype(jnp.int32), (0, start))
            cidx.value = start + t
            kk, v, k_seg = ck.value.astype(q.dtype), cv.value.astype(q.dtype), cseg.value  # [B,K,H|S,S|H], [B,S]
            causal = jnp.arange(slots)[None, :] <= (jnp.arange(t) + start)[:, None]  # [T,S]
            same = (segment_ids[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)  # [B,T,S]
            mask = (causal[None] & same)[:, None, None]  # [B,1,1,T,S]
            # Batch dims (b, k) lead every operand, so both products are plain batched matmuls with the
            # G query heads of a KV head stacked as extra rows (no transposes inside the dots).
            qg = (q * (1 / math.sqrt(h))).reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
            out = attn.cached_attention(qg, kk, v, mask).transpose(0, 3, 1, 2, 4)  # [B,T,K,G,H]
            # The fill index is traced, so running past the end cannot be refused here; dynamic_update_slice
            # would clamp and overwrite the last slots. NaN output makes that visible instead of plausible.
            out = jnp.where(start + t <= slots, out, jnp.nan)
        out = self.extra_attention(q, out.reshape(b, t, n, h))  # [B,T,N,H]; a no-op unless routed
        out = constrain(out.reshape(b, t, n * h), *heads)  # [B,T,N*H]
        return projected(_dense(cfg, cfg.hidden_size, cfg.attention_bias, "o_proj")(out), "batch", None, None)

    def extra_attention(self, q: jax.Array, out: jax.Array) -> jax.Array:
        """The one hook for routed methods: returns the attention output out [B,T,N,H] unchanged.

        Called once per layer, in training and KV-cached decoding alike, with the queries q [B,T,N,H]
        (after rope), before o_proj. The model has no method code: routing (`jlora.apply`) intercepts
        this call to add attention to keys the model does not own (LLaMA-Adapter's prompts,
        jlora.peft.llama_adapter), reading what it needs from this module's variables.
        """
        return out


class Mlp(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        hidden = ("batch", None, "mlp")
        parts = [_dense(cfg, cfg.intermediate_size, cfg.mlp_bias, name) for name in ("gate_proj", "up_proj")]
        gate, up = (projected(y, *hidden) for y in FusedDense(parts, shards("mlp") == 1, name="gate_up")(x))  # [B,T,F]
        down = _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(constrain(nn.silu(gate) * up, *hidden))
        return projected(down, "batch", None, None)  # [B,T,D]


class Block(nn.Module):
    """One decoder layer; the scan carry is the residual stream x [B,T,D], `rope` the (cos, sin) tables."""

    cfg: LlamaConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, rope, segment_ids):
        cfg, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        x = constrain(x, "batch", None, None)  # the residual stream: rows split, D whole
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="input_layernorm")(x)
        x = x + Attention(cfg, self.decode, name="self_attn")(h, rope, segment_ids)
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="post_attention_layernorm")(x)
        x = x + Mlp(cfg, name="mlp")(h)
        return constrain(x, "batch", None, None), None


class Llama(nn.Module):
    """LlamaForCausalLM. `__call__(ids [B,T], positions, segment_ids) -> logits [B,T,V]` in float32.

    positions default to 0..T-1; segment_ids (0 = padding, equal ids attend to each other) default to
    all ones. With decode=True the call appends to the KV cache from `init_cache`. `columns` [B,n]
    picks the positions whose logits are wanted ([B,n,V]; a prefill needs only its prompts' ends).
    With `unrolled` (the decode layout) layers are `layer_{i}` and the head is a matmul, `head`.
    """

    cfg: LlamaConfig
    unrolled: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids,
        positions=None,
        segment_ids=None,
        *,
        decode: bool = False,
        return_hidden: bool = False,
        columns: jax.Array | None = None,
    ):
        cfg, dt, pdt = self.cfg, DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        x = constrain(embed(input_ids), "batch", None, None)  # [B,T,D]
        rope = rope_tables(inv_freq(cfg), positions)
        if self.unrolled:  # per-layer buffers: slicing stacked weights in a loop copies them every token on XLA:CPU
            for i in range(cfg.num_hidden_layers):
                x, _ = Block(cfg, decode, name=f"layer_{i}")(x, rope, segment_ids)  # [B,T,D]
        else:
            block = Block
            if cfg.remat != "none":
                block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
            # Every collection is stacked on the layer axis, so extra collections (a KV cache, LoRA
            # pairs routed in from outside) are sliced per layer just like the params. Two layers per
            # loop iteration (unroll=2) made the CPU train step ~3% faster for ~2 s more compile.
            stack = nn.scan(
                block,
                variable_axes={True: 0},
                split_rngs={True: True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
                unroll=2,
            )
            x, _ = stack(cfg, decode, name="layers")(x, rope, segment_ids)  # [B,T,D]
        if columns is not None:
            x = jnp.take_along_axis(x, columns[..., None], axis=1)  # [B,n,D]
        x = constrain(RMSNorm(cfg.rms_norm_eps, pdt, name="norm")(x), "batch", None, None)
        if return_hidden:
            return x
        if self.unrolled:  # the decode layout always has an explicit [D,V] head: lm_head, or its column blocks
            (logits,) = FusedDense((_dense(cfg, cfg.vocab_size, False, "lm_head"),), fuse=False, name="head")(x)
        elif cfg.tie_word_embeddings:
            logits = embed.attend(x)  # [B,T,V]
        else:
            logits = _dense(cfg, cfg.vocab_size, False, "lm_head")(x)  # [B,T,V]
        return logits.astype(jnp.float32)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """A zeroed KV cache for `decode=True` calls: per layer keys [L,B,K,H,S] and values [L,B,K,S,H] (the
    layouts `jlora.models.attention.cached_attention` reads as they are: a step writes its new slots in
    place), slot segment ids [L,B,S], fill index [L]."""
    dtype = dtype or DTYPES[cfg.dtype]
    n, k, h = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    cache = {
        "k": jnp.zeros((n, batch, k, h, max_len), dtype),
        "v": jnp.zeros((n, batch, k, max_len, h), dtype),
        "segment_ids": jnp.zeros((n, batch, max_len), jnp.int32),
        "index": jnp.zeros((n,), jnp.int32),
    }
    return {"layers": {"self_attn": cache}}
