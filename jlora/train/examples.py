"""What training data becomes: a tokenized `Example`, the tokenizer interface it is made with, and `DataError`.

Shared by the record readers and batches (jlora.train.data) and the stream's identity
(jlora.train.data_stream), which import this module and not each other. `ByteTokenizer` is the tokenizer
of the random "tiny" model, which has no tokenizer files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from jlora.errors import JloraError


class DataError(JloraError, ValueError):
    """Bad or empty data; the message names the file and line (or record)."""


class TokenizerLike(Protocol):
    """What this module needs of a jlora.formats.tokenizer.Tokenizer (or ByteTokenizer)."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 after pad=0, bos=1, eos=2 (vocab 259), for random tiny models."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id] * (add_bos is not False) + ids + [self.eos_id] * add_eos

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


class Example(NamedTuple):
    """One tokenized example: ids [n] int32, and mask [n] bool (token i is trained as a target)."""

    ids: np.ndarray
    mask: np.ndarray
