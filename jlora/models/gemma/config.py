"""Gemma 2 and Gemma 3 (text) configs.

Both have Gemma's (1+w) norms computed in fp32, four norms per block, GeGLU with tanh-GELU, embeddings
scaled by sqrt(hidden_size), `query_pre_attn_scalar`, and local layers between global ones. Gemma 2
alternates them and soft-caps attention scores and logits; Gemma 3 has q/k norms, five local layers per
global one, its own rope base for local layers, and (4B and up) linear rope scaling on global layers.
A multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration) reads as its text model.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jlora.models.config import OPTIONAL_FEATURES, ModelConfig, ModelConfigError


def pattern(n: int, every: int) -> tuple[str, ...]:
    """HF's layer types of a stack where every `every`-th layer is global and the others local."""
    return tuple("full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n))


@dataclasses.dataclass(frozen=True)
class Gemma2Config(ModelConfig):
    """Gemma2ForCausalLM; defaults are HF's Gemma2Config's (Gemma 2 2B)."""

    family: ClassVar[str] = "gemma2"
    arch_keys: ClassVar[tuple[str, ...]] = (
        *ModelConfig.arch_keys,
        "sliding_window",
        "layer_types",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "hidden_act",
    )
    hf_architecture: ClassVar[str] = "Gemma2ForCausalLM"
    hf_model_type: ClassVar[str] = "gemma2"
    hf_features: ClassVar[tuple[str, ...]] = (*OPTIONAL_FEATURES, "layer_types")
    norm_plus_one: ClassVar[bool] = True
    sandwich_norms: ClassVar[bool] = True
    scale_embeddings: ClassVar[bool] = True
    global_every: ClassVar[int] = 2  # one global layer per this many (llama.cpp hard-codes it too)

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    hidden_act: str = "gelu_pytorch_tanh"
    sliding_window: int | None = 4096
    query_pre_attn_scalar: float | None = 256
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    name: str = "gemma2"

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", pattern(self.num_hidden_layers, self.global_every))
        super().__post_init__()

    @classmethod
    def hf_fields(cls, hf: dict, kwargs: dict) -> dict:
        # An explicit null soft-cap is kept null; a missing one takes the default.
        caps = ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window")
        return {k: hf[k] for k in caps if k in hf and hf[k] is None}

    def to_hf_config(self) -> dict:
        out = super().to_hf_config()
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            out[key] = getattr(self, key)
        return {**out, "hidden_activation": self.hidden_act}

    @classmethod
    def gguf_fields(cls, meta: dict, kwargs: dict) -> dict:
        """What llama.cpp hard-codes: the layer pattern, and 1/sqrt(hidden / heads) as the attention scale of
        the 27B models (the others use 1/sqrt(head_dim))."""
        arch = meta["general.architecture"]
        n, heads, hidden = kwargs["num_hidden_layers"], kwargs["num_attention_heads"], kwargs["hidden_size"]
        scalar = hidden // heads if n == cls.layers_27b else kwargs["head_dim"]
        out = dict(layer_types=pattern(n, cls.global_every), query_pre_attn_scalar=scalar)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if f"{arch}.{key}" in meta:
                out[key] = float(meta[f"{arch}.{key}"])
        return out

    layers_27b: ClassVar[int] = 46


@dataclasses.dataclass(frozen=True)
class Gemma3Config(Gemma2Config):
    """Gemma3ForCausalLM (the text model, also of a multimodal checkpoint); defaults are HF's Gemma3TextConfig's."""

    family: ClassVar[str] = "gemma3"
    arch_keys: ClassVar[tuple[str, ...]] = (*Gemma2Config.arch_keys, "rope_local_base_freq")
    hf_architecture: ClassVar[str] = "Gemma3ForCausalLM"
    hf_model_type: ClassVar[str] = "gemma3_text"
    hf_features: ClassVar[tuple[str, ...]] = (*Gemma2Config.hf_features, "rope_local_base_freq")
    qk_norm: ClassVar[bool] = True
    global_every: ClassVar[int] = 6
    layers_27b: ClassVar[int] = 62

    vocab_size: int = 262208
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float | None = 10_000.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    name: str = "gemma3"

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> Gemma3Config:
        """A Gemma3ForConditionalGeneration config.json (model_type "gemma3") reads as its `text_config`."""
        if hf.get("model_type") == "gemma3":
            text = hf.get("text_config")
            if not isinstance(text, dict):
                raise ModelConfigError("a multimodal Gemma 3 config.json (model_type 'gemma3') needs a text_config")
            hf = {"_name_or_path": hf.get("_name_or_path"), **text, "model_type": "gemma3_text"}
        if "sliding_window_pattern" in hf and "layer_types" not in hf:
            n = hf.get("num_hidden_layers", cls.num_hidden_layers)
            hf = {**hf, "layer_types": list(pattern(n, int(hf["sliding_window_pattern"])))}
        return super().from_hf_config(hf, **overrides)

    @classmethod
    def hf_fields(cls, hf: dict, kwargs: dict) -> dict:
        out = super().hf_fields(hf, kwargs)
        if "rope_local_base_freq" not in kwargs:
            out["rope_local_base_freq"] = cls.rope_local_base_freq
        return out

    def to_hf_config(self) -> dict:
        out = super().to_hf_config()
        out.pop("rope_scaling"), out.pop("rope_theta")
        full = {"rope_type": "default", **dict(self.rope_scaling or ()), "rope_theta": self.rope_theta}
        local = {"rope_type": "default", "rope_theta": self.rope_local_base_freq or self.rope_theta}
        return {**out, "rope_parameters": {"full_attention": full, "sliding_attention": local}}

    @classmethod
    def gguf_fields(cls, meta: dict, kwargs: dict) -> dict:
        # llama.cpp hard-codes Gemma 3's local rope base; global layers read rope.freq_base and its scaling.
        return {**super().gguf_fields(meta, kwargs), "rope_local_base_freq": 10_000.0}


def _tiny(cls, **kw):
    return cls(
        name=f"{cls.family}-tiny",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2 * cls.global_every if cls.global_every < 6 else 6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        query_pre_attn_scalar=16,
        sliding_window=16,
        **kw,
    )


def _gemma2(name: str, hidden: int, intermediate: int, layers: int, heads: int, head_dim: int, scalar: int):
    """A released Gemma 2 model (google/gemma-2-*): the rest of its config.json is Gemma2Config's defaults
    (256000 tokens, 4096-token windows on alternate layers, soft-caps 50 / 30, 8192 positions)."""
    return Gemma2Config(
        name=name,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=head_dim,
        query_pre_attn_scalar=scalar,
    )


def _gemma3(name: str, hidden: int, intermediate: int, layers: int, heads: int, head_dim: int, scalar: int):
    """The text model of a released multimodal Gemma 3 (google/gemma-3-{4,12,27}b-pt): its config.json's
    text_config sets these and 1024-token windows and linear rope scaling x8 on the global layers; the rest
    is Gemma3TextConfig's defaults (262208 tokens, rope 1e6 global / 1e4 local, 131072 positions)."""
    return Gemma3Config(
        name=name,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=head_dim,
        query_pre_attn_scalar=scalar,
        sliding_window=1024,
        rope_scaling=(("factor", 8.0), ("rope_type", "linear")),
    )


PRESETS_GEMMA2: dict[str, Gemma2Config] = {
    "gemma2-tiny": _tiny(Gemma2Config),
    "gemma2-9b": _gemma2("gemma2-9b", 3584, 14336, 42, 16, head_dim=256, scalar=256),
    "gemma2-27b": _gemma2("gemma2-27b", 4608, 36864, 46, 32, head_dim=128, scalar=144),  # scalar: hidden / heads
}
PRESETS_GEMMA3: dict[str, Gemma3Config] = {
    "gemma3-tiny": _tiny(Gemma3Config),
    "gemma3-270m": Gemma3Config(
        name="gemma3-270m",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        sliding_window=512,
        query_pre_attn_scalar=256,
    ),
    # google/gemma-3-1b-pt: text only, no rope scaling
    "gemma3-1b": Gemma3Config(
        name="gemma3-1b",
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        sliding_window=512,
        query_pre_attn_scalar=256,
    ),
    "gemma3-4b": _gemma3("gemma3-4b", 2560, 10240, 34, 8, head_dim=256, scalar=256),
    "gemma3-12b": _gemma3("gemma3-12b", 3840, 15360, 48, 16, head_dim=256, scalar=256),
    "gemma3-27b": _gemma3("gemma3-27b", 5376, 21504, 62, 32, head_dim=128, scalar=168),  # scalar: hidden / heads
}
