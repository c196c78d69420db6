"""The ids a model sees before its answer, for one question, built by the training data pipeline itself.

`prompt_ids` makes the record a run would train on (a chat of an optional system turn, the user's turn and an
empty assistant turn; or an Alpaca record) and encodes it with `jlora.train.data.encode_record`, keeping the ids
before the trained answer: what `jlora-generate --chat` / `--config` feed is what training and the demo's
evaluation (`jlora.train.demo.eval_items`) saw, chat template, BOS and token boundaries included. It owns no
generation and no template: chat templates are the tokenizer's, Alpaca prompts `data.ALPACA_TEMPLATES`.
"""

from __future__ import annotations

import numpy as np

from jlora.train.data import DataError, TokenizerLike, encode_record

PROMPT_FORMATS = ("chat", "alpaca", "text")


def prompt_record(fmt: str, prompt: str, system: str | None = None) -> dict:
    """The record of `fmt` whose answer is still to come. A chat gets a system turn when `system` is given; an
    Alpaca record is `alpaca_record(system, prompt, "")`, as `jlora.train.demo.chat_as_alpaca` reads the demo's
    chat records."""
    if fmt == "chat":
        turns = [{"role": "system", "content": system}] if system is not None else []
        return {"messages": [*turns, {"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]}
    if fmt == "alpaca":
        return alpaca_record(system, prompt, "")
    if system is not None:
        raise DataError("a system prompt needs a chat or Alpaca prompt (--chat, or a run config of that format)")
    return {"text": prompt}


def alpaca_record(system: str | None, user: str, answer: str) -> dict:
    """A chat's (system, user, assistant) turns as one Alpaca record: the system text is the instruction and the
    user's turn its input; without system text the user's turn is the instruction (Alpaca needs one)."""
    if system:
        return {"instruction": system, "input": user, "output": answer}
    return {"instruction": user, "input": "", "output": answer}


def prompt_ids(
    tok: TokenizerLike, fmt: str, prompt: str, system: str | None = None, *, template: str = "alpaca"
) -> list[int]:
    """The ids before the answer of `prompt_record(fmt, prompt, system)`, as `encode_record` builds them (a chat
    with the tokenizer's template, Alpaca with `template`); plain text is `tok.encode(prompt)`."""
    if fmt not in PROMPT_FORMATS:
        raise DataError(f"unknown prompt format {fmt!r}; known: {', '.join(PROMPT_FORMATS)}")
    record = prompt_record(fmt, prompt, system)
    if fmt == "text":
        return tok.encode(prompt)
    if fmt == "chat" and getattr(tok, "chat_template", None) is None:
        raise DataError("this model's tokenizer has no chat template: leave out --chat, or use an Alpaca prompt")
    ex = encode_record(record, fmt, tok, mask_prompt=True, template=template, where="--prompt")
    starts = np.flatnonzero(ex.mask & ~np.concatenate([[False], ex.mask[:-1]]))  # where trained runs begin
    return ex.ids[: starts[-1]].tolist()  # as eval_items: up to the last trained run, the answer to come
