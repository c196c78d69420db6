"""One choice of a completion as it grows: its visible text (cut before a stop string) and its tokens'
log-probabilities, and the OpenAI response objects that carry them (`Answer`), whole or as stream deltas.

A token's text is its share of the text of all the tokens so far, decoded together (`TokenTexts`), so the
pieces join to the answer's text and `text_offset` points into it. A token that ends mid-character gets ""
and the next one the whole character. Alternatives (top_logprobs) are decoded after a few tokens of context.
Log-probabilities cover the tokens that make the returned text: those wholly inside a stop string are left
out with it. No HTTP and no model here: `jlora.infer.serve` feeds it the engine's tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jlora.infer.engine import Request

CONTEXT = 4  # tokens decoded before an alternative, so that it gets its leading space as in place


class TokenTexts:
    """Each token's piece of the text of `ids` (special tokens skipped) and where it starts."""

    def __init__(self, tok):
        self.tok, self.ids, self.pieces, self.offsets, self.text = tok, [], [], [], ""

    def extend(self, new: list[int]) -> None:
        for t in new:
            self.ids.append(t)
            whole = self.tok.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")  # a half character waits
            piece = whole[len(self.text) :] if whole.startswith(self.text) else ""
            self.pieces.append(piece)
            self.offsets.append(len(self.text))
            self.text += piece

    def flush(self) -> None:
        """The end of the text: a character held back as half decoded goes to the last token."""
        whole = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.pieces and whole.startswith(self.text) and len(whole) > len(self.text):
            self.pieces[-1] += whole[len(self.text) :]
            self.text = whole

    def alternative(self, i: int, t: int) -> str:
        """The text token `t` would have added in place of token i."""
        ctx = self.ids[max(0, i - CONTEXT) : i]
        before = self.tok.decode(ctx, skip_special_tokens=True)
        after = self.tok.decode([*ctx, t], skip_special_tokens=True)
        return after[len(before) :] if after.startswith(before) else self.tok.decode([t], skip_special_tokens=True)


def visible(text: str, stop: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """`text` up to its first stop string (not included), and whether one was found. While running, a
    possible start of a stop string and a half-decoded character are held back."""
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[: min(cuts)], True
    if not final:
        hold = max((len(s) - 1 for s in stop), default=0)
        text = text[: len(text) - hold] if hold else text
        text = text.rstrip("\ufffd")
    return text, False


class Choice:
    """Choice `index` of a request: the engine's `req` (None when nothing is generated: echo with max_tokens 0),
    what was sent of it, and how it ended."""

    def __init__(self, index: int, req: Request | None, tok, stop: tuple[str, ...], logprobs: int | None):
        self.index, self.req, self.tok, self.stop, self.k = index, req, tok, stop, logprobs
        self.out: list[int] = []
        self.texts = TokenTexts(tok) if logprobs is not None else None
        self.sent, self.sent_tokens = "", 0
        self.finish: str | None = None  # the engine's: stop, length, timeout, error: ... (400), failed: ... (500)
        self.trimmed = False  # ended by a stop string

    @property
    def done(self) -> bool:
        return self.finish is not None or self.trimmed

    @property
    def finish_reason(self) -> str:
        return "stop" if self.trimmed or self.finish == "stop" else "length"

    def advance(self) -> tuple[str, list[tuple]]:
        """(new text, new token entries) since the last call. An entry: (text, offset, logprob, [(text, logprob)])."""
        final = self.finish is not None
        text, self.trimmed = visible(self.tok.decode(self.out, skip_special_tokens=True), self.stop, final)
        delta, self.sent = text[len(self.sent) :], text
        if self.texts is None:
            return delta, []
        self.texts.extend(self.out[len(self.texts.ids) :])
        if self.done:
            self.texts.flush()
        entries, n = [], len(text)
        while self.sent_tokens < len(self.out):
            i = self.sent_tokens
            start, piece = self.texts.offsets[i], self.texts.pieces[i]
            shown = (final and not self.trimmed) or (start < n and (self.done or start + len(piece) <= n))
            if not shown:
                break
            lp, top = self.req.token_logprobs[i]
            entries.append((piece, start, lp, [(self.texts.alternative(i, t), v) for t, v in top]))
            self.sent_tokens += 1
        return delta, entries


def prompt_entries(tok, prompt: list[int], scores: list) -> tuple[str, list[tuple]]:
    """(the prompt's text, its entries) for echo with logprobs: `scores` from `Engine.score_prompt`."""
    texts = TokenTexts(tok)
    texts.extend(prompt)
    texts.flush()
    entries = []
    for i, score in enumerate(scores):
        lp, top = score if score is not None else (None, None)
        alts = None if top is None else [(texts.alternative(i, t), v) for t, v in top]
        entries.append((texts.pieces[i], texts.offsets[i], lp, alts))
    return texts.text, entries


def completion_logprobs(entries: list[tuple]) -> dict:
    """OpenAI's completions `logprobs` object (entries' offsets are into the returned text). As OpenAI's,
    each top_logprobs dict holds the chosen token too (so up to logprobs + 1 entries)."""
    tops = [None if alts is None else {**dict(alts), piece: lp} for piece, _, lp, alts in entries]
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[2] for e in entries],
        "top_logprobs": tops,
        "text_offset": [e[1] for e in entries],
    }


def chat_logprobs(entries: list[tuple]) -> dict:
    """OpenAI's chat `logprobs` object: {content: [{token, logprob, bytes, top_logprobs}]}."""

    def one(piece: str, lp: float) -> dict:
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    return {"content": [{**one(p, lp), "top_logprobs": [one(a, v) for a, v in alts]} for p, _, lp, alts in entries]}


def choice_seeds(seed: int | None, n: int) -> list[int]:
    """Each choice's sampling seed: `seed` itself for the first (so one choice equals offline `generate` with
    that seed), one derived from (seed, i) for choice i; fresh random ones without a seed."""
    if seed is None:
        return [int(s) for s in np.random.SeedSequence().generate_state(n)]
    return [seed] + [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(1, n)]


@dataclasses.dataclass(frozen=True)
class Answer:
    """What every object of one response shares: its id, time, model, kind (chat or completions), whether
    logprobs were asked for, and the echoed prompt (text, entries) of a completions request with echo."""

    id: str
    created: int
    model: str
    chat: bool
    logprobs: bool
    echo: tuple[str, list] | None = None

    def head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, c: Choice, text: str, entries: list, *, whole: bool, first: bool = False) -> dict:
        """Choice c as a whole answer (`whole`) or as a stream chunk of `text` and `entries` (`first`: the chunk
        that opens it, holding the chat role or the echoed prompt). A stream chunk without tokens has null
        logprobs."""
        finish = c.finish_reason if c.done else None
        if self.chat:
            logprobs = chat_logprobs(entries) if self.logprobs and (whole or entries) else None
            if whole:
                message = {"role": "assistant", "content": text}
                return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        prompt, prompt_lps = self.echo or ("", [])
        entries = [(piece, len(prompt) + at, lp, alts) for piece, at, lp, alts in entries]  # offsets into all text
        if self.echo is not None and (whole or first):
            text, entries = prompt + text, [*prompt_lps, *entries]
        logprobs = completion_logprobs(entries) if self.logprobs and (whole or entries) else None
        return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
