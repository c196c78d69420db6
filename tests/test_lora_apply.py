"""The factored path (jlora.peft.routing): `lora_apply`, routing any flax.linen model through `apply` (DenseGeneral,
Einsum and scanned Dense kernels, found by `trace_layouts`), layer subsets of scanned stacks, and a jaxpr walk showing
that forward+backward never forms an [in, out] product of A and B. LLaMA/PEFT parity lives in test_lora.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from lora_testing import randomize

from jlora import split
from jlora.models.family import init_params
from jlora.models.llama import Llama, LlamaConfig
from jlora.peft.lora import LoraConfig, LoraError, count_params, merge, unmerge
from jlora.peft.routing import KernelLayout, LoraPair, apply, lora_apply, trace_layouts

TOL = dict(atol=1e-5, rtol=0)
KEY = lambda i: jax.random.key(i, impl="rbg")


def pairs(trainable) -> dict:
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
    return {k: v for k, v in flat.items() if isinstance(v, LoraPair)}


def test_lora_apply_is_x_w_plus_the_scaled_low_rank_term():
    rng = np.random.default_rng(0)
    x, w, a, b = (rng.normal(size=s).astype(np.float32) for s in [(3, 5, 6), (6, 7), (6, 2), (2, 7)])
    np.testing.assert_allclose(np.asarray(lora_apply(x, w, a, b, 0.5)), x @ w + 0.5 * (x @ a) @ b, atol=1e-5)


# ---- the same transformation on a model that is not LLaMA ----


class ScannedDense(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + jnp.tanh(nn.Dense(32, name="fc")(x)), None


class Tower(nn.Module):
    """A scanned stack of 3 Dense layers: the cheapest model with stacked kernels."""

    @nn.compact
    def __call__(self, x):
        return nn.scan(ScannedDense, variable_axes={True: 0}, split_rngs={"params": True}, length=3)(name="stack")(
            x, None
        )[0]


def numpy_params(model, *args, std: float = 0.15, seed: int = 0):
    """Random params of the model's shapes, without compiling its initializers."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(KEY(0), *args))["params"]
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype), shapes)


class MixerBlock(nn.Module):
    """Attention with DenseGeneral heads, an Einsum MLP (fc1's kernel stored [out, in]), a scanned Dense Tower."""

    @nn.compact
    def __call__(self, x):  # [B,T,D=32]
        q = nn.DenseGeneral((4, 8), name="query")(x)  # kernel [D,N,H]
        k = nn.DenseGeneral((4, 8), name="key")(x)
        v = nn.DenseGeneral((4, 8), name="value")(x)
        att = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8.0))
        x = x + nn.DenseGeneral(32, axis=(-2, -1), name="out")(jnp.einsum("bnts,bsnh->btnh", att, v))  # [N,H,D]
        h = nn.gelu(nn.Einsum((48, 32), "btd,fd->btf", name="fc1")(x))  # kernel [F,D]
        x = x + nn.Einsum((48, 32), "btf,fd->btd", use_bias=False, name="fc2")(h)
        x = Tower(name="tower")(x)
        return nn.Dense(10, name="head")(x.mean(axis=1))


