"""Device mesh and parameter placement over the ('data', 'fsdp', 'tensor') axes.

Owns `make_mesh`, the ONE ordered rules table (`RULES`: regex over a dotted param path ->
PartitionSpec of the per-layer leaf, first match wins, no match is an error), and the specs and
shardings derived from it for the frozen tree, the optimizer state (mirrors the trainable tree, whose
specs jlora.peft.placement derives) and batches (rows over ('data', 'fsdp')). A rule's axis that does
not divide its dim moves to another dim of the leaf that it divides; a frozen leaf over 1 MiB that
still ends up replicated over fsdp or tensor is an error (`ReplicationError`) unless allowed.
Also owns the one activation-constraint helper, `constrain`: the model names its activation dims
logically ("batch", "heads", "mlp", "vocab") and ACTIVATION_AXES places them on the mesh that
`activation_sharding` makes current while a step is traced. It does not build models or optimizers.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora.errors import JloraError
from jlora.quant.quantize import FORMATS, QuantizedKernel, is_quantized

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both: FSDP is data parallel with sharded weights

# The ordered rules table: regex over a dotted param path -> spec of the per-layer leaf (a layer-stacked
# leaf [L, ...] gets leading None for its extra dims), first match wins. Families and methods add theirs
# (`add_rules`) when they are imported: jlora.models.family.register adds a family's, a method its own.
RULES: list[tuple[str, P]] = []


def add_rules(rules) -> None:
    """Append (regex, PartitionSpec) rules to the table; one already there is not added again."""
    for rule in rules:
        if rule not in RULES:
            RULES.append(tuple(rule))


# Logical activation dims -> mesh axes. Batch rows are split like the batch itself; with tensor > 1
# attention heads, the MLP hidden dim and the vocab are split Megatron-style (column-parallel
# projections produce them sharded, row-parallel ones reduce them back).
ACTIVATION_AXES: dict[str, Any] = {"batch": BATCH_AXES, "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

# A frozen leaf bigger than this must not be silently replicated over fsdp or tensor.
REPLICATION_LIMIT_BYTES = 1 << 20
_WARNED: set[str] = set()


class ShardingError(JloraError, ValueError):
    """A parameter no rule covers, or a mesh that does not fit the devices; one line."""


class ReplicationError(ShardingError):
    """A big frozen leaf that no dim lets the mesh shard; one line naming leaf, shape, mesh and fix."""


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


def _names(axes) -> tuple[str, ...]:
    return () if axes is None else axes if isinstance(axes, tuple) else (axes,)


def _join(names: tuple[str, ...]):
    return None if not names else names[0] if len(names) == 1 else names


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str = "", movable: int = 0) -> P:
    """`spec` made to divide `shape`. A dim's mesh axes that do not divide it move to another of the
    last `movable` dims that they divide (the largest such dim); else they are dropped (replicated).

    E.g. fsdp=6 on an embedding [128256, 4096] with P("tensor", "fsdp"): 4096 is no multiple of 6,
    128256 is, so the table becomes P(("tensor", "fsdp"), None) instead of replicated over fsdp."""
    dims = [list(_names(a)) for a in tuple(spec) + (None,) * (len(shape) - len(spec))]
    for i in range(len(shape)):
        while dims[i] and shape[i] % _axis_size(mesh, tuple(dims[i])):
            axis = dims[i].pop()
            homes = [
                j
                for j in range(len(shape) - movable, len(shape))
                if j != i and shape[j] % (_axis_size(mesh, tuple(dims[j])) * mesh.shape[axis]) == 0
            ]
            if homes:
                dims[max(homes, key=lambda j: shape[j])].append(axis)
            else:
                log.debug("%s: no dim of %s is divisible by mesh axis %s; replicated over it", name, shape, axis)
    return P(*[_join(tuple(d)) for d in dims])


def _rule(name: str) -> P:
    for pattern, spec in RULES:
        if re.search(pattern, name):
            return spec
    raise ShardingError(f"no sharding rule matches parameter {name!r}; add one to its family's sharding_rules")


def rule_spec(name: str, ndim: int) -> P:
    """The spec of dotted param path `name` with `ndim` dims: first matching rule, leading None for stacked dims."""
    spec = _rule(name)
    if len(spec) > ndim:
        raise ShardingError(f"sharding rule for {name} has {len(spec)} dims but the parameter has {ndim}")
    return P(*((None,) * (ndim - len(spec)) + tuple(spec)))


def leaf_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[str]]:
    """(fitted spec, mesh axes of size > 1 the rule wanted but could not place) of one full leaf.
    Axes move only among the leaf's own dims, never onto the stacked layer dim the scan slices."""
    wanted = rule_spec(name, len(shape))
    got = fit_spec(wanted, shape, mesh, name, movable=len(_rule(name)))
    have = {a for axes in got for a in _names(axes)}
    return got, [a for axes in wanted for a in _names(axes) if a not in have and mesh.shape[a] > 1]


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_specs(params, mesh: Mesh, allow_replication: bool = False):
    """PartitionSpecs for a plain params tree (frozen, or full), arrays or ShapeDtypeStructs.

    A leaf over REPLICATION_LIMIT_BYTES that the mesh's fsdp / tensor axes cannot split is a
    ReplicationError; with `allow_replication`, one warning line on stderr instead."""
    specs, lost = {}, []
    for k, v in traverse_util.flatten_dict(params).items():
        if is_quantized(v):
            specs[k], axes = _quantized_spec(dotted(k), v, mesh)
            nbytes = v.nbytes
        else:
            specs[k], axes = leaf_spec(dotted(k), tuple(v.shape), mesh)
            nbytes = int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        if axes and nbytes > REPLICATION_LIMIT_BYTES:
            lost.append((nbytes, dotted(k), tuple(v.shape), axes))
    if lost:
        nbytes, name, shape, axes = max(lost)
        sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
        what = (
            f"{name} {shape} ({nbytes / 2**20:,.0f} MiB) would be replicated over mesh {sizes}: no dim of it "
            f"divides by that size ({len(lost)} leaves over {REPLICATION_LIMIT_BYTES >> 20} MiB in all)"
        )
        if not allow_replication:
            raise ReplicationError(
                f"{what}. Use mesh sizes that divide the model's dims (e.g. powers of two), "
                f"or set mesh.allow_replication: true"
            )
        if what not in _WARNED:  # specs are computed several times per run: say it once
            _WARNED.add(what)
            print(f"warning: {what}; replicated, as mesh.allow_replication is set", file=sys.stderr)
    return traverse_util.unflatten_dict(specs)


