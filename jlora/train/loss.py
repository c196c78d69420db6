"""The loss of a causal-LM batch: masked cross-entropy, chunked over positions when the output head is frozen.

Owns the CE chunk helpers (the [B,T,V] logits never exist: `chunked_cross_entropy` forms the loss and its
gradient a chunk of positions at a time), the frozen-head test, `full_batch` (the optional batch keys) and
`causal_lm_loss`. Shared by the train step (jlora.train.step) and the preference objectives
(jlora.train.preference), which import it and not each other's modules. No optimizer, no placement.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jlora.models.config import ModelConfig
from jlora.models.family import family_of
from jlora.models.layers import DTYPES
from jlora.parallel.sharding import constrain, shards
from jlora.peft.lora import LoraPair
from jlora.peft.routing import apply
from jlora.quant.quantize import dense_value


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
