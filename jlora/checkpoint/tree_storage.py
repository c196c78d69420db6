"""Pytrees <-> the nested dicts of arrays that orbax stores (jlora.checkpoint.train_state and .adapter).

Any pytree (optax states, `LoraPair`s, Python scalars, typed rng keys) becomes a nested dict keyed
by its key paths; rng keys are stored as their raw key data and restored with their impl.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"cannot name pytree key {k!r}")


def is_rng_key(x) -> bool:
    """A typed jax rng key (or its abstract value)."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keyed(tree, leaf_fn) -> dict:
    """Any pytree -> nested dict keyed by its key paths (a LoraPair becomes {a, b, magnitude}), leaves mapped."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return traverse_util.unflatten_dict({tuple(_key_name(k) for k in p): leaf_fn(x) for p, x in leaves})


def to_storage(tree) -> dict:
    """Any pytree -> nested dict of arrays keyed by its key paths (rng keys as raw key data)."""
    return _keyed(tree, _storable)


def restore_target(abstract) -> dict:
    """The orbax restore target (ShapeDtypeStructs with shardings) for the storage form of `abstract`."""
    return _keyed(abstract, _target_leaf)


def _storable(leaf):
    if is_rng_key(leaf):
        return jax.random.key_data(leaf)  # raw uint32 key data
    return leaf if isinstance(leaf, (jax.Array, np.ndarray)) else np.asarray(leaf)  # Python scalars


def _target_leaf(x):
    """The orbax restore target for one leaf of an abstract state."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if is_rng_key(x):
            if isinstance(sharding, jax.sharding.NamedSharding):
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return np.asarray(x)  # numpy and Python scalars come back as numpy


def from_storage(stored: dict, abstract):
    """Inverse of `to_storage`, shaped like `abstract` (python scalars and rng keys restored as such)."""
    flat = traverse_util.flatten_dict(stored)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, like in paths:
        value = flat[tuple(_key_name(k) for k in path)]
        if is_rng_key(like):
            # the key dtype carries its impl; jax.random.key_impl refuses a ShapeDtypeStruct
            value = jax.random.wrap_key_data(value, impl=like.dtype._impl)
        elif isinstance(like, (bool, int, float)):
            value = type(like)(np.asarray(value).item())
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)
