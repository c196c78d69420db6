"""KV-cached generation with or without a LoRA adapter, and the `jlora-generate` CLI.

`generate` left-pads a batch of prompts, prefills them in one call, then samples with a jitted
`lax.while_loop` over a preallocated cache, stopping each row at EOS and leaving the loop when all
rows are done. Greedy, temperature, top-k and top-p sampling; stop strings are checked on the host
between chunks, which is also how `Generator.stream` yields tokens as they are produced. A row whose
logits turn NaN or inf stops, and the host raises NonFiniteLogitsError before yielding that chunk. An adapter
runs unmerged (routed through `jlora.peft.routing.apply`) or merged (pass no trainable tree); with a
`jlora.infer.lora_stack.AdapterStack`, each row runs its own adapter of the stack (or the base) in one batch.
The model code is `jlora.models.decoder`'s, and so is the one decode path: the cache layout (`init_cache`), its
writes and their bound check (`Attention`). `jlora.infer.decode` lays the weights out for it (layers
unrolled over per-layer buffers, fused kernels joined once) and compiles the per-token step.
The cache is sized to the longest prompt + max_new_tokens, each rounded up to its `bucket` (a power of two), so
generation never runs past it and new prompt lengths reuse the programs compiled for their bucket.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jlora.checkpoint.adapter import load_any_adapter
from jlora.errors import JloraError
from jlora.formats.tokenizer import load_tokenizer
from jlora.formats.weights import resolve_model_path
from jlora.formats.weights_on_device import load_pretrained
from jlora.infer.decode import decode_jit, decode_model, forward, init_decode_cache, layout
from jlora.infer.lora_stack import AdapterStack
from jlora.models.config import ModelConfig
from jlora.models.family import build_model
from jlora.peft.llama_adapter import expand as expand_prompts
from jlora.peft.lora import merge_for_inference
from jlora.peft.routing import LoraPair

BUCKET = 16  # the smallest compiled size of a prompt or of max_new_tokens


def bucket(n: int, cap: int) -> int:
    """The compiled size for `n` tokens: the next power of two (at least BUCKET), so that every new length
    reuses one of a few compiled programs (log2 of the context of them); past `cap` (the context), `cap` or
    `n` rounded up to a multiple of BUCKET. Padding slots are masked out of attention."""
    size = max(BUCKET, 1 << max(0, n - 1).bit_length())
    return size if size <= cap else -(-max(n, cap) // BUCKET) * BUCKET


class GenerateError(JloraError, ValueError):
    """Bad generation input; the message is one line."""


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` as int32 (the first maximum; the first NaN where a row has one), as two
    single-operand reductions: XLA:CPU runs argmax's (value, index) reduction element by element, 0.8 ms
    for 16 rows of SmolLM2's 49152 logits against 0.45 ms."""
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN where the row has one
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, key, temperature, top_p, mode: tuple) -> jax.Array:
    """Next tokens [B] from logits [B,V]. mode = (greedy, top_k or None, use top_p) is static."""
    greedy, top_k, use_top_p = mode
    if greedy:
        return greedy_tokens(logits)
    logits = logits / temperature  # HF's order: temperature, then top-k, then top-p
    idx = None
    if top_k is not None:
        logits, idx = jax.lax.top_k(logits, top_k)  # [B,k], best first
    elif use_top_p:
        idx = jnp.argsort(-logits, axis=-1)  # [B,V]
        logits = jnp.take_along_axis(logits, idx, axis=-1)
    if use_top_p:
        probs = jax.nn.softmax(logits, axis=-1)
        better = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above; the best always stays
        logits = jnp.where(better < top_p, logits, -jnp.inf)
    choice = jax.random.categorical(key, logits, axis=-1)  # [B]
    if idx is not None:
        choice = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("dmodel", "max_len"))
def _prefill(dmodel, frozen, trainable, ids, positions, segment_ids, *, max_len: int):
    """Run the prompts [B,P] through a fresh cache: (last-position logits [B,V], cache)."""
    cache = init_decode_cache(dmodel.cfg, ids.shape[0], max_len, ring=True)
    return forward(dmodel, frozen, trainable, cache, ids, positions, segment_ids, True)


