"""Training data: records -> token ids with a loss mask; `make_batches` turns them into a run's streams.

Owns the record formats (Alpaca JSON/JSONL, chat `messages` JSONL, plain text), prompt
masking and explicit truncation. The streams of fixed-shape batches (packing, shuffling, the resumable
position, each host's slice) are jlora.train.batches; a stream's identity (what a checkpoint
records) is jlora.train.data_stream. It does not load tokenizers
(jlora.formats.tokenizer) or place batches on devices (jlora.train.step). Examples and the tokenizer
interface are jlora.train.examples.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jlora.formats.tokenizer import unicode_error
from jlora.train import data_stream
from jlora.train.batches import Batches
from jlora.train.config import DataConfig, RunConfig
from jlora.train.examples import DataError, Example, TokenizerLike

# The Stanford Alpaca prompts (with / without an input), which lit-llama and alpaca-lora also use.
ALPACA_TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}


CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates render; anything else is a typo


@dataclasses.dataclass
class DataStats:
    """What loading did, so nothing is dropped or cut silently."""

    records: int = 0
    skipped_bad: int = 0  # malformed records, with on_bad_record="skip"
    truncated: int = 0
    dropped_too_long: int = 0  # with truncation="drop"
    dropped_no_target: int = 0  # nothing left to train on (e.g. the prompt fills max_seq_len)
    empty_responses: int = 0  # records whose response (Alpaca output, assistant turns) is empty
    train_examples: int = 0
    val_examples: int = 0
    train_tokens: int = 0
    train_loss_tokens: int = 0

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


# ---- records ----


def read_text(path: str) -> str:
    """A data file's text; one DataError line when it cannot be read or is not UTF-8 (naming line and column)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read data file: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def read_records(
    path: str, fmt: str, on_bad_record: str = "error", stats: DataStats | None = None
) -> list[tuple[str, dict]]:
    """[(where, record)] from a .json array, a JSONL file, or (format "text") a whole plain-text file.
    `where` is "file:line"; a malformed record raises DataError naming it, or is skipped and counted."""
    stats = stats if stats is not None else DataStats()
    text = read_text(path)
    if fmt == "text" and not path.endswith((".jsonl", ".json")):
        stats.records += bool(text.strip())
        return [(f"{path}:1", {"text": text})] if text.strip() else []
    out = []
    for where, obj in json_items(path, text):
        try:
            if isinstance(obj, Exception):
                raise DataError(f"{where}: invalid JSON: {obj}")
            out.append((where, _check_record(fmt, where, obj)))
        except DataError:
            if on_bad_record != "skip":
                raise
            stats.skipped_bad += 1
    stats.records += len(out)
    return out


def json_items(path: str, text: str) -> Iterator[tuple[str, Any]]:
    """(where, object or the parse error) for each element of a JSON array or line of JSONL."""
    if path.endswith(".json") and text.lstrip().startswith("["):
        dec, pos, seen, line = json.JSONDecoder(), text.index("[") + 1, 0, 1
        while True:  # raw_decode element by element, so each record keeps its line number
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            line, seen = line + text.count("\n", seen, pos), pos
            if pos >= len(text) or text[pos] == "]":
                return
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                yield f"{path}:{e.lineno}", e  # the rest of the array cannot be found reliably
                return
            yield f"{path}:{line}", obj
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{i}", e


def _check_record(fmt: str, where: str, obj: Any) -> dict:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise DataError(f"{where}: {msg}")

    need(isinstance(obj, dict), f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "alpaca":
        need(
            isinstance(obj.get("instruction"), str) and obj["instruction"].strip() != "",
            "alpaca record needs a non-empty string 'instruction'",
        )
        need(isinstance(obj.get("output"), str), "alpaca record needs a string 'output'")
        need(isinstance(obj.get("input", ""), (str, type(None))), "alpaca 'input' must be a string")
    elif fmt == "chat":
        msgs = obj.get("messages")
        need(isinstance(msgs, list) and len(msgs) > 0, "chat record needs a non-empty list 'messages'")
        for j, m in enumerate(msgs):
            need(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str),
                f"messages[{j}] needs string 'role' and 'content'",
            )
            need(
                m["role"] in CHAT_ROLES,
                f"messages[{j}] has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}",
            )
        need(any(m["role"] == "assistant" for m in msgs), "chat record has no assistant message")
    else:
        need(isinstance(obj.get("text"), str), "text record needs a string 'text'")
    for key, text in _texts(fmt, obj):
        bad = unicode_error(text)
        need(bad is None, f"{key}: {bad}")
    return obj


def _texts(fmt: str, rec: dict) -> list[tuple[str, str]]:
    """(key, text) of every string a record contributes to the tokens."""
    if fmt == "alpaca":
        return [(k, rec[k]) for k in ("instruction", "input", "output") if isinstance(rec.get(k), str)]
    if fmt == "chat":
        return [(f"messages[{j}].content", m["content"]) for j, m in enumerate(rec["messages"])]
    return [("text", rec["text"])]


