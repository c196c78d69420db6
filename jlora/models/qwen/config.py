"""Qwen2 / Qwen2.5 and Qwen3 dense configs: LLaMA's blocks with q/k/v biases (Qwen2) or q/k norms (Qwen3),
sliding windows only in the layers from `max_window_layers` on, and only when `use_sliding_window`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jlora.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Qwen2Config(ModelConfig):
    """Qwen2ForCausalLM (Qwen2, Qwen2.5); defaults are HF's Qwen2Config's."""

    family: ClassVar[str] = "qwen2"
    arch_keys: ClassVar[tuple[str, ...]] = (*ModelConfig.arch_keys, "sliding_window", "layer_types")
    hf_architecture: ClassVar[str] = "Qwen2ForCausalLM"
    hf_model_type: ClassVar[str] = "qwen2"
    hf_features: ClassVar[tuple[str, ...]] = ("sliding_window", "layer_types")
    qkv_bias: ClassVar[bool] = True

    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    name: str = "qwen2"

    @classmethod
    def hf_fields(cls, hf: dict, kwargs: dict) -> dict:
        """HF keeps `sliding_window` set when `use_sliding_window` is off: then no layer is local. When it is
        on, layers from `max_window_layers` on are local (unless config.json lists `layer_types`)."""
        if not hf.get("use_sliding_window", False):
            return {"sliding_window": None, "layer_types": None}
        if "layer_types" in kwargs:
            return {}
        first = hf.get("max_window_layers", 28)
        n = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        return {"layer_types": tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))}

    def to_hf_config(self) -> dict:
        out = super().to_hf_config()
        local = self.sliding_window is not None and any(w is not None for w in self.layer_windows)
        out.update(hidden_act=self.hidden_act, use_sliding_window=local, max_window_layers=self.num_hidden_layers)
        out["layer_types"] = ["sliding_attention" if w else "full_attention" for w in self.layer_windows]
        out.pop("attention_bias", None)  # Qwen2's biases are fixed: q/k/v have them, o has none
        return out


@dataclasses.dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
    """Qwen3ForCausalLM (dense); defaults are HF's Qwen3Config's."""

    family: ClassVar[str] = "qwen3"
    arch_keys: ClassVar[tuple[str, ...]] = (*Qwen2Config.arch_keys, "attention_bias")
    hf_architecture: ClassVar[str] = "Qwen3ForCausalLM"
    hf_model_type: ClassVar[str] = "qwen3"
    qkv_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = True

    head_dim: int | None = 128
    name: str = "qwen3"

    def to_hf_config(self) -> dict:
        return {**super().to_hf_config(), "attention_bias": self.attention_bias}


def _tiny(cls, **kw):
    return cls(
        name=f"{cls.hf_model_type}-tiny",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        **kw,
    )


def _qwen3(name: str, hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> Qwen3Config:
    """A released Qwen3 dense model (Qwen/Qwen3-*, the post-trained checkpoints): what their config.json
    files share (8 KV heads of 128, rope 1e6, 40960 positions, <|im_end|> as eos) and what differs."""
    return Qwen3Config(
        name=name,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tied,
        bos_token_id=151643,
        eos_token_id=151645,
    )


PRESETS_QWEN2: dict[str, Qwen2Config] = {
    "qwen2-tiny": _tiny(Qwen2Config),
    # Qwen/Qwen2.5-7B (base): config.json's sliding_window 131072 is off (use_sliding_window false)
    "qwen2.5-7b": Qwen2Config(
        name="qwen2.5-7b",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        rope_theta=1_000_000.0,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
}
PRESETS_QWEN3: dict[str, Qwen3Config] = {
    "qwen3-tiny": _tiny(Qwen3Config),
    "qwen3-0.6b": _qwen3("qwen3-0.6b", 1024, 3072, 28, 16, tied=True),
    "qwen3-4b": _qwen3("qwen3-4b", 2560, 9728, 36, 32, tied=True),
    "qwen3-8b": _qwen3("qwen3-8b", 4096, 12288, 36, 32, tied=False),
    "qwen3-14b": _qwen3("qwen3-14b", 5120, 17408, 40, 40, tied=False),
    "qwen3-32b": _qwen3("qwen3-32b", 5120, 25600, 64, 64, tied=False),
}