@functools.partial(jax.jit, static_argnames=("n_new", "mode"), donate_argnames=("cache",))
def _first(logits, cache, lengths, key, temperature, top_p, eos_ids, *, n_new: int, mode: tuple) -> dict:
    """Sample the first token: the decode loop's state. Apart from the prefill, so sampling settings
    never recompile the model."""
    tok = sample(logits, jax.random.fold_in(key, 0), temperature, top_p, mode)
    tokens = jnp.zeros((logits.shape[0], n_new), jnp.int32).at[:, 0].set(tok)  # [B,N]
    broken = ~jnp.all(jnp.isfinite(logits), axis=-1)  # [B]
    return {
        "cache": cache,
        "tokens": tokens,
        "last": tok,
        "done": jnp.isin(tok, eos_ids) | broken,
        "step": jnp.ones((), jnp.int32),
        "lengths": lengths,
        "nonfinite": jnp.where(broken, 0, -1).astype(jnp.int32),  # [B] the first new token with NaN/inf logits
    }


@decode_jit(static_argnames=("dmodel", "mode"), donate_argnames=("state",))
def _decode(
    dmodel, frozen, trainable, state, stop_at, key, temperature, top_p, eos_ids, pad_id, *, mode: tuple
) -> dict:
    """Sample until `stop_at` tokens exist or every row is done. Token j draws with fold_in(key, j),
    so chunking the loop (streaming) never changes the result."""

    def body(s):
        ids = s["last"][:, None]  # [B,1]
        positions = (s["lengths"] + s["step"] - 1)[:, None]  # token j-1 sits at position len + j-1
        logits, cache = forward(dmodel, frozen, trainable, s["cache"], ids, positions, jnp.ones_like(ids), False)
        tok = sample(logits, jax.random.fold_in(key, s["step"]), temperature, top_p, mode)
        tok = jnp.where(s["done"], pad_id, tok)  # finished rows emit pad
        tokens = jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (0, s["step"]))
        # one [B, V] reduction per token, next to the [D, V] head: a row whose logits turn NaN/inf stops here
        broken = ~s["done"] & ~jnp.all(jnp.isfinite(logits), axis=-1)  # [B]
        return {
            **s,
            "cache": cache,
            "tokens": tokens,
            "last": tok,
            "done": s["done"] | jnp.isin(tok, eos_ids) | broken,
            "step": s["step"] + 1,
            "nonfinite": jnp.where(broken & (s["nonfinite"] < 0), s["step"], s["nonfinite"]),
        }

    return jax.lax.while_loop(lambda s: (s["step"] < stop_at) & ~jnp.all(s["done"]), body, state)