def _quantized_spec(name: str, q: QuantizedKernel, mesh: Mesh) -> tuple[QuantizedKernel, list[str]]:
    """A QuantizedKernel of specs: each field [*S, A, B, ...] takes its dense kernel's spec on [*S, A, B]
    (axes that do not divide A or B move between the two), its within-block dims replicated. The
    lost axes are those of the biggest field."""
    fields, lost = {}, []
    trailing = FORMATS[q.fmt].trailing
    biggest = max(q.fields, key=lambda k: int(np.prod(q.fields[k].shape)))
    for key, f in q.fields.items():
        spec, axes = leaf_spec(name, tuple(f.shape[: f.ndim - trailing[key]]), mesh)
        fields[key] = P(*spec, *(None,) * trailing[key])
        lost = axes if key == biggest else lost
    return q.replace(fields=fields), lost


def opt_state_specs(optimizer: optax.GradientTransformation, opt_state, trainable_spec_tree):
    """Specs of an optax state: every copy of the params tree (mu, nu, ...) takes the params' specs,
    everything else (step counts, flags) is replicated. `opt_state` may be ShapeDtypeStructs."""
    is_spec = lambda x: isinstance(x, P)
    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        opt_state,
        trainable_spec_tree,
        transform_non_params=lambda x: P(),
        is_leaf=lambda x: x is None or is_spec(x),
    )


def to_shardings(mesh: Mesh, specs):
    """NamedShardings for a tree of PartitionSpecs (LoraPair nodes kept)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int = 2, row_axis: int = 0) -> P:
    """Rows over ('data', 'fsdp'), every other dim replicated, e.g. [n_micro, B, T] with row_axis=1."""
    return P(*[BATCH_AXES if i == row_axis else None for i in range(ndim)])


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """Make `constrain` pin activations to `mesh` for what is traced inside (a jitted step's body)."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, *dims: str | None) -> jax.Array:
    """Pin activation `x` to the current `activation_sharding` mesh, one logical name (ACTIVATION_AXES)
    or None per dim, e.g. constrain(h, "batch", None, None). Without XLA would be free to keep the
    whole batch on every device. Axes that do not divide their dim are dropped; a no-op outside
    `activation_sharding` (plain model.apply, generation)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.devices.size == 1:
        return x
    spec = P(*(ACTIVATION_AXES[d] if d else None for d in dims))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fit_spec(spec, x.shape, mesh)))


def shards(dim: str) -> int:
    """Devices the logical activation dim `dim` ("heads", "vocab", ...) is split over under the current
    `activation_sharding` (1 outside it)."""
    mesh = _ACTIVATION_MESH.get()
    return 1 if mesh is None else _axis_size(mesh, ACTIVATION_AXES[dim])


def shard_init(init_fn, mesh: Mesh, specs_fn, *args) -> Any:
    """Run `init_fn(*args)` with its outputs created already sharded: `jax.eval_shape` gives the
    output shapes, `specs_fn(shapes)` their specs, then jit with out_shardings, so no device ever
    holds a full copy of a sharded tree."""
    shapes = jax.eval_shape(init_fn, *args)
    shardings = to_shardings(mesh, specs_fn(shapes))
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def shard_params(params, mesh: Mesh, allow_replication: bool = False):
    """Place a host params tree (numpy or jax) on the mesh by the rules, one leaf at a time.

    Each device receives only its slice (`make_array_from_callback`), so on several hosts every
    host reads just what its devices hold."""
    return jax.tree.map(put, params, to_shardings(mesh, param_specs(params, mesh, allow_replication)))


def put(x, sh: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sh:
        return x
    x = np.asarray(x)  # a host copy that every process holds: each device takes its slice
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def describe_mesh(mesh: Mesh) -> str:
    """'data=2 fsdp=2 tensor=2 (8 devices on 1 host, cpu)'."""
    hosts = len({d.process_index for d in mesh.devices.flat})
    axes = " ".join(f"{a}={mesh.shape[a]}" for a in AXES)
    return f"{axes} ({mesh.devices.size} devices on {hosts} host{'s' * (hosts > 1)}, {mesh.devices.flat[0].platform})"
