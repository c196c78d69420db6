"""Quantized frozen kernels (QLoRA): the frozen tree keeps its big leaves in 8 or 4 bits.

`quantize(frozen, "int8" | "nf4")` turns each kernel and embedding leaf into a `QuantizedKernel`, a
pytree node of packed arrays plus a static format. GGUF files keep their own blocks the same way
(jlora.quant.gguf_blocks registers Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). A quantized leaf is
dequantized inside the jitted step right at its matmul (`qmatmul`, routed by `jlora.apply` like LoRA), and its
gradient dequantizes again instead of saving the dense kernel, so no dense copy outlives its one use. The
model file knows nothing of this. Plain `model.apply` also works: flax unboxes the leaf (`unbox`).

Every format stores its fields as [*stack, A, B, ...]: the dense kernel [*stack, M, N] cut into
blocks of `block` values along one axis, M (axis -2, a kernel's input dim) or N (axis -1, an
embedding row). So a field takes its dense kernel's PartitionSpec dim for dim (jlora.parallel.sharding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from flax.core import meta

from jlora.errors import JloraError
from jlora.matmul import product

METHODS = ("none", "int8", "nf4", "gguf")
NF4_BLOCK = 64
# The 16 NormalFloat-4 values of the QLoRA paper (Dettmers et al. 2023, appendix E): quantiles of
# N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236328,
        1.0,
    ],
    np.float32,
)


class QuantizeError(JloraError, ValueError):
    """A leaf that cannot be quantized as asked, or an unknown format; one line naming it."""


@dataclasses.dataclass(frozen=True)
class Format:
    """A block format: `decode(fields)` gives the values [..., A, B, block] (or broadcastable) in fp32.

    trailing: per field, how many dims follow [*stack, A, B]. decode must accept any leading dims."""

    name: str
    block: int
    trailing: dict[str, int]
    decode: Callable[[dict], jax.Array]


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


class QuantizedKernel(struct.PyTreeNode, meta.AxisMetadata):
    """A frozen kernel [*stack, M, N] held as packed `fields`; `dense` = (M, N) of one layer.

    `axis` is the blocked dense axis (-2 or -1); `dense_dtype` the dtype `dequantize` gives by default."""

    fields: dict
    fmt: str = struct.field(pytree_node=False)
    dense: tuple[int, int] = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False, default=-2)
    dense_dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def stack(self) -> tuple[int, ...]:
        name, field = next(iter(sorted(self.fields.items())))
        return tuple(field.shape[: field.ndim - 2 - FORMATS[self.fmt].trailing[name]])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.stack, *self.dense)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.dense_dtype)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(f.shape)) * np.dtype(f.dtype).itemsize for f in self.fields.values())

    # flax.core.meta.AxisMetadata: `self.param(...)` in a module unboxes to the dense kernel.
    def unbox(self) -> jax.Array:
        return dequantize(self)

    def replace_boxed(self, val):
        raise TypeError("a QuantizedKernel is frozen; it cannot be overwritten by a module")

    def add_axis(self, index: int, params: dict):  # nn.scan: fields are sliced as plain leaves
        return self

    def remove_axis(self, index: int, params: dict):
        return self


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedKernel)


def dequantize(q: QuantizedKernel, dtype=None) -> jax.Array:
    """The dense kernel [*stack, M, N] of `q`, in `dtype` (default: q.dense_dtype)."""
    fmt = FORMATS[q.fmt]
    m, n = q.dense
    a, b = (m // fmt.block, n) if q.axis == -2 else (m, n // fmt.block)
    values = jnp.broadcast_to(fmt.decode(q.fields), (*q.stack, a, b, fmt.block))
    if q.axis == -2:
        values = jnp.swapaxes(values, -1, -2)  # [*S, A, block, N]
    return values.reshape(*q.stack, m, n).astype(dtype or q.dense_dtype)


def transposed(q: QuantizedKernel) -> QuantizedKernel:
    """The packed [*stack, N, M] transpose of q (e.g. a tied embedding [V, D] as a [D, V] head), no decoding:
    the block axis flips with it."""
    n = len(q.stack)
    return q.replace(
        fields={k: jnp.swapaxes(f, n, n + 1) for k, f in q.fields.items()}, dense=q.dense[::-1], axis=-3 - q.axis
    )


def take_rows(q: QuantizedKernel, ids: jax.Array, dtype=None) -> jax.Array:
    """Rows `ids` [...] of an unstacked [M, N] leaf blocked along N (an embedding): [..., N], decoding only those."""
    if q.stack or q.axis != -1:
        raise QuantizeError(f"take_rows needs an unstacked leaf blocked along its rows, not {q.shape} axis {q.axis}")
    # a field of one row (a scale shared by all rows) broadcasts as it is
    rows = {k: f if f.shape[0] == 1 < q.dense[0] else jnp.take(f, ids, axis=0) for k, f in q.fields.items()}
    fmt = FORMATS[q.fmt]
    values = jnp.broadcast_to(fmt.decode(rows), (*ids.shape, q.dense[1] // fmt.block, fmt.block))
    return values.reshape(*ids.shape, q.dense[1]).astype(dtype or q.dense_dtype)


def _zero_cotangent(q: QuantizedKernel) -> QuantizedKernel:
    def zero(f):
        if jnp.issubdtype(f.dtype, jnp.inexact):
            return jnp.zeros_like(f)
        return np.zeros(f.shape, jax.dtypes.float0)

    return jax.tree.map(zero, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qmatmul(x: jax.Array, q: QuantizedKernel, transpose: bool = False) -> jax.Array:
    """x [..., M] @ W [M, N] (or x [..., N] @ W.T with `transpose`) for a quantized, frozen W.

    The backward pass saves only the packed `q` and dequantizes it again: the dense W lives for one
    matmul. W takes no gradient (it is frozen)."""
    w = dequantize(q, x.dtype)
    return product("...n,mn->...m" if transpose else "...m,mn->...n", x, w)


def _qmatmul_fwd(x, q, transpose):
    return qmatmul(x, q, transpose), q


def _qmatmul_bwd(transpose, q, dy):
    w = dequantize(q, dy.dtype)
    dx = product("...m,mn->...n" if transpose else "...n,mn->...m", dy, w)
    return dx, _zero_cotangent(q)


qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def quantized_call(module: nn.Module, method: str, args: tuple, kwargs: dict):
    """What nn.Dense / nn.Embed `method` returns when its weight is quantized; None when it is not.

    Called by jlora.apply's interceptor before any LoRA delta is added."""
    if isinstance(module, nn.Dense) and method == "__call__":
        kernel = module.get_variable("params", "kernel")
        if not is_quantized(kernel):
            return None
        x = args[0] if args else kwargs["inputs"]
        dtype = module.dtype or x.dtype
        y = qmatmul(x.astype(dtype), kernel)
        if module.use_bias:
            y = y + module.get_variable("params", "bias").astype(dtype)
        return y
    if isinstance(module, nn.Embed) and method in ("__call__", "attend"):
        table = module.get_variable("params", "embedding")
        if not is_quantized(table):
            return None
        x = args[0] if args else kwargs["inputs" if method == "__call__" else "query"]
        if method == "__call__":
            return take_rows(table, x, module.dtype)
        dtype = module.dtype or x.dtype
        return qmatmul(x.astype(dtype), table, True)
    return None


