"""Loading a model onto devices: `load_pretrained` (the default device, or a mesh) and `load_pretrained_sharded`.

`load_pretrained` without a mesh reads the checkpoint (jlora.formats.weights.read_pretrained) and moves each
leaf to the default device as soon as it is whole, so the host holds one leaf beside the placed model, never a
second copy; a jitted step then reads the frozen tree where it lies instead of copying it in at every call.

`load_pretrained_sharded` never assembles the model in host RAM. For each param and each of its own devices, a
process reads only that device's block of the on-disk tensors (`safe_open(...).get_slice`), one layer at a
time, transposes it to jlora's layout and places it on the device. A process's peak host memory is therefore
its share of the model (on CPU, where device buffers are host memory) plus one block and a 16 MiB window of
the file. With quantize int8 / nf4 a leaf is placed one layer at a time (a stacked leaf) or whole, packed on
the devices and freed before the next is read, so the model is its packed share plus one dense tensor's.
Checkpoint discovery, name and shape checks and their one-line errors are jlora.formats.weights' and
jlora.formats.param_assembly's, and so is the check that every value read is finite; placement follows
`sharding.param_specs`. GGUF files (small models) are loaded whole and then sliced.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.formats.param_assembly import OnDense, check_finite, check_present, check_shape, expected_tensors, to_disk
from jlora.formats.weights import (
    TensorFiles,
    check_leftovers,
    dtype_overrides,
    hf_checkpoint,
    hf_embed_name,
    hf_head_name,
    open_safetensors,
    packing_for,
    read_error,
    read_pretrained,
    resolve_model_path,
)
from jlora.models.config import ModelConfig
from jlora.models.family import param_shapes
from jlora.models.layers import DTYPES
from jlora.parallel.sharding import param_specs, to_shardings
from jlora.quant.packing import LeafPacker
from jlora.quant.quantize import LeafEncoder, QuantizedKernel

Index = tuple[slice, ...]  # one device's block of a global array, as jax.sharding hands it out
_READ_SPAN = 16 << 20  # bytes of a file mapped at once by one read


def load_pretrained(
    path: str | pathlib.Path,
    *,
    mesh: Mesh | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    quantize: str = "none",
    double_quant: bool = False,
    skip: Callable[[str], bool] | None = None,
    on_dense: OnDense | None = None,
) -> tuple[ModelConfig, dict]:
    """Load an HF checkpoint directory, a .gguf file or an alias (see resolve_model_path) as (config, params),
    params as jax.Arrays: on the default device, or with `mesh` sharded by `param_specs` (load_pretrained_sharded).

    Keywords as jlora.formats.weights.read_pretrained's (which returns the same params as host numpy arrays,
    for converters and tools that never run the model). Without a mesh each leaf is placed as soon as it is
    read, so the peak is the placed model plus one leaf, never two copies.
    """
    overrides = dtype_overrides("load_pretrained", dtype, param_dtype)
    kept = {"quantize": quantize, "double_quant": double_quant, "skip": skip}
    packing_for("load_pretrained", quantize, double_quant, skip)  # checked here, so errors name this function
    if mesh is not None:
        return load_pretrained_sharded(path, mesh, **overrides, **kept, on_dense=on_dense)
    return read_pretrained(path, **overrides, **kept, on_dense=on_dense, place=jax.device_put)


def load_pretrained_sharded(
    path: str | pathlib.Path,
    mesh: Mesh,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    specs_fn: Callable[[dict], dict] | None = None,
    quantize: str = "none",
    double_quant: bool = False,
    skip: Callable[[str], bool] | None = None,
    on_dense: OnDense | None = None,
) -> tuple[ModelConfig, dict]:
    """Like `read_pretrained`, but params come back as jax.Arrays already placed on `mesh`.

    `specs_fn(shapes)` maps the ShapeDtypeStruct tree to PartitionSpecs (default
    `param_specs(shapes, mesh)`), packed leaves included. On several hosts every process calls this; each
    reads only the blocks its addressable devices hold. A tied checkpoint that also stores its head is checked
    cheaply: three rows (first, middle, last) must equal the embedding's, not the whole matrix.

    `quantize`, `double_quant`, `skip`: as read_pretrained's. With "int8" / "nf4" each leaf it packs is placed
    dense one layer at a time (a stacked leaf whose layer dim is not split) or whole, packed on the devices
    into fields placed by `specs_fn`, and freed before the next is read: the values are
    jlora.quant.quantize.quantize's bit for bit. `on_dense` sees each dense piece first (see OnDense).
    """
    path = pathlib.Path(resolve_model_path(path))
    overrides = dtype_overrides("load_pretrained_sharded", dtype, param_dtype)
    packing = packing_for("load_pretrained_sharded", quantize, double_quant, skip)
    specs_fn = specs_fn or (lambda shapes: param_specs(shapes, mesh))
    if not path.is_dir():  # GGUF: small models; read_pretrained also refuses other files, and packs as it reads
        kept = {"quantize": quantize, "double_quant": double_quant, "skip": skip} if quantize != "none" else {}
        cfg, params = read_pretrained(path, **overrides, **kept, on_dense=on_dense)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        shardings = to_shardings(mesh, specs_fn(shapes))
        return cfg, jax.tree.map(lambda x, sh: _place(x.shape, sh, x.__getitem__), params, shardings)

    cfg, where = hf_checkpoint(path, overrides)
    disk_shapes = {}
    for file in sorted(set(where.values())):
        with open_safetensors(file) as f:  # headers only
            disk_shapes.update(
                {n: tuple(f.get_slice(where.disk_name(n)).get_shape()) for n, at in where.items() if at == file}
            )
    pdt = np.dtype(DTYPES[cfg.param_dtype])
    expected = list(expected_tensors(cfg, 0))
    for _, _, names, want in expected:  # every name and shape is checked before any data is read
        for name in names:
            check_present(path, name, where, want)
            check_shape(path, name, disk_shapes[name], want)

    def head_is_embedding() -> bool:
        rows = np.empty((2, 1, cfg.hidden_size), pdt)  # [head/embedding, 1, D]
        for row in sorted({0, cfg.vocab_size // 2, cfg.vocab_size - 1}):
            for dest, n in zip(rows, (hf_head_name(cfg), hf_embed_name(cfg))):
                _read_into(dest, where[n], where.disk_name(n), (slice(row, row + 1), slice(None)), disk_shapes[n])
            if not np.array_equal(rows[0], rows[1]):
                return False
        return True

    check_leftovers(cfg, path, where, set(where).difference(*(names for _, _, names, _ in expected)), head_is_embedding)
    shapes = param_shapes(cfg)
    shardings = traverse_util.flatten_dict(to_shardings(mesh, specs_fn(shapes)))
    packed = None
    if packing is not None:  # the packed leaves' placement, from their packed shapes
        packed = traverse_util.flatten_dict(to_shardings(mesh, specs_fn(packing.shapes(shapes))))
    flat = {}
    for key, spec, names, want in expected:
        read = _block_reader(key, spec.shape, names, where, want, pdt)
        encode = packing.encoder(key, spec) if packing else None
        if encode is None:
            flat[key] = _place(spec.shape, shardings[key], read)
        else:
            stacked = len(spec.shape) > len(want)
            flat[key] = _pack(
                key, jax.ShapeDtypeStruct(spec.shape, pdt), stacked, encode, shardings[key], packed[key], read, on_dense
            )
    return cfg, traverse_util.unflatten_dict(flat)


def _pack(
    key: tuple[str, ...],
    spec: jax.ShapeDtypeStruct,
    stacked: bool,
    encode: LeafEncoder,
    sharding: NamedSharding,
    packed: QuantizedKernel,
    read: Callable[[Index], np.ndarray],
    on_dense: OnDense | None,
):
    """Param `key` packed on the devices from dense blocks `read(index)` placed by `sharding`: one layer at a
    time for a `stacked` leaf whose layer dim is not split, else whole; each piece is freed once packed."""
    spec_dims = tuple(sharding.spec) + (None,) * (len(spec.shape) - len(sharding.spec))
    by_layer = stacked and spec_dims[0] is None
    packer = LeafPacker(encode, spec, by_layer, packed)
    if not by_layer:
        pieces = [(None, spec.shape, sharding, read)]
    else:
        layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec_dims[1:]))
        pieces = [
            (i, spec.shape[1:], layer_sharding, lambda index, i=i: read((slice(i, i + 1), *index))[0])
            for i in range(spec.shape[0])
        ]
    for index, shape, piece_sharding, read_piece in pieces:
        dense = _place(shape, piece_sharding, read_piece)
        if on_dense is not None:
            on_dense(key, spec.shape, index, dense)
        packer.add(index, dense)
        dense.delete()  # before the next piece is read
    return packer.result()


def _place(shape: tuple[int, ...], sharding: NamedSharding, read: Callable[[Index], np.ndarray]) -> jax.Array:
    """A global array whose local blocks come from `read(index)`, each put on its device before the next is read.

    Not `jax.make_array_from_callback`: that reads every local device's block of a leaf before placing
    any. On a GPU/TPU host those blocks are host staging, so its host peak would be the process's share
    of the largest leaf (GBs for 70B) rather than one block. On CPU the two are alike: blocks become
    the device buffers (see _aligned_empty).
    """
    groups: dict[tuple, tuple[Index, list]] = {}  # replicas (e.g. over 'data') share one read
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        groups.setdefault(tuple((s.start, s.stop, s.step) for s in index), (index, []))[1].append(device)
    arrays = []
    for index, devices in groups.values():
        block = read(index)
        arrays += [jax.device_put(block, d) for d in devices]
        del block  # before the next read, so at most one host block is alive
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _block_reader(
    key: tuple[str, ...],
    shape: tuple[int, ...],
    names: list[str],
    where: TensorFiles,
    want: tuple[int, ...],
    pdt: np.dtype,
) -> Callable[[Index], np.ndarray]:
    """`read(index)`: block `index` of param `key` (global `shape`), in jlora layout and `pdt`.

    A layer-stacked leaf (one tensor per layer, each of disk shape `want`; [L, in, out] for kernels) is
    read layer by layer: each layer's [out, in] sub-block lands transposed in an [l, in, out] block."""
    stacked = len(shape) > len(want)

    def read(index: Index) -> np.ndarray:
        out = _aligned_empty(tuple(len(range(n)[s]) for n, s in zip(shape, index)), pdt)  # e.g. [l, in, out]
        layers = range(len(names))[index[0]] if stacked else range(1)
        disk_index = to_disk(key, index[1:] if stacked else index)  # kernels are [out, in] on disk
        for j, i in enumerate(layers):  # a leaf that is not stacked is a stack of one
            layer = (out if stacked else out[None])[j]
            dest = to_disk(key, layer)  # a disk-layout view into `out`
            _read_into(dest, where[names[i]], where.disk_name(names[i]), disk_index, want)
            check_finite(where[names[i]], names[i], layer)  # this process's block: each block is checked once
        return out

    return read


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty, 64-byte aligned: the CPU backend then adopts the buffer in device_put instead of copying
    it, so a process's share is not held twice (copies also leave freed blocks behind in malloc)."""
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size].view(dtype).reshape(shape)


def _read_into(dest: np.ndarray, file: pathlib.Path, name: str, index: Index, disk_shape: tuple[int, ...]) -> None:
    """Fill `dest` with block `index` of an on-disk tensor, cast to dest's dtype, in row chunks.

    safetensors maps the file, and every page a block touches (all of them, for a range of columns)
    stays in this process's RSS until the handle closes; so each chunk of at most _READ_SPAN bytes of
    the file opens it anew, and a huge tensor (a 128k-token embedding) never sits there whole."""
    from safetensors import SafetensorError

    rows = range(disk_shape[0])[index[0]]
    step = max(1, _READ_SPAN // (4 * int(np.prod(disk_shape[1:], dtype=np.int64))))  # 4: fp32, the widest
    for r in range(0, len(rows), step):
        chunk = rows[r : r + step]
        with open_safetensors(file) as f:
            try:
                dest[r : r + len(chunk)] = f.get_slice(name)[(slice(chunk.start, chunk.stop), *index[1:])]
            except SafetensorError as e:
                raise read_error(file, name, e) from None
