"""Fused projections: several nn.Dense layers of one input computed as ONE matmul.

q/k/v (and gate/up) read the same activations. Three GEMMs, with k and v at 192 columns for
SmolLM2, run at about half this CPU's matmul rate, and XLA:CPU has no pass that merges them. So
`FusedDense` multiplies the input by the concatenation of its parts' kernels and splits the output.
The parts stay ordinary `nn.Dense` modules of the caller: the params tree keeps HF's names
(`q_proj/kernel`, ...), and so do the weight loaders, sharding rules, LoRA targets and PEFT files.
A part whose kernel is not a plain array (a quantized one) makes the call run part by part.

Method interceptors written for single nn.Dense calls (LoRA routing, per-row adapter stacks) see a
fused call part by part (jlora.peft.routing.route_parts): a fused module shows them its `parts` and
whether a call is `fused()`. This module knows nothing about what they add.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from jlora.matmul import matmul


class FusedDense(nn.Module):
    """`parts` (nn.Dense of the caller, same input) as one matmul; returns one output per part.

    With fuse=False, or while params are created, or when a kernel is not a plain array, each part
    is called on its own: the result is the same, computed as separate matmuls. Params of its own
    (`kernel` [D, sum out_i], `bias`) are the parts' concatenated ahead of time, as jlora.infer.generate lays
    decode weights out: concatenating every call copied the kernels at every token. That own kernel
    may also be a list of column blocks [D, n_j] (`jlora.infer.decode.column_blocks`): one matmul
    each, the outputs joined."""

    parts: tuple[nn.Dense, ...]
    fuse: bool = True

    def fused(self) -> bool:
        """Whether this call runs as one matmul (static: decided from the kernels' types)."""
        if self.is_initializing():
            return False
        if self.has_variable("params", "kernel"):  # concatenated ahead of time
            return True
        if not self.fuse:
            return False
        first = self.parts[0]
        return all(
            type(p) is nn.Dense
            and p.use_bias == first.use_bias
            and p.dtype == first.dtype
            and isinstance(p.get_variable("params", "kernel"), jax.Array)
            for p in self.parts
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if not self.fused():
            return tuple(part(x) for part in self.parts)
        own = self.has_variable("params", "kernel")
        joined = lambda name: (
            self.get_variable("params", name)
            if own
            else jnp.concatenate([p.get_variable("params", name) for p in self.parts], axis=-1)
        )
        w = joined("kernel")  # [D, sum out_i], or its column blocks
        x, *blocks = promote_dtype(x, *(w if isinstance(w, (list, tuple)) else [w]), dtype=self.parts[0].dtype)
        ys = [matmul(x, b) for b in blocks]
        y = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)  # [..., sum out_i]
        if self.parts[0].use_bias:
            y = y + joined("bias").astype(y.dtype)
        return tuple(jnp.split(y, np.cumsum([p.features for p in self.parts])[:-1], axis=-1))
