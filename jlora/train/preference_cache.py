"""The reference log-probs of `preference.precompute_reference`: computed once before training, cached in the
output dir.

Owns computing each training pair's reference log-probs (the base, adapter off, or the adapter the run starts
from: jlora.train.step's `make_reference_step`) in pair order, and the cache file beside the run's checkpoints,
keyed by what they depend on: the data file's and the tokenized pairs' hashes (the run's data fingerprint,
jlora.train.data_stream), the base's fingerprint and the starting adapter's content hash (run.init_adapter).
A resume reads the cache; a cache of other data, base or starting adapter is refused in one line. It does
not batch pairs (jlora.train.preference_data) or run the loop (jlora.train.loop).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable

import numpy as np

from jlora.train.examples import DataError
from jlora.train.preference_data import PairBatches
from jlora.train.step import TrainState, make_reference_step, put_batch

CACHE = "reference_logps.npy"  # [num_pairs, 2] float32: (chosen, rejected) of each training pair, in file order
KEY = "reference_logps.json"  # what the cache was computed from


def cache_key(identity: dict, base_fingerprint, reference_sha: str | None = None) -> dict:
    """What the reference log-probs depend on: the training data (file and tokenized pairs), the base and,
    when the reference is the adapter the run starts from (run.init_adapter), that adapter's content hash."""
    base = hashlib.sha256(json.dumps(base_fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    key = {"data.train": identity["data.train"], "train_examples": identity["train_examples"], "base": base}
    if reference_sha is not None:
        key["init_adapter"] = reference_sha
    return key


def compute(model, state: TrainState, train_it: PairBatches, micro_batch: int) -> np.ndarray:
    """[num_pairs, 2] reference log-probs of train_it's pairs in file order, micro_batch pairs per forward."""
    pairs = PairBatches(
        train_it.pairs,
        global_batch=micro_batch,
        seq_len=train_it.seq_len,
        shuffle=False,
        process_index=train_it.process_index,
        process_count=train_it.global_batch // train_it.local_batch,
        pad_id=train_it.pad_id,
    )
    step = make_reference_step(model, state)
    out = [
        np.asarray(step(state.frozen, state.trainable, put_batch(b, state.mesh), *state.reference_args()))
        for b in pairs.one_pass()
    ]
    return np.concatenate(out).reshape(-1, 2)[: len(train_it.pairs)].astype(np.float32)


def load_or_compute(
    out_dir: pathlib.Path,
    key: dict,
    make: Callable[[], np.ndarray],
    num_pairs: int,
    write: bool,
) -> tuple[np.ndarray, bool]:
    """(reference log-probs [num_pairs, 2], whether they came from the cache). The cache of `key` in out_dir
    is read; a cache of another key is refused (DataError naming what changed); without one, `make()` and
    (where `write`: process 0) save."""
    cache, key_file = out_dir / CACHE, out_dir / KEY
    if key_file.exists():
        try:
            saved = json.loads(key_file.read_text())
            table = np.load(cache, allow_pickle=False)
        except (OSError, ValueError) as e:
            msg = f"cannot read the cached reference log-probs ({e}); delete {KEY} and {CACHE}"
            raise DataError(f"{cache}: {msg}") from None
        changed = next((k for k in key if saved.get(k) != key[k]), None)
        if changed is not None or table.shape != (num_pairs, 2):
            what = f"{changed} (sha256 {str(saved.get(changed))[:12]} -> {key[changed][:12]})" if changed else "pairs"
            raise DataError(
                f"{cache}: the cached reference log-probs are of other data: {what} changed since they were "
                f"computed; set it back, or start over (jlora-train --overwrite)"
            )
        return table, True
    table = make()
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / (CACHE + ".tmp.npy")
        np.save(tmp, table, allow_pickle=False)
        os.replace(tmp, cache)
        key_file.write_text(json.dumps(key, indent=1))  # last: a key names a complete cache
    return table, False
