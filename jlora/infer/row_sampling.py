"""Per-row sampling for the serving engine: one jitted call turns a batch's logits [B,V] into each row's next
token, with that row's own logit bias, presence and frequency penalties, temperature, top-p and seed, and the
log-probabilities the row asked for.

OpenAI's semantics, in vLLM's order: the bias is added and the penalties subtracted first,
`logits[t] += bias[t] - presence * (count[t] > 0) - frequency * count[t]`, where count[t] is how many times
the row has generated t (its prompt does not count); then temperature and top-p, then the draw. The
log-probabilities reported are those of the model's own distribution, log_softmax of the raw logits before
bias, penalties, temperature and top-p: vLLM's default (`logprobs_mode="raw_logprobs"`), and the numbers a
forward pass of the model gives offline.

Every row's state has the batch's static shape (bias [B,V] float, counts [B,V] int), so any mix of requests
shares one compiled call. What a batch needs is static (`Mode`) and chosen from its rows, so a batch of plain
greedy requests runs none of it. This module owns no model code and no batching (`jlora.infer.engine`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jlora.infer.generate import greedy_tokens, sample

MAX_TOP_LOGPROBS = 20  # most alternatives a request may ask for, as vLLM's default max_logprobs


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a batch's sampling computes (static: each value compiles once).

    draw: "greedy" (every row greedy: no draw at all), "sample" or "top_p". adjust: some row has a logit bias
    or a penalty. top: None (no row wants log-probabilities), or how many alternatives to compute per row."""

    draw: str = "greedy"
    adjust: bool = False
    top: int | None = None


def mode_of(rows) -> Mode:
    """The `Mode` for these rows: objects with temperature, top_p, adjusts and logprobs (None = an empty row)."""
    live = [r for r in rows if r is not None]
    drawing = [r for r in live if r.temperature > 0]
    draw = "greedy" if not drawing else ("top_p" if any(r.top_p < 1.0 for r in drawing) else "sample")
    want = [r.logprobs for r in live if r.logprobs is not None]
    return Mode(draw, any(r.adjusts for r in live), top_size(max(want)) if want else None)


def top_size(k: int) -> int:
    """How many alternatives to compute for a request of k: 0, 5 or 20, so that few sizes compile."""
    return next(n for n in (0, 5, MAX_TOP_LOGPROBS) if n >= k)


def _pick(logits, seeds, steps, temperature, top_p, draw: str):
    """Row b's token from logits [B,V]: argmax where temperature[b] == 0, else a draw with
    fold_in(key(seed[b]), step[b]), the key `jlora.infer.generate` uses for token `step` of a one-row call."""
    greedy = greedy_tokens(logits)
    if draw == "greedy":
        return greedy

    def one(row, seed, step, temp, tp):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return sample(row[None], key, jnp.where(temp > 0, temp, 1.0), tp, (False, None, draw == "top_p"))[0]

    drawn = jax.vmap(one)(logits, seeds, steps, temperature, top_p)  # [B]
    return jnp.where(temperature > 0, drawn, greedy)


@functools.partial(jax.jit, static_argnames=("mode",), donate_argnames=("counts",))
def sample_rows(logits, seeds, steps, temperature, top_p, presence, frequency, bias, counts, *, mode: Mode):
    """(tokens [B], counts with each row's token added, log-probabilities or None) for logits [B,V].

    seeds, steps, temperature, top_p, presence, frequency: [B] per row; bias [B,V] float, counts [B,V] int
    (read and updated only when `mode.adjust`). Log-probabilities, when `mode.top` is not None: the sampled
    token's [B] and the `mode.top` most likely tokens' values and ids [B,top], of the raw logits."""
    raw = logits.astype(jnp.float32)  # [B,V]
    if mode.adjust:
        seen = (counts > 0).astype(jnp.float32)
        logits = raw + bias - presence[:, None] * seen - frequency[:, None] * counts  # [B,V]
    tokens = _pick(logits, seeds, steps, temperature, top_p, mode.draw)  # [B]
    if mode.adjust:
        counts = counts.at[jnp.arange(tokens.shape[0]), tokens].add(1)
    if mode.top is None:
        return tokens, counts, None
    logp = jax.nn.log_softmax(raw, axis=-1)  # [B,V]
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]  # [B]
    values, ids = jax.lax.top_k(logp, mode.top) if mode.top else (logp[:, :0], jnp.zeros((logp.shape[0], 0), jnp.int32))
    return tokens, counts, (chosen, values, ids)


@functools.partial(jax.jit, donate_argnames=("bias", "counts"))
def set_rows(bias, counts, rows, new_bias, first):
    """Rows `rows` [n] of the engine's state take a joining request's bias [n,V] and, as counts, its first
    token `first` [n]. A row index past the batch (padding) writes nothing."""
    one_hot = jax.nn.one_hot(first, counts.shape[-1], dtype=counts.dtype)  # [n,V]
    return bias.at[rows].set(new_bias, mode="drop"), counts.at[rows].set(one_hot, mode="drop")


def dense_bias(biases, vocab: int) -> np.ndarray:
    """[n,V] float32 from each row's {token id: bias} (None = an empty row)."""
    out = np.zeros((len(biases), vocab), np.float32)
    for i, b in enumerate(biases):
        for t, v in (b or {}).items():
            out[i, t] = v
    return out


def top_entries(chosen, values, ids, b: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Row b's (sampled token's logprob, [(id, logprob)] of its k most likely), from `sample_rows`' outputs
    on the host."""
    return float(chosen[b]), [(int(i), float(v)) for i, v in zip(ids[b, :k], values[b, :k])]
