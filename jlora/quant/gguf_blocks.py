"""GGUF's own block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) as jlora.quant.quantize Formats.

A GGUF tensor's blocks are kept as they are in the file, only split into their parts (fp16 scales,
packed quants) so that each part is an array laid out [*stack, A, B, ...] like any QuantizedKernel
field. Nothing is dequantized at load: each format's JAX `decode` reproduces gguf-py's
`gguf.quants.dequantize` bit for bit (same fp32 op order), inside the jitted step at the matmul.
Every product there (fp16 scale x small integer, then x quant) is exact in fp32, so at most the
final `+ m` / `- dmin * m` rounds: a backend that fuses it into an FMA gives the same bits.
A param whose layers mix block types (llama.cpp's Q4_K_M) is one kernel too, see `stack_kernels`.
Reading the file and the llama tensor names belong to jlora.formats.weights; this module knows only blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant.quantize import FORMATS, Format, QuantizedKernel, QuantizeError, register

QK_K = 256  # super-block size of the K-quants

# Per format: the block's parts in file order as (field, dtype, count); count 0 means one scalar.
# Every layout is llama.cpp's block_q* struct (ggml-common.h), as gguf-py's dequantize_blocks reads it.
LAYOUTS: dict[str, tuple[int, list[tuple[str, str, int]]]] = {
    "Q4_0": (32, [("d", "float16", 0), ("qs", "uint8", 16)]),
    "Q4_1": (32, [("d", "float16", 0), ("m", "float16", 0), ("qs", "uint8", 16)]),
    "Q5_0": (32, [("d", "float16", 0), ("qh", "uint8", 4), ("qs", "uint8", 16)]),
    "Q5_1": (32, [("d", "float16", 0), ("m", "float16", 0), ("qh", "uint8", 4), ("qs", "uint8", 16)]),
    "Q8_0": (32, [("d", "float16", 0), ("qs", "int8", 32)]),
    "Q4_K": (QK_K, [("d", "float16", 0), ("dmin", "float16", 0), ("scales", "uint8", 12), ("qs", "uint8", 128)]),
    "Q5_K": (
        QK_K,
        [("d", "float16", 0), ("dmin", "float16", 0), ("scales", "uint8", 12), ("qh", "uint8", 32)]
        + [("qs", "uint8", 128)],
    ),
    "Q6_K": (QK_K, [("ql", "uint8", 128), ("qh", "uint8", 64), ("scales", "int8", 16), ("d", "float16", 0)]),
}


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _nibbles(qs: jax.Array, groups: int) -> jax.Array:
    """qs [..., groups * n] uint8 -> [..., groups, 2, n]: per group of n bytes, low nibbles then high."""
    qs = jnp.asarray(qs).reshape(*qs.shape[:-1], groups, 1, qs.shape[-1] // groups)
    return jnp.concatenate([qs & 15, qs >> 4], axis=-2)


def _decode_q4_0(f: dict) -> jax.Array:
    q = _nibbles(f["qs"], 1).reshape(*f["qs"].shape[:-1], 32)  # [..., 32]
    return _f32(f["d"])[..., None] * (q.astype(jnp.int8) - 8).astype(jnp.float32)


def _decode_q4_1(f: dict) -> jax.Array:
    q = _nibbles(f["qs"], 1).reshape(*f["qs"].shape[:-1], 32)  # [..., 32]
    return _f32(f["d"])[..., None] * q.astype(jnp.float32) + _f32(f["m"])[..., None]


def _fifth_bits(qh: jax.Array) -> jax.Array:
    """Q5_0 / Q5_1's qh [..., 4] uint8 (one little-endian uint32) -> [..., 32]: bit j of it is value j's bit 4."""
    qh = jnp.asarray(qh)[..., None] >> jnp.arange(8, dtype=jnp.uint8)  # [..., 4, 8]
    return (qh & 1).reshape(*qh.shape[:-2], 32)


def _q5_values(f: dict) -> jax.Array:
    """The 5-bit values 0..31 of a Q5_0 / Q5_1 block: [..., 32] uint8."""
    ql = _nibbles(f["qs"], 1).reshape(*f["qs"].shape[:-1], 32)
    return ql | (_fifth_bits(f["qh"]) << 4)


def _decode_q5_0(f: dict) -> jax.Array:
    q = (_q5_values(f).astype(jnp.int8) - 16).astype(jnp.float32)  # [..., 32]
    return _f32(f["d"])[..., None] * q


def _decode_q5_1(f: dict) -> jax.Array:
    q = _q5_values(f).astype(jnp.float32)  # [..., 32]
    return _f32(f["d"])[..., None] * q + _f32(f["m"])[..., None]


def _decode_q8_0(f: dict) -> jax.Array:
    return _f32(f["qs"]) * _f32(f["d"])[..., None]  # [..., 32]


def _q4_k_scale_min(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 8 six-bit scales and mins packed in 12 bytes (gguf-py's Q4_K.get_scale_min): [..., 8] each."""
    s = jnp.asarray(scales)
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _decode_q4_k(f: dict) -> jax.Array:
    lead = f["qs"].shape[:-1]
    sc, mn = _q4_k_scale_min(f["scales"])
    d = _f32(f["d"])[..., None] * sc.astype(jnp.float32)  # [..., 8]
    dm = _f32(f["dmin"])[..., None] * mn.astype(jnp.float32)  # [..., 8]
    q = _nibbles(f["qs"], 4).reshape(*lead, 8, 32).astype(jnp.float32)  # sub-blocks of 32
    return (d[..., None] * q - dm[..., None]).reshape(*lead, QK_K)


