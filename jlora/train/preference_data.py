"""Preference data: TRL's preference records -> tokenized (prompt, chosen, rejected) pairs -> pair batches.

Reads JSON / JSONL records in TRL's three forms: `{"prompt", "chosen", "rejected"}` as text, the same with
message lists (rendered by the tokenizer's chat template), and `{"chosen", "rejected"}` alone, whose prompt
is their common prefix (TRL's `extract_prompt`). Tokenizes as TRL's DPOTrainer does (EOS appended to text
responses, the response starting where prompt and prompt+response encodings part), truncates (the prompt
keeps its end, max_prompt_len; each sequence its start, max_seq_len) and lays pairs out as interleaved
batch rows for jlora.train.preference. A bad pair is a one-line DataError naming file:line. `PairBatches`
is jlora.train.data's stream with a pair where it has an example (shuffled, sliced per host and resumed as
whole pairs); placing batches is jlora.train.step's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jlora.formats.tokenizer import TokenizerError, unicode_error
from jlora.train import data_stream
from jlora.train.batches import Batches
from jlora.train.config import RunConfig
from jlora.train.data import CHAT_ROLES, DataStats, check_vocab, json_items, read_text
from jlora.train.examples import DataError, Example, TokenizerLike


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One tokenized pair: prompt ids, then each response's ids (EOS or the template's turn end included)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]

    def examples(self) -> tuple[Example, Example]:
        """(chosen, rejected) as training examples: prompt + response ids, the response tokens trained."""
        out = []
        for response in (self.chosen, self.rejected):
            ids = np.asarray(self.prompt + response, np.int32)
            out.append(Example(ids, np.arange(len(ids)) >= len(self.prompt)))
        return out[0], out[1]


@dataclasses.dataclass
class PreferenceStats:
    """What loading did, so nothing is cut or dropped silently."""

    records: int = 0
    skipped_bad: int = 0  # malformed pairs, with on_bad_record="skip"
    truncated: int = 0  # pairs whose prompt or a response was cut
    dropped_prompt_fills: int = 0  # the prompt alone fills max_seq_len: nothing of a response is left (TRL drops them)


# ---- records ----


def read_items(path: str):
    """(where, object or its JSON error) per record of a .json array or JSONL file (jlora.train.data's reader)."""
    return json_items(path, read_text(path))


def _is_messages(x: Any) -> bool:
    return isinstance(x, list)


def _check_messages(where: str, key: str, msgs: list) -> None:
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {key}[{j}] needs string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: {key}[{j}] has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
        if (bad := unicode_error(m["content"])) is not None:
            raise DataError(f"{where}: {key}[{j}].content: {bad}")


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two full conversations (message lists) or texts: the prompt is their
    longest common prefix, as TRL's `extract_prompt` finds it (a text prompt gives back a trailing space)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def check_pair(where: str, obj: Any) -> dict:
    """A record as {"prompt", "chosen", "rejected"} (an implicit prompt extracted), or a DataError naming it."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'chosen' and 'rejected', got {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(f"{where}: preference record has no '{key}'")
    chosen, rejected = obj["chosen"], obj["rejected"]
    for key in ("prompt", "chosen", "rejected"):
        value = obj.get(key, "")
        if _is_messages(value):
            _check_messages(where, key, value)
        elif not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}")
        elif (bad := unicode_error(value)) is not None:
            raise DataError(f"{where}: {key}: {bad}")
    if _is_messages(chosen) != _is_messages(rejected) or (
        "prompt" in obj and _is_messages(obj["prompt"]) != _is_messages(chosen)
    ):
        raise DataError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be text or all message lists")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' equals 'rejected': the pair prefers nothing")
    prompt = obj["prompt"] if "prompt" in obj else None
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        text = "".join(m["content"] for m in response) if _is_messages(response) else response
        if not text.strip():
            raise DataError(f"{where}: '{key}' response is empty")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# ---- tokenization ----


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def encode_pair(rec: dict, tok: TokenizerLike, where: str = "") -> PreferencePair:
    """A checked record (`check_pair`) as token ids, as TRL's DPOTrainer tokenizes it: text is encoded with
    the tokenizer's own BOS default and its responses end with EOS; messages go through the chat template
    (the prompt with the generation prompt) and are encoded as rendered. The response starts where the
    prompt's encoding and both prompt+response encodings part."""
    prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
    try:
        if _is_messages(prompt):
            if getattr(tok, "chat_template", "") is None:
                raise DataError(f"{where}: message lists need the tokenizer's chat template, and it has none")
            render = lambda msgs, gen=False: tok.encode(
                tok.apply_chat_template(msgs, add_generation_prompt=gen), add_bos=False
            )
            prompt_ids = render(prompt, True)
            full = [render(prompt + response) for response in (chosen, rejected)]
        else:
            if tok.eos_id is None:
                raise DataError(f"{where}: the tokenizer has no EOS token to end responses with")
            prompt_ids = tok.encode(prompt)
            if hasattr(tok, "id_to_token"):  # TRL appends the EOS token's text, then encodes
                eos = tok.id_to_token(tok.eos_id)
                full = [tok.encode(prompt + r + ("" if r.endswith(eos) else eos)) for r in (chosen, rejected)]
            else:  # a tokenizer without token texts (ByteTokenizer): the EOS id itself
                full = [tok.encode(prompt + r) + [tok.eos_id] for r in (chosen, rejected)]
    except (TokenizerError, ValueError) as e:  # e.g. the template's raise_exception("roles must alternate")
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: {e}") from None
    n = min(_common_prefix(prompt_ids, ids) for ids in full)
    pair = PreferencePair(tuple(prompt_ids[:n]), tuple(full[0][n:]), tuple(full[1][n:]))
    if pair.chosen == pair.rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' tokenize the same: the pair prefers nothing")
    return pair


def truncate_pair(pair: PreferencePair, max_seq_len: int, max_prompt_len: int | None = None) -> PreferencePair:
    """The prompt keeps its last max_prompt_len tokens (TRL's keep_end), then each prompt + response keeps its
    first max_seq_len + 1 tokens (keep_start): a batch row of max_seq_len positions, as jlora's SFT rows."""
    prompt = pair.prompt[-max_prompt_len:] if max_prompt_len is not None else pair.prompt
    room = max_seq_len + 1 - len(prompt)
    return PreferencePair(prompt, pair.chosen[: max(room, 0)], pair.rejected[: max(room, 0)])


def load_pairs(
    path: str,
    tok: TokenizerLike,
    max_seq_len: int,
    max_prompt_len: int | None = None,
    on_bad_record: str = "error",
) -> tuple[list[PreferencePair], PreferenceStats]:
    """(pairs, stats) of a preference file, tokenized and truncated; `preference_warning(stats)` is the one
    line to print about what truncation did."""
    if max_prompt_len is not None and not 0 < max_prompt_len <= max_seq_len:
        raise DataError(
            f"preference.max_prompt_len: {max_prompt_len} must be in [1, max_seq_len={max_seq_len}] "
            "so that every response keeps a token"
        )
    stats, pairs = PreferenceStats(), []
    for where, obj in read_items(path):
        try:
            if isinstance(obj, Exception):
                raise DataError(f"{where}: invalid JSON: {obj}")
            pair = encode_pair(check_pair(where, obj), tok, where)
        except DataError:
            if on_bad_record != "skip":
                raise
            stats.skipped_bad += 1
            continue
        stats.records += 1
        cut = truncate_pair(pair, max_seq_len, max_prompt_len)
        if not cut.chosen or not cut.rejected:
            stats.dropped_prompt_fills += 1
            continue
        stats.truncated += cut != pair
        pairs.append(cut)
    if not pairs:
        raise DataError(f"{path}: no preference pairs left ({dataclasses.asdict(stats)})")
    return pairs, stats


def preference_warning(stats: PreferenceStats, max_seq_len: int, max_prompt_len: int | None) -> str | None:
    """One warning line about truncated or dropped pairs, or None."""
    if not stats.truncated and not stats.dropped_prompt_fills:
        return None
    dropped = f"; {stats.dropped_prompt_fills} dropped: the prompt fills the row" if stats.dropped_prompt_fills else ""
    return (
        f"warning: {stats.truncated} of {stats.records} preference pairs truncated (prompts keep their last "
        f"max_prompt_len={max_prompt_len} tokens, sequences their first max_seq_len={max_seq_len} + 1){dropped}"
    )


# ---- batches ----


def collate_pairs(pairs: list[PreferencePair | None], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """[2P, seq_len] numpy rows, chosen at 2i and rejected at 2i+1, with the SFT batch keys (input_ids,
    targets, loss_mask on the response targets, positions, segment_ids 1 on real tokens and 0 on padding).
    A None pair is two padding rows (what fills a last eval batch; the loss leaves such pairs out)."""
    empty = Example(np.zeros(1, np.int32), np.zeros(1, bool))
    rows = [ex for pair in pairs for ex in (pair.examples() if pair is not None else (empty, empty))]
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    out["input_ids"][:] = out["targets"][:] = pad_id
    out["loss_mask"] = np.zeros((len(rows), seq_len), np.float32)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        if n > seq_len:
            raise ValueError(f"pair row {r} has {n} positions, more than the batch's {seq_len}: truncate_pair first")
        out["input_ids"][r, :n], out["targets"][r, :n] = ids[:-1], ids[1:]
        out["loss_mask"][r, :n] = mask[1:]
        out["positions"][r, :n] = np.arange(n)
        out["segment_ids"][r, :n] = 1
    return out


# ---- streams ----


class PairBatches(Batches):
    """`Batches` of preference pairs: the stream, its shuffle, positions, host slices and resume are Batches',
    with one pair where Batches has one example, so global_batch counts pairs and each pair yields two
    adjacent rows (chosen at 2i, rejected at 2i+1; jlora.train.preference_data.collate_pairs). A host's
    rows, and a contiguous split of them into micro-batches, hold whole pairs. `reference`: each pair's
    precomputed reference log-probs [num_pairs, 2], added to every batch as reference_logps [rows]."""

    def __init__(self, pairs: Sequence[PreferencePair], **kwargs):
        self.pairs = list(pairs)
        self.reference: np.ndarray | None = None
        self.warnings: list[str] = []  # printed once by the loop
        super().__init__([pair.examples()[0] for pair in self.pairs], **kwargs)

    def _batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        chosen = [self.pairs[row[0]] if row else None for row in rows]  # an empty row: a padding pair
        out = collate_pairs(chosen, self.seq_len, self.pad_id)
        if self.reference is not None:
            ref = [self.reference[row[0]] if row else np.zeros(2, np.float32) for row in rows]
            out["reference_logps"] = np.concatenate(ref).astype(np.float32) if ref else np.zeros(0, np.float32)
        return out


def _pair_examples(pairs: Sequence[PreferencePair]) -> list[Example]:
    return [ex for pair in pairs for ex in pair.examples()]


def make_pair_batches(
    cfg: RunConfig,
    tok: TokenizerLike,
    *,
    process_index: int = 0,
    process_count: int = 1,
    model_vocab: int | None = None,
) -> tuple[PairBatches, PairBatches | None, DataStats]:
    """make_batches for a preference objective: data.train / data.val read by `load_pairs` (TRL's formats),
    global_batch pairs per step; the val stream yields micro_batch pairs per batch."""
    d, p = cfg.data, cfg.preference
    train, pstats = load_pairs(d.train, tok, d.max_seq_len, p.max_prompt_len, d.on_bad_record)
    val, vstats = load_pairs(d.val, tok, d.max_seq_len, p.max_prompt_len, d.on_bad_record) if d.val else ([], None)
    if d.val_fraction:
        n_val = max(1, round(len(train) * d.val_fraction))
        if n_val >= len(train):
            raise DataError(f"{d.train}: data.val_fraction={d.val_fraction} leaves no training pairs")
        train, val = train[:-n_val], train[-n_val:]
    if model_vocab is not None:
        check_vocab(tok, model_vocab, [(d.train, _pair_examples(train)), (d.val or d.train, _pair_examples(val))])
    stats = DataStats(
        records=pstats.records + (vstats.records if vstats else 0),
        skipped_bad=pstats.skipped_bad + (vstats.skipped_bad if vstats else 0),
        truncated=pstats.truncated + (vstats.truncated if vstats else 0),
        dropped_no_target=pstats.dropped_prompt_fills + (vstats.dropped_prompt_fills if vstats else 0),
        train_examples=len(train),
        val_examples=len(val),
    )
    rows = _pair_examples(train)
    stats.train_tokens = sum(len(e.ids) - 1 for e in rows)
    stats.train_loss_tokens = sum(int(e.mask[1:].sum()) for e in rows)
    common = dict(
        seq_len=d.max_seq_len, process_index=process_index, process_count=process_count, pad_id=tok.pad_id or 0
    )
    train_it = PairBatches(train, global_batch=cfg.train.global_batch, shuffle=d.shuffle, seed=cfg.train.seed, **common)
    val_it = PairBatches(val, global_batch=cfg.train.micro_batch, shuffle=False, **common) if val else None
    train_it.identity = data_stream.stream_identity(cfg, tok, rows, _pair_examples(val))
    train_it.identity["preference.max_prompt_len"] = p.max_prompt_len  # its effect is in the examples' hash
    for s in (pstats, vstats):
        line = s and preference_warning(s, d.max_seq_len, p.max_prompt_len)
        if line:
            train_it.warnings.append(line.removeprefix("warning: "))
    return train_it, val_it, stats
