"""The LLaMA family (1/2/3, GQA, llama3 rope scaling, tied embeddings; SmolLM2 is one): its registry record.

Its config is `jlora.models.llama.config`, its module `jlora.models.llama.model`; this file holds the
tables the rest of jlora reads through the record: HF / GGUF tensor names, sharding rules, linear layers.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import PartitionSpec as P

from jlora.models.config import ModelConfigError
from jlora.models.family import Family, Linear, register
from jlora.models.llama.config import PRESETS, LlamaConfig
from jlora.models.llama.model import Llama, init_cache, inv_freq

# jlora param path, HF tensor name, GGUF tensor name. "{i}" marks a per-layer tensor, which jlora stacks
# on a leading layer axis. Leaves called "kernel" are [in, out] in jlora and [out, in] on disk.
WEIGHTS = (
    ("embed_tokens/embedding", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm/weight", "model.norm.weight", "output_norm.weight"),
    ("lm_head/kernel", "lm_head.weight", "output.weight"),
    ("layers/input_layernorm/weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    (
        "layers/post_attention_layernorm/weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight",
    ),
    ("layers/self_attn/q_proj/kernel", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers/self_attn/q_proj/bias", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    ("layers/self_attn/k_proj/kernel", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers/self_attn/k_proj/bias", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    ("layers/self_attn/v_proj/kernel", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers/self_attn/v_proj/bias", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    ("layers/self_attn/o_proj/kernel", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers/self_attn/o_proj/bias", "model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias"),
    ("layers/mlp/gate_proj/kernel", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers/mlp/gate_proj/bias", "model.layers.{i}.mlp.gate_proj.bias", "blk.{i}.ffn_gate.bias"),
    ("layers/mlp/up_proj/kernel", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers/mlp/up_proj/bias", "model.layers.{i}.mlp.up_proj.bias", "blk.{i}.ffn_up.bias"),
    ("layers/mlp/down_proj/kernel", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("layers/mlp/down_proj/bias", "model.layers.{i}.mlp.down_proj.bias", "blk.{i}.ffn_down.bias"),
)

# Specs of the per-layer leaf; a layer-stacked leaf ([L, ...]) gets leading None for its extra dims.
# Flax kernels are [in, out]: column-parallel layers split `out` over tensor, row-parallel ones `in`.
SHARDING_RULES = (
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head\.kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", P("fsdp", "tensor")),  # [D, out]
    (r"(o_proj|down_proj)\.kernel$", P("tensor", "fsdp")),  # [in, D]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", P("tensor")),  # [out]
    (r"(o_proj|down_proj)\.bias$", P(None)),  # [D]
    (r"norm\.weight$", P(None)),  # RMSNorm scales [D]: tiny, replicated
)


def _q(cfg: LlamaConfig) -> int:
    return cfg.num_attention_heads * cfg.head_dim


def _kv(cfg: LlamaConfig) -> int:
    return cfg.num_key_value_heads * cfg.head_dim


LINEAR = {
    "q_proj": Linear(("self_attn", "q_proj"), lambda c: (c.hidden_size, _q(c))),
    "k_proj": Linear(("self_attn", "k_proj"), lambda c: (c.hidden_size, _kv(c))),
    "v_proj": Linear(("self_attn", "v_proj"), lambda c: (c.hidden_size, _kv(c))),
    "o_proj": Linear(("self_attn", "o_proj"), lambda c: (_q(c), c.hidden_size)),
    "gate_proj": Linear(("mlp", "gate_proj"), lambda c: (c.hidden_size, c.intermediate_size)),
    "up_proj": Linear(("mlp", "up_proj"), lambda c: (c.hidden_size, c.intermediate_size)),
    "down_proj": Linear(("mlp", "down_proj"), lambda c: (c.intermediate_size, c.hidden_size)),
}


def gguf_rope_heads(cfg: LlamaConfig, name: str) -> int | None:
    """llama.cpp stores q and k rows permuted for its interleaved rope: the head count to undo it with."""
    if name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k"):
        return cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
    return None


def gguf_fixups(cfg: LlamaConfig, fetch, names: set) -> tuple[LlamaConfig, set]:
    """llama.cpp stores llama3 rope scaling as per-frequency divisors (`rope_freqs.weight`); rebuild the config."""
    if "rope_freqs.weight" not in names:
        return cfg, names
    factors = np.asarray(fetch("rope_freqs.weight"))
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    candidate = cfg.replace(rope_scaling=tuple(sorted(scaling.items())))
    if factors.shape != (cfg.head_dim // 2,) or not np.allclose(
        inv_freq(candidate), inv_freq(cfg) / factors, rtol=1e-4
    ):
        raise ModelConfigError(
            "rope_freqs.weight does not match llama3 rope scaling "
            "(factor, low 1, high 4, original 8192); this rope is not supported"
        )
    return candidate, names - {"rope_freqs.weight"}


FAMILY = register(
    Family(
        name="llama",
        config=LlamaConfig,
        module=Llama,
        init_cache=init_cache,
        hf_model_types=("llama", "mistral"),
        gguf_architectures=("llama",),
        weights=WEIGHTS,
        sharding_rules=SHARDING_RULES,
        linear=LINEAR,
        default_targets=("q_proj", "v_proj"),
        fused={("self_attn", "qkv"): ("q_proj", "k_proj", "v_proj"), ("mlp", "gate_up"): ("gate_proj", "up_proj")},
        embed=("embed_tokens", "embedding"),
        head=("lm_head", "kernel"),
        head_module="head",
        presets=PRESETS,
        gguf_rope_heads=gguf_rope_heads,
        gguf_fixups=gguf_fixups,
    )
)

__all__ = ["FAMILY", "Llama", "LlamaConfig", "PRESETS", "init_cache"]
