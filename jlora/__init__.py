"""jlora: LoRA fine-tuning of open model families in JAX/Flax, as a transformation of parameter trees.

The public names, gathered from the layers that own them (docs/architecture.md shows the layers).
"""

from jlora.api import split
from jlora.checkpoint.adapter import load_adapter, save_adapter
from jlora.errors import JloraError
from jlora.formats.gguf_adapter import export_gguf_adapter
from jlora.formats.peft_adapter import export_peft, import_peft
from jlora.formats.tokenizer import load_tokenizer
from jlora.formats.weights import read_pretrained, resolve_model_path, save_pretrained
from jlora.formats.weights_on_device import load_pretrained, load_pretrained_sharded
from jlora.infer.generate import generate
from jlora.models.config import ModelConfig
from jlora.models.decoder import Decoder
from jlora.models.family import build_model, init_cache, init_params, param_shapes, presets
from jlora.models.gemma import Gemma2Config, Gemma3Config
from jlora.models.llama import Llama, LlamaConfig
from jlora.models.mistral import MistralConfig
from jlora.models.qwen import Qwen2Config, Qwen3Config
from jlora.peft.llama_adapter import AdapterConfig
from jlora.peft.lora import LoraConfig, count_params, describe, merge, merge_for_inference, pissa_to_lora, unmerge
from jlora.peft.routing import LoraError, LoraPair, apply, lora_apply, trace_layouts
from jlora.quant.quantize import QuantizedKernel, dequantize, quantize
from jlora.train.loss import causal_lm_loss
from jlora.train.preference import preference_loss
from jlora.train.step import make_train_step

PRESETS = presets()  # every family's named configs

__version__ = "0.1.0"

__all__ = [
    "Qwen3Config",
    "Qwen2Config",
    "MistralConfig",
    "Gemma3Config",
    "Gemma2Config",
    "Decoder",
    "AdapterConfig",
    "apply",
    "build_model",
    "causal_lm_loss",
    "count_params",
    "dequantize",
    "describe",
    "export_gguf_adapter",
    "export_peft",
    "generate",
    "import_peft",
    "init_cache",
    "init_params",
    "JloraError",
    "Llama",
    "LlamaConfig",
    "load_adapter",
    "load_pretrained",
    "load_pretrained_sharded",
    "load_tokenizer",
    "read_pretrained",
    "lora_apply",
    "LoraConfig",
    "LoraError",
    "LoraPair",
    "make_train_step",
    "merge",
    "ModelConfig",
    "param_shapes",
    "merge_for_inference",
    "pissa_to_lora",
    "preference_loss",
    "PRESETS",
    "quantize",
    "QuantizedKernel",
    "resolve_model_path",
    "save_adapter",
    "save_pretrained",
    "split",
    "trace_layouts",
    "unmerge",
]
