"""The LLaMA family (1/2/3, GQA, llama3 rope scaling, tied embeddings) in flax.linen.

Owns `LlamaConfig` (+ presets) and the model: RMSNorm, rotary embeddings in HF's rotate_half
convention, causal GQA attention with positions / segment masking and a KV cache, the SwiGLU MLP
and the `nn.scan`-stacked blocks. It knows nothing about LoRA, weights on disk or meshes: it only
names its activations' dims logically for `constrain` ("batch", "heads", "mlp"; jlora.parallel.sharding
places them) and names the projection outputs the "dots_saveable" remat policy keeps.

Einsum letters, used in every shape comment of the package:
  B batch, T query sequence, S key sequence, D model width, N query heads, K kv heads,
  G query heads per kv head (N = K*G), H head dim, F ffn width, V vocab, L layers, R LoRA rank.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jlora.models import attention as attn
from jlora.models.fused import FusedDense
from jlora.parallel.sharding import constrain, shards

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PROJ_NAME = "projection"  # the output of each q/k/v/o/gate/up/down projection, for remat policies
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


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of one LLaMA-family model. Field names follow HF's config.json."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = MHA
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted (key, value) pairs, hashable
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    name: str = "llama"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "dots_saveable"  # none | full | dots_saveable: what a backward pass keeps (see REMAT_POLICIES)
    attention: str = "auto"  # auto | blocked | cudnn: the training attention kernel, see jlora.models.attention.resolve_impl

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of {sorted(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.attention not in attn.TRAIN_IMPLS:
            raise ValueError(f"attention={self.attention!r}: expected one of {', '.join(attn.TRAIN_IMPLS)}")
        rope_type = self.rope_type
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3)")

    @property
    def rope_type(self) -> str:
        scaling = dict(self.rope_scaling or ())
        return scaling.get("rope_type", scaling.get("type", "default"))

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> "LlamaConfig":
        """Build from the dict of an HF `config.json` (transformers 4 and 5 spellings)."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral") or not any(a in SUPPORTED_ARCHS for a in archs):
            raise ValueError(f"unsupported architecture {archs} (model_type {model_type!r}); jlora runs LlamaForCausalLM")
        window = hf.get("sliding_window")
        context = hf.get("max_position_embeddings", cls.max_position_embeddings)
        if window is not None and window < context:  # Mistral v0.1: jlora's attention would see past the window
            raise ValueError(f"sliding_window={window} < max_position_embeddings={context}: jlora has no "
                             f"sliding-window attention; up to {window} tokens the model is the same, so set "
                             f"max_position_embeddings to {window} to use it that far")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        runtime = {"name", "dtype", "param_dtype", "remat", "attention", "rope_scaling"}
        names = {f.name for f in dataclasses.fields(cls)} - runtime
        kwargs = {k: hf[k] for k in names if k in hf and hf[k] is not None}
        kwargs.update(rope_theta=float(theta), rope_scaling=tuple(sorted(rope.items())) or None)
        kwargs["name"] = hf.get("_name_or_path") or model_type
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict:
        """The config.json dict transformers reads back into the same model."""
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
            "pretraining_tp": 1,
            "attention_dropout": 0.0,
        }
        for f in dataclasses.fields(self):
            if f.name not in ("name", "dtype", "param_dtype", "remat", "attention", "rope_scaling"):
                out[f.name] = getattr(self, f.name)
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return out

    @classmethod
    def from_gguf_metadata(cls, meta: dict, **overrides) -> "LlamaConfig":
        """Build from a GGUF header (keys like `llama.block_count`), values already decoded to Python."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"unsupported GGUF architecture {arch!r}; jlora runs 'llama'")
        heads = int(meta["llama.attention.head_count"])
        hidden = int(meta["llama.embedding_length"])
        vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        rope = {}
        if meta.get("llama.rope.scaling.type") == "linear":
            rope = {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(meta["llama.feed_forward_length"]),
            num_hidden_layers=int(meta["llama.block_count"]),
            num_attention_heads=heads,
            num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
            head_dim=int(meta.get("llama.attention.key_length", hidden // heads)),
            rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(meta.get("llama.context_length", 4096)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=tuple(sorted(rope.items())) or None,
            tie_word_embeddings=overrides.pop("tie_word_embeddings", True),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            name=str(meta.get("general.name", "gguf")),
            **overrides,
        )


SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")

_LLAMA3_ROPE = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(name="llama2-7b", rms_norm_eps=1e-5),
    "llama2-13b": LlamaConfig(name="llama2-13b", hidden_size=5120, intermediate_size=13824,
                              num_hidden_layers=40, num_attention_heads=40, rms_norm_eps=1e-5),
    "llama2-70b": LlamaConfig(name="llama2-70b", hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                              rms_norm_eps=1e-5),
    "llama3-8b": LlamaConfig(name="llama3-8b", vocab_size=128256, intermediate_size=14336,
                             num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=8192,
                             rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    "llama3-70b": LlamaConfig(name="llama3-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                              rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=500000.0,
                              bos_token_id=128000, eos_token_id=128001),
    "llama3.2-1b": LlamaConfig(name="llama3.2-1b", vocab_size=128256, hidden_size=2048,
                               intermediate_size=8192, num_hidden_layers=16, num_key_value_heads=8,
                               head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=131072,
                               rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True,
                               bos_token_id=128000, eos_token_id=128001),
    "llama3.2-3b": LlamaConfig(name="llama3.2-3b", vocab_size=128256, hidden_size=3072,
                               intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                               num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
                               rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True,
                               bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": LlamaConfig(name="smollm2-135m", vocab_size=49152, hidden_size=576,
                                intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=8192,
                                rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny": LlamaConfig(name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        rms_norm_eps=1e-5, max_position_embeddings=512),
}


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in float64, with llama3 / linear scaling as HF computes them."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    scaling = dict(cfg.rope_scaling or ())
    if cfg.rope_type == "linear":
        inv = inv / scaling["factor"]
    elif cfg.rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B,T,1,H] of positions [B,T] in float32, for `apply_rope`.

    Computed once per model call and shared by every layer: fused into each layer's rotation, the
    trig functions were recomputed per head and per layer, ~8x the cost of the rotation itself on CPU.
    """
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)  # [B,T,H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B,T,1,H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate x [B,T,N,H] by the `rope_tables` (cos, sin), HF's rotate_half layout (halves, not interleaved)."""
    cos, sin = rope
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)  # HF casts to input dtype before the weight