def test_split_apply_merge_on_a_non_llama_model():
    model, x = MixerBlock(), jnp.asarray(np.random.default_rng(1).normal(0, 0.5, (2, 5, 32)), jnp.float32)
    params = numpy_params(model, x)
    base_fwd = jax.jit(lambda p: model.apply({"params": p}, x))
    lora_fwd = jax.jit(lambda f, t: apply(model, f, t, x))
    layouts = trace_layouts(model, x)
    assert layouts[("query", "kernel")] == KernelLayout("dense_general", stack=0, n_in_dims=1)
    assert layouts[("out", "kernel")] == KernelLayout("dense_general", stack=0, n_in_dims=2)
    assert layouts[("fc1", "kernel")] == KernelLayout("einsum", equation="btd,fd->btf")
    assert layouts[("tower", "stack", "fc", "kernel")] == KernelLayout("dense", stack=1)
    targets = ("query", "value", "out", "fc1", "fc2", "fc", "head")
    frozen, trainable = split(params, LoraConfig(rank=3, alpha=6, targets=targets), KEY(0), layouts=layouts)
    assert {p[-2] for p in pairs(trainable)} == set(targets)
    shapes = {path[-2]: (pair.a.shape, pair.b.shape) for path, pair in pairs(trainable).items()}
    assert shapes["query"] == ((32, 3), (3, 32)) and shapes["out"] == ((32, 3), (3, 32))  # [D, N*H] flattened
    assert shapes["fc1"] == ((32, 3), (3, 48)) and shapes["fc"] == ((3, 32, 3), (3, 3, 32))
    base = np.asarray(base_fwd(params))
    np.testing.assert_allclose(
        np.asarray(lora_fwd(frozen, trainable)), base, atol=1e-6, rtol=0
    )  # B = 0: the base model
    trainable = randomize(trainable, std=0.2)
    ours = np.asarray(lora_fwd(frozen, trainable))
    assert np.abs(ours - base).max() > 1e-2
    merged = merge(frozen, trainable)
    np.testing.assert_allclose(np.asarray(base_fwd(merged)), ours, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), jax.jit(unmerge)(merged, trainable), frozen)
    # split from the params alone reads DenseGeneral/Einsum kernels as Dense: apply says so instead of guessing
    frozen, trainable = split(params, LoraConfig(rank=3, targets=("query",)), KEY(0))
    with pytest.raises(LoraError, match=r"query .*nn.DenseGeneral.*trace_layouts") as err:
        apply(model, frozen, trainable, x)
    assert "\n" not in str(err.value)
    for name, kind in [("fc1", "einsum"), ("query", "dense_general")]:  # DoRA needs a plain [in, out] kernel
        with pytest.raises(LoraError, match=rf"DoRA .*{name} is a {kind} kernel") as err:
            split(params, LoraConfig(targets=(name,), use_dora=True), KEY(0), layouts=layouts)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("dora", [False, True])
def test_layers_subset_changes_and_trains_only_those_layers(dora):
    model, x = Tower(), jnp.asarray(np.random.default_rng(1).normal(size=(4, 32)), jnp.float32)
    params = numpy_params(model, x)
    frozen, trainable = split(
        params, LoraConfig(rank=3, alpha=6, targets=("fc",), layers=(0, 2), use_dora=dora), KEY(0)
    )
    trainable = randomize(trainable, std=0.3)
    pair = trainable["stack"]["fc"]["kernel"]
    assert pair.scale == (2.0, 0.0, 2.0) and not np.asarray(pair.a[1]).any() and not np.asarray(pair.b[1]).any()
    assert count_params(trainable) == 2 * (32 * 3 + 3 * 32 + (32 if dora else 0))
    grads = jax.jit(jax.grad(lambda t: jnp.sum(apply(model, frozen, t, x) ** 2)))(trainable)
    g = grads["stack"]["fc"]["kernel"]
    for leaf in [g.a, g.b] + ([g.magnitude] if dora else []):
        assert not np.asarray(leaf[1]).any()  # the left-out layer: exactly zero
        assert np.asarray(leaf[0]).any() and np.asarray(leaf[2]).any()
    merged = merge(frozen, trainable)
    w, w0 = np.asarray(merged["stack"]["fc"]["kernel"]), np.asarray(params["stack"]["fc"]["kernel"])
    np.testing.assert_array_equal(w[1], w0[1])
    assert np.abs(w[0] - w0[0]).max() > 1e-3 and np.abs(w[2] - w0[2]).max() > 1e-3
    both = jax.jit(lambda m, f, t: (model.apply({"params": m}, x), apply(model, f, t, x)))
    np.testing.assert_allclose(*map(np.asarray, both(merged, frozen, trainable)), **TOL)


def xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


# ---- the factored path never forms an [in, out] product of A and B ----


