"""What a run builds from its config before the step: the tokenizer, the base model and the method.

Shared by the training loop (jlora.train.loop) and `--plan` (jlora.train.plan), which compiles the same
step without running it; neither imports the other. A QLoRA base (int8 / nf4) of a checkpoint is packed
as it loads (`packing_keywords`); `DenseFingerprint` samples its dense values on the way, for the adapter.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.checkpoint.fingerprint import fingerprint, sample_positions
from jlora.formats.weights import OnDense, read_pretrained, resolve_model_path
from jlora.formats.weights_on_device import load_pretrained_sharded
from jlora.models.config import ModelConfig
from jlora.models.family import family_of, presets
from jlora.parallel.sharding import param_specs
from jlora.peft.llama_adapter import AdapterConfig, check_attention
from jlora.peft.lora import LoraConfig
from jlora.peft.routing import LoraPair
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


def load_base(
    run: RunConfig, tok, mesh: Mesh | None = None, on_dense: OnDense | None = None
) -> tuple[ModelConfig, Any]:
    """(config, params) of the base model, or (config, None) for a random preset ("tiny"). With a
    `mesh`, an HF checkpoint is read per host straight onto it (each process reads only its share);
    otherwise params are host numpy arrays. QLoRA's base is packed as it loads (see `packing_keywords`);
    `on_dense` sees each dense piece of it first (jlora.formats.weights.OnDense)."""
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

    packing = packing_keywords(run)
    if mesh is None or m.quantize == "gguf":  # a GGUF file's blocks are placed by init_state like host arrays
        kept = {"quantize": "gguf"} if m.quantize == "gguf" else packing
        cfg, params = read_pretrained(m.path, dtype=m.dtype, param_dtype=m.param_dtype, **kept, on_dense=on_dense)
    else:  # placed by the same specs init_state uses, so it keeps these arrays as they are
        cfg, params = load_pretrained_sharded(
            m.path,
            mesh,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
            specs_fn=lambda s: param_specs(s, mesh, run.mesh.allow_replication),
            **packing,
            on_dense=on_dense,
        )
    return check_context(run, cfg.replace(**overrides)), params


def packing_keywords(run: RunConfig) -> dict[str, Any]:
    """The loaders' quantize keywords for a base packed as it loads ({} for one loaded as stored): QLoRA (int8 /
    nf4), unless the LoRA init is PiSSA, whose split rewrites the dense kernels (that base is packed after the
    split, jlora.train.step.quantize_frozen). A leaf `lora.train_extra` matches stays dense: it is trained in full."""
    m = run.model
    lora = run.lora if run.method == "lora" else None
    if m.quantize not in ("int8", "nf4") or (lora is not None and lora.init == "pissa"):
        return {}
    extra = lora.train_extra if lora is not None else None
    skip = (lambda name: re.search(extra, name) is not None) if extra else None
    return {"quantize": m.quantize, "double_quant": m.double_quant, "skip": skip}


class DenseFingerprint:
    """The fingerprint (jlora.checkpoint.fingerprint) of a base that was packed as it loaded, taken from its dense
    pieces as they passed: pass it as load_base's `on_dense`. A QLoRA adapter records the dense base it applies to,
    though that base never existed whole. True once it has seen a piece, i.e. the base arrived packed.

    Each piece gives the elements of the fingerprint's sample that fall in it: a fixed-size gather (one compile
    per leaf shape) whose output is replicated, so every process of a multi-host run gets the same sample."""

    def __init__(self):
        self.samples: dict[str, np.ndarray] = {}  # dotted name -> the leaf's sample, filled piece by piece

    def __bool__(self) -> bool:
        return bool(self.samples)

    def __call__(self, key: tuple, shape: tuple, layer: int | None, piece) -> None:
        positions = sample_positions(tuple(shape))
        values = _gather(piece, positions if layer is None else positions[1:])
        sample = self.samples.setdefault(".".join(key), np.empty(len(positions[0]), values.dtype))
        if layer is None:
            sample[:] = values
        else:
            sample[positions[0] == layer] = values[positions[0] == layer]

    def fingerprint(self, frozen) -> dict:
        """fingerprint(frozen) as of its dense values: a packed leaf by the sample of its dense pieces."""
        flat = traverse_util.flatten_dict(frozen)
        sampled = {
            k: _Sampled(v.shape, self.samples[".".join(k)]) for k, v in flat.items() if ".".join(k) in self.samples
        }
        return fingerprint(traverse_util.unflatten_dict({**flat, **sampled}))


def _gather(piece, index: tuple[np.ndarray, ...]) -> np.ndarray:
    """piece[index] on the host: a jax.Array by a jitted gather replicated over its devices."""
    if not isinstance(piece, jax.Array):
        return np.asarray(piece[index])
    out = NamedSharding(piece.sharding.mesh, PartitionSpec()) if isinstance(piece.sharding, NamedSharding) else None
    return np.asarray(_take(out)(piece, *index))


@functools.cache
def _take(out: NamedSharding | None):
    return jax.jit(lambda x, *index: x[index], out_shardings=out)


class _Sampled:
    """A leaf known by its fingerprint sample alone: what `fingerprint` reads of a host array,
    x[sample_positions(x.shape)], and nothing else."""

    def __init__(self, shape: tuple, sample: np.ndarray):
        self.shape, self.sample = tuple(shape), sample

    def __getitem__(self, index):
        if not all(np.array_equal(a, b) for a, b in zip(index, sample_positions(self.shape), strict=True)):
            raise IndexError("a sampled leaf gives its fingerprint sample only")
        return self.sample


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


def start_from_adapter(path: str, trainable, base: ModelConfig, method, base_fingerprint) -> tuple[Any, Any]:
    """(trainable, reference): the adapter in `path` (run.init_adapter) laid out as the fresh `trainable` it
    replaces (same leaves, dtypes and shardings), and a second copy of it that training does not touch (the
    preference reference: the model the run starts from). A jlora adapter must be one for this base
    (`base_fingerprint`, as the run's checkpoints are checked) with the run's `method` settings; an HF PEFT
    one (adapter_config.json) must fit the base's shapes. Either must adapt what the run adapts, with its
    ranks, scales and DoRA magnitudes (`layout_problem`); else AdapterError, one line naming `path`."""
    from jlora.checkpoint.adapter import AdapterError, load_any_adapter

    _, loaded = load_any_adapter(path, base, base_fingerprint, expect=method)
    problem = layout_problem(trainable, loaded)
    if problem:
        raise AdapterError(f"{path}: {problem}")
    fresh, treedef = jax.tree.flatten(trainable)
    leaves = jax.tree.leaves(loaded)
    placed = treedef.unflatten([jax.device_put(x.astype(f.dtype), f.sharding) for f, x in zip(fresh, leaves)])
    # computed copies: a device_put may hand the same buffer to both trees, and the step donates the trainable one
    return placed, jax.tree.map(jnp.copy, placed)


def layout_problem(trainable, adapter) -> str | None:
    """What keeps `adapter` from standing in for the fresh `trainable` tree, in a few words naming the first
    param that differs (adapted or not, rank, scale, DoRA magnitude, shape), or None. Dropout and dtypes may
    differ: they are the run's to choose."""
    is_pair = lambda _, x: isinstance(x, LoraPair)
    want, got = (traverse_util.flatten_dict(t, is_leaf=is_pair) for t in (trainable, adapter))
    for key in sorted(want.keys() | got.keys()):
        name, mine, theirs = "/".join(key), want.get(key), got.get(key)
        if theirs is None:
            return f"it does not adapt {name}, which this run adapts (lora.targets / layers)"
        if mine is None:
            return f"it adapts {name}, which this run does not (lora.targets / layers)"
        if isinstance(mine, LoraPair) != isinstance(theirs, LoraPair):
            return f"{name} is a LoRA pair in one of the adapter and this run, a trained array in the other"
        if isinstance(mine, LoraPair):
            if theirs.rank != mine.rank:
                return f"{name} has rank {theirs.rank}, this run's is {mine.rank} (lora.rank / rank_pattern)"
            if (theirs.magnitude is None) != (mine.magnitude is None):
                return f"{name} {'has' if theirs.magnitude is not None else 'lacks'} a DoRA magnitude (lora.use_dora)"
            if not np.allclose(theirs.scale_array(), mine.scale_array(), rtol=1e-6, atol=0):
                return (
                    f"{name} has scale {_scales(theirs)}, this run's is {_scales(mine)} "
                    "(lora.alpha / alpha_pattern / use_rslora)"
                )
            if theirs.layout != mine.layout:
                return f"{name} is laid out as {theirs.layout}, this run as {mine.layout}"
        shapes = [tuple(x.shape) for x in jax.tree.leaves(theirs)], [tuple(x.shape) for x in jax.tree.leaves(mine)]
        if shapes[0] != shapes[1]:
            return f"{name} has shapes {shapes[0]}, this run's are {shapes[1]}"
    return None


def _scales(pair: LoraPair) -> str:
    values = sorted({round(float(v), 6) for v in np.ravel(pair.scale_array())})
    return f"{values[0]:g}" if len(values) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"
