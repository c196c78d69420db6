"""Quantizing a base on its way in: each leaf is packed as it is read, so the dense base never exists whole.

`Packing` says which leaves of a params tree are packed and how (int8 / nf4, as `quantize` would).
`LeafPacker` fills one packed leaf from its dense pieces: a stacked leaf [L, M, N] one layer at a time
into preallocated fields, any other leaf whole. Its fields are host numpy arrays, or, given the packed
leaf's NamedShardings, device arrays placed by them, each layer written in place (the fields are donated).
Either way the packed values are bit for bit those of `quantize(dense)`: every format encodes each
layer on its own. Reading the pieces and placing them is the loaders' concern (jlora.formats.weights*).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant.quantize import LeafEncoder, QuantizedKernel, check_method, leaf_encoder, quantize


@dataclasses.dataclass(frozen=True)
class Packing:
    """What `quantize(params, method, double_quant=..., skip=...)` would pack, for a loader to pack as it reads.

    `skip(dotted_path)` keeps a leaf dense (e.g. one trained in full)."""

    method: str
    double_quant: bool = False
    skip: Callable[[str], bool] | None = None

    def __post_init__(self):
        check_method(self.method)

    def shapes(self, shapes):
        """The tree of ShapeDtypeStructs `shapes` as packed: QuantizedKernels of ShapeDtypeStructs where packed."""
        return quantize(shapes, self.method, double_quant=self.double_quant, skip=self.skip)

    def encoder(self, path: tuple, spec: jax.ShapeDtypeStruct) -> LeafEncoder | None:
        """`w -> QuantizedKernel` for the leaf at `path` (also for one layer of it), or None where it stays dense."""
        if self.skip is not None and self.skip(".".join(map(str, path))):
            return None
        return leaf_encoder(path, spec, self.method, double_quant=self.double_quant)


class LeafPacker:
    """One packed leaf (dense shape `spec`), filled by `add(index, w)`: with `stacked`, `w` is layer `index` (of
    the leading dim) of a stacked leaf [L, M, N]; else `w` is the whole leaf and index None. `result()` gives the
    QuantizedKernel.

    With `shardings` (a QuantizedKernel of NamedShardings, the packed leaf's placement) the fields live on the
    devices and `w` is a jax.Array there; each layer is encoded on the devices and written into the fields in
    place. Without, the fields are host numpy arrays and `w` a host array, encoded on the default device."""

    def __init__(
        self,
        encode: LeafEncoder,
        spec: jax.ShapeDtypeStruct,
        stacked: bool,
        shardings: QuantizedKernel | None = None,
    ):
        self.packed = jax.eval_shape(encode, spec)  # QuantizedKernel of ShapeDtypeStructs
        self.encode, self.stacked, self.shardings = encode, stacked, shardings
        self.fields = None
        if stacked and shardings is None:
            self.fields = {k: np.empty(s.shape, s.dtype) for k, s in self.packed.fields.items()}
        elif stacked:
            self.fields = {
                k: jnp.zeros(s.shape, s.dtype, device=shardings.fields[k]) for k, s in self.packed.fields.items()
            }

    def add(self, index: int | None, w) -> None:
        if (index is None) == self.stacked:
            raise ValueError(f"LeafPacker.add: index {index} for a {'stacked' if self.stacked else 'whole'} leaf")
        if self.shardings is None:
            fields = {k: np.asarray(f) for k, f in _encoder(self.encode)(w).items()}
            if not self.stacked:
                self.fields = fields
            for k, f in fields.items() if self.stacked else ():
                self.fields[k][index] = f
        elif self.stacked:
            self.fields = _layer_writer(self.encode, _items(self.shardings.fields))(self.fields, index, w)
        else:
            self.fields = _encoder(self.encode, _items(self.shardings.fields))(w)

    def result(self) -> QuantizedKernel:
        return self.packed.replace(fields=self.fields)


def _items(shardings: dict) -> tuple:
    return tuple(sorted(shardings.items()))  # hashable, for the caches below


# Each compiled once per encoder, shapes and placement: equal encoders (like leaves) share them.
@functools.lru_cache(maxsize=64)
def _encoder(encode: LeafEncoder, out: tuple = ()) -> Callable:
    """jit of w -> encode(w)'s fields, each placed by `out` ((field, sharding), ...) if given."""
    return jax.jit(lambda w: encode(w).fields, out_shardings=dict(out) if out else None)


@functools.lru_cache(maxsize=64)
def _layer_writer(encode: LeafEncoder, out: tuple) -> Callable:
    """jit of (fields [L, ...], index, w) -> fields with layer `index` set to encode(w)'s, in place (donated)."""

    def put(fields: dict, index: jax.Array, w: jax.Array) -> dict:
        layer = encode(w).fields
        return {k: f.at[index].set(layer[k]) for k, f in fields.items()}

    return jax.jit(put, donate_argnums=0, out_shardings=dict(out))
