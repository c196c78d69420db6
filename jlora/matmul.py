"""The product every projection runs: x [..., I] @ w [I, O] (`matmul`), and nn.Dense's `dot_general` that routes
its product here. The models' projections and LoRA's deltas multiply through it; quantized kernels, which own
their gradient, through its `product`.

In bf16 / fp16 the product and both of its gradient products accumulate in fp32 and round once to the compute
dtype, as a bf16 GEMM does on a GPU or TPU. That is the same arithmetic a plain bf16 dot does, but XLA:CPU runs
bf16 x bf16 -> fp32 ~1.8x faster than its fp32 GEMM (AVX512-BF16), a plain bf16 dot (bf16 out) at its fp32 rate
or below, and autodiff's backward products (an fp32 cotangent times a bf16 kernel) as fp32 GEMMs; hence the
custom gradient. Other dtypes take the plain product, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # the compute dtypes accumulated in fp32


def product(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in x's dtype, summed in fp32 when that is bf16 / fp16 (rounded once at the end)."""
    low = x.dtype in LOW_PRECISION
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32 if low else None).astype(x.dtype)


@jax.custom_vjp
def _low_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return product("...i,io->...o", x, w)


def _low_matmul_fwd(x, w):
    # symbolic zeros: a frozen kernel takes no gradient, so x is not kept for one
    return _low_matmul(x.value, w.value), (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _low_matmul_bwd(res, g):
    x, w = res
    dx = None if w is None else product("...o,io->...i", g, w)  # g [..., O] @ w.T
    dw = None if x is None else product("...i,...o->io", x, g)
    return dx, dw


_low_matmul.defvjp(_low_matmul_fwd, _low_matmul_bwd, symbolic_zeros=True)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O]; with both in bf16 / fp16, accumulated in fp32 (forward and backward), else plain."""
    if x.dtype == w.dtype and x.dtype in LOW_PRECISION:
        return _low_matmul(x, w)
    return jnp.einsum("...i,io->...o", x, w)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's `dot_general`: its x [..., I] @ kernel [I, O] as `matmul`; anything else as lax.dot_general."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2
    if plain and precision is None and preferred_element_type is None:
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)
