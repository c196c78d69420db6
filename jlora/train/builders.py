"""What a run builds from its config before the step: the tokenizer, the base model and the method.

Shared by the training loop (jlora.train.loop) and `--plan` (jlora.train.plan), which compiles the same
step without running it; neither imports the other.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from jlora.formats.weights import load_pretrained, resolve_model_path
from jlora.formats.weights_sharded import load_pretrained_sharded
from jlora.models.config import ModelConfig
from jlora.models.family import family_of, presets
from jlora.parallel.sharding import param_specs
from jlora.peft.llama_adapter import AdapterConfig, check_attention
from jlora.peft.lora import LoraConfig
from jlora.train.config import ConfigError, RunConfig
from jlora.train.examples import ByteTokenizer


def method_config(run: RunConfig, cfg: ModelConfig) -> LoraConfig | AdapterConfig:
    """The run's method config for base `cfg`: LoRA targets left unset take the family's default."""
    method = run.method_config
    if isinstance(method, LoraConfig):
        return method.with_default_targets(family_of(cfg).default_targets)
    check_attention(cfg)  # before any weights are read into a train state
    return method


def load_tok(run: RunConfig):
    """The run's tokenizer; ByteTokenizer for a random model without one."""
    path = run.tokenizer_path
    if path is None:
        return ByteTokenizer()
    from jlora.formats.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_path(path))


def model_overrides(run: RunConfig) -> dict[str, Any]:
    """The model config fields the run sets on top of the base model's: model.overrides, train.remat,
    and the blocked attention kernel for packed rows (cuDNN's mask is causal + per-row lengths)."""
    overrides = {"remat": run.train.remat, **dict(run.model.overrides)}
    if run.data.packing:
        if overrides.get("attention") == "cudnn":
            raise ConfigError(
                "attention 'cudnn' cannot keep packed rows apart; use 'auto' or 'blocked'", "model.overrides"
            )
        overrides["attention"] = "blocked"
    return overrides


def load_base(run: RunConfig, tok, mesh: Mesh | None = None) -> tuple[ModelConfig, Any]:
    """(config, params) of the base model, or (config, None) for a random preset ("tiny"). With a
    `mesh`, an HF checkpoint is read per host straight onto it (each process reads only its share);
    otherwise params are host numpy arrays."""
    m = run.model
    overrides = model_overrides(run)
    common = {"dtype": m.dtype, "param_dtype": m.param_dtype}
    if m.path == "tiny" or m.preset:
        name = m.preset or "tiny"
        if name not in presets():
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(presets()))}", "model.preset")
        if m.path == "tiny" and "vocab_size" not in overrides:  # follow the tokenizer, padded to shard evenly
            overrides["vocab_size"] = -(-tok.vocab_size // 64) * 64
        try:
            cfg = presets()[name].replace(**common, **overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{e}", "model.overrides") from None
        return check_context(run, cfg), None

    if mesh is None or m.quantize == "gguf":  # a GGUF file's blocks are placed by init_state like host arrays
        kept = {"quantize": "gguf"} if m.quantize == "gguf" else {}
        cfg, params = load_pretrained(m.path, dtype=m.dtype, param_dtype=m.param_dtype, **kept)
    else:  # placed by the same specs init_state uses, so it keeps these arrays as they are
        cfg, params = load_pretrained_sharded(
            m.path,
            mesh,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
            specs_fn=lambda s: param_specs(s, mesh, run.mesh.allow_replication),
        )
    return check_context(run, cfg.replace(**overrides)), params


def check_context(run: RunConfig, cfg: ModelConfig) -> ModelConfig:
    """`cfg`, unless a training row is longer than the model's context: positions past it are ones the model
    never saw (and a huge max_seq_len ends in an out-of-memory traceback). Extending the context is a
    choice to make explicitly, with model.overrides."""
    if run.data.max_seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"is {run.data.max_seq_len}, longer than the model's context of {cfg.max_position_embeddings} "
            f"tokens ({run.model.path}); lower it, or extend the context on purpose with "
            f"model.overrides: {{max_position_embeddings: {run.data.max_seq_len}}}",
            "data.max_seq_len",
        )
    return cfg
