"""The LLaMA family (1/2/3, GQA, llama3 rope scaling, tied embeddings; SmolLM2 is one): its registry record.

Its config is `jlora.models.llama.config`; its module is the shared `jlora.models.decoder.Decoder` (also
exported as `Llama`), its weight names and sharding rules the shared `jlora.models.tables`. This file
adds what only LLaMA GGUF files need: llama.cpp's q/k row permutation and its llama3 rope factors.
"""

from __future__ import annotations

import numpy as np

from jlora.models import tables
from jlora.models.config import ModelConfigError
from jlora.models.decoder import Decoder, init_cache, inv_freq
from jlora.models.llama.config import PRESETS, LlamaConfig

Llama = Decoder  # the module of every family; `jlora.Llama(cfg)` predates the others


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


FAMILY = tables.decoder_family(
    "llama",
    LlamaConfig,
    hf_model_types=("llama",),
    gguf_architectures=("llama",),
    presets=PRESETS,
    gguf_rope_heads=tables.llamacpp_rope_heads,
    gguf_fixups=gguf_fixups,
)

__all__ = ["FAMILY", "Llama", "LlamaConfig", "PRESETS", "init_cache"]
