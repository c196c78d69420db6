"""The factored LoRA forward: `lora_apply`, and `apply`, which runs any flax.linen model with LoRA.

`apply` intercepts the `__call__` of nn.Dense / nn.DenseGeneral / nn.Einsum / nn.Embed and, where
the trainable tree holds a `LoraPair` for the module's kernel, adds `scale * ((x @ A) @ B)` to the
module's own output (to its slice, for a part of a fused q/k/v or gate/up call: jlora.models.fused); a
quantized frozen weight (jlora.quant.quantize) is multiplied there by `qmatmul`. The model is not edited
and never sees `W + A@B`. The pairs travel into the model as an extra variable collection, so
`nn.scan` slices stacked A/B per layer like the params (the model must scan all collections:
`variable_axes={True: 0}`). Owns `LoraPair` and kernel layouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from jlora.errors import JloraError
from jlora.matmul import matmul
from jlora.peft import llama_adapter
from jlora.quant.quantize import dense_value, quantized_call

COLLECTION = "lora"


@dataclasses.dataclass(frozen=True)
class PartCall:
    """What an interceptor needs of flax's InterceptorContext, for one part of a fused call."""

    module: nn.Module
    method_name: str = "__call__"


def route_parts(route: Callable) -> Callable:
    """Wrap a flax method interceptor written for single nn.Dense calls so it also serves FusedDense.

    A fused call runs its one matmul, then `route` sees each part as a call of that part whose own
    computation returns the part's slice. An unfused call needs nothing: its parts' own calls are
    intercepted like any other."""

    def wrapped(next_fun, args, kwargs, context):
        module = context.module
        parts = getattr(module, "parts", None)  # a fused module (jlora.models.fused.FusedDense) shows its parts
        if parts is None or context.method_name != "__call__" or not module.fused():
            return route(next_fun, args, kwargs, context)
        outs = next_fun(*args, **kwargs)
        return tuple(route(lambda *_a, y=y, **_k: y, args, kwargs, PartCall(part)) for part, y in zip(parts, outs))

    return wrapped


