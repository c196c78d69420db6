"""The LoRA train step: loss, optimizer, sharded state init, the jitted train and eval steps.

Owns the objective (the token-mean cross-entropy of jlora.train.loss, or a preference loss of
jlora.train.preference, and a reference step that precomputes its log-probs), the optax chain (clip,
then AdamW on a warmup + constant / linear / cosine schedule, inside `apply_if_finite`: a non-finite
step is skipped and counted),
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
from jlora.models.family import init_params
from jlora.parallel.sharding import (
    BATCH_AXES,
    activation_sharding,
    batch_spec,
    opt_state_specs,
    param_specs,
    shard_init,
    shard_params,
    to_shardings,
)
from jlora.peft.lora import LoraConfig, LoraPair, split
from jlora.peft.placement import shard_trainable, trainable_specs
from jlora.quant.quantize import leaf_encoder
from jlora.train import preference
from jlora.train.config import OptimConfig, RunConfig
from jlora.train.loss import (
    full_batch,
    loss_terms,
)

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


class NonFiniteError(JloraError, RuntimeError):
    """Too many non-finite steps in a row: training diverged."""


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
    """The arrays of a run, all placed on `mesh`. opt_state is None until `init_opt_state`. reference: a
    preference run's reference adapter when it is not "the adapter off": the adapter the run started from
    (run.init_adapter), a copy that training leaves alone, laid out as `trainable`."""

    frozen: Any
    trainable: Any
    opt_state: Any
    mesh: Mesh
    allow_replication: bool = False  # mesh.allow_replication: big frozen leaves may be replicated
    reference: Any = None

    def reference_args(self) -> tuple:
        """What the compiled steps of this state take after their usual arguments: (reference,) when it has
        one, else nothing (so a step of a state without one keeps its signature)."""
        return () if self.reference is None else (self.reference,)

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


REFERENCE_KEY = "reference_logps"  # a preference batch's precomputed reference log-probs [rows]


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, n_micro: int | None = None) -> dict[str, jax.Array]:
    """Host rows [L,T] (this process's share) -> global arrays, rows over ('data', 'fsdp').

    With n_micro, the result is [n_micro, micro_B, T]: every micro-batch takes L/n_micro rows of
    each host, so all hosts' devices work on every micro-batch. A preference batch's `reference_logps`
    [L] goes along the same way ([n_micro, micro_B]): a contiguous split keeps pairs whole."""
    n_proc = jax.process_count()
    rows_axes = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if rows_axes % n_proc:
        raise ValueError(
            f"mesh data*fsdp = {rows_axes} must be a multiple of the {n_proc} processes: each host feeds its own rows"
        )
    out = {}
    for k in BATCH_KEYS + ((REFERENCE_KEY,) if REFERENCE_KEY in batch else ()):
        x = np.asarray(batch[k])
        if n_micro is None:
            sh, gshape = NamedSharding(mesh, batch_spec(x.ndim, 0)), (x.shape[0] * n_proc, *x.shape[1:])
        else:
            if x.shape[0] % n_micro:
                raise ValueError(f"{x.shape[0]} rows per host do not split into {n_micro} micro-batches")
            x = x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:])
            sh, gshape = NamedSharding(mesh, batch_spec(x.ndim, 1)), (n_micro, x.shape[1] * n_proc, *x.shape[2:])
        out[k] = jax.make_array_from_process_local_data(sh, x, gshape)
    return out


def _uses_dropout(trainable) -> bool:
    leaves = jax.tree_util.tree_leaves(trainable, is_leaf=lambda x: isinstance(x, LoraPair))
    return any(isinstance(x, LoraPair) and x.dropout > 0 for x in leaves)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a step minimises: "sft" (the token-mean cross-entropy) or a preference objective of
    jlora.train.preference ("dpo", "ipo", "orpo") with its beta and label smoothing. precomputed: the
    batches carry `reference_logps` (`make_reference_step`), so the step runs no reference forward."""

    name: str = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    precomputed: bool = False

    def __post_init__(self):
        if self.name != "sft":
            preference.check_objective(self.name, self.beta, self.label_smoothing)

    @classmethod
    def of_run(cls, run: RunConfig) -> Objective:
        """The objective of a run config (its `objective` and `preference` section)."""
        p = run.preference
        return (
            cls() if run.objective == "sft" else cls(run.objective, p.beta, p.label_smoothing, p.precompute_reference)
        )

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return BATCH_KEYS + ((REFERENCE_KEY,) if self.precomputed else ())

    def terms(self, model: nn.Module, frozen, trainable, batch: dict, rngs: dict | None = None, reference=None):
        """(value, weight, metrics) of one micro-batch: SFT sums token losses over a token count (weight);
        a preference loss is already a mean over the micro-batch's pairs (weight 1: equal micro-batches
        average), as TRL's loss is; its metrics are means too. reference: TrainState.reference."""
        if self.name == "sft":
            lsum, count = loss_terms(model, frozen, trainable, batch, rngs)
            return lsum, count, {}
        loss, metrics = preference.preference_loss(
            model,
            frozen,
            trainable,
            batch,
            self.name,
            self.beta,
            self.label_smoothing,
            reference_logps=batch.get(REFERENCE_KEY),
            reference_adapter=reference,
            rngs=rngs,
        )
        return loss, jnp.ones((), jnp.float32), metrics


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    state: TrainState | None = None,
    compiler_options: dict | None = None,
    *,
    objective: str | Objective = "sft",
) -> Callable:
    """A jitted `step(frozen, trainable, opt_state, batch, rng=None, reference=None) -> (trainable, opt_state,
    metrics)`; reference: the state's reference adapter (`TrainState.reference`), for a preference objective.

    batch holds [B,T] arrays (one micro-batch; `full_batch` fills the optional keys) or [n_micro, micro_B, T]
    ones (`put_batch(..., n_micro)`); gradients are summed over micro-batches in a lax.scan and divided by the
    global count of loss tokens once, so the result equals one pass over the whole batch. trainable and
    opt_state are donated; rng is needed only for LoRA dropout. With a `state` the step is compiled for its
    mesh (explicit shardings, activations pinned); without, jax places it where its inputs are.
    compiler_options go to XLA (e.g. {"xla_backend_optimization_level": 0} compiles faster on CPU).

    objective: "sft", or "dpo" / "ipo" / "orpo" (beta 0.1), or an `Objective`. A preference batch holds whole
    pairs (rows 2i chosen, 2i+1 rejected) in every micro-batch; the loss and gradients are the mean of the
    micro-batches' (each a mean over its pairs), and the metrics add TRL's rewards/* and logps/*."""
    obj = objective if isinstance(objective, Objective) else Objective(objective)

    def step(frozen, trainable, opt_state, batch, rng=None, reference=None):
        dropout = _uses_dropout(trainable)
        if dropout and rng is None:
            raise ValueError("the adapters use LoRA dropout: pass step(..., rng=jax.random.key(step_number))")
        batch = full_batch(batch)
        if batch["input_ids"].ndim == 2:
            batch = jax.tree.map(lambda x: x[None], batch)

        def grads_of(mb, i):
            rngs = {"dropout": jax.random.fold_in(rng, i)} if dropout else None
            fn = lambda t: (lambda v, w, m: (v, (w, m)))(*obj.terms(model, frozen, t, mb, rngs, reference))
            (value, (weight, aux)), grads = jax.value_and_grad(fn, has_aux=True)(trainable)
            return value, weight, aux, grads

        n_micro = batch["input_ids"].shape[0]
        if n_micro == 1:
            value, weight, aux, grads = grads_of(jax.tree.map(lambda x: x[0], batch), 0)
        else:

            def body(carry, xs):
                mb, i = xs
                new = grads_of(mb, i)
                return jax.tree.map(jnp.add, carry, new), None

            first = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], batch), 0)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
            (value, weight, aux, grads), _ = jax.lax.scan(body, zeros, (batch, jnp.arange(n_micro)))
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": value / denom, "grad_norm": optax.tree.norm(grads)}
        if obj.name == "sft":
            metrics["loss_tokens"] = weight
        metrics |= {k: v / denom for k, v in aux.items()}
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
    bsh = {k: NamedSharding(state.mesh, batch_spec(2 if k == REFERENCE_KEY else 3, 1)) for k in obj.batch_keys}
    return jax.jit(
        activation_sharding(state.mesh)(step),
        in_shardings=(fsh, tsh, osh, bsh, rep, *((tsh,) if state.reference is not None else ())),
        out_shardings=(tsh, osh, rep),
        donate_argnums=(1, 2),
        compiler_options=compiler_options,
    )


