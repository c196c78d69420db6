"""The decoder every family runs: `Decoder`, a flax.linen module configured by a `ModelConfig`.

One module covers LLaMA, Mistral, Qwen 2/3 and Gemma 2/3, because they differ only in switches the
config carries: q/k/v (and o) biases, q/k norms, GQA, rope with a second base for local layers,
sliding-window local layers (per layer, `ModelConfig.layer_windows`), soft-capped attention scores and
logits, Gemma's (1+w) norms and four norms per block, SwiGLU or GeGLU, and the √d embedding scale.
Parameter names follow HF's module names, so every family's weight table maps them one to one.

Training stacks the blocks with `nn.scan`; a stack that mixes local and global layers passes each
layer's kind as a scanned flag and branches with `lax.cond`, so a local layer only pays for its window.
The same module decodes: with `unrolled=True` its layers are `layer_{i}` over per-layer weight buffers
(each layer's kind is then static, and a local layer's cache may be a ring of `sliding_window` slots)
and its head is always a matmul (`jlora.infer.decode` lays the weights out for that). It knows nothing
about LoRA, weights on disk or meshes: it only names its activations' dims logically for `constrain`
("batch", "heads", "mlp") and names the projection outputs the "dots_saveable" remat policy keeps.
Shape letters: `jlora.models.layers`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import attention as attn
from jlora.models.config import ModelConfig
from jlora.models.fused import FusedDense
from jlora.models.layers import (
    DTYPES,
    REMAT_POLICIES,
    Embed,
    RMSNorm,
    apply_rope,
    dense,
    projected,
    rope_inv_freq,
    rope_tables,
)
from jlora.parallel.sharding import constrain, shards

ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}


def inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """The rotary inverse frequencies [H/2] of a global or local layer of `cfg` (its theta and scaling)."""
    theta, scaling = cfg.rope(local)
    return rope_inv_freq(cfg.head_dim, theta, scaling)


def _dense(cfg: ModelConfig, features: int, bias: bool, name: str) -> nn.Dense:
    return dense(features, bias, name, cfg.dtype, cfg.param_dtype)


def _norm(cfg: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, DTYPES[cfg.param_dtype], cfg.norm_plus_one, name=name)


def _mixed(cfg: ModelConfig) -> bool:
    """Whether the stack mixes local and global layers (then each layer's kind is a traced flag in the scan)."""
    return len({w is None for w in cfg.layer_windows}) == 2


def _uniform_kind(cfg: ModelConfig) -> bool:
    """Whether every layer is local, for a stack that does not mix kinds."""
    return cfg.layer_windows[0] is not None


class Attention(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    kv_projections = ("k_proj", "v_proj")  # what methods routed into `extra_attention` may read

    @nn.compact
    def __call__(self, x, rope, segment_ids, local):
        """x [B,T,D] -> [B,T,D]. `local`: whether this is a sliding-window layer, a Python bool, or a
        traced bool scalar inside a scan over a stack that mixes kinds."""
        cfg = self.cfg
        b, t, _ = x.shape
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        heads = ("batch", None, "heads")
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        parts = [
            _dense(cfg, f, qkv_bias, name) for f, name in ((n * h, "q_proj"), (k * h, "k_proj"), (k * h, "v_proj"))
        ]
        q, kk, v = (projected(y, *heads) for y in FusedDense(parts, shards("heads") == 1, name="qkv")(x))
        q, kk, v = q.reshape(b, t, n, h), kk.reshape(b, t, k, h), v.reshape(b, t, k, h)  # [B,T,N|K,H]
        if cfg.qk_norm:
            q, kk = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(kk)
        q, kk = apply_rope(q, rope), apply_rope(kk, rope)

        if not self.decode:  # training / evaluation: cuDNN flash attention or the blocked kernel, by cfg.attention
            kernel = lambda window: functools.partial(
                attn.train_attention,
                impl=cfg.attention,
                scale=cfg.attention_scale,
                window=window,
                softcap=cfg.attn_logit_softcapping,
            )
            if isinstance(local, bool):
                out = kernel(cfg.sliding_window if local else None)(q, kk, v, segment_ids)  # [B,T,N,H]
            else:  # only the taken branch runs: a local layer skips the blocks outside its window
                out = jax.lax.cond(local, kernel(cfg.sliding_window), kernel(None), q, kk, v, segment_ids)
        else:
            out = self._cached(q, kk, v, segment_ids, local)
        out = self.extra_attention(q, out.reshape(b, t, n, h))  # [B,T,N,H]; a no-op unless routed
        out = constrain(out.reshape(b, t, n * h), *heads)  # [B,T,N*H]
        return projected(_dense(cfg, cfg.hidden_size, cfg.attention_bias, "o_proj")(out), "batch", None, None)

    def _cached(self, q, kk, v, segment_ids, local):
        """Attention over the KV cache, after appending this call's keys and values to it: [B,T,N,H].

        The cache is kept in the layouts attention reads (keys [B,K,H,S], values [B,K,S,H]): only the
        call's new keys and values are transposed, not the whole cache in every layer at every token.
        A slot's "time" is the fill index it was written at; a local layer sees the times within its
        window. A local layer whose cache has exactly `sliding_window` slots keeps them as a ring."""
        cfg = self.cfg
        b, t, n, h = q.shape
        k = cfg.num_key_value_heads
        if not self.has_variable("cache", "k"):
            raise ValueError("decode=True needs a KV cache: pass {'cache': jlora.init_cache(...)}")
        ck, cv = self.variable("cache", "k", None), self.variable("cache", "v", None)
        cseg, cidx = self.variable("cache", "segment_ids", None), self.variable("cache", "index", None)
        start, slots = cidx.value, cv.value.shape[2]
        window = cfg.sliding_window
        new_k, new_v = kk.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B,K,H,T], [B,K,T,H]
        q_time = jnp.arange(t) + start  # [T]
        if local is True and window is not None and slots == window:
            # The ring: slot s holds the latest time < start that is s mod W. Attend over the ring as it
            # was plus this call's own keys, then keep the call's last min(T, W) keys in their slots.
            s = jnp.arange(slots)
            times = jnp.concatenate([start - 1 - (start - 1 - s) % slots, q_time])  # [W+T]
            keys = jnp.concatenate([ck.value.astype(q.dtype), new_k.astype(q.dtype)], axis=3)  # [B,K,H,W+T]
            values = jnp.concatenate([cv.value.astype(q.dtype), new_v.astype(q.dtype)], axis=2)  # [B,K,W+T,H]
            k_seg = jnp.concatenate([cseg.value, segment_ids.astype(jnp.int32)], axis=1)  # [B,W+T]
            m = min(t, slots)
            at = (start + t - m + jnp.arange(m)) % slots  # the slots of the last m new tokens
            ck.value = ck.value.at[..., at].set(new_k[..., t - m :].astype(ck.value.dtype))
            cv.value = cv.value.at[:, :, at].set(new_v[:, :, t - m :].astype(cv.value.dtype))
            cseg.value = cseg.value.at[:, at].set(segment_ids[:, t - m :].astype(jnp.int32))
            fits = True
        else:
            if t > slots:  # static: refuse here, before dynamic_update_slice fails deep inside jax
                raise ValueError(
                    f"decode=True: a call of {t} tokens does not fit a KV cache of {slots} slots; "
                    f"make the cache longer (init_cache max_len >= prompt + new tokens)"
                )
            ck.value = jax.lax.dynamic_update_slice(ck.value, new_k.astype(ck.value.dtype), (0, 0, 0, start))
            cv.value = jax.lax.dynamic_update_slice(cv.value, new_v.astype(cv.value.dtype), (0, 0, start, 0))
            cseg.value = jax.lax.dynamic_update_slice(cseg.value, segment_ids.astype(jnp.int32), (0, start))
            keys, values, k_seg = ck.value.astype(q.dtype), cv.value.astype(q.dtype), cseg.value
            times = jnp.arange(slots)
            # The fill index is traced, so running past the end cannot be refused here; dynamic_update_slice
            # would clamp and overwrite the last slots. NaN output makes that visible instead of plausible.
            fits = start + t <= slots
        cidx.value = start + t
        diff = q_time[:, None] - times[None, :]  # [T,S]
        visible = (diff >= 0) & (times[None, :] >= 0)
        if window is not None and local is not False:
            visible &= (diff < window) | jnp.logical_not(local)  # a traced `local` may still say global
        same = (segment_ids[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)  # [B,T,S]
        mask = (visible[None] & same)[:, None, None]  # [B,1,1,T,S]
        # Batch dims (b, k) lead every operand, so both products are plain batched matmuls with the
        # G query heads of a KV head stacked as extra rows (no transposes inside the dots).
        qg = (q * cfg.attention_scale).reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
        out = attn.cached_attention(qg, keys, values, mask, cfg.attn_logit_softcapping).transpose(0, 3, 1, 2, 4)
        return jnp.where(fits, out, jnp.nan)  # [B,T,K,G,H]

    def extra_attention(self, q: jax.Array, out: jax.Array) -> jax.Array:
        """The one hook for routed methods: returns the attention output out [B,T,N,H] unchanged.

        Called once per layer, in training and KV-cached decoding alike, with the queries q [B,T,N,H]
        (after rope), before o_proj. The model has no method code: routing (`jlora.apply`) intercepts
        this call to add attention to keys the model does not own (LLaMA-Adapter's prompts,
        jlora.peft.llama_adapter), reading what it needs from this module's variables.
        """
        return out


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        hidden = ("batch", None, "mlp")
        parts = [_dense(cfg, cfg.intermediate_size, cfg.mlp_bias, name) for name in ("gate_proj", "up_proj")]
        gate, up = (projected(y, *hidden) for y in FusedDense(parts, shards("mlp") == 1, name="gate_up")(x))  # [B,T,F]
        act = ACTIVATIONS[cfg.hidden_act]
        down = _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(constrain(act(gate) * up, *hidden))
        return projected(down, "batch", None, None)  # [B,T,D]


class Block(nn.Module):
    """One decoder layer; the scan carry is the residual stream x [B,T,D]. `ropes` are the (cos, sin)
    tables of global and local layers, `local` the layer's kind (a scanned flag in a mixed stack)."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, ropes, segment_ids, local):
        cfg = self.cfg
        if not isinstance(local, bool) and not _mixed(cfg):
            local = _uniform_kind(cfg)  # static whenever the stack does not mix kinds
        if isinstance(local, bool):
            rope = ropes[local]
        else:
            rope = jax.tree.map(lambda a, b: jnp.where(local, a, b), ropes[True], ropes[False])
        x = constrain(x, "batch", None, None)  # the residual stream: rows split, D whole
        h = _norm(cfg, "input_layernorm")(x)
        a = Attention(cfg, self.decode, name="self_attn")(h, rope, segment_ids, local)
        if cfg.sandwich_norms:  # Gemma: the attention output is normed before the residual add
            a = _norm(cfg, "post_attention_layernorm")(a)
        x = x + a
        h = _norm(cfg, "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm")(x)
        m = Mlp(cfg, name="mlp")(h)
        if cfg.sandwich_norms:
            m = _norm(cfg, "post_feedforward_layernorm")(m)
        return constrain(x + m, "batch", None, None), None


class Decoder(nn.Module):
    """A causal LM (LlamaForCausalLM, Gemma3ForCausalLM, ...). `__call__(ids [B,T], positions, segment_ids)
    -> logits [B,T,V]` in float32.

    positions default to 0..T-1; segment_ids (0 = padding, equal ids attend to each other) default to
    all ones. With decode=True the call appends to the KV cache from `init_cache`. `columns` [B,n]
    picks the positions whose logits are wanted ([B,n,V]; a prefill needs only its prompts' ends).
    With `unrolled` (the decode layout) layers are `layer_{i}` and the head is a matmul, `head`.
    """

    cfg: ModelConfig
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
        embed = Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        x = embed(input_ids)  # [B,T,D]
        if cfg.scale_embeddings:  # sqrt(D) rounded to the compute dtype first, as HF does
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
        x = constrain(x, "batch", None, None)
        windows = cfg.layer_windows
        ropes = {False: rope_tables(inv_freq(cfg), positions)}
        ropes[True] = ropes[False] if cfg.rope_local_base_freq is None else rope_tables(inv_freq(cfg, True), positions)
        if self.unrolled:  # per-layer buffers: slicing stacked weights in a loop copies them every token on XLA:CPU
            for i, window in enumerate(windows):
                x, _ = Block(cfg, decode, name=f"layer_{i}")(x, ropes, segment_ids, window is not None)  # [B,T,D]
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
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=cfg.num_hidden_layers,
                unroll=2,
            )
            kinds = jnp.asarray([w is not None for w in windows])  # [L]: read only where the stack mixes kinds
            x, _ = stack(cfg, decode, name="layers")(x, ropes, segment_ids, kinds)  # [B,T,D]
        if columns is not None:
            x = jnp.take_along_axis(x, columns[..., None], axis=1)  # [B,n,D]
        x = constrain(_norm(cfg, "norm")(x), "batch", None, None)
        if return_hidden:
            return x
        if self.unrolled:  # the decode layout always has an explicit [D,V] head: lm_head, or its column blocks
            (logits,) = FusedDense((_dense(cfg, cfg.vocab_size, False, "lm_head"),), fuse=False, name="head")(x)
        elif cfg.tie_word_embeddings:
            logits = embed.attend(x)  # [B,T,V]
        else:
            logits = _dense(cfg, cfg.vocab_size, False, "lm_head")(x)  # [B,T,V]
        return softcap_logits(cfg, logits.astype(jnp.float32))


def softcap_logits(cfg: ModelConfig, logits: jax.Array) -> jax.Array:
    """Gemma 2's final-logit soft-cap, cap * tanh(logits / cap), or the logits as they are."""
    cap = cfg.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def cache_slots(cfg: ModelConfig, max_len: int, ring: bool = False) -> tuple[int, ...]:
    """Per layer, the KV-cache slots for `max_len` tokens: with `ring`, a local layer keeps only its window."""
    return tuple(min(max_len, w) if ring and w is not None else max_len for w in cfg.layer_windows)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """A zeroed KV cache for `decode=True` calls: per layer keys [L,B,K,H,S] and values [L,B,K,S,H] (the
    layouts `jlora.models.attention.cached_attention` reads as they are: a step writes its new slots in
    place), slot segment ids [L,B,S], fill index [L]."""
    dtype = dtype or DTYPES[cfg.dtype]
    n = cfg.num_hidden_layers
    return {"layers": {"self_attn": layer_cache(cfg, batch, max_len, dtype, (n,))}}


def layer_cache(cfg: ModelConfig, batch: int, slots: int, dtype: Any = None, lead: tuple = ()) -> dict:
    """One layer's zeroed KV cache of `slots` slots (with `lead` leading dims, e.g. the layer axis)."""
    dtype = dtype or DTYPES[cfg.dtype]
    k, h = cfg.num_key_value_heads, cfg.head_dim
    return {
        "k": jnp.zeros((*lead, batch, k, h, slots), dtype),
        "v": jnp.zeros((*lead, batch, k, slots, h), dtype),
        "segment_ids": jnp.zeros((*lead, batch, slots), jnp.int32),
        "index": jnp.zeros(lead, jnp.int32),
    }