class LoraError(JloraError, ValueError):
    """Bad LoRA configuration or mismatched trees; the message is one line."""


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a kernel's dims split: `stack` leading (scanned) dims, then its input dims, then output dims.

    kind is dense | dense_general | einsum | embed. For einsum, `equation` is the module's einsum string.
    """

    kind: str
    stack: int = 0
    n_in_dims: int = 1
    equation: str | None = None

    def stack_shape(self, shape) -> tuple[int, ...]:
        return tuple(shape[: self.stack])

    def _in_out(self, shape):
        per_call = tuple(shape[self.stack :])
        if self.kind == "einsum":
            x_spec, k_spec, o_spec = _parse(self.equation)
            ins = [d for c, d in zip(k_spec, per_call) if c in x_spec and c not in o_spec]
            outs = [d for c, d in zip(k_spec, per_call) if c in o_spec]
            return ins, outs
        return per_call[: self.n_in_dims], per_call[self.n_in_dims :]

    def n_in(self, shape) -> int:
        return int(np.prod(self._in_out(shape)[0]))

    def n_out(self, shape) -> int:
        return int(np.prod(self._in_out(shape)[1]))


def _parse(equation: str) -> tuple[str, str, str]:
    lhs, out = equation.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    return x_spec, k_spec, out


@struct.dataclass
class LoraPair:
    """One adapted kernel: A [*stack, in, R], B [*stack, R, out], optional DoRA magnitude [*stack, out].

    scale (alpha/r or alpha/sqrt r; a tuple per stacked layer, 0 where a layer is not adapted),
    layout and dropout are static: they are not trainable leaves.
    """

    a: jax.Array
    b: jax.Array
    magnitude: jax.Array | None
    scale: float | tuple[float, ...] = struct.field(pytree_node=False)
    layout: KernelLayout = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def fits(self, kernel_shape) -> bool:
        lay = self.layout
        stack = lay.stack_shape(kernel_shape)
        return (
            len(kernel_shape) > lay.stack
            and tuple(self.a.shape) == (*stack, lay.n_in(kernel_shape), self.rank)
            and tuple(self.b.shape) == (*stack, self.rank, lay.n_out(kernel_shape))
        )

    def scale_array(self) -> np.ndarray:
        return np.asarray(self.scale, np.float32).reshape(self.a.shape[: self.layout.stack])


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale) -> jax.Array:
    """scale * ((x @ a) @ b) for x [..., in], a [in, R], b [R, out]: the one place the delta is computed.

    The association is fixed, so neither this nor its gradient ever forms an [in, out] matrix.
    """
    with jax.named_scope("lora"):  # names its ops for profiles (bench/profile_step.py's "LoRA A/B")
        return matmul(matmul(x, a), b) * jnp.asarray(scale, x.dtype)  # ([..., in] @ [in, R]) @ [R, out]


def lora_apply(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale, x_lora: jax.Array | None = None):
    """x @ w + scale * ((x @ a) @ b), without forming w + a@b. x_lora is x after LoRA dropout, if any."""
    return matmul(x, w) + lora_delta(x if x_lora is None else x_lora, a, b, scale)


def dora_column_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale) -> jax.Array:
    """|W + s*A@B| per output column, [*stack, out] in fp32, for w [*stack, in, out], a [*stack, in, R],
    b [*stack, R, out] and scale [*stack] (or a scalar), without forming an [in, out] product of A and B.

    Column by column, |W + sAB|^2 = |W|^2 + 2s * sum_r B*(A^T W) + s^2 * sum_r B*((A^T A) B): besides |W|^2
    (from the frozen kernel alone) it needs only A^T W [R, out], A^T A [R, R] and B.
    """
    w, a, b = (x.astype(jnp.float32) for x in (w, a, b))
    s = jnp.asarray(scale, jnp.float32)[..., None]  # [*stack, 1]
    atw = jnp.einsum("...ir,...io->...ro", a, w)  # [*stack, R, out]
    ata = jnp.einsum("...ir,...is->...rs", a, a)  # [*stack, R, R]
    ab_sq = jnp.sum(b * jnp.einsum("...rs,...so->...ro", ata, b), axis=-2)  # [*stack, out]: |AB|^2 per column
    sq = jnp.sum(w * w, axis=-2) + 2 * s * jnp.sum(b * atw, axis=-2) + s * s * ab_sq  # [*stack, out]
    return jnp.sqrt(jnp.maximum(sq, 0.0))  # rounding may take an all-but-zero column below 0


def pair_delta(w: jax.Array, pair: LoraPair, *, add_base: bool, dora: bool = False) -> jax.Array:
    """The dense delta s*A@B in W's layout, fp32 (+ W, and DoRA's column rescale). For merge/init only."""
    lay = pair.layout
    stack = lay.stack_shape(w.shape)
    s = pair.scale_array().reshape(*stack, 1, 1)
    delta = s * (pair.a.astype(jnp.float32) @ pair.b.astype(jnp.float32))  # [*stack, in, out]
    if lay.kind == "einsum":
        x_spec, k_spec, o_spec = _parse(lay.equation)
        ins = [c for c in k_spec if c in x_spec and c not in o_spec]
        outs = [c for c in k_spec if c in o_spec]
        dims = dict(zip(k_spec, w.shape[lay.stack :]))
        delta = delta.reshape(*stack, *[dims[c] for c in ins + outs])
        perm = [(ins + outs).index(c) for c in k_spec]
        delta = jnp.transpose(delta, (*range(len(stack)), *[len(stack) + p for p in perm]))
    delta = delta.reshape(w.shape)
    if not add_base:
        return delta
    full = w.astype(jnp.float32) + delta
    if dora and pair.magnitude is not None:
        rescale = pair.magnitude.astype(jnp.float32) / jnp.linalg.norm(full, axis=-2)  # [*stack, out]
        rescale = jnp.where(s[..., 0] != 0, rescale, 1.0)  # a layer left out by `layers` keeps W exactly
        full = full * rescale[..., None, :]
    return full


def infer_layouts(params) -> dict[tuple, KernelLayout]:
    """Layouts read off a params tree alone: `kernel` leaves are Dense [*stack, in, out], `embedding` leaves Embed."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel" and leaf.ndim >= 2:
            out[path] = KernelLayout("dense", stack=leaf.ndim - 2)
        elif path[-1] == "embedding" and leaf.ndim >= 2:
            out[path] = KernelLayout("embed", stack=leaf.ndim - 2)
    return out