def _rows(prompt_ids, lengths) -> list[list[int]]:
    """Prompts as lists of ints: a list of lists, one flat list, or a [B,T] array (+ per-row lengths)."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_ids)
        arr = arr[None] if arr.ndim == 1 else arr
        if arr.ndim != 2:
            raise GenerateError(f"prompt_ids must be [B, T] token ids, got shape {arr.shape}")
        lens = [arr.shape[1]] * arr.shape[0] if lengths is None else [int(n) for n in lengths]
        if len(lens) != arr.shape[0]:
            raise GenerateError(f"lengths has {len(lens)} entries for {arr.shape[0]} prompts")
        return [arr[b, :n].tolist() for b, n in enumerate(lens)]
    rows = list(prompt_ids)
    if rows and isinstance(rows[0], (int, np.integer)):
        rows = [rows]
    return [[int(t) for t in r] for r in rows]


def eos_list(eos_id, cfg: ModelConfig) -> list[int]:
    eos = cfg.eos_token_id if eos_id is None else eos_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, (int, np.integer)) else [int(e) for e in eos]


class Generator:
    """A model with its weights laid out for decoding (one buffer per layer, fused projections' kernels
    joined), reusable across calls.

    `trainable` None or empty runs `frozen` as plain (e.g. merged) params; otherwise LoRA is unmerged.
    With a `stack` instead, `stream(..., adapters=[name or None per row])` runs each row's own adapter.
    """

    def __init__(
        self, model: nn.Module, frozen: dict, trainable: dict | None = None, stack: AdapterStack | None = None
    ):
        if not isinstance(getattr(model, "cfg", None), ModelConfig):
            raise GenerateError(f"generate needs a jlora model (jlora.build_model), got {type(model).__name__}")
        cfg = self.cfg = model.cfg
        self.model = decode_model(cfg)
        trainable = dict(trainable or {})
        if stack is not None and trainable:
            raise GenerateError("give a trainable tree or an adapter stack, not both")
        self.stack = stack
        self.frozen, self.trainable = layout(cfg, frozen, expand_prompts(trainable, cfg.num_hidden_layers))

    def stream(
        self,
        prompt_ids,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        eos_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        tokenizer=None,
        pad_id: int = 0,
        lengths=None,
        chunk: int = 1,
        adapters: Sequence[str | None] | None = None,
    ) -> Iterator[list[list[int]]]:
        """Yield, every `chunk` tokens, the new ids of each row (EOS and what follows a stop string left out).

        `adapters` names each row's adapter in the stack (None = the base); it needs a Generator with a stack.

        Concatenated, the yields equal `generate(...)` with the same arguments, whatever `chunk` is.
        """
        cfg = self.cfg
        rows = _rows(prompt_ids, lengths)
        n_new = int(max_new_tokens)
        _check(rows, n_new, cfg, temperature, top_k, top_p, chunk, pad_id)
        if stop_strings and tokenizer is None:
            raise GenerateError("stop_strings need a tokenizer to decode with (tokenizer=...)")
        eos = eos_list(eos_id, cfg)
        greedy = temperature == 0.0
        mode = (greedy, None if greedy else top_k, not greedy and top_p is not None and top_p < 1.0)
        b, n_max = len(rows), max(len(r) for r in rows)
        p, n_buf = (bucket(n, cfg.max_position_embeddings) for n in (n_max, n_new))
        ids = np.zeros((b, p), np.int32)  # pad slots hold a valid id: a NaN there would leak through 0 * NaN
        positions, segs = np.zeros((b, p), np.int32), np.zeros((b, p), np.int32)
        for i, r in enumerate(rows):  # left-pad: every row's last prompt token sits in the last column
            ids[i, p - len(r) :], positions[i, p - len(r) :], segs[i, p - len(r) :] = r, np.arange(len(r)), 1
        trainable = self._row_adapters(adapters, b)
        key = jax.random.key(seed)
        temp, tp = jnp.float32(temperature or 1.0), jnp.float32(top_p or 1.0)
        eos_ids = jnp.asarray(eos or [-1], jnp.int32)
        logits, cache = _prefill(self.model, self.frozen, trainable, ids, positions, segs, max_len=p + n_buf)
        state = _first(
            logits,
            cache,
            jnp.asarray([len(r) for r in rows], jnp.int32),
            key,
            temp,
            tp,
            eos_ids,
            n_new=n_buf,
            mode=mode,
        )
        out: list[list[int]] = [[] for _ in rows]
        finished, emitted, step = [False] * b, 0, 1
        while True:
            _check_finite_logits(np.asarray(state["nonfinite"]), finished)
            fresh, stopped = np.asarray(state["tokens"])[:, emitted:step], []
            new: list[list[int]] = [[] for _ in rows]
            for i in range(b):
                for t in fresh[i].tolist():
                    if finished[i] or t in eos:
                        finished[i] = True
                        break
                    new[i].append(t)
                if new[i] and stop_strings:
                    cut = stop_cut(out[i], new[i], stop_strings, tokenizer)
                    if cut is not None:
                        new[i], finished[i] = new[i][:cut], True
                        stopped.append(i)
                out[i].extend(new[i])
            emitted = step
            yield new
            if step >= n_new or all(finished):
                return
            if stopped:  # rows done by a stop string: stop sampling them on the device too
                state["done"] = state["done"].at[np.asarray(stopped)].set(True)
            state = _decode(
                self.model,
                self.frozen,
                trainable,
                state,
                jnp.int32(min(step + chunk, n_new)),
                key,
                temp,
                tp,
                eos_ids,
                jnp.int32(pad_id),
                mode=mode,
            )
            step = int(state["step"])

    def _row_adapters(self, adapters, b: int):
        """The trainable argument of the jitted calls: the tree, or the stack with each row's index."""
        if adapters is None:
            return self.trainable if self.stack is None else self.stack.rows([None] * b)
        if self.stack is None:
            raise GenerateError("adapters=[...] per row needs a Generator built with an adapter stack")
        if len(adapters) != b:
            raise GenerateError(f"adapters names {len(adapters)} rows for {b} prompts")
        try:
            return self.stack.rows(adapters)
        except ValueError as e:
            raise GenerateError(str(e)) from None

    def generate(self, prompt_ids, **kwargs) -> list[list[int]]:
        """New ids per row, ending before EOS or just after a stop string. Arguments as `stream`."""
        if not kwargs.get("stop_strings"):  # nothing to check on the host: one loop to the end
            kwargs.setdefault("chunk", int(kwargs.get("max_new_tokens", 64)))
        kwargs.setdefault("chunk", 16)
        rows: list[list[int]] | None = None
        for new in self.stream(prompt_ids, **kwargs):
            rows = new if rows is None else [r + n for r, n in zip(rows, new)]
        return rows or []


