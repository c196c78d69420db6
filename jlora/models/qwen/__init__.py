"""The Qwen families: Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 dense (q/k norms, no biases), with their
presets and registry records. Configs: `jlora.models.qwen.config`.
"""

from __future__ import annotations

from jlora.models import tables
from jlora.models.qwen.config import PRESETS_QWEN2, PRESETS_QWEN3, Qwen2Config, Qwen3Config

QWEN2 = tables.decoder_family(
    "qwen2", Qwen2Config, hf_model_types=("qwen2",), gguf_architectures=("qwen2",), presets=PRESETS_QWEN2
)
QWEN3 = tables.decoder_family(
    "qwen3", Qwen3Config, hf_model_types=("qwen3",), gguf_architectures=("qwen3",), presets=PRESETS_QWEN3
)

__all__ = ["QWEN2", "QWEN3", "Qwen2Config", "Qwen3Config"]