def _dense(cfg: LlamaConfig, features: int, bias: bool, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                    kernel_init=nn.initializers.normal(0.02), name=name)


def _projected(y: jax.Array, *dims: str | None) -> jax.Array:
    """A projection's output, pinned to the mesh by logical dims and named for the remat policy."""
    return checkpoint_name(constrain(y, *dims), PROJ_NAME)


class Attention(nn.Module):
    cfg: LlamaConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, rope, segment_ids):
        cfg = self.cfg
        b, t, _ = x.shape
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        heads = ("batch", None, "heads")
        parts = [_dense(cfg, f, cfg.attention_bias, name) for f, name in ((n * h, "q_proj"), (k * h, "k_proj"),
                                                                          (k * h, "v_proj"))]
        q, kk, v = (_projected(y, *heads) for y in FusedDense(parts, shards("heads") == 1, name="qkv")(x))
        q, kk, v = q.reshape(b, t, n, h), kk.reshape(b, t, k, h), v.reshape(b, t, k, h)  # [B,T,N|K,H]
        q, kk = apply_rope(q, rope), apply_rope(kk, rope)

        if not self.decode:  # training / evaluation: cuDNN flash attention or the blocked kernel, by cfg.attention
            out = attn.train_attention(q, kk, v, segment_ids, cfg.attention)  # [B,T,N,H]
        else:
            if not self.has_variable("cache", "k"):
                raise ValueError("decode=True needs a KV cache: pass {'cache': jlora.models.llama.model.init_cache(...)}")
            ck, cv = self.variable("cache", "k", None), self.variable("cache", "v", None)
            cseg, cidx = self.variable("cache", "segment_ids", None), self.variable("cache", "index", None)
            start, slots = cidx.value, cv.value.shape[2]
            if t > slots:  # static: refuse here, before dynamic_update_slice fails deep inside jax
                raise ValueError(f"decode=True: a call of {t} tokens does not fit a KV cache of {slots} slots; "
                                 f"make the cache longer (init_cache max_len >= prompt + new tokens)")
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
        return _projected(_dense(cfg, cfg.hidden_size, cfg.attention_bias, "o_proj")(out), "batch", None, None)

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
        gate, up = (_projected(y, *hidden) for y in FusedDense(parts, shards("mlp") == 1, name="gate_up")(x))  # [B,T,F]
        down = _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(constrain(nn.silu(gate) * up, *hidden))
        return _projected(down, "batch", None, None)  # [B,T,D]


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
    all ones. With decode=True the call appends to the KV cache from `init_cache`.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, *, decode: bool = False,
                 return_hidden: bool = False):
        cfg = self.cfg
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=DTYPES[cfg.dtype],
                         param_dtype=DTYPES[cfg.param_dtype], embedding_init=nn.initializers.normal(0.02),
                         name="embed_tokens")
        x = constrain(embed(input_ids), "batch", None, None)  # [B,T,D]

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        # Every collection is stacked on the layer axis, so extra collections (a KV cache, LoRA
        # pairs routed in from outside) are sliced per layer just like the params. Two layers per
        # loop iteration (unroll=2) made the CPU train step ~3% faster for ~2 s more compile.
        stack = nn.scan(block, variable_axes={True: 0}, split_rngs={True: True},
                        in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers, unroll=2)
        x, _ = stack(cfg, decode, name="layers")(x, rope_tables(cfg, positions), segment_ids)  # [B,T,D]
        x = constrain(RMSNorm(cfg.rms_norm_eps, DTYPES[cfg.param_dtype], name="norm")(x), "batch", None, None)
        if return_hidden:
            return x
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)  # [B,T,V]
        else:
            logits = _dense(cfg, cfg.vocab_size, False, "lm_head")(x)  # [B,T,V]
        return logits.astype(jnp.float32)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """A zeroed KV cache for `decode=True` calls: per layer keys [L,B,K,H,S] and values [L,B,K,S,H] (the
    layouts `jlora.models.attention.cached_attention` reads as they are: a step writes its new slots in place),
    slot segment ids [L,B,S], fill index [L]."""
    dtype = dtype or DTYPES[cfg.dtype]
    l, k, h = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    attn = {
        "k": jnp.zeros((l, batch, k, h, max_len), dtype),
        "v": jnp.zeros((l, batch, k, max_len, h), dtype),
        "segment_ids": jnp.zeros((cfg.num_hidden_layers, batch, max_len), jnp.int32),
        "index": jnp.zeros((cfg.num_hidden_layers,), jnp.int32),
    }
    return {"layers": {"self_attn": attn}}


def init_params(cfg: LlamaConfig, key: jax.Array) -> dict:
    """Random params (HF-style normal(0.02) init) as a plain nested dict."""
    model = Llama(cfg)
    return jax.jit(model.init)(key, jnp.zeros((1, 1), jnp.int32))["params"]  # jitted: 4x faster than eager


def param_shapes(cfg: LlamaConfig) -> dict:
    """The params tree as ShapeDtypeStructs, without allocating memory."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))

