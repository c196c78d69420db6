"""`LlamaConfig`: the LLaMA family's architecture (1/2/3, GQA, llama3 rope scaling, tied embeddings), its
presets, and how it is read from HF `config.json` and GGUF metadata and written back to config.json.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jlora.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    """Architecture and numerics of one LLaMA-family model. Field names follow HF's config.json."""

    family: ClassVar[str] = "llama"
    arch_keys: ClassVar[tuple[str, ...]] = (*ModelConfig.arch_keys, "attention_bias", "mlp_bias")
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"
    hf_model_type: ClassVar[str] = "llama"

    name: str = "llama"

    def to_hf_config(self) -> dict:
        return {**super().to_hf_config(), "pretraining_tp": 1}


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