def _decode_q5_k(f: dict) -> jax.Array:
    lead = f["qs"].shape[:-1]
    sc, mn = _q4_k_scale_min(f["scales"])
    d = _f32(f["d"])[..., None] * sc.astype(jnp.float32)  # [..., 8]
    dm = _f32(f["dmin"])[..., None] * mn.astype(jnp.float32)  # [..., 8]
    ql = _nibbles(f["qs"], 4).reshape(*lead, 8, 32)  # sub-blocks of 32
    # bit i of qh's 32 bytes is sub-block i's bit 4
    qh = jnp.asarray(f["qh"])[..., None, :] >> jnp.arange(8, dtype=jnp.uint8)[:, None]  # [..., 8, 32]
    q = (ql | ((qh & 1) << 4)).astype(jnp.float32)
    return (d[..., None] * q - dm[..., None]).reshape(*lead, QK_K)


def _decode_q6_k(f: dict) -> jax.Array:
    lead = f["ql"].shape[:-1]
    ql = _nibbles(f["ql"], 2).reshape(*lead, 8, 32)  # [..., 2, 2, 64] -> 8 rows of 32
    qh = jnp.asarray(f["qh"]).reshape(*lead, 2, 1, 32)
    qh = jnp.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-2).reshape(*lead, 8, 32)
    q = ((ql | (qh << 4)).astype(jnp.int8) - 32).reshape(*lead, 16, 16).astype(jnp.float32)
    d = _f32(f["d"])[..., None] * _f32(f["scales"])  # [..., 16]
    return (d[..., None] * q).reshape(*lead, QK_K)


_DECODERS = {
    "Q4_0": _decode_q4_0,
    "Q4_1": _decode_q4_1,
    "Q5_0": _decode_q5_0,
    "Q5_1": _decode_q5_1,
    "Q8_0": _decode_q8_0,
    "Q4_K": _decode_q4_k,
    "Q5_K": _decode_q5_k,
    "Q6_K": _decode_q6_k,
}
for _name, (_block, _parts) in LAYOUTS.items():
    register(Format(_name, _block, {field: int(count > 0) for field, _, count in _parts}, _DECODERS[_name]))


def type_name(ggml_type) -> str:
    """The GGML type's name (a gguf.GGMLQuantizationType, its name or its int)."""
    from gguf import GGMLQuantizationType

    if isinstance(ggml_type, str):
        return ggml_type
    return GGMLQuantizationType(int(ggml_type)).name


def supports(ggml_type) -> bool:
    """Whether a tensor of this GGML type can be kept as blocks (else it is F32/F16 or unsupported)."""
    return type_name(ggml_type) in LAYOUTS


