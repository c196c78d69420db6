"""The LoRA train step: loss, optimizer, sharded state init, the jitted train and eval steps.

Owns the masked mean cross-entropy, the optax chain (clip, then AdamW on a warmup + constant /
linear / cosine schedule, inside `apply_if_finite`: a non-finite step is skipped and counted),
sharded init of (frozen, trainable, optimizer state), placing host batches on the mesh, and one
jitted call per global step that accumulates gradients over micro-batches with `lax.scan`.
Gradients are taken w.r.t. the trainable tree only; the frozen tree is an input that is never
donated. The loop, metrics and CLI live in jlora.train.loop (`main` here is the `jlora-train` entry).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora.errors import JloraError
from jlora.models.config import ModelConfig
from jlora.models.family import family_of, init_params
from jlora.models.layers import DTYPES
from jlora.parallel.sharding import (
    BATCH_AXES,
    activation_sharding,
    batch_spec,
    constrain,
    opt_state_specs,
    param_specs,
    shard_init,
    shard_params,
    shards,
    to_shardings,
)
from jlora.peft.lora import LoraConfig, LoraPair, split
from jlora.peft.placement import shard_trainable, trainable_specs
from jlora.peft.routing import apply
from jlora.quant.quantize import dense_value, leaf_encoder
from jlora.train.config import OptimConfig

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


class NonFiniteError(JloraError, RuntimeError):
    """Too many non-finite steps in a row: training diverged."""


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses where mask, number of such tokens) for logits [B,T,V], targets/mask [B,T].

    Sums, not a mean, so micro-batches and hosts add up to the exact mean of the global batch."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B,T]
    mask = mask.astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)


# Logits of one CE chunk stay under this many elements (64 MB in fp32).
CE_CHUNK_ELEMENTS = 1 << 24


def ce_chunk_size(batch: int, seq: int, vocab: int, max_elements: int = CE_CHUNK_ELEMENTS) -> int:
    """The largest divisor c of seq with batch * c * vocab <= max_elements (at least 1)."""
    fits = [c for c in range(1, seq + 1) if seq % c == 0 and batch * c * vocab <= max_elements]
    return max(fits, default=1)


def device_ce_chunk(batch: int, seq: int, vocab: int) -> int:
    """`ce_chunk_size` for the rows and vocab entries ONE device holds under the current
    `activation_sharding`: sized from the global batch, 70B on 64 chips got 2-position chunks."""
    return ce_chunk_size(max(batch // shards("batch"), 1), seq, max(vocab // shards("vocab"), 1))


def chunk_logits(h: jax.Array, w: jax.Array, tied: bool, softcap: float | None = None) -> jax.Array:
    eq = "bcd,vd->bcv" if tied else "bcd,dv->bcv"
    logits = jnp.einsum(eq, h, w.astype(h.dtype), preferred_element_type=jnp.float32)  # [B,c,V] fp32
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def by_chunk(x: jax.Array, chunk: int) -> jax.Array:
    """[B,T,...] -> [T/c, B, c, ...]: scan over sequence chunks, rows stay sharded."""
    b, t = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked_cross_entropy(
    h: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    tied: bool,
    chunk: int,
    softcap: float | None = None,
) -> jax.Array:
    """sum(mask * CE(h @ head, targets)) for hidden h [B,T,D], head w ([V,D] if tied else [D,V]),
    computed `chunk` positions at a time, so the [B,T,V] logits never exist. The gradient (w.r.t. h
    only: the head is frozen) is formed in the same pass, chunk by chunk, and kept as [B,T,D].
    `softcap`: the model's final-logit soft-cap (Gemma 2), applied to each chunk's logits as the model does."""

    def body(total, xs):
        hc, tc, mc = xs
        logits = constrain(chunk_logits(hc, w, tied, softcap), "batch", None, "vocab")  # [B,c,V]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tc)  # [B,c]
        return total + jnp.sum(ce * mc), None

    total, _ = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (by_chunk(h, chunk), by_chunk(targets, chunk), by_chunk(mask, chunk))
    )
    return total


def _chunked_ce_fwd(h, w, targets, mask, tied, chunk, softcap):
    def body(total, xs):
        hc, tc, mc = xs
        logits = constrain(chunk_logits(hc, w, tied, softcap), "batch", None, "vocab")  # [B,c,V]
        top = jnp.max(logits, axis=-1, keepdims=True)  # [B,c,1]
        e = jnp.exp(logits - top)  # one exp per logit serves the loss and its gradient
        total_e = jnp.sum(e, axis=-1, keepdims=True)
        ce = (top + jnp.log(total_e))[..., 0] - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]  # [B,c]
        dlogits = (e / total_e - jax.nn.one_hot(tc, logits.shape[-1])) * mc[..., None]
        if softcap is not None:  # through cap * tanh(raw / cap): times 1 - tanh^2
            dlogits = dlogits * (1 - jnp.square(logits / softcap))
        eq = "bcv,vd->bcd" if tied else "bcv,dv->bcd"
        dh = jnp.einsum(eq, dlogits.astype(hc.dtype), w.astype(hc.dtype), preferred_element_type=jnp.float32)
        return total + jnp.sum(ce * mc), dh.astype(hc.dtype)  # [B,c,D]

    total, dh = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (by_chunk(h, chunk), by_chunk(targets, chunk), by_chunk(mask, chunk))
    )
    return total, jnp.swapaxes(dh, 0, 1).reshape(h.shape)


def _chunked_ce_bwd(tied, chunk, softcap, dh, g):
    return (g * dh).astype(dh.dtype), None, None, None


chunked_cross_entropy.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def frozen_head(cfg: ModelConfig, frozen, trainable) -> jax.Array | None:
    """The output projection, if it is frozen and not adapted (else None: the plain logits path)."""
    path = family_of(cfg).head_path(cfg)
    flat_t = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
    if path in flat_t:
        return None
    return traverse_util.flatten_dict(frozen).get(path)


def loss_terms(model: nn.Module, frozen, trainable, batch: dict, rngs: dict | None = None, ce_chunk: int | None = None):
    """(loss sum, token count) of one batch of [B,T] arrays, LoRA routed in by `jlora.apply`.

    With a frozen output head the loss is `chunked_cross_entropy` over the final hidden states
    (ce_chunk positions at a time; default: CE_CHUNK_ELEMENTS of logits on each device, from the rows
    and vocab entries one device holds under `activation_sharding`), else CE over full fp32 logits."""
    args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    cfg = model.cfg
    head = frozen_head(cfg, frozen, trainable)
    if head is None:
        logits = constrain(apply(model, frozen, trainable, *args, rngs=rngs), "batch", None, "vocab")  # [B,T,V] fp32
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    b, t = batch["input_ids"].shape
    chunk = ce_chunk or device_ce_chunk(b, t, cfg.vocab_size)
    hidden = apply(model, frozen, trainable, *args, rngs=rngs, return_hidden=True)  # [B,T,D]
    # Gather the head's fsdp shards once here, not in every chunk of the scan; vocab stays split over tensor.
    # A quantized head is dequantized once for the whole loss (its gradient is not needed).
    head = dense_value(head, DTYPES[cfg.dtype])
    head = constrain(head, "vocab", None) if cfg.tie_word_embeddings else constrain(head, None, "vocab")
    mask = batch["loss_mask"].astype(jnp.float32)
    total = chunked_cross_entropy(
        hidden, head, batch["targets"], mask, cfg.tie_word_embeddings, chunk, cfg.final_logit_softcapping
    )
    return total, jnp.sum(mask)


def full_batch(batch: dict) -> dict:
    """`batch` with the optional keys filled in: every token trained (loss_mask), positions 0..T-1 and one
    segment per row. input_ids and targets [B,T] are required."""
    missing = [k for k in ("input_ids", "targets") if k not in batch]
    if missing:
        raise ValueError(f"a batch needs {' and '.join(missing)} ([B,T] token ids); it has {sorted(batch)}")
    ids = batch["input_ids"]
    rows, t = ids.shape[:-1], ids.shape[-1]
    defaults = {
        "loss_mask": lambda: jnp.ones(ids.shape, jnp.float32),
        "positions": lambda: jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (*rows, t)),
        "segment_ids": lambda: jnp.ones(ids.shape, jnp.int32),
    }
    return {**{k: make() for k, make in defaults.items() if k not in batch}, **batch}


def causal_lm_loss(model: nn.Module, frozen, trainable, batch: dict, rngs: dict | None = None) -> jax.Array:
    """The mean next-token cross-entropy of `batch` over its loss_mask tokens, LoRA routed in: what
    jlora-train minimises, for a custom loop (`jax.value_and_grad` w.r.t. trainable).

    batch: input_ids and targets [B,T], optional loss_mask, positions and segment_ids (`full_batch`).
    With a frozen output head the [B,T,V] logits are never formed (`chunked_cross_entropy`).
    rngs={"dropout": key} turns on LoRA dropout."""
    total, count = loss_terms(model, frozen, trainable, full_batch(batch), rngs)
    return total / jnp.maximum(count, 1.0)


def make_schedule(ocfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant, or linear / cosine decay to 0 at `total_steps`."""
    warm = ocfg.warmup_steps
    rest = max(total_steps - warm, 1)
    after = {
        "constant": optax.constant_schedule(ocfg.lr),
        "linear": optax.linear_schedule(ocfg.lr, 0.0, rest),
        "cosine": optax.cosine_decay_schedule(ocfg.lr, rest),
    }[ocfg.schedule]
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, ocfg.lr, warm), after], [warm])


