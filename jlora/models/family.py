"""The family registry: the one seam where a model family plugs into jlora.

A `Family` record says everything the rest of the package needs to know about an architecture: its
config class (read from HF config.json and GGUF metadata), its flax module and KV cache, the weight-name
table for HF and GGUF files (with llama.cpp's q/k row permutation), its sharding rules, its linear layers
(for LoRA targets, `all-linear` and per-row adapter stacks), the fused projection groups decoding joins,
and which parameters are the embedding and the head. Code outside `jlora.models` asks the record
(`family_of(cfg)`) instead of naming a family's parameters. Adding a family: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec

from jlora.models.config import ModelConfig, ModelConfigError
from jlora.parallel.sharding import add_rules

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Linear:
    """One linear layer of a block: its path inside the layer and its [in, out] shape for a config."""

    path: Path  # e.g. ("self_attn", "q_proj")
    shape: Callable[[Any], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything jlora needs to know about one model architecture. See the module docstring."""

    name: str
    config: type[ModelConfig]
    module: type[nn.Module]  # module(cfg) -> the model; module(cfg, unrolled=True) -> its decode layout
    init_cache: Callable[..., dict]  # (cfg, batch, max_len, dtype=None) -> {"layers": stacked cache}
    hf_model_types: tuple[str, ...]  # config.json's model_type values this family reads
    gguf_architectures: tuple[str, ...]  # general.architecture values this family reads
    # (param path "a/b/kernel", HF tensor name, GGUF tensor name); "{i}" marks a per-layer tensor
    weights: tuple[tuple[str, str, str], ...]
    sharding_rules: tuple[tuple[str, PartitionSpec], ...]  # regex over a dotted param path -> spec, first wins
    linear: Mapping[str, Linear]  # every linear layer of a block, by module name
    default_targets: tuple[str, ...]  # LoRA targets when a config names none (PEFT's default for the family)
    fused: Mapping[Path, tuple[str, ...]]  # a block's FusedDense path -> its parts (siblings of it)
    embed: Path  # the token embedding [V, D]
    head: Path  # the output head [D, V], absent when tied to the embedding
    head_module: str  # the decode layout's head FusedDense, whose own kernel may be column blocks
    presets: Mapping[str, ModelConfig]
    # GGUF tensor name -> the head count whose llama.cpp rope permutation its rows carry (None: not permuted)
    gguf_rope_heads: Callable[[Any, str], int | None] = lambda cfg, name: None
    # (cfg, gguf tensor name -> array, names) -> (cfg, names left): header fixes read from extra tensors
    gguf_fixups: Callable[[Any, Callable, set], tuple[Any, set]] = lambda cfg, fetch, names: (cfg, names)
    # (cfg, GGUF tensor name, dense array) -> the array as HF holds it (llama.cpp stores Gemma's norms as 1 + w)
    gguf_tensor_fix: Callable[[Any, str, Any], Any] = lambda cfg, name, x: x
    # A multimodal checkpoint's text tower: HF name prefixes that stand for "model." (vision tensors are skipped)
    hf_text_prefixes: tuple[str, ...] = ()
    hf_skip_prefixes: tuple[str, ...] = ()

    @property
    def renames(self) -> dict[Path, tuple[str, str]]:
        """param path -> (HF name, GGUF name)."""
        return {tuple(path.split("/")): (hf, gg) for path, hf, gg in self.weights}

    def head_path(self, cfg: ModelConfig) -> Path:
        """The output head's param path: the embedding when the head is tied to it."""
        return self.embed if cfg.tie_word_embeddings else self.head

    def linear_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
        return {name: lin.shape(cfg) for name, lin in self.linear.items()}


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (its config class's `family` is its key), and its sharding rules to the table."""
    if family.config.family != family.name:
        raise ValueError(f"family {family.name!r}: its config class says {family.config.family!r}")
    _FAMILIES[family.name] = family
    add_rules(family.sharding_rules)
    return family


def families() -> dict[str, Family]:
    """Every registered family, by name (the built-in ones register when jlora.models is imported)."""
    return dict(_FAMILIES)


def family_of(cfg: ModelConfig) -> Family:
    """The family record of a config."""
    try:
        return _FAMILIES[type(cfg).family]
    except KeyError:
        raise ModelConfigError(f"{type(cfg).__name__} belongs to no registered family") from None


def build_model(cfg: ModelConfig) -> nn.Module:
    """The flax module of a loaded config (e.g. `jlora.Llama(cfg)` for a LLaMA config)."""
    return family_of(cfg).module(cfg)


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """The config of an HF config.json dict, by its model_type."""
    model_type = hf.get("model_type", "llama")
    for fam in families().values():
        if model_type in fam.hf_model_types:
            return fam.config.from_hf_config(hf, **overrides)
    archs = hf.get("architectures")
    known = ", ".join(t for f in _FAMILIES.values() for t in f.hf_model_types)
    raise ModelConfigError(f"unsupported architecture {archs} (model_type {model_type!r}); jlora runs {known}")


def family_of_gguf(meta: dict) -> Family:
    arch = meta.get("general.architecture")
    for fam in families().values():
        if arch in fam.gguf_architectures:
            return fam
    known = ", ".join(repr(a) for f in _FAMILIES.values() for a in f.gguf_architectures)
    raise ModelConfigError(f"unsupported GGUF architecture {arch!r}; jlora runs {known}")


def presets() -> dict[str, ModelConfig]:
    """Every family's named configs ("llama3-8b", "smollm2-135m", "tiny", ...)."""
    return {name: cfg for fam in families().values() for name, cfg in fam.presets.items()}


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random params (HF-style normal(0.02) init) as a plain nested dict."""
    model = build_model(cfg)
    return jax.jit(model.init)(key, jnp.zeros((1, 1), jnp.int32))["params"]  # jitted: 4x faster than eager


def param_shapes(cfg: ModelConfig) -> dict:
    """The params tree as ShapeDtypeStructs, without allocating memory."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """A zeroed KV cache for the model's `decode=True` calls."""
    return family_of(cfg).init_cache(cfg, batch, max_len, dtype)


def family_of_params(params: dict) -> Family:
    """The family whose weight table names every param of `params` (a params tree of one of its models)."""
    paths = set(traverse_util.flatten_dict(params, is_leaf=lambda _, x: not isinstance(x, dict)))
    for fam in families().values():
        if paths and paths <= set(fam.renames):
            return fam
    raise ModelConfigError("these params belong to no registered family (name LoraConfig.targets explicitly)")
