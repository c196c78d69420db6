"""Device mesh and parameter placement over the ('data', 'fsdp', 'tensor') axes.

Owns `make_mesh`, the ONE ordered rules table (`RULES`: regex over a dotted param path ->
PartitionSpec of the per-layer leaf, first match wins, no match is an error), and the specs and
shardings derived from it for the frozen tree, the trainable tree (`LoraPair` A takes its
kernel's input-dim spec, B its output-dim spec, the rank dim is replicated), the optimizer state
(mirrors the trainable tree) and batches (rows over ('data', 'fsdp')). A dim that its mesh axes
do not divide is replicated instead, so every preset runs on any mesh. It does not build models
or optimizers.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora.lora_apply import LoraPair

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both: FSDP is data parallel with sharded weights

# Specs of the per-layer leaf; a layer-stacked leaf ([L, ...]) gets leading None for its extra dims.
# Flax kernels are [in, out]: column-parallel layers split `out` over tensor, row-parallel ones `in`.
RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head\.kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", P("fsdp", "tensor")),  # [D, out]
    (r"(o_proj|down_proj)\.kernel$", P("tensor", "fsdp")),  # [in, D]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", P("tensor")),  # [out]
    (r"(o_proj|down_proj)\.bias$", P(None)),  # [D]
    (r"norm\.weight$", P(None)),  # RMSNorm scales [D]: tiny, replicated
)


class ShardingError(ValueError):
    """A parameter no rule covers, or a mesh that does not fit the devices; one line."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all, every host); one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh (data, fsdp, tensor) = {tuple(sizes)}: sizes are >= 1, at most one -1")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // fixed if len(devices) % fixed == 0 else -1
    if int(np.prod(sizes)) != len(devices) or -1 in sizes:
        raise ShardingError(f"mesh (data, fsdp, tensor) = {(data, fsdp, tensor)} does not fit {len(devices)} devices")
    # Auto axes: the model code is sharding-agnostic; jit propagates from the in/out shardings.
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str = "") -> P:
    """`spec` with every dim its mesh axes do not divide replaced by None (replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is not None and dim % _axis_size(mesh, axes):
            log.debug("%s: dim %d of %s is not divisible by mesh axes %s; replicated", name, dim, shape, axes)
            axes = None
        out.append(axes)
    return P(*out)


def rule_spec(name: str, ndim: int) -> P:
    """The spec of dotted param path `name` with `ndim` dims: first matching rule, leading None for stacked dims."""
    for pattern, spec in RULES:
        if re.search(pattern, name):
            if len(spec) > ndim:
                raise ShardingError(f"sharding rule {pattern!r} has {len(spec)} dims but {name} has {ndim}")
            return P(*((None,) * (ndim - len(spec)) + tuple(spec)))
    raise ShardingError(f"no sharding rule matches parameter {name!r}; add one to jlora.sharding.RULES")


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_specs(params, mesh: Mesh):
    """PartitionSpecs for a plain params tree (frozen, or full), arrays or ShapeDtypeStructs."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: fit_spec(rule_spec(_dotted(k), len(v.shape)), v.shape, mesh, _dotted(k)) for k, v in flat.items()})


def _pair_specs(path: tuple, pair: LoraPair, mesh: Mesh) -> LoraPair:
    """A LoraPair of specs: A [*S, in, R] gets the kernel's input spec, B [*S, R, out] its output spec."""
    name = _dotted(path)
    lay = pair.layout
    stack = lay.stack
    kernel_spec = rule_spec(name, stack + 2)  # the kernel as [*S, in, out]
    s_in, s_out = kernel_spec[stack], kernel_spec[stack + 1]
    if lay.kind not in ("dense", "embed"):
        # an einsum / DenseGeneral kernel's in or out is several dims flattened: no single axis fits
        log.debug("%s: %s kernel; LoRA pair replicated", name, lay.kind)
        s_in = s_out = None
    lead = (None,) * stack
    a = fit_spec(P(*lead, s_in, None), pair.a.shape, mesh, name + ".a")
    b = fit_spec(P(*lead, None, s_out), pair.b.shape, mesh, name + ".b")
    m = None if pair.magnitude is None else fit_spec(P(*lead, s_out), pair.magnitude.shape, mesh, name + ".magnitude")
    return pair.replace(a=a, b=b, magnitude=m)


def _is_pair(x) -> bool:
    return isinstance(x, LoraPair)


def trainable_specs(trainable, mesh: Mesh):
    """Specs with the trainable tree's exact structure: LoraPair nodes of specs, full leaves by rule."""
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: _is_pair(x))
    out = {}
    for path, leaf in flat.items():
        if _is_pair(leaf):
            out[path] = _pair_specs(path, leaf, mesh)
        else:
            out[path] = fit_spec(rule_spec(_dotted(path), len(leaf.shape)), leaf.shape, mesh, _dotted(path))
    return traverse_util.unflatten_dict(out)


def opt_state_specs(optimizer: optax.GradientTransformation, opt_state, trainable_spec_tree):
    """Specs of an optax state: every copy of the params tree (mu, nu, ...) takes the params' specs,
    everything else (step counts, flags) is replicated. `opt_state` may be ShapeDtypeStructs."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, spec: spec, opt_state, trainable_spec_tree,
        transform_non_params=lambda x: P(), is_leaf=lambda x: x is None or is_spec(x))


def to_shardings(mesh: Mesh, specs):
    """NamedShardings for a tree of PartitionSpecs (LoraPair nodes kept)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int = 2, row_axis: int = 0) -> P:
    """Rows over ('data', 'fsdp'), every other dim replicated, e.g. [n_micro, B, T] with row_axis=1."""
    return P(*[BATCH_AXES if i == row_axis else None for i in range(ndim)])


def shard_init(init_fn, mesh: Mesh, specs_fn, *args) -> Any:
    """Run `init_fn(*args)` with its outputs created already sharded: `jax.eval_shape` gives the
    output shapes, `specs_fn(shapes)` their specs, then jit with out_shardings, so no device ever
    holds a full copy of a sharded tree."""
    shapes = jax.eval_shape(init_fn, *args)
    shardings = to_shardings(mesh, specs_fn(shapes))
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def shard_params(params, mesh: Mesh):
    """Place a host params tree (numpy or jax) on the mesh by the rules, one leaf at a time.

    Each device receives only its slice (`make_array_from_callback`), so on several hosts every
    host reads just what its devices hold."""
    return jax.tree.map(_put, params, to_shardings(mesh, param_specs(params, mesh)))


def _put(x, sh: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sh:
        return x
    x = np.asarray(x)  # a host copy that every process holds: each device takes its slice
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def shard_trainable(trainable, mesh: Mesh):
    """Place a trainable tree (LoraPair nodes) on the mesh by `trainable_specs`."""
    return jax.tree.map(_put, trainable, to_shardings(mesh, trainable_specs(trainable, mesh)))


def describe_mesh(mesh: Mesh) -> str:
    """'data=2 fsdp=2 tensor=2 (8 devices on 1 host, cpu)'."""
    hosts = len({d.process_index for d in mesh.devices.flat})
    axes = " ".join(f"{a}={mesh.shape[a]}" for a in AXES)
    return f"{axes} ({mesh.devices.size} devices on {hosts} host{'s' * (hosts > 1)}, {mesh.devices.flat[0].platform})"
