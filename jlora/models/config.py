"""`ModelConfig`: the architecture fields every family shares, under HF's config.json names.

A family's config subclasses it, adds its own fields and reads itself from HF `config.json` and GGUF
metadata. Code outside `jlora.models` reads only these shared fields (layer count, widths, heads, tied
embeddings, token ids, dtypes), so it works for any family. It owns no module and no weights.
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
        if self.rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"rope_scaling type {self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        scaling = dict(self.rope_scaling or ())
        return scaling.get("rope_type", scaling.get("type", "default"))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
