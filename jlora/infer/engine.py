"""Continuous batching over an adapter stack: the engine behind `jlora-serve`.

One thread owns the device. It keeps `max_batch` rows of one KV cache of `max_len` slots with a
shared fill index (a local, sliding-window layer keeps a ring of its window's slots instead). A
request joins at the next step: the joining prompts are prefilled packed into one row (each with its
own adapter) and each is copied into a free row so that it ends at the fill index; earlier slots of
that row are empty (segment 0), and rope positions are per row, so rows of different ages share every
decode step, whatever adapter each uses. A row leaves as soon as it is
done. When the fill index reaches the end, every row is shifted left by the oldest live row's start
(rows never span more than a request's prompt + max_tokens <= max_len, so there is always room).
Steps are pipelined: each step's sampled tokens stay on the device as the next step's input, and the
host reads them (emits, checks EOS and stop strings) while that next step runs, so the device never
waits on Python. A row that ended at step t has run one step more, whose token is dropped.
Each row samples with its own request's settings (`jlora.infer.row_sampling`): seed, temperature, top-p,
logit bias and penalties, whose per-row state ([B,V] bias and generated-token counts) stays on the device
with the rows, and the log-probabilities it asked for, read with its tokens. `score_prompt` gives a
prompt's own log-probabilities (echo).
HTTP, tokenization and text live in `jlora.infer.serve`; the model code is `jlora.infer.generate`'s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.infer.decode import decode_jit, forward, init_decode_cache
from jlora.infer.generate import BUCKET, GenerateError, Generator, bucket, stop_cut
from jlora.infer.lora_stack import RowAdapters
from jlora.infer.row_sampling import dense_bias, mode_of, sample_rows, set_rows, top_entries, top_size


@dataclasses.dataclass(eq=False)
class Request:
    """One generation; `emit(new_ids, finish)` is called on the engine thread (finish None while running)."""

    prompt: list[int]
    adapter: str | None
    max_tokens: int
    emit: Callable[[list[int], str | None], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives
    deadline: float = float("inf")  # time.monotonic() after which it ends with finish "timeout"
    cancelled: bool = False
    out: list[int] = dataclasses.field(default_factory=list)
    # (logprob, [(id, logprob)] of the `logprobs` most likely) per token of `out`, filled before its emit
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = dataclasses.field(default_factory=list)
    start: int = 0  # the row's first cache slot
    fed: int = 0  # generated tokens given to the model so far (the last of `out` may still be in flight)

    @property
    def adjusts(self) -> bool:
        """Whether its logits change before sampling (a bias or a penalty): `row_sampling.Mode.adjust`."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@functools.partial(jax.jit, static_argnames=("dmodel",))
def _prefill_packed(dmodel, frozen, routed: RowAdapters, ids, positions, segment_ids, last):
    """Prompts packed into one row [1,P] (segment j+1 each, own positions and adapter per token): the logits
    [n,V] at their last tokens `last` [n] and the prefill cache of P slots."""
    cache = init_decode_cache(dmodel.cfg, 1, ids.shape[1])
    logits, cache = forward(dmodel, frozen, routed, cache, ids, positions, segment_ids, last[None])
    return logits[0], cache


def _slot_times(n_slots: int, idx, max_len: int) -> jax.Array:
    """The time (fill index it was written at) each of a layer's `n_slots` slots holds when the fill index is
    `idx`: the slot itself in a linear cache of `max_len` slots; in a ring (a local layer's window), the
    latest time before `idx` that is the slot mod `n_slots` (negative: nothing yet)."""
    slot = jnp.arange(n_slots)
    return slot if n_slots == max_len else idx - 1 - (idx - 1 - slot) % n_slots


@functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(6,))
def _insert(cache: dict, small: dict, rows, starts, lengths, idx, max_len: int) -> dict:
    """Copy prompt j, at slots [starts[j], starts[j] + lengths[j]) of a packed prefill cache (one row), into
    row rows[j] of `cache`, ending at time `idx`; that row's other slots become empty. A row index past the
    batch (padding) copies nothing. A ring layer keeps the prompt's last `window` times."""

    def one(big, part):
        times = _slot_times(big["segment_ids"].shape[1], idx, max_len)[None, :]  # [1,S]
        begin = (idx - lengths)[:, None]  # [n,1]
        mine = (times >= begin) & (times < idx) & (times >= 0)  # [n,S]
        src = starts[:, None] + times - begin  # [n,S], the packed slot each slot copies (where mine)
        src_ok = jnp.clip(src, 0, part["segment_ids"].shape[1] - 1)

        def rows_of(x, axis):  # values [1,K,P,H] or keys [1,K,H,P] -> [n,K,S,H] or [n,K,H,S]; slots on `axis`
            got = jnp.moveaxis(jnp.take(x[0], src_ok, axis=axis - 1), axis - 1, 0)  # the request axis n first
            keep = jnp.expand_dims(mine, [d for d in range(1, x.ndim) if d != axis])
            return jnp.where(keep, got, 0).astype(big["k"].dtype)

        return {
            "k": big["k"].at[rows].set(rows_of(part["k"], 3), mode="drop"),
            "v": big["v"].at[rows].set(rows_of(part["v"], 2), mode="drop"),
            "segment_ids": big["segment_ids"].at[rows].set(mine.astype(jnp.int32), mode="drop"),
            "index": big["index"],
        }

    return {name: {"self_attn": one(layer["self_attn"], small[name]["self_attn"])} for name, layer in cache.items()}


@functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(3,))
def _shift(cache: dict, delta, idx, max_len: int) -> dict:
    """Every row moved `delta` slots (right if > 0), vacated slots emptied; `idx` is the fill index after the
    move. A ring layer rolls by `delta` (time t + delta lives in slot (t + delta) mod W) and empties the
    slots whose time is now before 0."""

    def move(x, axis, ring):
        s = x.shape[axis]
        both = jnp.concatenate([x, x], axis=axis)
        out = jax.lax.dynamic_slice_in_dim(both, (s - delta) % s, s, axis=axis)  # a roll by delta along slots
        src = _slot_times(s, idx, max_len) if ring else jnp.arange(s) - delta  # where each slot came from
        keep = (src >= 0) if ring else (src >= 0) & (src < s)
        keep = keep.reshape((s,) + (1,) * (x.ndim - axis - 1))
        return jnp.where(keep, out, 0)

    def one(a):  # slots are axis 3 of keys [B,K,H,S], 2 of values [B,K,S,H], 1 of segment ids [B,S]
        ring = a["segment_ids"].shape[1] != max_len
        return {
            "k": move(a["k"], 3, ring),
            "v": move(a["v"], 2, ring),
            "segment_ids": move(a["segment_ids"], 1, ring),
            "index": a["index"],
        }

    return {name: {"self_attn": one(layer["self_attn"])} for name, layer in cache.items()}


@decode_jit(static_argnames=("dmodel",), donate_argnames=("cache",))
def _step(dmodel, frozen, routed: RowAdapters, cache, tokens, positions, idx):
    """One decode step for every row: logits [B,V] of tokens [B] at positions [B] written to slot idx, and the cache.
    Sampling is a separate call (`row_sampling.sample_rows`), so the model step compiles once whatever the rows
    ask for."""
    ids = tokens[:, None]  # [B,1]
    cache = {name: {"self_attn": {**layer["self_attn"], "index": idx}} for name, layer in cache.items()}
    return forward(dmodel, frozen, routed, cache, ids, positions[:, None], jnp.ones_like(ids), False)


@jax.jit
def _finite_rows(logits: jax.Array) -> jax.Array:
    """[B] whether each row's logits [B,V] are all finite: a row that turns NaN or inf ends with an error."""
    return jnp.all(jnp.isfinite(logits), axis=-1)