def tainted_shapes(jaxpr, tainted: list[bool]) -> tuple[list[bool], set]:
    """Follow values computed from the tainted inputs through `jaxpr` and its sub-jaxprs (scan, remat, pjit, ...).

    Returns the taint of the outputs and the shapes of every tainted intermediate."""
    env, shapes = {}, set()
    is_var = lambda v: not hasattr(v, "val")
    for v, t in zip(jaxpr.invars, tainted):
        env[v] = t
    for eqn in jaxpr.eqns:
        ins = [is_var(v) and env.get(v, False) for v in eqn.invars]
        outs = [any(ins)] * len(eqn.outvars)
        for sub in eqn.params.values():
            for sj in sub if isinstance(sub, (tuple, list)) else [sub]:
                sj = getattr(sj, "jaxpr", sj)
                if not hasattr(sj, "eqns"):
                    continue
                # jit, remat, scan, custom_vjp map inputs one to one; cond, while: conservatively all or none
                one_to_one = len(sj.invars) == len(ins) and eqn.primitive.name != "while"
                sub_in = ins if one_to_one else [any(ins)] * len(sj.invars)
                if eqn.primitive.name == "scan":  # a tainted carry out taints the carry in: iterate to a fixpoint
                    c0, nc = eqn.params["num_consts"], eqn.params["num_carry"]
                    while True:
                        sub_out, inner = tainted_shapes(sj, sub_in)
                        grown = [a or b for a, b in zip(sub_in[c0 : c0 + nc], sub_out[:nc])]
                        if grown == sub_in[c0 : c0 + nc]:
                            break
                        sub_in = sub_in[:c0] + grown + sub_in[c0 + nc :]
                else:
                    sub_out, inner = tainted_shapes(sj, sub_in)
                shapes |= inner
                if len(sub_out) == len(outs):
                    outs = sub_out
        for v, t in zip(eqn.outvars, outs):
            env[v] = t
            if t:
                shapes.add(tuple(v.aval.shape))
    return [is_var(v) and env.get(v, False) for v in jaxpr.outvars], shapes


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_forward_backward_never_forms_the_full_delta(remat, dora):
    """Nor does DoRA: its column norms |W + sAB| come from A^T W [R, out], A^T A [R, R] and B."""
    # distinctive sizes: D=48, q_proj [48, 80], o_proj [80, 48], gate/up [48, 112]; batch*seq = 2*7 rows
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=20,
        remat=remat,
    )
    params, model = jax.eval_shape(lambda: init_params(cfg, KEY(0))), Llama(cfg)
    targets = ("q_proj", "o_proj", "gate_proj", "down_proj")
    frozen, trainable = jax.eval_shape(
        lambda p: split(p, LoraConfig(rank=4, targets=targets, use_dora=dora), KEY(0)), params
    )
    ids = jnp.zeros((2, 7), jnp.int32)
    kernels = {tuple(p.a.shape[1:-1]) + tuple(p.b.shape[-1:]) for p in pairs(trainable).values()}
    forbidden = {s for k in kernels for s in (k, k[::-1], (2, *k), (2, *k[::-1]))}

    def shapes_from_trainable(loss):  # the jaxpr of value_and_grad wrt trainable; its first inputs are A/B
        closed = jax.make_jaxpr(jax.value_and_grad(loss))(trainable, frozen)
        n = len(jax.tree.leaves(trainable))
        return tainted_shapes(closed.jaxpr, [i < n for i in range(len(closed.jaxpr.invars))])[1]

    factored = shapes_from_trainable(lambda t, f: xent(apply(model, f, t, ids), ids))
    assert not factored & forbidden, sorted(factored & forbidden)
    assert (2, 7, 4) in factored  # the x@A activations are seen, so the walk did go inside the scan
    naive = shapes_from_trainable(lambda t, f: xent(model.apply({"params": merge(f, t)}, ids), ids))
    assert naive & forbidden  # the same check does catch W + A@B


# ---- what the remat policy keeps for the backward pass ----


def _saved_residual_shapes(fn, *args) -> list[str]:
    """The shapes (e.g. 'f32[2,2,16,128]') of every residual `jax.grad(fn)` keeps from forward to backward."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return [line.split()[0] for line in out.getvalue().splitlines() if line.strip()]


def test_dots_saveable_keeps_one_full_width_copy_per_projection_with_lora():
    """Under remat="dots_saveable" an adapted projection keeps its output once, like a frozen one: the
    LoRA term (x@A)@B is part of the saved sum, never saved again at full width ([.., T, F] or [.., T, D])."""
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        remat="dots_saveable",
    )
    params = init_params(cfg, KEY(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 16)), jnp.int32)
    model = Llama(cfg)
    frozen, trainable = split(params, LoraConfig(rank=4, targets="all-linear"), KEY(1))
    q_frozen, q_only = split(params, LoraConfig(rank=4, targets=("q_proj",)), KEY(1))

    def loss(t, f):
        return jnp.sum(apply(model, f, t, ids, return_hidden=True) ** 2)

    def full_width(shapes):  # saved [L, B, T, width] activations, by width
        widths = {}
        for s in shapes:
            dims = [int(d) for d in s[s.index("[") + 1 : -1].split(",") if d]
            if len(dims) == 4 and dims[:3] == [2, 2, 16]:
                widths[dims[3]] = widths.get(dims[3], 0) + 1
        return widths

    with_lora = full_width(_saved_residual_shapes(lambda t: loss(t, frozen), trainable))
    attention_only = full_width(_saved_residual_shapes(lambda t: loss(t, q_frozen), q_only))
    assert with_lora[160] == 2  # gate_proj and up_proj outputs, nothing else at width F
    assert with_lora == attention_only  # adapting 6 more projections saves nothing more at full width
