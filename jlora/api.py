"""Public functions that join a model family to a method: what `import jlora` offers beside the re-exports.

`split` is jlora.peft.lora.split with one addition: a LoraConfig that names no targets takes the default
of the family its params belong to (PEFT's default for that family). The method itself knows no family.
"""

from __future__ import annotations

import jax

from jlora.models.family import family_of_params
from jlora.peft.llama_adapter import AdapterConfig
from jlora.peft.lora import LoraConfig
from jlora.peft.lora import split as split_method


def split(params, lcfg: LoraConfig | AdapterConfig, key: jax.Array, *, layouts: dict | None = None):
    """params -> (frozen, trainable), by `lcfg` (see jlora.peft.lora.split); LoRA targets left unset are the
    default of the params' family."""
    if isinstance(lcfg, LoraConfig) and lcfg.targets is None:
        lcfg = lcfg.with_default_targets(family_of_params(params).default_targets)
    return split_method(params, lcfg, key, layouts=layouts)