@functools.partial(jax.jit, static_argnames=("dmodel", "top"))
def _score_prompt(dmodel, frozen, routed: RowAdapters, ids, positions, segment_ids, *, top: int):
    """Each prompt token's logprob given the tokens before it, for one prompt [1,P]: ([P-1], the `top` most
    likely tokens' values and ids [P-1,top]) at positions 1..P-1, of the raw logits."""
    cache = init_decode_cache(dmodel.cfg, 1, ids.shape[1])
    columns = jnp.arange(ids.shape[1] - 1, dtype=jnp.int32)[None]  # [1,P-1]: each position predicts the next
    logits, _ = forward(dmodel, frozen, routed, cache, ids, positions, segment_ids, columns)
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)  # [P-1,V]
    chosen = jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0]  # [P-1]
    values, top_ids = jax.lax.top_k(logp, top) if top else (logp[:, :0], jnp.zeros((logp.shape[0], 0), jnp.int32))
    return chosen, values, top_ids


class Engine:
    """Continuous batching of `Request`s over `gen` (a Generator with an adapter stack) on one thread."""

    def __init__(self, gen: Generator, *, max_batch: int, max_len: int, max_queue: int, eos: list[int], tokenizer=None):
        if gen.stack is None:
            raise ValueError("the engine needs a Generator with an adapter stack")
        self.gen, self.stack, self.tokenizer, self.eos = gen, gen.stack, tokenizer, set(eos)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = -(-max_len // BUCKET) * BUCKET
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.commands: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.idx = 0
        # Local layers keep a ring of their window's slots, global ones every slot up to max_len.
        self.cache = jax.jit(init_decode_cache, static_argnums=(0, 1, 2, 3))(gen.cfg, max_batch, self.max_len, True)
        self.steps = 0
        self.feed = jnp.zeros((max_batch,), jnp.int32)  # each row's next input token, on the device
        self.pending: tuple | None = None  # (rows, tokens, logprobs, finite) of the step in flight, not yet read
        # Each row's logit bias and counts of the tokens it generated (row_sampling), and whether its bias
        # row may be non-zero, so that a joining request that needs neither skips resetting them.
        vocab = gen.cfg.vocab_size
        self.bias, self.counts = jnp.zeros((max_batch, vocab), jnp.float32), jnp.zeros((max_batch, vocab), jnp.int32)
        self.dirty = [False] * max_batch
        self._thread = threading.Thread(target=self._loop, name="jlora-engine", daemon=True)
        self._thread.start()

    # ---- called from other threads

    def submit(self, req: Request) -> bool:
        """Queue a request; False when the queue is full (the caller answers 429)."""
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(req)
            self.cond.notify()
        return True

    def submit_all(self, reqs: list[Request]) -> bool:
        """Queue requests together (a request's n choices), or none: False when the queue has no room for all."""
        with self.cond:
            if len(self.waiting) + len(reqs) > self.max_queue:
                return False
            self.waiting.extend(reqs)
            self.cond.notify()
        return True

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn on the engine thread between steps (e.g. a stack change); its result or error in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            self.commands.append((fn, fut))
            self.cond.notify()
        return fut

    def in_use(self, name: str) -> bool:
        with self.cond:
            return any(r is not None and r.adapter == name for r in [*self.slots, *self.waiting])

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def warm_up(self) -> int:
        """Compile what requests run before the first one comes: one greedy request per prompt `bucket` up to
        max_len (each alone, so its packed prefill and cache insert are that bucket's), then one sampled request
        (temperature 1, the API's default). Each runs two tokens, so the decode step and the row sampling compile
        too. EOS is ignored meanwhile (a first token of EOS would skip the step). Call it before serving; it
        returns the number of prompt sizes compiled."""
        sizes = sorted({self._packed_size(n) for n in range(1, self.max_len - 1)})
        jobs = [(min(size, self.max_len - 2), 0.0) for size in sizes] + [(1, 1.0)]
        eos, self.eos = self.eos, set()
        try:
            for n, temperature in jobs:
                done, finish = threading.Event(), []

                def emit(_new: list[int], fin: str | None, done=done, finish=finish) -> None:
                    if fin is not None:
                        finish.append(fin)
                        done.set()

                with self.cond:  # past the queue's limit, which is for clients
                    self.waiting.append(Request([0] * n, None, 2, emit, temperature=temperature))
                    self.cond.notify()
                done.wait()
                if finish[0] != "length":  # the model cannot run: say so before serving
                    raise GenerateError(f"warming up a prompt of {n} tokens: {finish[0]}")
        finally:
            self.eos = eos
        return len(sizes)

    # ---- the engine thread

    def score_prompt(self, prompt: list[int], adapter: str | None, top: int) -> list[tuple | None]:
        """Each prompt token's (logprob, [(id, logprob)] of the `top` most likely) given the tokens before it
        (None for the first, which has none), with `adapter`. Run it on the engine thread (`call`)."""
        p = bucket(len(prompt), self.max_len)
        ids, positions, segs = (np.zeros((1, p), np.int32) for _ in range(3))
        ids[0, : len(prompt)], positions[0, : len(prompt)], segs[0, : len(prompt)] = prompt, np.arange(len(prompt)), 1
        routed = self.stack.rows([adapter])
        k = top_size(top)
        out = tuple(
            np.asarray(x) for x in _score_prompt(self.gen.model, self.gen.frozen, routed, ids, positions, segs, top=k)
        )
        return [None] + [top_entries(*out, i, top) for i in range(len(prompt) - 1)]

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.waiting or self.commands or any(self.slots)):
                    self.cond.wait()
                commands = list(self.commands)
                self.commands.clear()
            try:
                if commands:
                    self._collect()  # a stack change waits for the step in flight, which reads the stack
                for fn, fut in commands:
                    try:
                        fut.set_result(fn())
                    except Exception as e:
                        fut.set_exception(e)
                self._expire()
                self._admit()
                if any(self.slots):
                    self._decode()
                else:
                    self.idx = 0  # nothing live: start the next requests at the front of the cache
            except Exception as e:
                self.pending = None
                for i, req in enumerate(self.slots):
                    if req is not None:
                        self._finish(i, f"error: {' '.join(str(e).split())}")

    def _finish(self, i: int, reason: str) -> None:
        req, self.slots[i] = self.slots[i], None
        req.emit([], reason)

    def _expire(self) -> None:
        now = time.monotonic()
        for i, req in enumerate(self.slots):
            if req is not None and (req.cancelled or now > req.deadline):
                self._finish(i, "cancelled" if req.cancelled else "timeout")
        with self.cond:
            for req in [r for r in self.waiting if r.cancelled or now > r.deadline]:
                self.waiting.remove(req)
                req.emit([], "cancelled" if req.cancelled else "timeout")

    def _admit(self) -> None:
        """Every waiting request that a free row can take joins now, prefilled together."""
        with self.cond:
            free = [i for i, r in enumerate(self.slots) if r is None]
            joining = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        ok = []
        for req in joining:
            if req.adapter is None or req.adapter in self.stack:
                ok.append(req)
            else:  # its adapter was removed while it waited
                req.emit([], f"error: no adapter named {req.adapter!r} in the stack")
        try:
            if ok:
                self._join(free[: len(ok)], ok)
        except Exception as e:
            for req in ok:
                if req not in self.slots:
                    req.emit([], f"error: {' '.join(str(e).split())}")
            raise

    def _join(self, rows: list[int], reqs: list[Request]) -> None:
        """Prefill `reqs` packed into one row (each prompt its own segment, positions and adapter; padded to a
        bucket) and copy each into its free row, ending at the fill index. Packed, a prefill computes the
        prompts' own tokens: left-padded to the longest, 16 short prompts were ~70% padding."""
        lengths = [len(r.prompt) for r in reqs]
        n_pad = 1 << (len(reqs) - 1).bit_length()  # compiled sizes: powers of 2 requests, bucketed lengths
        p = self._packed_size(sum(lengths))
        ids, positions, segs, adapters = (np.zeros((1, p), np.int32) for _ in range(4))
        adapters -= 1  # padding: the base
        starts, lens, dest = (
            np.zeros(n_pad, np.int32),
            np.ones(n_pad, np.int32),
            np.full(n_pad, self.max_batch, np.int32),
        )
        o = 0
        for j, (row, req, n) in enumerate(zip(rows, reqs, lengths)):
            ids[0, o : o + n], positions[0, o : o + n], segs[0, o : o + n] = req.prompt, np.arange(n), j + 1
            adapters[0, o : o + n] = self.stack.index(req.adapter)
            starts[j], lens[j], dest[j] = o, n, row
            o += n
        routed = RowAdapters(self.stack.arrays, jnp.asarray(adapters))
        logits, small = _prefill_packed(
            self.gen.model, self.gen.frozen, routed, ids, positions, segs, starts + lens - 1
        )
        if self.idx < max(lengths) and any(self.slots):  # room for the prompts before the fill index:
            self._move(max(lengths) - self.idx)  # move every live row right
        elif self.idx < max(lengths):  # nothing live to move: the fill index moves on (a shift copies the whole
            self.idx = max(lengths)  # cache: ~0.8 s at 16 rows x 1024 slots of SmolLM2, at each idle server's request)
        self.cache = _insert(self.cache, small, dest, starts, lens, np.int32(self.idx), self.max_len)
        for row, req in zip(rows, reqs):
            req.start = self.idx - len(req.prompt)
            self.slots[row] = req
        padded = reqs + [None] * (n_pad - len(reqs))
        mode = mode_of(padded)
        vocab = self.bias.shape[1] if mode.adjust else 1  # counts start empty: only the bias matters here
        bias = dense_bias([r and r.logit_bias for r in padded], vocab)
        toks, _, lps = sample_rows(
            logits, *self._sampling(padded), bias, jnp.zeros((n_pad, vocab), jnp.int32), mode=mode
        )
        toks, finite = np.asarray(toks), np.asarray(_finite_rows(logits))
        self.feed = self.feed.at[np.asarray(rows)].set(toks[: len(rows)])
        reset = [j for j, (row, req) in enumerate(zip(rows, reqs)) if req.adjusts or self.dirty[row]]
        if reset:  # the rows' bias and counts become the joining requests' own
            at = np.full(n_pad, self.max_batch, np.int32)
            at[: len(reset)] = [rows[j] for j in reset]
            mine = dense_bias([reqs[j].logit_bias for j in reset] + [None] * (n_pad - len(reset)), self.bias.shape[1])
            first = np.zeros(n_pad, np.int32)
            first[: len(reset)] = toks[reset]
            self.bias, self.counts = set_rows(self.bias, self.counts, at, mine, first)
            for j in reset:
                self.dirty[rows[j]] = bool(reqs[j].logit_bias)
        lps = None if lps is None else tuple(np.asarray(x) for x in lps)
        for j, (row, tok) in enumerate(zip(rows, toks)):
            if finite[j]:
                self._accept(row, int(tok), lps, j)
            else:
                self._nonfinite(row)

    def _packed_size(self, total: int) -> int:
        """The compiled length of a packed prefill of `total` prompt tokens (`bucket`: a power of two)."""
        return bucket(total, self.max_len * self.max_batch)

    def _move(self, delta: int) -> None:
        self.idx += delta
        self.cache = _shift(self.cache, jnp.int32(delta), np.int32(self.idx), self.max_len)
        for req in self.slots:
            if req is not None:
                req.start += delta

    @staticmethod
    def _sampling(reqs):
        """(seeds, steps, temperatures, top_ps, presence and frequency penalties) per row (None = an empty row),
        as host arrays (the jitted call takes them over). A row's step is the number of the token being drawn:
        0 at the prefill, `fed` after it."""
        return (
            np.asarray([r.seed if r else 0 for r in reqs], np.uint32),
            np.asarray([r.fed if r else 0 for r in reqs], np.int32),
            np.asarray([r.temperature if r else 0.0 for r in reqs], np.float32),
            np.asarray([r.top_p if r else 1.0 for r in reqs], np.float32),
            np.asarray([r.presence_penalty if r else 0.0 for r in reqs], np.float32),
            np.asarray([r.frequency_penalty if r else 0.0 for r in reqs], np.float32),
        )

    def _accept(self, row: int, tok: int, lps: tuple | None = None, at: int | None = None) -> None:
        """Row `row`'s next token; `lps` the step's log-probabilities on the host, its entry `at` (default: the row)."""
        req = self.slots[row]
        if tok in self.eos:
            return self._finish(row, "stop")
        if req.logprobs is not None:  # recorded before the emit, so the listener finds it
            req.token_logprobs.append(top_entries(*lps, row if at is None else at, req.logprobs))
        req.out.append(tok)
        if req.stop and self.tokenizer is not None:
            cut = stop_cut(req.out[:-1], [tok], req.stop, self.tokenizer)
            if cut is not None:
                req.emit([tok], None)
                return self._finish(row, "stop")
        req.emit([tok], None)
        if len(req.out) >= req.max_tokens:
            self._finish(row, "length")

    def _decode(self) -> None:
        """Queue one step for every row that still needs a token, then read the step before it."""
        if self.idx >= self.max_len:  # full: drop the slots before the oldest live row
            self._move(-min(r.start for r in self.slots if r is not None))
        live = [r if r is not None and r.fed + 1 < r.max_tokens else None for r in self.slots]
        if not any(live):  # every row's last token is in flight already
            return self._collect()
        positions = np.asarray([len(r.prompt) + r.fed if r else 0 for r in live], np.int32)
        for r in live:
            if r is not None:
                r.fed += 1
        routed = self.stack.rows([r.adapter if r else None for r in live])
        logits, self.cache = _step(
            self.gen.model, self.gen.frozen, routed, self.cache, self.feed, positions, np.int32(self.idx)
        )
        self.idx += 1
        self.steps += 1
        self.feed, self.counts, lps = sample_rows(
            logits, *self._sampling(live), self.bias, self.counts, mode=mode_of(live)
        )
        done, self.pending = self.pending, (live, self.feed, lps, _finite_rows(logits))
        self._read(done)

    def _collect(self) -> None:
        """Read the step in flight, if any."""
        done, self.pending = self.pending, None
        self._read(done)

    def _read(self, step: tuple | None) -> None:
        """Accept a finished step's tokens for the rows that are still its own."""
        if step is None:
            return
        live, tokens, lps, finite = step
        tokens, finite = np.asarray(tokens), np.asarray(finite)
        lps = None if lps is None else tuple(np.asarray(x) for x in lps)
        for i, req in enumerate(live):
            if req is not None and self.slots[i] is req:
                if finite[i]:
                    self._accept(i, int(tokens[i]), lps)
                else:
                    self._nonfinite(i)

    def _nonfinite(self, row: int) -> None:
        """End row `row`, whose logits turned NaN or inf (a token drawn from them would be garbage): the
        server answers 500 with this line, and the other rows go on."""
        req = self.slots[row]
        self._finish(
            row,
            f"failed: the model gave NaN or inf logits for new token {len(req.out) + 1} "
            f"(adapter {req.adapter or 'none'}); check the base weights and the adapter",
        )
