"""The identity of a run's data stream: what a checkpoint records so a resume cannot continue another.

Owns the hashes of the data files, the tokenizer's vocabulary and the tokenized examples, the data
settings that shape the examples (CAUSE_KEYS) or their order (LAYOUT_KEYS), and `stream_change`,
which says whether a saved stream continues identically now, and if not, which setting moved it.
It does not read records or build batches (jlora.train.data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from jlora.checkpoint.metadata import CheckpointError
from jlora.train.config import RunConfig
from jlora.train.examples import DataError, Example, TokenizerLike

# What can make the examples differ, most specific first: the first that changed names the cause.
CAUSE_KEYS = (
    "data.train",
    "data.val",
    "tokenizer",
    "data.format",
    "data.template",
    "data.mask_prompt",
    "data.max_seq_len",
    "data.truncation",
    "data.on_bad_record",
    "data.val_fraction",
)
# What decides, with the examples, which rows the stream yields from a given row on.
LAYOUT_KEYS = ("data.packing", "data.shuffle", "train.seed")


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes; DataError naming it if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read data file: {e}") from None
    return h.hexdigest()


def examples_sha256(examples: Sequence[Example]) -> str:
    """sha256 of every example's ids and loss mask, in order."""
    h = hashlib.sha256()
    for ids, mask in examples:
        h.update(len(ids).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(ids, np.int32).tobytes())
        h.update(np.packbits(mask).tobytes())
    return h.hexdigest()


def tokenizer_sha256(tok: TokenizerLike) -> str:
    """sha256 of a tokenizer's vocabulary (every id's token) and special ids; the class name for a
    tokenizer without a vocabulary list (ByteTokenizer)."""
    h = hashlib.sha256(type(tok).__name__.encode())
    n = getattr(tok, "vocab_size", None)
    h.update(repr((n, tok.bos_id, tok.eos_id, tok.pad_id, getattr(tok, "add_bos", None))).encode())
    if hasattr(tok, "id_to_token") and n:
        for i in range(n):
            try:
                h.update(tok.id_to_token(i).encode("utf-8", "surrogatepass") + b"\0")
            except ValueError:  # an id with no token (a hole in an HF vocab)
                h.update(b"\1")
    return h.hexdigest()


def stream_identity(cfg: RunConfig, tok: TokenizerLike, train: Sequence[Example], val: Sequence[Example]) -> dict:
    """What defines a run's train and val streams, as JSON: the settings and file contents that shape
    the examples (CAUSE_KEYS), the tokenized examples themselves, and the layout (LAYOUT_KEYS, plus
    max_seq_len when packing). Not the batch sizes: the position is a row, which they do not move."""
    d = cfg.data
    return {
        "data.train": file_sha256(d.train),
        "data.val": file_sha256(d.val) if d.val else None,
        "tokenizer": tokenizer_sha256(tok),
        "data.format": d.format,
        "data.template": d.template,
        "data.mask_prompt": d.mask_prompt,
        "data.max_seq_len": d.max_seq_len,
        "data.truncation": d.truncation,
        "data.on_bad_record": d.on_bad_record,
        "data.val_fraction": d.val_fraction,
        "data.packing": d.packing,
        "data.shuffle": d.shuffle,
        "train.seed": cfg.train.seed,
        "train_examples": examples_sha256(train),
        "val_examples": examples_sha256(val),
    }


def stream_change(saved: dict, now: dict) -> str | None:
    """None when a stream saved as `saved` continues identically as `now` from the same row; else
    "key (old -> new)" naming the setting that changed it. A setting that changed without changing
    the examples or the layout (e.g. a max_seq_len that cuts nothing, unpacked) is no change."""

    def show(key: str) -> str:
        old, new = saved.get(key), now.get(key)
        if isinstance(old, str) and len(old) == 64 and isinstance(new, str) and len(new) == 64:
            old, new = f"sha256 {old[:12]}", f"sha256 {new[:12]}"  # contents: the hashes' heads
        return f"{key} ({old} -> {new})"

    layout = LAYOUT_KEYS + ("data.max_seq_len",) * bool(now.get("data.packing"))
    for key in layout:
        if saved.get(key) != now.get(key):
            return show(key)
    for examples in ("train_examples", "val_examples"):
        if saved.get(examples) != now.get(examples):
            cause = next((k for k in CAUSE_KEYS if saved.get(k) != now.get(k)), None)
            return show(cause) if cause else f"the tokenized {examples.replace('_', ' ')} (same settings)"
    return None


def check_resume(meta: dict, where: str, data_stream: dict) -> None:
    """Raise CheckpointError unless the checkpoint's data stream continues as `data_stream` from its
    position; the message names the setting that changed (old -> new) and how to start over."""
    saved = meta.get("data_stream")
    if saved is None:
        raise CheckpointError(
            f"{where}: made by an older jlora that did not record its data stream, so a resume "
            f"cannot be checked; start over (jlora-train --overwrite)"
        )
    change = stream_change(saved, data_stream)
    if change is not None:
        raise CheckpointError(
            f"{where}: cannot resume: {change} changed since this checkpoint, and with it the "
            f"rows each step trains on; set it back, or start over (jlora-train --overwrite)"
        )
