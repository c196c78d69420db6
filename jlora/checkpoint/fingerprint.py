"""The identity of a base model's weights, which an adapter records so it is never applied to others.

`fingerprint(params)` keeps every tensor's shape and the sha256 of a fixed sample of its elements:
up to SAMPLE per tensor at spread positions that depend only on its shape, rounded to bf16 so fp32
and bf16 loads of one checkpoint agree. Merging an adapter changes every element of the tensors it
adapts, so a merged base is told from its original. It stays cheap at any size: host arrays give
their sample by a strided read, device arrays by one jitted gather whose output is replicated, so
every process of a multi-host run gets the same sample of sharded tensors without gathering them.
`mismatch` compares a saved fingerprint with params; version 1 (norms and embedding rows only, no
version field) is still understood. Where fingerprints are stored is jlora.checkpoint.metadata's concern.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from jlora.quant.quantize import dequantize, is_quantized

VERSION = 2
SAMPLE = 2048  # elements per tensor: 4 KiB of bf16, whatever the model's size
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / phi: j * it mod 2^64 spreads j = 0, 1, ... evenly (a Weyl sequence)


def _v1_part(key: tuple, x):
    """Version 1 hashed small slices only (norms, the first embedding rows), which a merged base shares with its
    original: an embedding's first 8 rows, a layer-stacked norm's first layer, any other norm whole."""
    if key[-1] == "embedding":
        return x[:8]
    return x[0] if key[0] == "layers" else x


def sample_positions(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per-axis indices of the sampled elements: all of a small tensor, else SAMPLE spread over it.
    Integer arithmetic only, so every process and numpy version picks the same ones."""
    size = math.prod(shape)
    if size <= SAMPLE:
        flat = np.arange(size, dtype=np.int64)
    else:
        flat = np.array([((j * _GOLDEN) % (1 << 64)) * size >> 64 for j in range(SAMPLE)], np.int64)
    return np.unravel_index(flat, shape)


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    return NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else sharding


def sampler(leaves: dict[str, jax.Array | jax.ShapeDtypeStruct]) -> Callable:
    """A jitted function of {name: array} -> {name: its sample [n]}, replicated wherever the input lives.
    XLA gathers each device's share of the positions locally and all-reduces only the samples."""
    positions = {k: sample_positions(x.shape) for k, x in leaves.items()}
    out = {k: _replicated(x.sharding) for k, x in leaves.items()}
    return jax.jit(lambda tree: {k: x[positions[k]] for k, x in tree.items()}, out_shardings=out)


def _samples(flat: dict[str, object]) -> dict[str, np.ndarray]:
    """Each tensor's sample as a host array: jax arrays one jit per device set, the rest by numpy indexing."""
    out, groups = {}, {}
    for name, x in flat.items():
        if is_quantized(x):  # one leaf dequantized at a time, only the sample leaves the jit
            out[name] = np.asarray(jax.jit(lambda q, pos=sample_positions(x.shape): dequantize(q)[pos])(x))
        elif isinstance(x, jax.Array) and (isinstance(x.sharding, NamedSharding) or x.sharding.is_fully_replicated):
            groups.setdefault(frozenset(d.id for d in x.sharding.device_set), {})[name] = x
        else:
            out[name] = np.asarray(x[sample_positions(np.shape(x))])  # numpy (memory-mapped or not): a strided read
    for leaves in groups.values():
        out.update(jax.device_get(sampler(leaves)(leaves)))
    return out


def _digest(sample: np.ndarray) -> str:
    """sha256 of a sample: floats rounded to bf16, -0 as 0 and one NaN (a sharded gather sums in zeros)."""
    if np.issubdtype(sample.dtype, np.floating) or sample.dtype == ml_dtypes.bfloat16:
        bits = np.asarray(sample, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
        bits = np.where(bits == 0x8000, 0, np.where(np.isnan(np.asarray(sample, np.float32)), 0x7FC0, bits))
        return hashlib.sha256(bits.astype(np.uint16).tobytes()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest()


def is_fingerprint(x) -> bool:
    return isinstance(x, dict) and x.get("version") == VERSION and "samples" in x


def fingerprint(params, names: Iterable[str] | None = None) -> dict:
    """{version, shapes, samples}: every tensor's shape and the sha256 of its sample (only `names`, if given).
    Params as loaded or the frozen tree, or a fingerprint taken before (e.g. of a base before it was
    quantized to int8 / nf4); every process of a multi-host run must call it together. A quantized
    leaf (jlora.quant.quantize) is sampled dequantized: a GGUF file's blocks give the dense load's fingerprint."""
    if is_fingerprint(params):
        keep = params["samples"].keys() if names is None else set(names)
        return {**params, "samples": {k: v for k, v in params["samples"].items() if k in keep}}
    flat = {".".join(k): v for k, v in sorted(traverse_util.flatten_dict(params).items())}
    picked = flat if names is None else {k: flat[k] for k in sorted(set(names) & flat.keys())}
    return {
        "version": VERSION,
        "shapes": {k: list(np.shape(v) if not is_quantized(v) else v.shape) for k, v in flat.items()},
        "samples": {k: _digest(s) for k, s in sorted(_samples(picked).items())},
    }


def _fingerprint_v1(params, hashed=None) -> dict:
    """Version 1 of `params`, hashing the tensors a saved record names (`hashed`), by default every norm
    scale and the embedding."""
    flat = traverse_util.flatten_dict(params)
    out = {"shapes": {".".join(k): list(np.shape(v)) for k, v in sorted(flat.items())}, "sha256": {}}
    if hashed is None:
        hashed = [
            ".".join(k)
            for k, v in flat.items()
            if k[-1] == "embedding" or (k[-1] == "weight" and np.ndim(v) == 1 + (k[0] == "layers"))
        ]
    for key in (tuple(name.split(".")) for name in hashed):
        if key in flat:
            x = np.asarray(jnp.asarray(_v1_part(key, flat[key]), jnp.bfloat16).view(jnp.uint16))
            out["sha256"][".".join(key)] = hashlib.sha256(x.tobytes()).hexdigest()
    return out


def mismatch(saved: dict, params) -> list[tuple[str, str]]:
    """[(tensor name, "shape" or "sample")] of the tensors that differ from `saved`, comparing only
    the tensors both sides have (a frozen tree lacks what train_extra trains in full); [] if none."""
    if saved.get("version", 1) == 1:
        mine, kinds = _fingerprint_v1(params, saved.get("sha256", {})), {"shapes": "shape", "sha256": "sample"}
    else:
        have = (
            params["samples"] if is_fingerprint(params) else {".".join(k) for k in traverse_util.flatten_dict(params)}
        )
        shared = set(saved["samples"]) & set(have)
        mine, kinds = fingerprint(params, shared), {"shapes": "shape", "samples": "sample"}
    bad = []
    for field, kind in kinds.items():
        bad += [
            (k, kind) for k in sorted(saved[field].keys() & mine[field].keys()) if saved[field][k] != mine[field][k]
        ]
    return bad
