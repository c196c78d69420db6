"""HF PEFT AdaptionPrompt (`peft_type: ADAPTION_PROMPT`) adapters <-> jlora LLaMA-Adapter trees.

PEFT keeps, for each of the top `adapter_layers` layers i, `base_model.model.model.layers.{i}.self_attn.
adaption_prompt` [1, len, D] and `.adaption_gate` [1]; jlora stacks them as [A, len, D] and [A, 1]
(jlora.peft.llama_adapter). `export_adaption_prompt` writes adapter_config.json + adapter_model.safetensors
as `peft`'s save_pretrained does; `import_adaption_prompt` reads them back, checking every key and shape
against the base, and every value (finite, within jlora.formats.tensor_values.ADAPTER_VALUE_BOUND).
jlora.formats.peft_adapter's export_peft / import_peft dispatch here. No pickle, no `peft` needed.
PEFT supports it for llama / mistral model types, GQA included (its k/v heads repeat per query group).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jlora.formats.peft_config import CONFIG_FILE, PeftError
from jlora.formats.tensor_values import adapter_value_problem
from jlora.formats.weights import save_safetensors
from jlora.models.config import ModelConfig
from jlora.peft.llama_adapter import GATE, PROMPT, AdapterConfig, AdapterConfigError, adapted_layers, is_adapter_tree

PREFIX = "base_model.model.model.layers."
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TYPE = "ADAPTION_PROMPT"


def is_adaption_prompt_dir(directory: str | pathlib.Path) -> bool:
    """Whether `directory` holds a PEFT adapter_config.json with peft_type ADAPTION_PROMPT."""
    try:
        config = json.loads((pathlib.Path(directory) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == PEFT_TYPE


def _key(layer: int, leaf: str) -> str:
    return f"{PREFIX}{layer}.self_attn.{leaf}"


def export_adaption_prompt(
    out_dir: str | pathlib.Path, trainable, acfg: AdapterConfig, cfg: ModelConfig, base_name: str | None = None
) -> None:
    """Write a LLaMA-Adapter tree as an HF PEFT AdaptionPrompt adapter dir for `cfg`'s LlamaForCausalLM."""
    if not is_adapter_tree(trainable):
        raise PeftError("the trainable tree holds no adaption prompts; export a LoRA tree with its LoraConfig")
    attn = trainable["layers"]["self_attn"]
    prompt, gate = np.asarray(attn[PROMPT]), np.asarray(attn[GATE])  # [A, len, D], [A, 1]
    if prompt.shape[1] != acfg.len:
        raise PeftError(f"adaption prompts have length {prompt.shape[1]}, the config says adapter.len={acfg.len}")
    if cfg.hidden_size != cfg.num_attention_heads * cfg.head_dim:
        raise PeftError(
            f"PEFT's AdaptionPrompt splits hidden_size={cfg.hidden_size} into heads; this base has "
            f"{cfg.num_attention_heads} x {cfg.head_dim}, which PEFT does not support"
        )
    tensors = {}
    for j, layer in enumerate(adapted_layers(trainable, cfg.num_hidden_layers)):
        tensors[_key(layer, PROMPT)] = prompt[j][None]  # [1, len, D]
        tensors[_key(layer, GATE)] = gate[j].reshape(1)  # [1]
    config = {
        "adapter_layers": int(prompt.shape[0]),
        "adapter_len": int(prompt.shape[1]),
        "auto_mapping": None,
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        "peft_type": PEFT_TYPE,
        "revision": None,
        "target_modules": "self_attn",
        "task_type": "CAUSAL_LM",
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _read_config(file: pathlib.Path) -> tuple[int, int]:
    """(adapter_len, adapter_layers) of an AdaptionPrompt adapter_config.json, checked."""
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise PeftError(f"{file}: unreadable ({' '.join(str(e).split())})") from None
    if config.get("peft_type") != PEFT_TYPE:
        raise PeftError(f"{file}: peft_type is {config.get('peft_type')!r}, expected {PEFT_TYPE}")
    if config.get("target_modules", "self_attn") != "self_attn":
        raise PeftError(f"{file}: target_modules={config['target_modules']!r}; jlora adapts self_attn only")
    for key in ("adapter_len", "adapter_layers"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PeftError(f"{file}: {key}={v!r} must be a positive integer")
    return config["adapter_len"], config["adapter_layers"]


def import_adaption_prompt(directory: str | pathlib.Path, cfg: ModelConfig) -> tuple[AdapterConfig, dict]:
    """(AdapterConfig, trainable tree) from an HF PEFT AdaptionPrompt adapter dir, for the base `cfg`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    length, n = _read_config(directory / CONFIG_FILE)
    try:
        acfg = AdapterConfig(len=length, layers=n)
        acfg.n_layers(cfg.num_hidden_layers)
    except AdapterConfigError as e:
        raise PeftError(f"{directory / CONFIG_FILE}: {e}") from None
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        raise PeftError(
            f"{file}: missing"
            + (
                "; adapter_model.bin would need pickle: resave it as safetensors"
                if (directory / "adapter_model.bin").is_file()
                else ""
            )
        )
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftError(f"{file}: truncated or corrupt safetensors ({' '.join(str(e).split())})") from None
    layers = range(cfg.num_hidden_layers - n, cfg.num_hidden_layers)
    want = {_key(i, PROMPT): (1, length, cfg.hidden_size) for i in layers} | {_key(i, GATE): (1,) for i in layers}
    problems = [f"missing {k}" for k in sorted(want.keys() - tensors.keys())]
    problems += [f"unexpected key {k}" for k in sorted(tensors.keys() - want.keys())]
    problems += [
        f"{k} has shape {tuple(tensors[k].shape)}, expected {s}"
        for k, s in want.items()
        if k in tensors and tuple(tensors[k].shape) != s
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PeftError(f"{directory}: adapter does not fit base {cfg.name!r}: {'; '.join(problems[:3])}{more}")
    bad = adapter_value_problem(tensors, bounded=lambda _: True)  # no checksum: refuse NaN, inf, flipped exponents
    if bad:
        raise PeftError(f"{file}: {bad}: a damaged adapter file")
    prompt = np.stack([tensors[_key(i, PROMPT)][0] for i in layers]).astype(np.float32)  # [A, len, D]
    gate = np.stack([tensors[_key(i, GATE)] for i in layers]).astype(np.float32)  # [A, 1]
    return acfg, {"layers": {"self_attn": {PROMPT: prompt, GATE: gate}}}