def _response_empty(fmt: str, rec: dict) -> bool:
    """Whether the record has nothing to learn but the end of its response."""
    if fmt == "alpaca":
        return not rec["output"].strip()
    if fmt == "chat":
        return all(not m["content"].strip() for m in rec["messages"] if m["role"] == "assistant")
    return False


# ---- tokenization and masking ----


def _encode_pieces(tok: TokenizerLike, pieces: list[tuple[str, bool]]) -> tuple[list[int], np.ndarray]:
    """Encode the whole text in one go (the ids inference sees) and mark each piece's tokens: a piece
    ends where the encoding of the text up to it stops agreeing; a token across a boundary goes later."""
    text, add_bos = "".join(t for t, _ in pieces), None
    ids = tok.encode(text, add_bos=add_bos)
    if len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:  # the chat template already wrote BOS
        add_bos, ids = False, tok.encode(text, add_bos=False)
    mask = np.zeros(len(ids), bool)
    start, offset = 0, 0
    for k, (piece, trained) in enumerate(pieces):
        offset += len(piece)
        if k == len(pieces) - 1:
            end = len(ids)
        else:  # the longest common prefix of the two encodings
            head = tok.encode(text[:offset], add_bos=add_bos)
            end = next((j for j, (x, y) in enumerate(zip(ids, head)) if x != y), min(len(ids), len(head)))
        mask[start:end] = trained
        start = max(start, end)
    return ids, mask


def _chat_pieces(tok: TokenizerLike, msgs: list[dict], where: str) -> list[tuple[str, bool]]:
    """(text, is_assistant) pieces of a rendered chat, found by rendering its prefixes."""

    def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except ValueError as e:  # e.g. the template's raise_exception("roles must alternate")
            raise DataError(f"{where}: {e}") from None

    full = render(msgs)
    pieces, cursor = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = render(msgs[:i], add_generation_prompt=True)
        turn = render(msgs[: i + 1])
        if not (full.startswith(head) and full.startswith(turn) and cursor <= len(head) <= len(turn)):
            raise DataError(
                f"{where}: the chat template does not render message prefixes as prefixes, "
                "so the assistant turns cannot be located"
            )
        pieces += [(full[cursor : len(head)], False), (full[len(head) : len(turn)], True)]
        cursor = len(turn)
    return pieces  # messages after the last assistant turn teach nothing, so they are left out


def encode_record(
    rec: dict, fmt: str, tok: TokenizerLike, *, mask_prompt: bool = True, template: str = "alpaca", where: str = ""
) -> Example:
    """One alpaca / chat / text record as ids + mask, with EOS appended (and trained)."""
    if tok.eos_id is None:
        raise DataError(f"{where}: the tokenizer has no EOS token to end examples with")
    if fmt == "alpaca":
        if template not in ALPACA_TEMPLATES:
            raise DataError(f"data.template: unknown template {template!r}; known: {sorted(ALPACA_TEMPLATES)}")
        with_input, no_input = ALPACA_TEMPLATES[template]
        inp = rec.get("input") or ""
        prompt = (with_input if inp.strip() else no_input).format(instruction=rec["instruction"], input=inp)
        pieces = [(prompt, False), (rec["output"], True)]
    elif fmt == "chat":
        pieces = _chat_pieces(tok, rec["messages"], where)
    else:
        pieces = [(rec["text"], True)]
    if not mask_prompt:
        pieces = [(t, True) for t, _ in pieces]
    ids, mask = _encode_pieces(tok, pieces)
    if fmt != "chat" or tok.eos_id not in ids[int(np.argmax(mask)) if mask.any() else len(ids) :]:
        ids, mask = ids + [tok.eos_id], np.append(mask, True)  # a template's own end-of-turn token counts as EOS
    return Example(np.asarray(ids, np.int32), mask)


def _fit(ex: Example, cfg: DataConfig, stats: DataStats) -> list[Example]:
    """An example cut to max_seq_len inputs (text: chunked), or [] if dropped; counted in stats."""
    t = cfg.max_seq_len
    if cfg.format == "text":  # chunks of t+1 tokens overlapping by one, so every token is a target once
        out = [Example(ex.ids[i : i + t + 1], ex.mask[i : i + t + 1]) for i in range(0, len(ex.ids) - 1, t)]
    elif len(ex.ids) - 1 > t and cfg.truncation == "drop":
        stats.dropped_too_long, out = stats.dropped_too_long + 1, []
    else:
        stats.truncated += len(ex.ids) - 1 > t
        out = [Example(ex.ids[: t + 1], ex.mask[: t + 1])]
    kept = [e for e in out if e.mask[1:].any()]
    stats.dropped_no_target += len(out) - len(kept)
    return kept