def dense_value(w, dtype=None) -> jax.Array:
    """A leaf as a dense array: dequantized if it is a QuantizedKernel."""
    return dequantize(w, dtype) if is_quantized(w) else (w if dtype is None else w.astype(dtype))


# ---- int8: per-output-channel absmax ----------------------------------------------------------------


def _decode_int8(fields: dict) -> jax.Array:
    return (fields["q"].astype(jnp.float32) * fields["scale"])[..., None]  # [..., A, B, 1]


register(Format("int8", 1, {"q": 0, "scale": 0}, _decode_int8))


def _encode_int8(w: jax.Array, axis: int) -> dict:
    """w [*S, M, N]; one scale per output channel: per column N of a kernel, per row of an embedding."""
    absmax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)  # [*S, 1, N] or [*S, M, 1]
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return {"q": jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), "scale": scale.astype(jnp.float32)}


# ---- nf4: NormalFloat-4 in blocks of 64, optional double quantization of the block scales --------------


def _nf4_values(codes: jax.Array) -> jax.Array:
    """codes [..., 32] uint8, two 4-bit indices each (low nibble first) -> [..., 64] fp32 code values."""
    idx = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    return jnp.take(jnp.asarray(NF4_CODE), idx.astype(jnp.int32))


def _decode_nf4(fields: dict) -> jax.Array:
    return _nf4_values(fields["codes"]) * fields["absmax"][..., None]