class NonFiniteLogitsError(GenerateError):
    """The model gave NaN or inf logits: broken weights or adapter, whose tokens would be garbage or blank."""


def _check_finite_logits(nonfinite: np.ndarray, finished: list[bool]) -> None:
    """NonFiniteLogitsError for the first row still running whose logits were NaN/inf (`nonfinite` [B]: the
    new token's index, -1 where none), before any token of that chunk is yielded."""
    for i, step in enumerate(nonfinite.tolist()):
        if step >= 0 and not finished[i]:
            raise NonFiniteLogitsError(
                f"row {i}: the model gave NaN or inf logits for new token {step + 1}; its weights or adapter "
                f"overflow (values far out of range?): stopping instead of emitting garbage"
            )


def _check(rows, n_new, cfg: ModelConfig, temperature, top_k, top_p, chunk, pad_id) -> None:
    if not rows:
        raise GenerateError("no prompts given")
    for i, r in enumerate(rows):
        if not r:
            raise GenerateError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
        bad = next((t for t in r if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise GenerateError(f"prompt {i} has token id {bad}, outside the vocabulary [0, {cfg.vocab_size})")
    if n_new < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {n_new}")
    longest = max(len(r) for r in rows)
    if longest + n_new > cfg.max_position_embeddings:
        raise GenerateError(
            f"prompt of {longest} tokens + max_new_tokens {n_new} = {longest + n_new} exceeds the "
            f"model's context of {cfg.max_position_embeddings} (max_position_embeddings)"
        )
    if not temperature >= 0.0:
        raise GenerateError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise GenerateError(f"top_k must be in [1, {cfg.vocab_size}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerateError(f"top_p must be in (0, 1], got {top_p}")
    if chunk < 1:
        raise GenerateError(f"chunk must be >= 1, got {chunk}")
    if not 0 <= pad_id < cfg.vocab_size:
        raise GenerateError(f"pad_id {pad_id} is outside the vocabulary [0, {cfg.vocab_size})")


def stop_cut(done: list[int], new: list[int], stops: Sequence[str], tokenizer) -> int | None:
    """How many of `new` to keep so the text ends with its first stop string's last token; None if none."""
    if not any(s in tokenizer.decode(done + new) for s in stops):
        return None
    for k in range(1, len(new) + 1):
        if any(s in tokenizer.decode(done + new[:k]) for s in stops):
            return k
    return len(new)


def generate(
    model: nn.Module,
    frozen: dict,
    trainable: dict | None,
    prompt_ids,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    pad_id: int = 0,
    lengths=None,
) -> list[list[int]]:
    """New ids per row for a batch of prompts (lists of ids of any lengths, or [B,T] with `lengths`).

    temperature 0 is greedy. eos_id (an id or several) ends a row and is not returned: None means the
    config's, () never. stop_strings (decoded with `tokenizer`) end a row just after the string.
    `trainable` None or {} runs `frozen` as plain (e.g. merged) params; otherwise LoRA runs unmerged.
    For several calls on one model, build a `Generator` once (it re-lays the weights per layer).
    """
    return Generator(model, frozen, trainable).generate(
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_id=eos_id,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        pad_id=pad_id,
        lengths=lengths,
    )


def generate_stream(model: nn.Module, frozen: dict, trainable: dict | None, prompt_ids, **kwargs):
    """`Generator.stream`: yields each row's new ids every `chunk` tokens (default 1) as they are produced."""
    return Generator(model, frozen, trainable).stream(prompt_ids, **kwargs)


def load_for_generation(model_path: str, adapter: str | None = None, merge: bool = False):
    """(Generator, tokenizer) for a model path or "smollm2-135m", with a jlora or HF PEFT adapter dir."""
    path = resolve_model_path(model_path)
    cfg, params = load_pretrained(path)
    trainable = None
    if adapter:
        _, trainable = load_any_adapter(adapter, cfg, params)  # a jlora one made for other base weights is refused
        if merge:
            tied = cfg.tie_word_embeddings
            params, trainable = merge_for_inference(params, trainable, tie_word_embeddings=tied), None
        else:
            full = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
            trained = {p for p, x in full.items() if not isinstance(x, LoraPair)}  # trained in full: not frozen
            params = traverse_util.unflatten_dict(
                {p: x for p, x in traverse_util.flatten_dict(params).items() if p not in trained}
            )
    return Generator(build_model(cfg), params, trainable), load_tokenizer(path)
