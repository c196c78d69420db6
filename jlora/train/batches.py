"""The stream of fixed-shape numpy batches a run trains on: examples laid out in rows (one per row, or packed
with segment ids), shuffled per epoch from a seed, the position kept as the next global row so a resume
continues exactly, and each host building only its own slice of the global batch. Examples come from
jlora.train.data (records) or jlora.train.preference_data (pairs, whose `PairBatches` extends this).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jlora.train.examples import DataError, Example


class Batches:
    """An endless, deterministic stream of global batches; this host gets rows
    [p*L, (p+1)*L) of each, L = global_batch // process_count.

    Rows are laid out per epoch from a seeded permutation (unpacked: one example per row,
    right-padded; packed: examples filled in order into rows of seq_len). Every host computes
    the same layout from the example lengths and builds only its own rows, so the union over
    hosts is the global batch whatever the host count. The position is the next global row, so
    a resume with another global_batch (or host count) continues exactly where the last one stopped.
    Each batch: input_ids, targets, positions, segment_ids [L, T] int32 and loss_mask [L, T]
    float32; segment 0 is padding, 1.. the examples of a row, and positions restart at 0.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        global_batch: int,
        seq_len: int,
        packing: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        pad_id: int = 0,
    ):
        if not examples:
            raise DataError("no examples to batch")
        if global_batch % process_count or not 0 <= process_index < process_count:
            raise DataError(
                f"global batch {global_batch} cannot be split over {process_count} processes "
                f"(process index {process_index})"
            )
        self.examples, self.global_batch, self.seq_len = list(examples), global_batch, seq_len
        self.packing, self.shuffle, self.seed, self.pad_id = packing, shuffle, seed, pad_id
        self.local_batch, self.process_index = global_batch // process_count, process_index
        self._lengths = np.array([len(e.ids) - 1 for e in self.examples])  # inputs per example
        if self._lengths.max() > seq_len:
            raise DataError(
                f"example {int(self._lengths.argmax())} has {self._lengths.max()} inputs > seq_len {seq_len}"
            )
        self._layouts: dict[int, list[list[int]]] = {}
        self._starts, self.row = [0], 0  # _starts: the first global row of each epoch laid out so far
        self.identity: dict[str, Any] = {}  # what defines this stream (make_batches sets it): see stream_identity

    # -- layout --
    def _layout(self, epoch: int) -> list[list[int]]:
        if epoch not in self._layouts:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if not self.packing:
                rows = [[int(i)] for i in order]
            else:
                rows, used = [[]], 0
                for i in order:  # next-fit keeps the shuffled order and needs no lookahead
                    if used + self._lengths[i] > self.seq_len:
                        rows.append([])
                        used = 0
                    rows[-1].append(int(i))
                    used += int(self._lengths[i])
            if len(self._layouts) > 2:  # a small cache: an evicted layout is recomputed identically
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = rows
        return self._layouts[epoch]

    def _rows(self, first: int, count: int) -> list[list[int]]:
        """Example indices of global rows [first, first + count) of the endless stream."""
        while self._starts[-1] < first + count:
            self._starts.append(self._starts[-1] + len(self._layout(len(self._starts) - 1)))
        out = []
        for r in range(first, first + count):
            epoch = int(np.searchsorted(self._starts, r, side="right")) - 1
            out.append(self._layout(epoch)[r - self._starts[epoch]])
        return out

    @property
    def steps_per_epoch(self) -> float:
        """Global batches in one pass (epoch 0's layout; a packed layout varies slightly by epoch)."""
        return len(self._layout(0)) / self.global_batch

    # -- batches --
    def _batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        b, t = len(rows), self.seq_len
        out = {k: np.zeros((b, t), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
        out["input_ids"][:] = out["targets"][:] = self.pad_id
        out["loss_mask"] = np.zeros((b, t), np.float32)
        for r, row in enumerate(rows):
            col = 0
            for seg, i in enumerate(row, 1):
                ids, mask = self.examples[i]
                n = len(ids) - 1
                out["input_ids"][r, col : col + n] = ids[:-1]
                out["targets"][r, col : col + n] = ids[1:]
                out["loss_mask"][r, col : col + n] = mask[1:]
                out["positions"][r, col : col + n] = np.arange(n)
                out["segment_ids"][r, col : col + n] = seg
                col += n
        return out

    def _local(self) -> list[list[int]]:
        return self._rows(self.row + self.process_index * self.local_batch, self.local_batch)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._batch(self._local())
        self.row += self.global_batch
        return batch

    def one_pass(self) -> Iterator[dict[str, np.ndarray]]:
        """Epoch 0 once (e.g. for evaluation), the last batch filled with empty rows; the stream
        position is untouched. Every host yields the same number of batches."""
        n_rows = len(self._layout(0))
        for step in range(math.ceil(n_rows / self.global_batch)):
            first = step * self.global_batch + self.process_index * self.local_batch
            rows = [self._layout(0)[r] if r < n_rows else [] for r in range(first, first + self.local_batch)]
            yield self._batch(rows)

    def state(self) -> dict[str, int]:
        """The position (the next global row), as plain ints (the same on every host)."""
        return {"row": self.row, "seed": self.seed, "num_examples": len(self.examples)}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from `state()`: the following rows are exactly those that followed it, whatever
        the global batch then and now. A saved position without "row" is from an older jlora."""
        if "row" not in state:
            raise DataError(
                "cannot resume the data stream: the checkpoint's position is step-based (an older jlora); start over"
            )
        for key, have in (("seed", self.seed), ("num_examples", len(self.examples))):
            if int(state.get(key, have)) != have:
                raise DataError(f"cannot resume the data stream: {key} was {state[key]} at save, is {have} now")
        self.row = int(state["row"])