def make_optimizer(
    ocfg: OptimConfig, total_steps: int, max_nonfinite: int = 10
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(apply_if_finite(clip_by_global_norm -> adamw(schedule)), schedule).

    apply_if_finite would give up after `max_consecutive_errors` and apply a NaN update; the loop
    stops at `max_nonfinite` first, so it is set one higher and never reached."""
    schedule = make_schedule(ocfg, total_steps)
    parts = [optax.clip_by_global_norm(ocfg.grad_clip)] if ocfg.grad_clip else []
    parts.append(optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay))
    return optax.apply_if_finite(optax.chain(*parts), max_nonfinite + 1), schedule


@dataclasses.dataclass
class TrainState:
    """The arrays of a run, all placed on `mesh`. opt_state is None until `init_opt_state`."""

    frozen: Any
    trainable: Any
    opt_state: Any
    mesh: Mesh
    allow_replication: bool = False  # mesh.allow_replication: big frozen leaves may be replicated

    def shardings(self, optimizer: optax.GradientTransformation | None = None):
        """(frozen, trainable, opt_state) NamedSharding trees, from the rules table."""
        t_specs = trainable_specs(self.trainable, self.mesh)
        fsh = to_shardings(self.mesh, param_specs(self.frozen, self.mesh, self.allow_replication))
        tsh = to_shardings(self.mesh, t_specs)
        osh = None
        if optimizer is not None and self.opt_state is not None:
            osh = to_shardings(self.mesh, opt_state_specs(optimizer, self.opt_state, t_specs))
        return fsh, tsh, osh


def split_for_training(params, key: jax.Array, lcfg: LoraConfig):
    """`split`, with fp32 master copies of the parameters trained in full (train_extra), like the adapters."""
    frozen, trainable = split(params, lcfg, key)
    return frozen, jax.tree.map(
        lambda x: x if isinstance(x, LoraPair) else x.astype(jnp.float32),
        trainable,
        is_leaf=lambda x: isinstance(x, LoraPair),
    )


def init_state(
    cfg: ModelConfig,
    lcfg: LoraConfig,
    mesh: Mesh,
    key: jax.Array,
    optimizer: optax.GradientTransformation,
    params: Any = None,
    model_key: jax.Array | None = None,
    allow_replication: bool = False,
) -> TrainState:
    """Sharded (frozen, trainable, opt_state). params: host (numpy) weights or arrays already on the
    mesh, or None for a random model from `model_key`. Shapes come from eval_shape and every array
    is created in place. allow_replication: see sharding.param_specs."""
    specs = lambda s: param_specs(s, mesh, allow_replication)
    if params is None:
        params = shard_init(lambda k: init_params(cfg, k), mesh, specs, key if model_key is None else model_key)
    else:
        params = shard_params(params, mesh, allow_replication)

    do_split = functools.partial(split_for_training, lcfg=lcfg)
    f_shape, t_shape = jax.eval_shape(do_split, params, key)
    out = (to_shardings(mesh, specs(f_shape)), to_shardings(mesh, trainable_specs(t_shape, mesh)))
    # donating params lets the untouched kernels pass through as the frozen tree without a copy
    frozen, trainable = jax.jit(do_split, out_shardings=out, donate_argnums=0)(params, key)
    t_specs = trainable_specs(trainable, mesh)
    opt_state = shard_init(optimizer.init, mesh, lambda s: opt_state_specs(optimizer, s, t_specs), trainable)
    return TrainState(frozen, trainable, opt_state, mesh, allow_replication)


def quantize_frozen(state: TrainState, method: str, *, double_quant: bool = False) -> None:
    """Quantize `state.frozen` in place on its mesh (jlora.quant.quantize, "int8" or "nf4"), one leaf at a
    time: each dense leaf is freed as soon as its packed form is placed by the rules. For a base that is
    dense on the devices (a random preset, a PiSSA split); a checkpoint loads packed instead
    (jlora.train.builders.packing_keywords), never whole and dense."""
    flat = traverse_util.flatten_dict(state.frozen)
    state.frozen = None
    for path, leaf in flat.items():
        encode = leaf_encoder(path, leaf, method, double_quant=double_quant)
        if encode is None:
            continue
        specs = lambda s, path=path: traverse_util.flatten_dict(
            param_specs(traverse_util.unflatten_dict({path: s}), state.mesh, state.allow_replication)
        )[path]
        flat[path] = shard_init(encode, state.mesh, specs, leaf)
        leaf.delete()
    state.frozen = traverse_util.unflatten_dict(flat)


def place_state(
    frozen, trainable, mesh: Mesh, optimizer: optax.GradientTransformation, allow_replication: bool = False
) -> TrainState:
    """A TrainState from existing trees (host numpy or jax arrays, e.g. a loaded adapter): each is
    placed by the rules, and a fresh optimizer state is created sharded."""
    frozen, trainable = shard_params(frozen, mesh, allow_replication), shard_trainable(trainable, mesh)
    t_specs = trainable_specs(trainable, mesh)
    opt_state = shard_init(optimizer.init, mesh, lambda s: opt_state_specs(optimizer, s, t_specs), trainable)
    return TrainState(frozen, trainable, opt_state, mesh, allow_replication)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, n_micro: int | None = None) -> dict[str, jax.Array]:
    """Host rows [L,T] (this process's share) -> global arrays, rows over ('data', 'fsdp').

    With n_micro, the result is [n_micro, micro_B, T]: every micro-batch takes L/n_micro rows of
    each host, so all hosts' devices work on every micro-batch."""
    n_proc = jax.process_count()
    rows_axes = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if rows_axes % n_proc:
        raise ValueError(
            f"mesh data*fsdp = {rows_axes} must be a multiple of the {n_proc} processes: each host feeds its own rows"
        )
    out = {}
    for k in BATCH_KEYS:
        x = np.asarray(batch[k])
        if n_micro is None:
            sh, gshape = NamedSharding(mesh, batch_spec(2, 0)), (x.shape[0] * n_proc, x.shape[1])
        else:
            if x.shape[0] % n_micro:
                raise ValueError(f"{x.shape[0]} rows per host do not split into {n_micro} micro-batches")
            x = x.reshape(n_micro, x.shape[0] // n_micro, x.shape[1])
            sh, gshape = NamedSharding(mesh, batch_spec(3, 1)), (n_micro, x.shape[1] * n_proc, x.shape[2])
        out[k] = jax.make_array_from_process_local_data(sh, x, gshape)
    return out


def _uses_dropout(trainable) -> bool:
    leaves = jax.tree_util.tree_leaves(trainable, is_leaf=lambda x: isinstance(x, LoraPair))
    return any(isinstance(x, LoraPair) and x.dropout > 0 for x in leaves)


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    state: TrainState | None = None,
    compiler_options: dict | None = None,
) -> Callable:
    """A jitted `step(frozen, trainable, opt_state, batch, rng=None) -> (trainable, opt_state, metrics)`.

    batch holds [B,T] arrays (one micro-batch; `full_batch` fills the optional keys) or [n_micro, micro_B, T]
    ones (`put_batch(..., n_micro)`); gradients are summed over micro-batches in a lax.scan and divided by the
    global count of loss tokens once, so the result equals one pass over the whole batch. trainable and
    opt_state are donated; rng is needed only for LoRA dropout. With a `state` the step is compiled for its
    mesh (explicit shardings, activations pinned); without, jax places it where its inputs are.
    compiler_options go to XLA (e.g. {"xla_backend_optimization_level": 0} compiles faster on CPU)."""

    def step(frozen, trainable, opt_state, batch, rng=None):
        dropout = _uses_dropout(trainable)
        if dropout and rng is None:
            raise ValueError("the adapters use LoRA dropout: pass step(..., rng=jax.random.key(step_number))")
        batch = full_batch(batch)
        if batch["input_ids"].ndim == 2:
            batch = jax.tree.map(lambda x: x[None], batch)

        def grads_of(mb, i):
            rngs = {"dropout": jax.random.fold_in(rng, i)} if dropout else None
            fn = lambda t: loss_terms(model, frozen, t, mb, rngs)
            (lsum, count), grads = jax.value_and_grad(fn, has_aux=True)(trainable)
            return lsum, count, grads

        n_micro = batch["input_ids"].shape[0]
        if n_micro == 1:
            lsum, count, grads = grads_of(jax.tree.map(lambda x: x[0], batch), 0)
        else:

            def body(carry, xs):
                mb, i = xs
                lsum, count, grads = grads_of(mb, i)
                acc_l, acc_n, acc_g = carry
                return (acc_l + lsum, acc_n + count, jax.tree.map(jnp.add, acc_g, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
            (lsum, count, grads), _ = jax.lax.scan(body, zeros, (batch, jnp.arange(n_micro)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": lsum / denom, "grad_norm": optax.tree.norm(grads), "loss_tokens": count}
        if isinstance(new_opt, optax.ApplyIfFiniteState):  # make_optimizer's guard: what it skipped
            metrics.update(
                skipped=jnp.logical_not(new_opt.last_finite),
                nonfinite_run=new_opt.notfinite_count,
                nonfinite_total=new_opt.total_notfinite,
            )
        return new_trainable, new_opt, metrics

    if state is None:
        return jax.jit(step, donate_argnums=(1, 2), compiler_options=compiler_options)
    fsh, tsh, osh = state.shardings(optimizer)
    rep = NamedSharding(state.mesh, P())
    bsh = {k: NamedSharding(state.mesh, batch_spec(3, 1)) for k in BATCH_KEYS}
    return jax.jit(
        activation_sharding(state.mesh)(step),
        in_shardings=(fsh, tsh, osh, bsh, rep),
        out_shardings=(tsh, osh, rep),
        donate_argnums=(1, 2),
        compiler_options=compiler_options,
    )


def make_eval_step(model: nn.Module, state: TrainState, compiler_options: dict | None = None) -> Callable:
    """A jitted `eval_step(frozen, trainable, batch) -> (loss sum, token count)` over [B,T] rows."""
    fsh, tsh, _ = state.shardings()
    bsh = {k: NamedSharding(state.mesh, batch_spec(2, 0)) for k in BATCH_KEYS}
    rep = NamedSharding(state.mesh, P())
    return jax.jit(
        activation_sharding(state.mesh)(lambda f, t, b: loss_terms(model, f, t, b)),
        in_shardings=(fsh, tsh, bsh),
        out_shardings=(rep, rep),
        compiler_options=compiler_options,
    )


class DivergenceWatch:
    """Stops a run whose gradients explode while the loss may still look sane (a learning rate of 1e6 took
    the tiny model's grad norm from 0.6 to 1e6 in three steps, the loss staying near 5.7).

    The reference is the median grad norm of the run's first `warm` steps (of this process's run: after a
    resume, of its first steps); a step whose grad norm exceeds `factor` times it counts, and `patience`
    such steps in a row raise NonFiniteError. factor 0: never. Non-finite norms are check_nonfinite's."""

    def __init__(self, factor: float, lr: float, patience: int = 3, warm: int = 3):
        self.factor, self.lr, self.patience, self.warm = factor, lr, patience, warm
        self.first: list[float] = []
        self.run = 0

    def __call__(self, grad_norm: float, step: int) -> None:
        if not self.factor or not math.isfinite(grad_norm):
            return
        if len(self.first) < self.warm:
            self.first.append(grad_norm)
            return
        ref = float(np.median(self.first))
        self.run = self.run + 1 if ref > 0 and grad_norm > self.factor * ref else 0
        if self.run >= self.patience:
            raise NonFiniteError(
                f"step {step}: training diverged: the grad norm ({grad_norm:.3g}) has been over "
                f"train.divergence_factor={self.factor:g} times its first steps' ({ref:.3g}) for {self.run} steps "
                f"in a row; stopping (the last checkpoint is kept). Lower optim.lr={self.lr:g}"
            )


def check_nonfinite(metrics: dict, max_nonfinite: int, step: int) -> None:
    """Raise NonFiniteError once `max_nonfinite` steps in a row had non-finite gradients."""
    run = int(metrics["nonfinite_run"])
    if run >= max_nonfinite:
        raise NonFiniteError(
            f"step {step}: {run} steps in a row had non-finite gradients (train.max_nonfinite="
            f"{max_nonfinite}); stopping. Lower optim.lr, or check the data"
        )
