"""Checkpoint tensors -> jlora params, whatever the format: the disk names and shapes each param expects
(`expected_tensors`, through the family's weight table), the checks every tensor read passes (present, its
shape, finite values), and `assemble`, which fills the params from a reader's `fetch(name)`: stacking layers,
packing as they are read, or placing each leaf as soon as it is whole. The readers of HF checkpoints
(jlora.formats.weights) and of GGUF files (jlora.formats.gguf_weights) and the sharded loader
(jlora.formats.weights_on_device) share it; each reports a problem as one `WeightsError` line naming the file.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import numpy as np
from flax import traverse_util

from jlora.errors import JloraError
from jlora.formats.tensor_values import value_problem
from jlora.models.config import ModelConfig
from jlora.models.family import family_of, param_shapes
from jlora.models.layers import DTYPES
from jlora.quant import gguf_blocks
from jlora.quant.packing import LeafPacker, Packing
from jlora.quant.quantize import QuantizedKernel, dequantize, is_quantized


class WeightsError(JloraError, ValueError):
    """A checkpoint that cannot be loaded or written; the message is one line naming the file."""

    def __init__(self, file: str | pathlib.Path, problem: object):
        super().__init__(f"{file}: {' '.join(str(problem).split())}")  # always one line


# on_dense(param key, the leaf's dense shape, layer index or None, dense array): each dense piece (one layer
# of a stacked leaf, or the whole leaf: None) of a leaf that is packed as it loads, before it is packed
OnDense = Callable[[tuple, tuple, "int | None", object], None]
# place(leaf) -> what the params hold instead: a whole leaf (array or QuantizedKernel) as soon as it is read
Place = Callable[[object], object]


def to_disk(key: tuple[str, ...], x):
    """A leaf of param `key` (or a per-dim tuple such as a block index) in disk layout: kernels transposed.
    The transpose is its own inverse, so this also maps disk layout back to jlora's."""
    if key[-1] != "kernel":
        return x
    return x[::-1] if isinstance(x, tuple) else x.T


def expected_tensors(cfg: ModelConfig, fmt: int):
    """Yield (param key, ShapeDtypeStruct, disk names, disk shape of one name) for every param of `cfg`.

    `fmt` picks the HF (0) or GGUF (1) name in the family's weight table. A layer-stacked leaf [L, ...] has L names,
    one per layer; any other leaf has one. Disk shapes are per name, kernels transposed ([out, in]).
    """
    renames = family_of(cfg).renames
    for key, spec in traverse_util.flatten_dict(param_shapes(cfg)).items():
        pattern = renames[key][fmt]
        stacked = "{i}" in pattern
        names = [pattern.format(i=i) for i in range(cfg.num_hidden_layers)] if stacked else [pattern]
        want = to_disk(key, np.empty(spec.shape[1:] if stacked else spec.shape, bool)).shape
        yield key, spec, names, want


def check_present(file: str | pathlib.Path, name: str, names, want: tuple[int, ...]) -> None:
    if name not in names:
        raise WeightsError(file, f"tensor {name} is missing (expected shape {want})")


def check_shape(file: str | pathlib.Path, name: str, shape, want: tuple[int, ...]) -> None:
    if tuple(shape) != want:
        raise WeightsError(file, f"tensor {name} has shape {tuple(shape)}, expected {want}")


def check_finite(file: str | pathlib.Path, name: str, x: np.ndarray | QuantizedKernel) -> None:
    """WeightsError naming tensor `name` unless every value of `x` is finite. A QuantizedKernel (GGUF blocks)
    is checked by its float fields, the fp16 block scales: its integer quants times finite scales are finite."""
    for part in x.fields.values() if is_quantized(x) else [x]:
        problem = value_problem(part)
        if problem:
            raise WeightsError(file, f"tensor {name} has {problem}: corrupt weights")


_dequantize_jit = jax.jit(dequantize, static_argnums=1)  # one compiled decode, not an eager op per step


def assemble(
    cfg: ModelConfig,
    file: pathlib.Path,
    names: set[str],
    fetch: Callable[[str], np.ndarray | QuantizedKernel],
    fmt: int,
    packing: Packing | None = None,
    on_dense: OnDense | None = None,
    place: Place | None = None,
) -> tuple[dict, set[str]]:
    """Fill every param of `cfg` from `fetch(name)` (a disk-layout array), checking names and shapes; `place`
    (see jlora.formats.weights.read_pretrained) takes each leaf once it is whole.

    Layers go straight into a preallocated stacked array, so the peak is one checkpoint-sized copy, not two.
    With `packing`, a leaf it packs is packed layer by layer instead (jlora.quant.packing.LeafPacker), each
    layer dropped once packed. `fetch` may instead give a QuantizedKernel (jlora layout, GGUF blocks): a param's
    layers are stacked into one kernel, also where they mix block types (llama.cpp's Q4_K_M gives some layers
    Q6_K; see gguf_blocks.stack_kernels); one whose layers mix blocks and dense tensors is dequantized into the
    dense array.
    """
    pdt = np.dtype(DTYPES[cfg.param_dtype])
    used, flat = set(), {}
    for key, spec, layer_names, want in expected_tensors(cfg, fmt):
        stacked = len(spec.shape) > len(want)
        encode = packing.encoder(key, spec) if packing else None
        if encode is not None:
            packer = LeafPacker(encode, jax.ShapeDtypeStruct(spec.shape, pdt), stacked)
            for i, name in enumerate(layer_names):
                check_present(file, name, names, want)
                arr = fetch(name)
                check_shape(file, name, arr.shape, want)
                w = np.asarray(to_disk(key, arr), pdt)  # [M, N]: one layer, in jlora layout
                if on_dense is not None:
                    on_dense(key, spec.shape, i if stacked else None, w)
                packer.add(i if stacked else None, w)
                used.add(name)
                del arr, w  # before the next layer is read
            flat[key] = place(packer.result()) if place else packer.result()
            continue
        out, held = None, {}
        for i, name in enumerate(layer_names):
            check_present(file, name, names, want)
            arr = fetch(name)
            if is_quantized(arr):
                check_shape(file, name, to_disk(key, arr.shape), want)
                held[i] = arr
            else:
                check_shape(file, name, arr.shape, want)
                out = np.empty(spec.shape, pdt) if out is None else out
                out[i if stacked else ...] = to_disk(key, arr)
            used.add(name)
        if held and out is None:
            whole = gguf_blocks.stack_kernels(list(held.values())) if stacked else held[0]
            if whole is not None:
                flat[key] = place(whole) if place else whole
                continue
        out = np.empty(spec.shape, pdt) if out is None else out
        for i, q in held.items():
            out[i if stacked else ...] = np.asarray(_dequantize_jit(q, pdt))
        flat[key] = place(out) if place else out
        del out
    return traverse_util.unflatten_dict(flat), names - used


def refuse_extra(path: pathlib.Path, extra: set[str]) -> None:
    if extra:
        raise WeightsError(path, f"unexpected tensor {sorted(extra)[0]} ({len(extra)} unknown in all)")
