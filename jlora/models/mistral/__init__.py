"""The Mistral family: LLaMA's blocks with sliding-window attention in every layer (v0.1; later versions
set `sliding_window` null and are LLaMA in all but name). Its config, presets and registry record.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jlora.models import tables
from jlora.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MistralConfig(ModelConfig):
    """MistralForCausalLM; defaults are HF's MistralConfig's (Mistral 7B v0.1)."""

    family: ClassVar[str] = "mistral"
    arch_keys: ClassVar[tuple[str, ...]] = (*ModelConfig.arch_keys, "sliding_window")
    hf_architecture: ClassVar[str] = "MistralForCausalLM"
    hf_model_type: ClassVar[str] = "mistral"
    hf_features: ClassVar[tuple[str, ...]] = ("sliding_window",)

    vocab_size: int = 32000
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = 4096
    name: str = "mistral"

    def to_hf_config(self) -> dict:
        return {**super().to_hf_config(), "hidden_act": "silu", "sliding_window": self.sliding_window}


PRESETS = {
    "mistral-7b": MistralConfig(name="mistral-7b", bos_token_id=1, eos_token_id=2),
    "mistral-tiny": MistralConfig(
        name="mistral-tiny",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=16,
    ),
}

FAMILY = tables.decoder_family(
    "mistral",
    MistralConfig,
    hf_model_types=("mistral",),
    gguf_architectures=("mistral",),
    presets=PRESETS,
    gguf_rope_heads=tables.llamacpp_rope_heads,
)

__all__ = ["FAMILY", "PRESETS", "MistralConfig"]
