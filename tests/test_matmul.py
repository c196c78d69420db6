"""jlora.matmul: bf16 products accumulate in fp32 forward and backward, and their compiled products stay bf16."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.matmul import dense_dot_general, matmul
from jlora.models.layers import Embed, dense


def _operands(dtype, shape=(3, 5, 64), out=48):
    kx, kw = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, shape, dtype), jax.random.normal(kw, (shape[-1], out), dtype) / 8


def _reference(x, w, g):
    """y, dx, dw in fp32 math from the same bf16 values, each rounded once to bf16."""
    x32, w32, g32 = (np.asarray(a, np.float32) for a in (x, w, g))
    y = x32 @ w32
    dx = g32 @ w32.T
    dw = x32.reshape(-1, x32.shape[-1]).T @ g32.reshape(-1, g32.shape[-1])
    return [jnp.asarray(a).astype(jnp.bfloat16) for a in (y, dx, dw)]


def test_bf16_product_and_gradients_are_fp32_sums_rounded_once():
    x, w = _operands(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(1), (*x.shape[:-1], w.shape[-1]), jnp.bfloat16)
    y, vjp = jax.vjp(matmul, x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    for got, want in zip((y, dx, dw), _reference(x, w, g)):
        # fp32 sums in another order: at most one bf16 ulp apart
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2**-7, atol=1e-3)


def test_fp32_is_the_plain_product():
    x, w = _operands(jnp.float32)
    np.testing.assert_array_equal(np.asarray(matmul(x, w)), np.asarray(jnp.einsum("...i,io->...o", x, w)))


def _dots(fn, *args) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) tensor types of every dot_general `jax.jit(fn)` lowers to, e.g. '4x48xbf16'."""
    text = jax.jit(fn).lower(*args).as_text()
    return re.findall(r"stablehlo\.dot_general.*: \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>", text)


def _bf16_into_fp32(dot) -> bool:
    """bf16 operands summed into fp32: XLA:CPU's fast bf16 GEMM (a bf16 result, or an fp32 operand, is not)."""
    lhs, rhs, out = dot
    return lhs.endswith("bf16") and rhs.endswith("bf16") and out.endswith("f32")


@pytest.mark.parametrize("frozen", [True, False])
def test_bf16_gradient_products_are_bf16_and_a_frozen_kernel_gets_none(frozen):
    """A plain bf16 dot gives a bf16 result, and autodiff of an fp32-accumulated one makes fp32 x bf16 backward
    products: XLA:CPU runs both at its fp32 rate or below. Every product here is bf16 x bf16 -> fp32, and a
    frozen kernel's gradient is not computed."""
    x, w = _operands(jnp.bfloat16)
    loss = lambda x, w: matmul(x, w).astype(jnp.float32).sum()
    dots = _dots(jax.grad(loss, argnums=0 if frozen else (0, 1)), x, w)
    assert dots and all(_bf16_into_fp32(d) for d in dots), dots
    kernel_grads = [d for d in dots if d[2] == "64x48xf32"]  # a product of the kernel's shape: its gradient
    assert len(kernel_grads) == (0 if frozen else 1), dots


def test_a_frozen_kernel_keeps_no_input_for_the_backward_pass():
    """The input is kept only for the kernel's gradient: under a frozen kernel (a LoRA base) the backward pass
    holds the kernel alone, not a copy of every projection's input."""
    x, w = _operands(jnp.bfloat16)
    _, frozen = jax.vjp(lambda x: matmul(x, w), x)
    _, trained = jax.vjp(matmul, x, w)
    assert [a.shape for a in jax.tree.leaves(frozen)] == [w.shape]
    assert sorted(a.shape for a in jax.tree.leaves(trained)) == sorted([x.shape, w.shape])


def test_nn_dense_multiplies_through_matmul():
    x, w = _operands(jnp.bfloat16, (4, 64), 48)
    layer = dense(48, False, "proj", "bfloat16", "bfloat16")
    y = layer.apply({"params": {"kernel": w}}, x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(matmul(x, w), np.float32))
    loss = lambda x, w: layer.apply({"params": {"kernel": w}}, x).astype(jnp.float32).sum()
    dots = _dots(jax.grad(loss), x, w)
    assert dots and all(_bf16_into_fp32(d) for d in dots), dots


def test_other_dot_generals_pass_through():
    x, w = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    dims = (((2,), (1,)), ((0,), (0,)))  # batched: not nn.Dense's plain product
    np.testing.assert_array_equal(dense_dot_general(x, w, dims), jax.lax.dot_general(x, w, dims))
    assert isinstance(dense(3, False, "p", "float32", "float32"), nn.Dense)


def test_a_tied_head_multiplies_through_matmul():
    """The tied output head (`Embed.attend`, x @ table.T) is a bf16 x bf16 -> fp32 product too, forward and back."""
    x, table = _operands(jnp.bfloat16, (4, 64), 48)
    table = table.T  # [V=48, D=64]
    embed = Embed(48, 64, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    head = lambda x, table: embed.apply({"params": {"embedding": table}}, x, method="attend")
    np.testing.assert_array_equal(np.asarray(head(x, table), np.float32), np.asarray(matmul(x, table.T), np.float32))
    loss = lambda x, table: head(x, table).astype(jnp.float32).sum()
    dots = _dots(jax.value_and_grad(loss, argnums=(0, 1)), x, table)  # the head, and both its gradients
    assert len(dots) == 3 and all(_bf16_into_fp32(d) for d in dots), dots