def _examples(path: str, cfg: DataConfig, tok: TokenizerLike, stats: DataStats) -> list[Example]:
    out = []
    for where, rec in read_records(path, cfg.format, cfg.on_bad_record, stats):
        stats.empty_responses += _response_empty(cfg.format, rec)
        ex = encode_record(rec, cfg.format, tok, mask_prompt=cfg.mask_prompt, template=cfg.template, where=where)
        out += _fit(ex, cfg, stats)
    return out


def load_examples(cfg: DataConfig, tok: TokenizerLike) -> tuple[list[Example], list[Example], DataStats]:
    """(train, val, stats): the val file, or the last val_fraction of the train examples (in file order)."""
    stats = DataStats()
    if cfg.format == "chat" and getattr(tok, "chat_template", "") is None:
        raise DataError(
            f"data.format: chat renders messages with the tokenizer's chat template, and "
            f"{_tok_name(tok)} has none; add chat_template to its tokenizer_config.json, or use "
            f"format alpaca or text"
        )
    train = _examples(cfg.train, cfg, tok, stats)
    val = _examples(cfg.val, cfg, tok, stats) if cfg.val else []
    if cfg.val_fraction and train:
        n_val = max(1, round(len(train) * cfg.val_fraction))
        train, val = train[:-n_val], train[-n_val:]
    if not train:
        raise DataError(f"{cfg.train}: no training examples left ({stats.summary()})")
    if cfg.val and not val:
        raise DataError(f"{cfg.val}: no validation examples left ({stats.summary()})")
    stats.train_examples, stats.val_examples = len(train), len(val)
    stats.train_tokens = sum(len(e.ids) - 1 for e in train)
    stats.train_loss_tokens = sum(int(e.mask[1:].sum()) for e in train)
    return train, val, stats


def data_warnings(cfg: DataConfig, stats: DataStats) -> list[str]:
    """One line per data setup that loads but is almost surely a mistake."""
    out = []
    if cfg.val and os.path.realpath(cfg.val) == os.path.realpath(cfg.train):
        out.append(
            f"data.val is data.train ({cfg.train}): the held-out loss is measured on the training examples; "
            f"set data.val to another file, or use data.val_fraction"
        )
    if stats.records and stats.empty_responses == stats.records:
        out.append(f"every record's response is empty ({cfg.train}): the run can only learn to end its answer at once")
    return out


def _tok_name(tok: TokenizerLike) -> str:
    """Where a tokenizer came from, for messages (a jlora.formats.tokenizer.Tokenizer knows its file)."""
    return str(getattr(tok, "source", None) or f"the tokenizer {type(tok).__name__}")


def check_vocab(tok: TokenizerLike, model_vocab: int, examples: Sequence[tuple[str, Sequence[Example]]]) -> None:
    """Refuse a tokenizer larger than the model's vocab, or any token id the model has no embedding row
    for (`examples`: [(data file, its examples)]); either would train on garbage (gather fills NaN)."""
    n = getattr(tok, "vocab_size", None)
    if n is not None and n > model_vocab:
        raise DataError(
            f"{_tok_name(tok)} has {n} tokens, more than the model's vocab_size {model_vocab}; use the "
            f"tokenizer the model was trained with"
        )
    for path, exs in examples:
        top = max((int(e.ids.max()) for e in exs if len(e.ids)), default=-1)
        if top >= model_vocab:
            raise DataError(
                f"{path}: token id {top} from {_tok_name(tok)} is beyond the model's vocab_size "
                f"{model_vocab}; use the tokenizer the model was trained with"
            )


def make_batches(
    cfg: RunConfig,
    tok: TokenizerLike,
    *,
    process_index: int = 0,
    process_count: int = 1,
    model_vocab: int | None = None,
) -> tuple[Batches, Batches | None, DataStats]:
    """(train stream of global_batch rows, val batches of micro_batch rows or None, stats) for a run.
    model_vocab: the model's vocab_size; the tokenizer and every token id must fit it. (A preference
    objective's streams of pairs: jlora.train.preference_data.make_pair_batches.)"""
    train, val, stats = load_examples(cfg.data, tok)
    if model_vocab is not None:
        check_vocab(tok, model_vocab, [(cfg.data.train, train), (cfg.data.val or cfg.data.train, val)])
    common = dict(
        seq_len=cfg.data.max_seq_len,
        packing=cfg.data.packing,
        process_index=process_index,
        process_count=process_count,
        pad_id=tok.pad_id or 0,
    )
    train_it = Batches(
        train, global_batch=cfg.train.global_batch, shuffle=cfg.data.shuffle, seed=cfg.train.seed, **common
    )
    val_it = Batches(val, global_batch=cfg.train.micro_batch, shuffle=False, **common) if val else None
    train_it.identity = data_stream.stream_identity(cfg, tok, train, val)
    return train_it, val_it, stats
