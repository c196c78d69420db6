"""`LlamaConfig`: the LLaMA family's architecture (1/2/3, GQA, llama3 rope scaling, tied embeddings), its
presets, and how it is read from HF `config.json` and GGUF metadata and written back to config.json.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jlora.models.config import RUNTIME_FIELDS, ModelConfig, ModelConfigError

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    """Architecture and numerics of one LLaMA-family model. Field names follow HF's config.json."""

    family: ClassVar[str] = "llama"
    arch_keys: ClassVar[tuple[str, ...]] = (*ModelConfig.arch_keys, "attention_bias", "mlp_bias")

    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = "llama"

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> LlamaConfig:
        """Build from the dict of an HF `config.json` (transformers 4 and 5 spellings)."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral") or not any(a in SUPPORTED_ARCHS for a in archs):
            raise ModelConfigError(
                f"unsupported architecture {archs} (model_type {model_type!r}); jlora runs LlamaForCausalLM"
            )
        window = hf.get("sliding_window")
        context = hf.get("max_position_embeddings", cls.max_position_embeddings)
        if window is not None and window < context:  # Mistral v0.1: jlora's attention would see past the window
            raise ModelConfigError(
                f"sliding_window={window} < max_position_embeddings={context}: jlora has no "
                f"sliding-window attention; up to {window} tokens the model is the same, so set "
                f"max_position_embeddings to {window} to use it that far"
            )
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS) - {"rope_scaling"}
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
            if f.name not in (*RUNTIME_FIELDS, "rope_scaling"):
                out[f.name] = getattr(self, f.name)
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return out

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tensors: frozenset[str] = frozenset(), **overrides) -> LlamaConfig:
        """Build from a GGUF header (keys like `llama.block_count`), values already decoded to Python, and
        the file's tensor names (which say whether the head is tied and which projections have biases)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ModelConfigError(f"unsupported GGUF architecture {arch!r}; jlora runs 'llama'")
        if tensors:
            overrides.setdefault("tie_word_embeddings", "output.weight" not in tensors)
            overrides.setdefault("attention_bias", "blk.0.attn_q.bias" in tensors)
            overrides.setdefault("mlp_bias", "blk.0.ffn_gate.bias" in tensors)
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


_LLAMA3_ROPE = (
    ("factor", 32.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 8192),
    ("rope_type", "llama3"),
)
PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(name="llama2-7b", rms_norm_eps=1e-5),
    "llama2-13b": LlamaConfig(
        name="llama2-13b",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        rms_norm_eps=1e-5,
    ),
    "llama2-70b": LlamaConfig(
        name="llama2-70b",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
    ),
    "llama3-8b": LlamaConfig(
        name="llama3-8b",
        vocab_size=128256,
        intermediate_size=14336,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3-70b": LlamaConfig(
        name="llama3-70b",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3.2-1b": LlamaConfig(
        name="llama3.2-1b",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3.2-3b": LlamaConfig(
        name="llama3.2-3b",
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "smollm2-135m": LlamaConfig(
        name="smollm2-135m",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tiny": LlamaConfig(
        name="tiny",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
    ),
}
