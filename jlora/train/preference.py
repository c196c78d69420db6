"""Preference objectives: DPO (TRL's `sigmoid` loss, with cDPO label smoothing), IPO and ORPO, as one loss.

A batch holds pairs as interleaved rows, chosen at 2i and rejected at 2i+1 (jlora.train.preference_data
builds them), with the SFT batch's keys, so both halves run in one forward pass, and a contiguous split of
the rows (hosts, micro-batches) never separates a pair. The reference policy of DPO and IPO is the frozen
tree with the adapter off: the same arrays, no second copy, run under stop_gradient in the same function.
A run that starts from an adapter (run.init_adapter, e.g. an SFT one) has that adapter as its reference: the
model it starts from, as TRL's is; only the adapter's small copy is added, never the base's.
Per-token log-probs come from the final hidden states a chunk of positions at a time, so no [B,T,V]
logits are formed when the head is frozen. Owns the losses and their TRL-named metrics; not the data,
the optimizer or the step (jlora.train.step).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jlora.errors import JloraError
from jlora.models.layers import DTYPES
from jlora.parallel.sharding import constrain
from jlora.peft import llama_adapter
from jlora.peft.routing import LoraPair, apply
from jlora.quant.quantize import dense_value
from jlora.train.loss import by_chunk, chunk_logits, device_ce_chunk, frozen_head, full_batch

OBJECTIVES = ("dpo", "ipo", "orpo")
REFERENCE_FREE = ("orpo",)  # objectives that need no reference log-probs


class PreferenceError(JloraError, ValueError):
    """A preference objective asked of what cannot give it; one line naming the setting."""


def _logps_and_grad(logits: jax.Array, targets: jax.Array, softcap: float | None):
    """(log p(target) [B,c], its gradient w.r.t. the raw logits [B,c,V]) of one chunk's logits."""
    top = jnp.max(logits, axis=-1, keepdims=True)  # [B,c,1]
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B,c]
    logps = picked - (top + jnp.log(total))[..., 0]
    dlogits = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype) - e / total
    if softcap is not None:  # through cap * tanh(raw / cap): times 1 - tanh^2
        dlogits = dlogits * (1 - jnp.square(logits / softcap))
    return logps, dlogits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def chunked_token_logps(
    h: jax.Array, w: jax.Array, targets: jax.Array, tied: bool, chunk: int, softcap: float | None = None
) -> jax.Array:
    """log p(targets) [B,T] fp32 under logits h @ head, for hidden h [B,T,D] and the frozen head w ([V,D] if
    tied else [D,V]), `chunk` positions at a time: the [B,T,V] logits never exist. Under differentiation the
    gradient (w.r.t. h only) is formed in the same pass, as `jlora.train.loss.chunked_cross_entropy` does."""

    def body(_, xs):
        hc, tc = xs
        logits = constrain(chunk_logits(hc, w, tied, softcap), "batch", None, "vocab")  # [B,c,V]
        return None, _logps_and_grad(logits, tc, softcap)[0]

    _, logps = jax.lax.scan(body, None, (by_chunk(h, chunk), by_chunk(targets, chunk)))  # [T/c, B, c]
    return jnp.swapaxes(logps, 0, 1).reshape(targets.shape)


def _token_logps_fwd(h, w, targets, tied, chunk, softcap):
    def body(_, xs):
        hc, tc = xs
        logits = constrain(chunk_logits(hc, w, tied, softcap), "batch", None, "vocab")  # [B,c,V]
        logps, dlogits = _logps_and_grad(logits, tc, softcap)
        eq = "bcv,vd->bcd" if tied else "bcv,dv->bcd"
        dh = jnp.einsum(eq, dlogits.astype(hc.dtype), w.astype(hc.dtype), preferred_element_type=jnp.float32)
        return None, (logps, dh.astype(hc.dtype))  # [B,c], [B,c,D]

    _, (logps, dh) = jax.lax.scan(body, None, (by_chunk(h, chunk), by_chunk(targets, chunk)))
    unchunk = lambda x: jnp.swapaxes(x, 0, 1).reshape(*targets.shape, *x.shape[3:])
    return unchunk(logps), unchunk(dh)


def _token_logps_bwd(tied, chunk, softcap, dh, g):
    return (g[..., None] * dh).astype(dh.dtype), None, None  # each log-prob depends on its own position only


