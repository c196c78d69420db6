"""Where a trainable tree lives on the mesh: LoRA pairs placed by their kernel's sharding rule.

`LoraPair` A [*S, in, R] takes its kernel's input-dim spec, B [*S, R, out] its output-dim spec, and the
rank dim is replicated; a DoRA magnitude takes the output spec. Leaves trained in full take their own
rule. The rules and the mesh are jlora.parallel.sharding's; this module only knows the method's trees.
"""

from __future__ import annotations

import logging

import jax
from flax import traverse_util
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jlora.parallel.sharding import dotted, fit_spec, leaf_spec, put, rule_spec, to_shardings
from jlora.peft.routing import LoraPair

log = logging.getLogger(__name__)


def _pair_specs(path: tuple, pair: LoraPair, mesh: Mesh) -> LoraPair:
    """A LoraPair of specs: A [*S, in, R] gets the kernel's input spec, B [*S, R, out] its output spec."""
    name = dotted(path)
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
            out[path] = leaf_spec(dotted(path), tuple(leaf.shape), mesh)[0]
    return traverse_util.unflatten_dict(out)


def shard_trainable(trainable, mesh: Mesh):
    """Place a trainable tree (LoraPair nodes) on the mesh by `trainable_specs`."""
    return jax.tree.map(put, trainable, to_shardings(mesh, trainable_specs(trainable, mesh)))
