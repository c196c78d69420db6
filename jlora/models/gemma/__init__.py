"""The Gemma families: Gemma 2 and Gemma 3 (text, also out of a multimodal checkpoint), their registry
records. Configs: `jlora.models.gemma.config`. llama.cpp stores Gemma's norm weights as 1 + w.
"""

from __future__ import annotations

from jlora.models import tables
from jlora.models.gemma.config import PRESETS_GEMMA2, PRESETS_GEMMA3, Gemma2Config, Gemma3Config


def gguf_norms(cfg, name: str, x):
    """llama.cpp's Gemma converters add 1 to every norm weight (its RMSNorm multiplies by w): undo it."""
    return x - 1 if name.endswith("norm.weight") else x


GEMMA2 = tables.decoder_family(
    "gemma2",
    Gemma2Config,
    hf_model_types=("gemma2",),
    gguf_architectures=("gemma2",),
    presets=PRESETS_GEMMA2,
    gguf_tensor_fix=gguf_norms,
)
GEMMA3 = tables.decoder_family(
    "gemma3",
    Gemma3Config,
    hf_model_types=("gemma3_text", "gemma3"),
    gguf_architectures=("gemma3",),
    presets=PRESETS_GEMMA3,
    gguf_tensor_fix=gguf_norms,
    # transformers 5 / 4 names of a Gemma3ForConditionalGeneration's text model, and what it also holds
    hf_text_prefixes=("model.language_model.", "language_model.model."),
    hf_skip_prefixes=("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector."),
)

__all__ = ["GEMMA2", "GEMMA3", "Gemma2Config", "Gemma3Config"]