chunked_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def token_logps(
    model: nn.Module, frozen, trainable, batch: dict, rngs: dict | None = None, ce_chunk: int | None = None
):
    """log p(target) at every position [B,T] fp32 (masks are the caller's), adapters routed in by `jlora.apply`.

    With a frozen output head from the final hidden states by `chunked_token_logps`; with an adapted or
    trained head from the full logits."""
    batch = full_batch(batch)
    args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    cfg = model.cfg
    head = frozen_head(cfg, frozen, trainable)
    if head is None:
        logits = constrain(apply(model, frozen, trainable, *args, rngs=rngs), "batch", None, "vocab")  # [B,T,V]
        logps = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logps, batch["targets"][..., None], axis=-1)[..., 0]
    b, t = batch["input_ids"].shape
    hidden = apply(model, frozen, trainable, *args, rngs=rngs, return_hidden=True)  # [B,T,D]
    head = dense_value(head, DTYPES[cfg.dtype])  # decoded once for the whole pass; the head is not trained
    head = constrain(head, "vocab", None) if cfg.tie_word_embeddings else constrain(head, None, "vocab")
    chunk = ce_chunk or device_ce_chunk(b, t, cfg.vocab_size)
    return chunked_token_logps(
        hidden, head, batch["targets"], cfg.tie_word_embeddings, chunk, cfg.final_logit_softcapping
    )


def adapter_off(trainable, keep_full: bool = False):
    """The trainable tree with the adapter off, i.e. what makes `jlora.apply` run the frozen base: no LoRA /
    DoRA / rsLoRA pair, no LLaMA-Adapter prompt (a zero gate adds exactly nothing, so dropping them is the
    base at no cost). Parameters trained in full (train_extra) were moved out of the frozen tree, so the base
    no longer holds them: that is an error here, unless `keep_full` keeps them, which is the base only before
    the first update (precomputing the reference log-probs)."""
    is_leaf = lambda _, x: isinstance(x, LoraPair)
    flat = traverse_util.flatten_dict(trainable or {}, is_leaf=is_leaf)
    full = [p for p, x in flat.items() if not isinstance(x, LoraPair) and not llama_adapter.is_adapter_leaf(p)]
    if full and keep_full:
        return traverse_util.unflatten_dict({p: flat[p] for p in full})
    if full:
        raise PreferenceError(
            f"the reference model is the base with the adapter off, but {'.'.join(full[0])} (and "
            f"{len(full) - 1} more) is trained in full and has no base copy; precompute the reference log-probs "
            "(preference.precompute_reference: true) before training"
        )
    return {}


def sequence_logps(logps: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-row sums [B] of token log-probs [B,T] where mask (the response tokens), as TRL sums them."""
    return jnp.sum(logps * mask.astype(jnp.float32), axis=-1)


def compute_reference_logps(
    model: nn.Module,
    frozen,
    trainable,
    batch: dict,
    ce_chunk: int | None = None,
    *,
    before_training: bool = False,
    reference=None,
) -> jax.Array:
    """The reference policy's per-row response log-probs [2P], without gradient: the base (`adapter_off`), or
    with `reference` (a trainable tree: the adapter a run started from) the base with that adapter.
    What `preference_loss(..., reference_logps=...)` takes when they are computed once before training;
    `before_training`: `trainable` is not updated yet, so its parameters trained in full are still the base's."""
    batch = full_batch(batch)
    tree = adapter_off(trainable, before_training) if reference is None else reference
    logps = token_logps(model, frozen, tree, batch, ce_chunk=ce_chunk)
    return jax.lax.stop_gradient(sequence_logps(logps, batch["loss_mask"]))


def _pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Interleaved rows [2P, ...] -> (chosen [P, ...], rejected [P, ...])."""
    x = x.reshape(-1, 2, *x.shape[1:])
    return x[:, 0], x[:, 1]


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 as TRL's ORPO does; each branch gets only inputs it
    is finite for, so the branch not taken cannot put NaN into the gradient."""
    t = -0.6931471805599453
    low = x < t
    return jnp.where(low, jnp.log1p(-jnp.exp(jnp.where(low, x, t))), jnp.log(-jnp.expm1(jnp.where(low, t, x))))


def real_pairs(mask: jax.Array) -> jax.Array:
    """[P] 1.0 where a pair has response tokens, 0.0 for an empty pair (the padding of a last eval batch)."""
    return (jnp.sum(_pairs(mask)[0], axis=-1) > 0).astype(jnp.float32)


def _mean(x: jax.Array, real: jax.Array) -> jax.Array:
    """The mean of per-pair x [P] over the real pairs: with no padding pairs, jnp.mean as TRL takes it."""
    return jnp.sum(jnp.where(real > 0, x, 0.0)) / jnp.maximum(jnp.sum(real), 1.0)


def _reward_metrics(real, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, jax.Array]:
    return {
        "rewards/chosen": _mean(chosen_rewards, real),
        "rewards/rejected": _mean(rejected_rewards, real),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).astype(jnp.float32), real),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards, real),
        "logps/chosen": _mean(chosen_logps, real),
        "logps/rejected": _mean(rejected_logps, real),
    }