def _call_layout(module: nn.Module, args, kwargs) -> tuple[str, KernelLayout, int] | None:
    """(param name, per-call layout, per-call kernel ndim) of a routable module, or None."""
    if isinstance(module, nn.Dense):
        return "kernel", KernelLayout("dense"), 2
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            return None
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        return "kernel", KernelLayout("dense_general", n_in_dims=len(axis)), len(axis) + len(features)
    if isinstance(module, nn.Einsum):
        eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
        return "kernel", KernelLayout("einsum", equation=eq), len(_parse(eq)[1])
    if isinstance(module, nn.Embed):
        return "embedding", KernelLayout("embed"), 2
    return None


def trace_layouts(model: nn.Module, *args, **kwargs) -> dict[tuple, KernelLayout]:
    """Layouts of every routable kernel, found by tracing `model.init` (shapes only). For split(layouts=...)."""
    seen = {}

    def record(next_fun, call_args, call_kwargs, context):
        if context.method_name == "__call__":
            found = _call_layout(context.module, call_args, call_kwargs)
            if found is not None:
                seen[tuple(context.module.path) + (found[0],)] = found[1:]
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]
    flat = traverse_util.flatten_dict(params)
    # Leading dims beyond what one call uses are stacked (scanned) layers.
    return {p: dataclasses.replace(lay, stack=flat[p].ndim - ndim) for p, (lay, ndim) in seen.items() if p in flat}


def _to_rows(x: jax.Array, lay: KernelLayout, kernel_shape, module_axis) -> tuple[jax.Array, Any]:
    """Move a module input into [..., in] rows; returns rows and how to shape [..., out] back."""
    if lay.kind == "dense":
        return x, lambda y: y
    if lay.kind == "dense_general":
        axis = tuple(a % x.ndim for a in (module_axis if isinstance(module_axis, tuple) else (module_axis,)))
        keep = [d for d in range(x.ndim) if d not in axis]
        rows = jnp.transpose(x, (*keep, *axis)).reshape(*[x.shape[d] for d in keep], -1)
        out_dims = tuple(kernel_shape[len(axis) :])
        return rows, lambda y: y.reshape(*y.shape[:-1], *out_dims)
    x_spec, k_spec, o_spec = _parse(lay.equation)
    ins = [c for c in k_spec if c in x_spec and c not in o_spec]
    batch = [c for c in x_spec if c not in ins]
    outs = [c for c in k_spec if c in o_spec]
    dims = {**dict(zip(k_spec, kernel_shape)), **dict(zip(x_spec, x.shape))}
    rows = jnp.einsum(f"{x_spec}->{''.join(batch + ins)}", x).reshape(*[dims[c] for c in batch], -1)
    unrows = lambda y: jnp.einsum(
        f"{''.join(batch + outs)}->{o_spec}", y.reshape(*y.shape[:-1], *[dims[c] for c in outs])
    )
    return rows, unrows