def _decode_nf4_dq(fields: dict) -> jax.Array:
    absmax = fields["absmax_q"].astype(jnp.float32) * (fields["absmax_scale"] / 255.0)  # [..., A, B]
    return _nf4_values(fields["codes"]) * absmax[..., None]


register(Format("nf4", NF4_BLOCK, {"codes": 1, "absmax": 0}, _decode_nf4))
register(Format("nf4-dq", NF4_BLOCK, {"codes": 1, "absmax_q": 0, "absmax_scale": 0}, _decode_nf4_dq))


def _blocks(w: jax.Array, axis: int, block: int) -> jax.Array:
    """[*S, M, N] -> [*S, A, B, block] with blocks along `axis`."""
    *s, m, n = w.shape
    if axis == -2:
        return jnp.swapaxes(w.reshape(*s, m // block, block, n), -1, -2)
    return w.reshape(*s, m, n // block, block)


def _encode_nf4(w: jax.Array, axis: int, double_quant: bool) -> dict:
    blocks = _blocks(w.astype(jnp.float32), axis, NF4_BLOCK)  # [*S, A, B, 64]
    absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [*S, A, B]
    out = {}
    if double_quant:  # 8-bit block scales, one fp32 scale per column of blocks; rounded up so |x| / absmax <= 1
        col = jnp.max(absmax, axis=-2, keepdims=True)  # [*S, 1, B]
        col = jnp.where(col > 0, col, 1.0)
        out["absmax_q"] = jnp.clip(jnp.ceil(absmax / col * 255.0), 0, 255).astype(jnp.uint8)
        out["absmax_scale"] = col
        absmax = out["absmax_q"].astype(jnp.float32) * (col / 255.0)
    else:
        out["absmax"] = absmax
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    mids = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
    idx = jnp.searchsorted(mids, normed).astype(jnp.uint8)  # nearest code value
    out["codes"] = idx[..., 0::2] | (idx[..., 1::2] << 4)
    return out


# ---- the tree transformation --------------------------------------------------------------------------


def quantize_axis(path: tuple, leaf) -> int | None:
    """The blocked axis for a leaf that is quantized (kernels along input M, embeddings along row N), or None."""
    if is_quantized(leaf) or getattr(leaf, "ndim", 0) < 2:
        return None
    return {"kernel": -2, "embedding": -1}.get(path[-1])


def check_method(method: str) -> None:
    """QuantizeError unless `method` is one `quantize` packs (int8, nf4)."""
    if method not in ("int8", "nf4"):
        raise QuantizeError(
            f"quantize method {method!r}: expected one of int8, nf4 "
            f"(gguf keeps a GGUF file's own blocks: load it with quantize='gguf')"
        )


def quantize_leaf(w, method: str, axis: int, *, double_quant: bool = False, name: str = "") -> QuantizedKernel:
    """One dense leaf [*stack, M, N] as a QuantizedKernel ("int8" or "nf4"), blocked along `axis`."""
    m, n = w.shape[-2:]
    if method == "int8":
        fields, fmt = _encode_int8(jnp.asarray(w), axis), "int8"
    elif method == "nf4":
        along = w.shape[axis]
        if along % NF4_BLOCK:
            raise QuantizeError(
                f"{name or 'leaf'} {tuple(w.shape)}: nf4 needs dim {along} to be a multiple of "
                f"the block size {NF4_BLOCK}; quantize it as int8 or leave it out"
            )
        fields, fmt = _encode_nf4(jnp.asarray(w), axis, double_quant), "nf4-dq" if double_quant else "nf4"
    else:
        check_method(method)
    return QuantizedKernel(fields, fmt, (int(m), int(n)), axis, np.dtype(w.dtype).name)


def requantize_like(q: QuantizedKernel, w: jax.Array) -> QuantizedKernel:
    """Dense `w` (e.g. a merged kernel) quantized in q's own format and layout."""
    method = {"int8": "int8", "nf4": "nf4", "nf4-dq": "nf4"}.get(q.fmt)
    if method is None:
        raise QuantizeError(
            f"cannot re-encode a {q.fmt} kernel: jlora decodes GGUF blocks but does not write "
            f"them; merge with quantized='dequantize', or requantize as int8 / nf4"
        )
    return quantize_leaf(w, method, q.axis, double_quant=q.fmt == "nf4-dq")


def is_head(path: tuple) -> bool:
    """Whether param `path` is the token embedding or the output head: a kernel or embedding outside the
    layer stack ("layers"), whatever the family calls it."""
    return path[0] != "layers" and path[-1] in ("kernel", "embedding")


def leaf_method(path: tuple, method: str, head: str = "int8") -> str:
    """The method one leaf gets: the embedding and the output head in `head` ("int8" by default, as llama.cpp's
    Q4 files keep token_embd in Q8_0: a tied embedding is the head too, the most sensitive matmul), the rest in
    `method`."""
    return head if is_head(tuple(path)) else method


def quantize(
    frozen,
    method: str = "nf4",
    *,
    double_quant: bool = False,
    head: str = "int8",
    skip: Callable[[str], bool] | None = None,
):
    """The frozen tree with every kernel quantized by `method` ("int8" or "nf4"; "none": unchanged), and the
    embedding / output head by `head` (see `leaf_method`; head="nf4" packs them in 4 bits too).

    `skip(dotted_path)` keeps a leaf dense. Leaves that already are QuantizedKernels are kept as they are.
    One leaf at a time: the device holds one leaf's dense and packed copies at once."""
    if method == "none":
        return frozen
    check_method(method)
    check_method(head)
    out = {}
    for path, leaf in traverse_util.flatten_dict(frozen).items():
        encode = leaf_encoder(path, leaf, method, double_quant=double_quant, head=head)
        if encode is None or (skip is not None and skip(".".join(map(str, path)))):
            out[path] = leaf
        else:
            out[path] = jax.eval_shape(encode, leaf) if isinstance(leaf, jax.ShapeDtypeStruct) else encode(leaf)
    return traverse_util.unflatten_dict(out)


def leaf_encoder(
    path: tuple, leaf, method: str, *, double_quant: bool = False, head: str = "int8"
) -> LeafEncoder | None:
    """`w -> QuantizedKernel` for the leaf at `path` (its method by `leaf_method`, its blocked axis by
    `quantize_axis`), or None for a leaf that stays as it is."""
    axis = quantize_axis(path, leaf)
    if axis is None:
        return None
    return LeafEncoder(leaf_method(path, method, head), axis, double_quant, ".".join(map(str, path)))


@dataclasses.dataclass(frozen=True)
class LeafEncoder:
    """`quantize_leaf` with its arguments bound, for one leaf. Encoders equal but for the leaf's name (used in
    messages only) are equal, so a jit that takes one as a static argument compiles once for all such leaves."""

    method: str
    axis: int
    double_quant: bool = False
    name: str = dataclasses.field(default="", compare=False)

    def __call__(self, w) -> QuantizedKernel:
        return quantize_leaf(w, self.method, self.axis, double_quant=self.double_quant, name=self.name)


def frozen_bytes(tree) -> int:
    """Bytes the leaves of a (frozen) tree hold, packed fields counted as stored."""
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
