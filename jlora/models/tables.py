"""The tables every `Decoder` family shares: weight names, sharding rules and linear layers.

All built-in families run `jlora.models.decoder.Decoder`, whose parameter names are HF's module names,
so their tables differ only in which norms a block has (`weights(sandwich=..., qk_norm=...)`). A
family record (`jlora.models.family.Family`) takes these; nothing else reads them directly.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from jlora.models.config import ModelConfig
from jlora.models.decoder import Decoder, init_cache
from jlora.models.family import Family, Linear, register

_ATTENTION = (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"))
_MLP = (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down"))


def weights(*, sandwich: bool = False, qk_norm: bool = False) -> tuple[tuple[str, str, str], ...]:
    """(jlora param path, HF tensor name, GGUF tensor name) of every parameter a Decoder may have.

    "{i}" marks a per-layer tensor, which jlora stacks on a leading layer axis. Leaves called "kernel"
    are [in, out] in jlora and [out, in] on disk. `sandwich`: Gemma's four norms per block (its
    post_attention_layernorm follows attention, where LLaMA's precedes the MLP); `qk_norm`: q/k norms."""
    rows = [
        ("embed_tokens/embedding", "model.embed_tokens.weight", "token_embd.weight"),
        ("norm/weight", "model.norm.weight", "output_norm.weight"),
        ("lm_head/kernel", "lm_head.weight", "output.weight"),
        ("layers/input_layernorm/weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ]
    norms = {"post_attention_layernorm": "ffn_norm"}
    if sandwich:
        norms = {
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
        }
    rows += [
        (f"layers/{hf}/weight", f"model.layers.{{i}}.{hf}.weight", f"blk.{{i}}.{gg}.weight") for hf, gg in norms.items()
    ]
    if qk_norm:
        rows += [
            (
                f"layers/self_attn/{x}_norm/weight",
                f"model.layers.{{i}}.self_attn.{x}_norm.weight",
                f"blk.{{i}}.attn_{x}_norm.weight",
            )
            for x in "qk"
        ]
    for module, parts in (("self_attn", _ATTENTION), ("mlp", _MLP)):
        for hf, gg in parts:
            for leaf, disk in (("kernel", "weight"), ("bias", "bias")):
                rows.append(
                    (
                        f"layers/{module}/{hf}/{leaf}",
                        f"model.layers.{{i}}.{module}.{hf}.{disk}",
                        f"blk.{{i}}.{gg}.{disk}",
                    )
                )
    return tuple(rows)


# Specs of the per-layer leaf; a layer-stacked leaf ([L, ...]) gets leading None for its extra dims.
# Flax kernels are [in, out]: column-parallel layers split `out` over tensor, row-parallel ones `in`.
SHARDING_RULES = (
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head\.kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", P("fsdp", "tensor")),  # [D, out]
    (r"(o_proj|down_proj)\.kernel$", P("tensor", "fsdp")),  # [in, D]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", P("tensor")),  # [out]
    (r"(o_proj|down_proj)\.bias$", P(None)),  # [D]
    (r"norm\.weight$", P(None)),  # RMSNorm scales [D] or [H]: tiny, replicated
)


def _q(cfg: ModelConfig) -> int:
    return cfg.num_attention_heads * cfg.head_dim


def _kv(cfg: ModelConfig) -> int:
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
FUSED = {("self_attn", "qkv"): ("q_proj", "k_proj", "v_proj"), ("mlp", "gate_up"): ("gate_proj", "up_proj")}


def llamacpp_rope_heads(cfg: ModelConfig, name: str) -> int | None:
    """llama.cpp stores LLaMA's (and Mistral's) q and k rows permuted for its interleaved rope: the head
    count to undo it with. Other families' converters keep HF's row order."""
    if name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k"):
        return cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
    return None


def decoder_family(name: str, config: type[ModelConfig], **fields) -> Family:
    """A `Family` record of a `Decoder` family: the shared tables, plus the family's own `fields` (HF model
    types, GGUF architectures, presets, default LoRA targets, GGUF fix-ups ...)."""
    sandwich, qk_norm = config.sandwich_norms, config.qk_norm
    shared = dict(
        name=name,
        config=config,
        module=Decoder,
        init_cache=init_cache,
        weights=weights(sandwich=sandwich, qk_norm=qk_norm),
        sharding_rules=SHARDING_RULES,
        linear=LINEAR,
        default_targets=("q_proj", "v_proj"),
        fused=FUSED,
        embed=("embed_tokens", "embedding"),
        head=("lm_head", "kernel"),
        head_module="head",
    )
    return register(Family(**{**shared, **fields}))