def make_eval_step(
    model: nn.Module, state: TrainState, compiler_options: dict | None = None, *, objective: str | Objective = "sft"
) -> Callable:
    """A jitted `eval_step(frozen, trainable, batch, reference=None)` over [B,T] rows: (loss sum, token count)
    for SFT; for a preference objective (loss, metrics, real pairs), the loss and metrics means over the batch's
    real pairs (a last batch's padding pairs count for nothing), the reference (`state.reference`, else the
    adapter off) run in the same step."""
    obj = objective if isinstance(objective, Objective) else Objective(objective)
    fsh, tsh, _ = state.shardings()
    bsh = {k: NamedSharding(state.mesh, batch_spec(2, 0)) for k in BATCH_KEYS}
    rep = NamedSharding(state.mesh, P())
    if obj.name == "sft":
        fn, out = (lambda f, t, b, r=None: loss_terms(model, f, t, b)), (rep, rep)
    else:
        obj = dataclasses.replace(obj, precomputed=False)

        def fn(f, t, b, r=None):
            loss, _, metrics = obj.terms(model, f, t, b, reference=r)
            return loss, metrics, jnp.sum(preference.real_pairs(b["loss_mask"]))

        out = (rep, rep, rep)
    return jax.jit(
        activation_sharding(state.mesh)(fn),
        in_shardings=(fsh, tsh, bsh, *((tsh,) if state.reference is not None else ())),
        out_shardings=out,
        compiler_options=compiler_options,
    )


def make_reference_step(model: nn.Module, state: TrainState, compiler_options: dict | None = None) -> Callable:
    """A jitted `reference_step(frozen, trainable, batch, reference=None) -> [B]`: each row's response log-probs
    under the reference (`state.reference`, else the base: the adapter off), replicated: what
    `precompute_reference` computes once, before the first update (so parameters trained in full are still
    the base's)."""
    fsh, tsh, _ = state.shardings()
    bsh = {k: NamedSharding(state.mesh, batch_spec(2, 0)) for k in BATCH_KEYS}
    rep = NamedSharding(state.mesh, P())
    fn = lambda f, t, b, r=None: preference.compute_reference_logps(model, f, t, b, before_training=True, reference=r)
    return jax.jit(
        activation_sharding(state.mesh)(fn),
        in_shardings=(fsh, tsh, bsh, *((tsh,) if state.reference is not None else ())),
        out_shardings=rep,
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