def split_blocks(raw: np.ndarray, ggml_type) -> dict[str, np.ndarray]:
    """gguf's raw tensor data [rows, bytes] (uint8) -> its blocks' parts {field: [rows, n_blocks, ...]}.

    The same bits as the file, viewed as each part's dtype (fp16 scales, int8/uint8 quants)."""
    name = type_name(ggml_type)
    if name not in LAYOUTS:
        raise QuantizeError(f"GGML type {name} cannot be kept as blocks (supported: {', '.join(LAYOUTS)})")
    _, parts = LAYOUTS[name]
    size = sum(np.dtype(dt).itemsize * max(count, 1) for _, dt, count in parts)
    raw = np.asarray(raw).view(np.uint8)
    if raw.ndim != 2 or raw.shape[1] % size:
        raise QuantizeError(f"{name} data of shape {raw.shape} is not [rows, a multiple of {size} bytes]")
    blocks = raw.reshape(raw.shape[0], raw.shape[1] // size, size)  # [R, n_blocks, bytes]
    fields, at = {}, 0
    for field, dt, count in parts:
        width = np.dtype(dt).itemsize * max(count, 1)
        part = np.ascontiguousarray(blocks[..., at : at + width]).view(dt)  # [R, n_blocks, max(count, 1)]
        fields[field] = part if count else part[..., 0]
        at += width
    return fields


def gguf_kernel(
    raw: np.ndarray,
    ggml_type,
    *,
    embedding: bool = False,
    dense_dtype: str = "float32",
    rows: Callable[[np.ndarray], np.ndarray] | None = None,
) -> QuantizedKernel:
    """A GGUF 2-D tensor [R, C] (raw [R, bytes], blocks along C) as a QuantizedKernel, not dequantized.

    A linear weight [out, in] becomes jlora's kernel [in, out], blocked along in (axis -2, fields
    [in/block, out, ...]); an embedding table [V, D] stays [V, D], blocked along D (axis -1, fields
    [V, D/block, ...]). `rows(field)` reorders the R rows of every field (whole rows, e.g. llama.cpp's
    q/k rope permutation) before that."""
    fields = split_blocks(raw, ggml_type)
    if rows is not None:
        fields = {k: np.ascontiguousarray(rows(f)) for k, f in fields.items()}
    name = type_name(ggml_type)
    r, c = raw.shape[0], next(iter(fields.values())).shape[1] * LAYOUTS[name][0]
    if embedding:
        return QuantizedKernel(fields, name, (r, c), -1, dense_dtype)
    fields = {k: np.ascontiguousarray(np.swapaxes(f, 0, 1)) for k, f in fields.items()}  # [C/block, R, ...]
    return QuantizedKernel(fields, name, (c, r), -2, dense_dtype)


# ---- one param whose layers mix block types ----
# Each layer keeps its own blocks, regrouped into cells of the mix's largest block (256 for a K-quant): field
# "bytes" [*stack, A', B', width] holds a cell's blocks as their raw parts (a Q8_0 layer's 8 blocks of 32 in a
# 256-cell: 8 fp16 d, then 8 x 32 int8 qs), zero-padded to the widest member; "which" [*stack, 1, 1] names the
# layer's member. So the param costs its widest member's bytes in every layer, not the sum over members, and
# like any field "bytes" is laid out [*stack, A, B, ...] (nn.scan slices it, sharding splits A and B).
# Decoding runs only the layer's own member decoder (jax.lax.switch), on the same bits: bit-exact per layer.


def stack_kernels(kernels: list[QuantizedKernel]) -> QuantizedKernel | None:
    """Per-layer QuantizedKernels [A, B, ...] of one param as one kernel [L, ...], so nn.scan slices it.

    Layers of one format stack per field. Layers that mix GGUF formats (llama.cpp's Q4_K_M gives some layers
    of a param Q6_K or Q8_0) become one kernel of a `mixed_format`. None where shapes, axes or dtypes differ,
    or a mix holds a non-GGUF format."""
    first = kernels[0]
    same = (first.dense, first.axis, first.dense_dtype, ())
    if any((k.dense, k.axis, k.dense_dtype, k.stack) != same for k in kernels):
        return None
    if all(k.fmt == first.fmt for k in kernels):
        fields = {name: np.stack([np.asarray(k.fields[name]) for k in kernels]) for name in first.fields}
        return QuantizedKernel(fields, first.fmt, first.dense, first.axis, first.dense_dtype)
    members = tuple(name for name in LAYOUTS if any(k.fmt == name for k in kernels))  # in LAYOUTS order
    if any(k.fmt not in LAYOUTS for k in kernels):
        return None
    fmt = mixed_format(members)
    cells = [_cell_bytes(k, fmt.block) for k in kernels]  # [A', B', its bytes] per layer
    width = max(c.shape[-1] for c in cells)
    raw = np.zeros((len(cells), *cells[0].shape[:-1], width), np.uint8)  # [L, A', B', width]: zero-padded
    for i, c in enumerate(cells):
        raw[i, ..., : c.shape[-1]] = c
    which = np.array([members.index(k.fmt) for k in kernels], np.int32).reshape(-1, 1, 1)  # [L, 1, 1]
    return QuantizedKernel({"bytes": raw, "which": which}, fmt.name, first.dense, first.axis, first.dense_dtype)


def mixed_format(members: tuple[str, ...]) -> Format:
    """The Format of a param whose layers come in the GGUF types `members` (e.g. ("Q4_K", "Q6_K")), registered
    under the name "Q4_K|Q6_K" on first use."""
    name = "|".join(members)
    if len(members) < 2 or any(m not in LAYOUTS for m in members):
        raise QuantizeError(f"mixed format {name}: needs two or more of {', '.join(LAYOUTS)}")
    if name in FORMATS:
        return FORMATS[name]
    block = max(LAYOUTS[m][0] for m in members)
    decode = functools.partial(_decode_mixed, members, block)
    return register(Format(name, block, {"bytes": 1, "which": 0}, decode))


def _cell_bytes(k: QuantizedKernel, block: int) -> np.ndarray:
    """One layer's fields [A, B, ...] as raw bytes per cell of `block` values: [A', B', r * its block's bytes]."""
    r = block // LAYOUTS[k.fmt][0]  # own blocks per cell
    parts = []
    for field, _, _ in LAYOUTS[k.fmt][1]:
        f = np.asarray(k.fields[field])
        a, b = f.shape[:2]
        if k.axis == -2:  # [A, B, c] -> [A/r, r, B, c] -> [A/r, B, r, c]
            f = np.swapaxes(f.reshape(a // r, r, b, -1), 1, 2)
        else:  # [A, B, c] -> [A, B/r, r, c]
            f = f.reshape(a, b // r, r, -1)
        parts.append(np.ascontiguousarray(f).view(np.uint8).reshape(*f.shape[:2], -1))
    return np.concatenate(parts, axis=-1)


def _unpack_decode(name: str, block: int, raw: jax.Array) -> jax.Array:
    """raw [..., A', B', >= width] uint8 cells of type `name` -> its values [..., A', B', block] in fp32."""
    own, parts = LAYOUTS[name]
    r, lead = block // own, raw.shape[:-1]
    fields, at = {}, 0
    for field, dt, count in parts:
        size, n = np.dtype(dt).itemsize, max(count, 1)
        part = raw[..., at : at + r * n * size].reshape(*lead, r, n, size)
        part = jax.lax.bitcast_convert_type(part if size > 1 else part[..., 0], jnp.dtype(dt))  # [..., r, n]
        fields[field] = part if count else part[..., 0]
        at += r * n * size
    return _DECODERS[name](fields).reshape(*lead, block)  # [..., A', B', r, own] -> [..., A', B', block]


def _decode_mixed(members: tuple[str, ...], block: int, f: dict) -> jax.Array:
    """fields {"bytes": [*S, A', B', width], "which": [*S, 1, 1]} -> values [*S, A', B', block] in fp32."""
    raw, which = jnp.asarray(f["bytes"]), jnp.asarray(f["which"])
    branches = [functools.partial(_unpack_decode, m, block) for m in members]

    def one(w, x):  # one layer: only its own member's decoder runs
        return jax.lax.switch(w.reshape(()), branches, x)

    if which.ndim == 2:
        return one(which, raw)
    stack = which.shape[:-2]  # a whole stack (a merge, a fingerprint): layer by layer
    out = jax.lax.map(lambda wx: one(*wx), (which.reshape(-1, 1, 1), raw.reshape(-1, *raw.shape[-3:])))
    return out.reshape(*stack, *out.shape[1:])