def _dropout(module: nn.Module, x: jax.Array, rate: float, training: bool) -> jax.Array:
    if not training or rate == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _make_interceptor(statics: dict, training: bool):
    @route_parts  # a fused q/k/v or gate/up call: each part's delta goes to its slice of the output
    def route(next_fun, args, kwargs, context):
        module = context.module
        base = quantized_call(module, context.method_name, args, kwargs)  # None: the weight is not quantized
        if context.method_name != "__call__" or not module.has_variable(COLLECTION, "a"):
            return next_fun(*args, **kwargs) if base is None else base
        pname, layout, rate = statics[tuple(module.path)]
        a, b = module.get_variable(COLLECTION, "a"), module.get_variable(COLLECTION, "b")
        scale = module.get_variable(COLLECTION, "scale")
        found = _call_layout(module, args, kwargs)
        if found is None or found[1] != dataclasses.replace(layout, stack=0) or a.ndim != 2:
            # e.g. a DenseGeneral/Einsum kernel split from its params alone, which read it as a stacked Dense
            raise LoraError(
                f"the LoRA pair of {'/'.join(module.path)} was made for a {layout.kind} kernel with "
                f"{layout.stack} stacked dims, but the module is nn.{type(module).__name__}; "
                f"split this model with layouts=trace_layouts(model, *inputs)"
            )
        y = next_fun(*args, **kwargs) if base is None else base
        x = args[0]
        if layout.kind == "embed":  # PEFT's embedding LoRA: rows of A, no dropout
            return y + lora_delta(jnp.take(a, x, axis=0), jnp.eye(a.shape[-1], dtype=y.dtype), b.astype(y.dtype), scale)
        kernel = module.get_variable("params", pname)
        x = x.astype(y.dtype)
        rows, unrows = _to_rows(x, layout, kernel.shape, getattr(module, "axis", -1))
        rows_l = _dropout(module, rows, rate, training)
        a, b = a.astype(y.dtype), b.astype(y.dtype)
        if not module.has_variable(COLLECTION, "magnitude"):
            return y + unrows(lora_delta(rows_l, a, b, scale))
        # DoRA (PEFT's formula): y = base + (m/|W+sAB| - 1) * x_l@W + m/|W+sAB| * s*(x_l@A)@B
        kernel = dense_value(kernel)  # DoRA needs the kernel's values, a quantized one decoded
        norm = jax.lax.stop_gradient(dora_column_norm(kernel, a, b, scale))  # [out]; PEFT detaches it too
        mns = module.get_variable(COLLECTION, "magnitude").astype(jnp.float32) / norm  # [out]
        mns = jnp.where(scale != 0, mns, 1.0).astype(y.dtype)  # a layer left out by `layers`: no change, no gradient
        base_l = matmul(rows_l, kernel.astype(y.dtype))
        return y + unrows((mns - 1) * base_l + mns * lora_delta(rows_l, a, b, scale))

    return route


def _is_pair(x) -> bool:
    return isinstance(x, LoraPair)


def routed_variables(frozen, trainable) -> tuple[dict, dict]:
    """({"params": frozen + full-trained leaves, "lora": pair arrays by module}, static per-module info)."""
    params = traverse_util.flatten_dict(frozen)
    lora, statics = {}, {}
    for path, leaf in traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: _is_pair(x)).items():
        if not _is_pair(leaf):
            params[path] = leaf
            continue
        module = path[:-1]
        lora[module + ("a",)], lora[module + ("b",)] = leaf.a, leaf.b
        lora[module + ("scale",)] = jnp.asarray(leaf.scale_array())
        if leaf.magnitude is not None:
            lora[module + ("magnitude",)] = leaf.magnitude
        statics[module] = (path[-1], leaf.layout, leaf.dropout)
    variables = {"params": traverse_util.unflatten_dict(params)}
    if lora:
        variables[COLLECTION] = traverse_util.unflatten_dict(lora)
    return variables, statics


def apply(
    model: nn.Module, frozen, trainable, *args, rngs: dict | None = None, variables: dict | None = None, **kwargs
):
    """`model.apply` with LoRA (or LLaMA-Adapter prompts, jlora.peft.llama_adapter) routed in.

    Pass rngs={"dropout": key} to train with LoRA dropout.

    `variables` adds other collections (e.g. {"cache": ...}); kwargs go to `model.apply` (mutable, method, ...).
    """
    trainable = llama_adapter.routed_trainable(frozen, trainable)  # LLaMA-Adapter prompts, padded to every layer
    routed, statics = routed_variables(frozen, trainable)
    training = bool(rngs) and "dropout" in rngs
    with nn.intercept_methods(_make_interceptor(statics, training)), llama_adapter.intercept():
        return model.apply({**routed, **(variables or {})}, *args, rngs=rngs, **kwargs)
