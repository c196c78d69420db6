"""Training attention's two paths: cuDNN's layout and masks (run through jax.nn.dot_product_attention with
implementation="xla", the same call the GPU makes with "cudnn") against the blocked kernel, the trace-time
dispatch between them, packed rows, and the cuDNN call itself traced (not run) with its remat policy."""

import jax
import jax._src.cudnn.fused_attention_stablehlo as cudnn_fa
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jlora.models.attention import (
    CUDNN_FWD_PRIMITIVE,
    SAVE_NAME,
    blocked_attention,
    resolve_impl,
    saveable,
    sdpa_attention,
    train_attention,
)

B, T, N, K, H = 4, 256, 4, 2, 16  # G = 2 query heads per KV head; T = 2 blocks of the blocked kernel
LENGTHS = (256, 173, 5, 0)  # a full row, two right-padded rows, an all-padding row (evaluation's filler)


def qkv(dtype=jnp.float32, b=B, t=T, h=H, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, t, N, h), dtype)  # [B,T,N,H]
    return q, jax.random.normal(kk, (b, t, K, h), dtype), jax.random.normal(kv, (b, t, K, h), dtype)  # [B,T,K,H]


def right_padded(lengths, t=T):
    return (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.int32)  # [B,T]: 1 = the row's sequence


def test_cudnn_layout_matches_blocked_kernel_in_values_and_gradients():
    q, k, v = qkv()
    seg = jnp.asarray(right_padded(LENGTHS))
    valid = seg[:, :, None, None].astype(jnp.float32)  # [B,T,1,1]
    w = jax.random.normal(jax.random.key(1), q.shape)  # a loss that weighs every head and position differently

    def loss(fn, q, k, v):  # padded queries are left out, as the trainer's loss_mask does
        return jnp.sum(fn(q, k, v, seg) * w * valid)

    sdpa = lambda q, k, v, seg: sdpa_attention(q, k, v, seg, implementation="xla")
    out_s, out_b = sdpa(q, k, v, seg), blocked_attention(q, k, v, seg)
    np.testing.assert_allclose(out_s * valid, out_b * valid, atol=2e-5, rtol=2e-5)
    grads_s = jax.grad(lambda *a: loss(sdpa, *a), argnums=(0, 1, 2))(q, k, v)
    grads_b = jax.grad(lambda *a: loss(blocked_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for name, gs, gb in zip("qkv", grads_s, grads_b):
        assert float(jnp.max(jnp.abs(gb))) > 0.1, name  # the comparison below is not between zeros
        np.testing.assert_allclose(gs, gb, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")
    # Padding reaches cuDNN as per-row lengths: padded queries of a row with a sequence come out 0.
    for row, n in enumerate(LENGTHS[:3]):
        assert not np.any(np.asarray(out_s[row, n:])), row


def test_packed_and_left_padded_rows_give_nan_on_the_cudnn_layout_and_the_blocked_kernel_handles_packing():
    q, k, v = qkv(b=3)
    seg = right_padded((200, 256, 100))
    seg[0, 120:200] = 2  # row 0 packs two sequences: [0, 120) and [120, 200)
    seg[2] = seg[2, ::-1]  # row 2 is left-padded
    out = np.asarray(sdpa_attention(q, k, v, jnp.asarray(seg), implementation="xla"))
    assert np.isnan(out[0]).all() and np.isnan(out[2]).all()
    assert np.isfinite(out[1]).all()

    # The blocked kernel keeps the packed segments apart: segment 2 of row 0 attends as if it stood alone.
    packed = blocked_attention(q[:1], k[:1], v[:1], jnp.asarray(seg[:1]))
    alone = lambda x: jnp.roll(x[:1], -120, axis=1)  # [1,T,.,H]: segment 2 moved to the row's start
    single = blocked_attention(alone(q), alone(k), alone(v), jnp.asarray(right_padded((80,))))
    np.testing.assert_allclose(packed[0, 120:200], single[0, :80], atol=2e-5, rtol=2e-5)


def test_dispatch_picks_the_blocked_kernel_on_cpu_and_cudnn_only_where_it_runs():
    assert jax.default_backend() == "cpu"
    for dtype in (jnp.float32, jnp.bfloat16):
        assert resolve_impl("auto", dtype, 64) == "blocked"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU, and the backend is cpu"):
        resolve_impl("cudnn", jnp.bfloat16, 64)
    q, k, v = qkv(jnp.bfloat16, b=2)
    seg = jnp.asarray(right_padded((256, 100)))
    np.testing.assert_array_equal(train_attention(q, k, v, seg, "auto"), blocked_attention(q, k, v, seg))

    # The same rule on a CUDA backend: cuDNN for bf16 / fp16 and head dims it takes, else the blocked kernel.
    assert resolve_impl("auto", jnp.bfloat16, 64, platform="cuda") == "cudnn"
    assert resolve_impl("auto", jnp.float16, 128, platform="cuda") == "cudnn"
    assert resolve_impl("cudnn", jnp.bfloat16, 128, platform="cuda") == "cudnn"
    for dtype, head_dim in ((jnp.float32, 64), (None, 64), (jnp.bfloat16, 100), (jnp.bfloat16, 256)):
        assert resolve_impl("auto", dtype, head_dim, platform="cuda") == "blocked", (dtype, head_dim)
    assert resolve_impl("blocked", jnp.bfloat16, 64, platform="cuda") == "blocked"
    assert resolve_impl("auto", jnp.bfloat16, 64, platform="rocm") == "blocked"
    with pytest.raises(ValueError, match="computes in bfloat16 / float16"):
        resolve_impl("cudnn", jnp.float32, 64, platform="cuda")
    with pytest.raises(ValueError, match="expected one of auto, blocked, cudnn"):
        resolve_impl("flash", jnp.bfloat16, 64)


def test_cudnn_call_traces_and_the_remat_policy_keeps_its_forward(monkeypatch, capsys):
    # Tracing needs no GPU once jax believes cuDNN is installed; nothing here is compiled or run.
    monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 90800)
    q, k, v = qkv(jnp.bfloat16, b=2)
    seg = jnp.asarray(right_padded((256, 100)))

    def loss(q, k, v):
        return jnp.sum(sdpa_attention(q, k, v, seg, implementation="cudnn").astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(jax.checkpoint(loss, policy=saveable), argnums=(0, 1, 2)))(q, k, v)
    fwd = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == CUDNN_FWD_PRIMITIVE]
    assert len(fwd) == 1 and str(fwd[0].params["mask_type"]) == "MaskType.PADDING_CAUSAL"
    assert [x.aval.shape for x in fwd[0].invars[:3]] == [q.shape, k.shape, v.shape]  # GQA: K heads, not N

    def saved(policy):
        capsys.readouterr()
        print_saved_residuals(jax.checkpoint(loss, policy=policy), q, k, v)
        return capsys.readouterr().out

    kept = saved(saveable)
    assert kept.count(f"output of {CUDNN_FWD_PRIMITIVE}") == 2, kept  # the output and the softmax statistics
    assert kept.count("named 'attention_residual'") == 3, kept  # q, k, v
    # Without the primitive rule, names alone cannot reach inside jax's custom VJP: the forward would rerun.
    names_only = saved(jax.checkpoint_policies.save_only_these_names(SAVE_NAME))
    assert CUDNN_FWD_PRIMITIVE not in names_only, names_only