def check_objective(objective: str, beta: float, label_smoothing: float) -> None:
    """One-line errors for settings TRL would refuse or that make no loss."""
    if objective not in OBJECTIVES:
        raise PreferenceError(f"objective: unknown preference objective {objective!r}; expected one of {OBJECTIVES}")
    if not beta > 0:
        raise PreferenceError(f"preference.beta: must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise PreferenceError(f"preference.label_smoothing: must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and objective != "dpo":
        raise PreferenceError(f"preference.label_smoothing: is DPO's (cDPO); objective {objective} has none")


def preference_loss(
    model: nn.Module,
    frozen,
    trainable,
    batch: dict,
    objective: str = "dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    reference_logps: jax.Array | None = None,
    reference_adapter=None,
    rngs: dict | None = None,
    ce_chunk: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of one batch of preference pairs, as TRL defines them; differentiate w.r.t. trainable.

    batch: input_ids, targets and loss_mask [2P,T] (loss_mask marks response targets), optional positions and
    segment_ids (0 = padding); rows 2i chosen, 2i+1 rejected (`jlora.train.preference_data.collate_pairs`).
    objective: "dpo" (TRL's sigmoid loss; label_smoothing > 0 is cDPO), "ipo" (TRL's length-normalised IPO),
    or "orpo" (TRL's ORPOTrainer: NLL of the chosen rows over prompt and response, minus beta times the
    log-sigmoid of the odds ratio of their mean log-probs; no reference). reference_logps [2P]: the
    reference's per-row log-probs computed earlier (`compute_reference_logps`); without them DPO and IPO run
    the base (the frozen tree, adapter off; with `reference_adapter`, a trainable tree such as the adapter
    training started from, the base with that adapter) in the same function, under stop_gradient. Metrics are
    means over the pairs under TRL's names (rewards/*, logps/*; ORPO adds nll_loss, log_odds_ratio and
    log_odds_chosen)."""
    check_objective(objective, beta, label_smoothing)
    batch = full_batch(batch)
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise PreferenceError(f"a preference batch holds (chosen, rejected) row pairs; it has {rows} rows")
    mask = batch["loss_mask"].astype(jnp.float32)
    real = real_pairs(mask)  # [P]; all ones in a training batch
    logps = token_logps(model, frozen, trainable, batch, rngs, ce_chunk)  # [2P,T]
    if objective == "orpo":
        return _orpo(logps, mask, batch["segment_ids"], beta, real)
    seq = sequence_logps(logps, mask)  # [2P]
    if reference_logps is None:
        reference_logps = compute_reference_logps(
            model, frozen, trainable, batch, ce_chunk, reference=reference_adapter
        )
    ref = jax.lax.stop_gradient(jnp.asarray(reference_logps, jnp.float32))
    (chosen, rejected), (ref_chosen, ref_rejected) = _pairs(seq), _pairs(ref)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected  # [P]
    if objective == "dpo":
        delta = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(delta) - label_smoothing * jax.nn.log_sigmoid(-delta)
    else:  # ipo: per-token averages of the log-ratios (TRL, confirmed with the IPO authors)
        n_chosen, n_rejected = (jnp.maximum(n, 1.0) for n in _pairs(jnp.sum(mask, axis=-1)))
        losses = jnp.square(chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta))
    rewards = [jax.lax.stop_gradient(beta * r) for r in (chosen_ratio, rejected_ratio)]
    return _mean(losses, real), _reward_metrics(real, *rewards, *(jax.lax.stop_gradient(x) for x in (chosen, rejected)))


def _orpo(logps: jax.Array, mask: jax.Array, segment_ids: jax.Array, beta: float, pairs_real: jax.Array):
    """TRL's ORPOTrainer.get_batch_loss_metrics, from token log-probs [2P,T]."""
    real = (segment_ids != 0).astype(jnp.float32)  # TRL's NLL covers every real target, prompt included
    (chosen_lp, _), (chosen_real, _) = _pairs(logps), _pairs(real)
    nll = -jnp.sum(chosen_lp * chosen_real) / jnp.maximum(jnp.sum(chosen_real), 1.0)
    mean_logps = sequence_logps(logps, mask) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)  # [2P]; TRL's average
    chosen, rejected = _pairs(mean_logps)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # [P]
    ratio = jax.nn.log_sigmoid(log_odds)
    loss = nll - _mean(beta * ratio, pairs_real)
    chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
    metrics = _reward_metrics(pairs_real, beta * chosen, beta * rejected, chosen, rejected)
    metrics |= {
        "nll_loss": nll,
        "log_odds_ratio": _mean(ratio, pairs_real),
        "log_odds_chosen": _mean(log_odds, pairs_real),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
