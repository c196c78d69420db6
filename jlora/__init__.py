"""jlora: LoRA fine-tuning of LLaMA-family models in JAX/Flax, as a transformation of parameter trees."""

from jlora.llama import PRESETS, Llama, LlamaConfig, init_cache, init_params
from jlora.lora import LoraConfig, LoraError, count_params, describe, merge, split, unmerge
from jlora.tokenizer import load_tokenizer
from jlora.lora_apply import LoraPair, apply, lora_apply, trace_layouts

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "Llama", "LlamaConfig", "init_cache", "init_params",
    "LoraConfig", "LoraError", "LoraPair", "apply", "count_params", "describe", "lora_apply", "merge", "split",
    "load_tokenizer", "trace_layouts", "unmerge",
]
