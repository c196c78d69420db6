"""`ModelConfig`: the architecture of a decoder-only transformer, under HF's config.json names.

Every family runs the one module `jlora.models.decoder.Decoder`; what differs between families is data:
config fields read from config.json / GGUF (biases, sliding window and the per-layer `layer_types`,
soft-caps, `query_pre_attn_scalar`, a second rope base for local layers) and a few family constants,
class attributes of its config subclass (q/k norms, Gemma's (1+w) norms and four norms per block, the
√d embedding scale). A family's config subclass says which config.json / GGUF keys it reads and writes.
Code outside `jlora.models` reads only the shared fields (layer count, widths, heads, tied embeddings,
token ids, dtypes), so it works for any family. It owns no module and no weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jlora.errors import JloraError
from jlora.models import attention as attn
from jlora.models.layers import DTYPES, REMAT_POLICIES, ROPE_TYPES

# Fields that say how a model runs here (numerics, memory), not what it is: they are not part of the
# architecture an adapter is made for, and not written to config.json.
RUNTIME_FIELDS = ("name", "dtype", "param_dtype", "remat", "attention")
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's per-layer `layer_types` values
# Feature fields a family without the feature leaves None; config.json gets them only when set.
OPTIONAL_FEATURES = ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the MLP's gate activation (SwiGLU, GeGLU)
# config.json keys that change the maths, with the values that leave it unchanged. A family reads those
# in its `hf_features`; any other one set to another value is a checkpoint jlora would run wrongly (a
# Gemma config under model_type llama, a quantized or mixture-of-experts checkpoint), refused in one line.
NEUTRAL_VALUES: dict[str, tuple] = {
    **{key: (None,) for key in OPTIONAL_FEATURES},
    "rope_local_base_freq": (None,),
    "layer_types": (None,),  # or every layer full_attention, see _neutral
    "partial_rotary_factor": (None, 1, 1.0),
    "quantization_config": (None,),
    "num_local_experts": (None, 0, 1),
    "num_experts": (None, 0, 1),
    "use_bidirectional_attention": (None, False),
    "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
}


class ModelConfigError(JloraError, ValueError):
    """A model config that cannot describe a model jlora runs; the message is one line."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics shared by every family. Field names follow HF's config.json."""

    family: ClassVar[str] = ""  # the registry key of the family this config belongs to
    # The fields that decide which base an adapter fits: shapes and positional encoding, not dtypes or names.
    arch_keys: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "tie_word_embeddings",
    )
    # Family constants (not config.json fields): what the family's blocks are made of.
    qkv_bias: ClassVar[bool] = False  # q/k/v projections carry a bias whatever attention_bias says (Qwen2)
    qk_norm: ClassVar[bool] = False  # RMSNorm over each head's queries and keys before rope (Qwen3, Gemma 3)
    norm_plus_one: ClassVar[bool] = False  # Gemma's RMSNorm: x * (1 + w) in fp32, weights initialised to 0
    sandwich_norms: ClassVar[bool] = False  # Gemma 2/3: norms after attention and around the MLP too
    scale_embeddings: ClassVar[bool] = False  # embeddings times sqrt(hidden_size), rounded to the compute dtype

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
    attention_bias: bool = False  # biases on q/k/v/o
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # local layers see the last `sliding_window` keys (themselves included)
    # per layer, one of LAYER_TYPES; None: every layer local when sliding_window is set (Mistral), else global
    layer_types: tuple[str, ...] | None = None
    rope_local_base_freq: float | None = None  # rope theta of local layers, when it differs (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None: 1/sqrt(head_dim)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    name: str = "model"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "dots_saveable"  # none | full | dots_saveable: what a backward pass keeps (see REMAT_POLICIES)
    attention: str = "auto"  # auto | blocked | cudnn: the training attention kernel, see attention.resolve_impl

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ModelConfigError(f"{key}={getattr(self, key)!r}: expected one of {sorted(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ModelConfigError(f"remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.attention not in attn.TRAIN_IMPLS:
            raise ModelConfigError(f"attention={self.attention!r}: expected one of {', '.join(attn.TRAIN_IMPLS)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ModelConfigError(f"hidden_act={self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise ModelConfigError(
                    f"layer_types must list one of {', '.join(LAYER_TYPES)} per layer "
                    f"({self.num_hidden_layers}); got {len(self.layer_types)} entries"
                    + (f", including {bad[0]!r}" if bad else "")
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelConfigError(f"sliding_window={self.sliding_window}: expected a positive window or null")
        if self.rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"rope_scaling type {self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        scaling = dict(self.rope_scaling or ())
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, the window a local layer attends over (keys j with i - j < window), or None (global).

        A window at least max_position_embeddings long changes nothing, but is kept: decoding past the
        trained context still honours it, as HF does."""
        n, w = self.num_hidden_layers, self.sliding_window
        if w is None:
            return (None,) * n
        if self.layer_types is None:
            return (w,) * n
        return tuple(w if t == "sliding_attention" else None for t in self.layer_types)

    def rope(self, local: bool) -> tuple[float, dict]:
        """(theta, rope scaling) of a local or global layer: local layers have their own base and no
        scaling where the family says so (`rope_local_base_freq`), else every layer shares one rope."""
        if local and self.rope_local_base_freq is not None:
            return self.rope_local_base_freq, {}
        return self.rope_theta, dict(self.rope_scaling or ())

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- config.json and GGUF metadata ----
    hf_architecture: ClassVar[str] = ""  # what to_hf_config writes as `architectures`
    hf_model_type: ClassVar[str] = ""
    hf_features: ClassVar[tuple[str, ...]] = ()  # the NEUTRAL_VALUES keys this family implements

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> ModelConfig:
        """Build from the dict of an HF `config.json` (transformers 4 and 5 spellings); keys it omits take
        the family's defaults, which are HF's. A key that changes the maths in a way this family does not
        implement (NEUTRAL_VALUES) is a ModelConfigError naming it."""
        foreign = [
            f"{key}={_short(hf[key])}"
            for key, neutral in NEUTRAL_VALUES.items()
            if key in hf and key not in cls.hf_features and not _neutral(key, hf[key], neutral)
        ]
        if foreign:
            raise ModelConfigError(
                f"{', '.join(foreign)}: not implemented for model_type {hf.get('model_type', cls.hf_model_type)!r}; "
                f"running without {'them' if len(foreign) > 1 else 'it'} would compute another model"
            )
        special = ("rope_scaling", "rope_theta", "rope_local_base_freq", "layer_types", "hidden_act")
        names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS) - set(special)
        kwargs = {k: hf[k] for k in names if k in hf and hf[k] is not None}
        act = hf.get("hidden_activation") or hf.get("hidden_act")
        if act is not None:
            kwargs["hidden_act"] = act
        if hf.get("layer_types") is not None:
            kwargs["layer_types"] = tuple(hf["layer_types"])
        kwargs.update(_hf_rope(hf, cls))
        kwargs["name"] = hf.get("_name_or_path") or hf.get("model_type") or cls.hf_model_type
        kwargs.update(cls.hf_fields(hf, kwargs))
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def hf_fields(cls, hf: dict, kwargs: dict) -> dict:
        """The family's own reading of config.json, on top of the shared fields in `kwargs`."""
        return {}

    def to_hf_config(self) -> dict:
        """The config.json dict transformers reads back into the same model."""
        out = {
            "architectures": [self.hf_architecture],
            "model_type": self.hf_model_type,
            "initializer_range": 0.02,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
            "attention_dropout": 0.0,
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in (*RUNTIME_FIELDS, "rope_scaling", "rope_local_base_freq", "layer_types"):
                continue
            if value is not None or f.name not in OPTIONAL_FEATURES:  # absent features stay unwritten
                out[f.name] = value
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if self.layer_types is not None:
            out["layer_types"] = list(self.layer_types)
        return out

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tensors: frozenset[str] = frozenset(), **overrides) -> ModelConfig:
        """Build from a GGUF header (keys like `llama.block_count`, under the file's architecture), values
        already decoded to Python, and the file's tensor names (which say whether the head is tied and
        which projections have biases)."""
        arch = meta["general.architecture"]
        key = lambda k, default=None: meta.get(f"{arch}.{k}", default)
        if tensors:
            overrides.setdefault("tie_word_embeddings", "output.weight" not in tensors)
            bias = "blk.0.attn_output.bias" if cls.qkv_bias else "blk.0.attn_q.bias"
            overrides.setdefault("attention_bias", bias in tensors)
            overrides.setdefault("mlp_bias", "blk.0.ffn_gate.bias" in tensors)
        heads = int(meta[f"{arch}.attention.head_count"])
        hidden = int(meta[f"{arch}.embedding_length"])
        vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        rope = {}
        if key("rope.scaling.type") == "linear":
            rope = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        window = key("attention.sliding_window")
        kwargs = dict(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            num_hidden_layers=int(meta[f"{arch}.block_count"]),
            num_attention_heads=heads,
            num_key_value_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("attention.key_length", hidden // heads)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(key("context_length", 4096)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=tuple(sorted(rope.items())) or None,
            sliding_window=None if window is None else int(window),
            tie_word_embeddings=overrides.pop("tie_word_embeddings", True),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            name=str(meta.get("general.name", "gguf")),
        )
        kwargs.update(cls.gguf_fields(meta, kwargs))
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def gguf_fields(cls, meta: dict, kwargs: dict) -> dict:
        """The family's own reading of a GGUF header (what llama.cpp hard-codes for it), on top of `kwargs`."""
        return {}


def _neutral(key: str, value: Any, neutral: tuple) -> bool:
    if key == "layer_types" and isinstance(value, list):
        return all(t == "full_attention" for t in value)
    return value in neutral


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _hf_rope(hf: dict, cls: type) -> dict:
    """rope_theta, rope_scaling and rope_local_base_freq from config.json: transformers 5's `rope_parameters`
    (flat, or per layer type as Gemma 3 writes it) or transformers 4's rope_theta / rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    local_theta = hf.get("rope_local_base_freq")
    if "full_attention" in params or "sliding_attention" in params:
        rope = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        local_theta = local.pop("rope_theta", local_theta)
        if local.get("rope_type", "default") != "default":
            raise ModelConfigError(
                f"rope_parameters.sliding_attention: rope type {local['rope_type']!r} is not supported"
            )
    else:
        rope = params or dict(hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", cls.rope_theta))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    out = {"rope_theta": float(theta), "rope_scaling": tuple(sorted(rope.items())) or None}
    if local_theta is not None:
        out["rope_local_base_freq"] = float(local_theta)
    return out
