"""The tokenizer stored in a GGUF file's metadata, rebuilt with the field's own libraries.

A GGUF carries no tokenizer.json or tokenizer.model: llama.cpp stores the vocabulary as
`tokenizer.ggml.*` keys. This module reads them with jlora.formats.gguf_file and rebuilds
- `gpt2` vocabularies (byte-level BPE: SmolLM2, LLaMA 3, Qwen 2/2.5/3, Mistral's Tekken) as a
  `tokenizers.Tokenizer`, split the way `tokenizer.ggml.pre` names (the same regexes llama.cpp uses);
  a name jlora does not know is an error, since any other split gives different ids without a sign;
- `llama` vocabularies (SentencePiece: LLaMA 1/2, TinyLlama, Mistral 7B, Gemma) as a serialized
  SentencePiece `ModelProto` (BPE over the stored scores, which is how llama.cpp encodes them).
Where llama.cpp and the model's own tokenizer.json part, the ids follow the tokenizer the model was
trained with: Qwen2's NFC normalization (which llama.cpp and transformers' GGUF loader leave out) is
applied, so a LoRA trained from a Qwen GGUF sees the ids the base model saw.
Wrapping either in the common interface is jlora.formats.tokenizer's job, not this module's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gguf
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from jlora.formats.gguf_file import GGUFFileError, read_gguf

_K = gguf.Keys.Tokenizer

# LLaMA 3's split: letters with one leading non-letter, numbers in groups of 1-3, newlines apart.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split: as LLaMA 3's, but every digit alone.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's names for each split (llama-vocab.cpp); "ignore_merges" follows its LLaMA 3 flag.
_REGEX_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")}
_REGEX_SPLITS |= {name: _QWEN2_SPLIT for name in ("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez")}
# Mistral's Tekken (NeMo, Small 3): letters split on case changes, every digit alone, "/" kept with punctuation.
_REGEX_SPLITS["tekken"] = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "tekken"}
# Vocabularies whose published tokenizer.json NFC-normalizes before splitting (Qwen2Tokenizer's normalizer).
_NFC = {"qwen2"}
# These split every digit off first, then apply GPT-2's regex (SmolLM2's tokenizer.json does the same).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2 = {"gpt2", "default", "mpt", "olmo", "jais"}


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """What a GGUF says about its tokenizer: one of `tokenizer` / `sp_model_proto`, plus the metadata."""

    kind: str  # tokenizer.ggml.model: "gpt2" or "llama"
    tokenizer: Tokenizer | None  # set for "gpt2"
    sp_model_proto: bytes | None  # set for "llama"
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None


def known_pre_tokenizers() -> list[str]:
    """The `tokenizer.ggml.pre` names jlora splits byte-level text for."""
    return sorted({*_REGEX_SPLITS, *_DIGITS_THEN_GPT2, *_GPT2})


def gpt2_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer for a byte-level vocabulary whose `tokenizer.ggml.pre` is `pre` (None: GPT-2's).

    A name not in the table raises ValueError: GPT-2's regex in its place would give other ids, and the
    model would be trained or run on them without any error."""
    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre not in _GPT2 and pre is not None:
        raise ValueError(
            f"{_K.PRE}={pre!r} is a split jlora does not know (it knows {', '.join(known_pre_tokenizers())})"
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def read_gguf_vocab(path: str) -> GGUFVocab:
    """Read the tokenizer described by the `tokenizer.ggml.*` keys of the GGUF file at `path`."""
    try:
        get = read_gguf(path).metadata.get  # (key, default) -> the plain value
    except GGUFFileError as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e.problem})") from e
    except OSError as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e

    kind = get(_K.MODEL)
    tokens = get(_K.LIST)
    if kind is None or tokens is None:
        raise ValueError(f"{path}: GGUF has no tokenizer ({_K.MODEL} / {_K.LIST} missing)")
    types = get(_K.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {_K.TOKEN_TYPE} has {len(types)} entries for {len(tokens)} tokens")
    ids = {
        name: get(key) for name, key in (("bos", _K.BOS_ID), ("eos", _K.EOS_ID), ("pad", _K.PAD_ID), ("unk", _K.UNK_ID))
    }
    for name, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"{path}: {name} token id {i} is outside the vocabulary of {len(tokens)}")
    if kind == "gpt2":
        merges = get(_K.MERGES)
        if merges is None:
            raise ValueError(f"{path}: byte-level GGUF vocabulary has no {_K.MERGES}")
        try:
            tok, proto = _byte_level_bpe(tokens, types, merges, get(_K.PRE)), None
        except ValueError as e:  # an unknown tokenizer.ggml.pre: name the file as every other error does
            raise ValueError(f"{path}: {e}") from None
        add_bos_default = False  # as HF's GGUF loader: GPT-2 style vocabularies add no BOS unless told
    elif kind == "llama":
        scores = get(_K.SCORES)
        if scores is None:
            raise ValueError(f"{path}: SentencePiece GGUF vocabulary has no {_K.SCORES}")
        if len(scores) != len(tokens):
            raise ValueError(f"{path}: {_K.SCORES} has {len(scores)} entries for {len(tokens)} tokens")
        tok, proto = (
            None,
            _sentencepiece_proto(
                tokens,
                scores,
                types,
                ids,
                add_prefix=get(_K.ADD_PREFIX, True),
                remove_extra_ws=get(_K.REMOVE_EXTRA_WS, False),
                charsmap=get(_K.PRECOMPILED_CHARSMAP),
            ),
        )
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say
    else:
        raise ValueError(f"{path}: {_K.MODEL}={kind!r} is not supported (only 'gpt2' and 'llama')")
    return GGUFVocab(
        kind=kind,
        tokenizer=tok,
        sp_model_proto=proto,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["pad"],
        unk_id=ids["unk"],
        add_bos=bool(get(_K.ADD_BOS, add_bos_default)),
        chat_template=get(_K.CHAT_TEMPLATE),
    )


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str | None) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` over the stored vocabulary and merges."""
    split = gpt2_pre_tokenizer(pre)  # first: an unknown name fails before the vocabulary is built
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]  # byte-level spelling has no real spaces
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = split
    if pre in _NFC:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) and user-defined ones must stay whole when written in text.
    # A "control" token spelled outside the byte alphabet is a converter mislabel, which HF skips too.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    control = [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL and set(t) <= alphabet]
    user = [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


def _sentencepiece_proto(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    ids: dict[str, int | None],
    *,
    add_prefix: bool,
    remove_extra_ws: bool,
    charsmap: Any,
) -> bytes:
    """A SentencePiece BPE ModelProto holding the stored pieces, scores and piece types."""
    m = sp_pb2.ModelProto()
    for token, score, ty in zip(tokens, scores, types):
        # GGUF's token types copy SentencePiece's numbering (1 normal ... 6 byte).
        m.pieces.add(
            piece=token, score=float(score), type=ty if 1 <= ty <= 6 else sp_pb2.ModelProto.SentencePiece.NORMAL
        )
    spec = m.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.byte_fallback = any(ty == gguf.TokenType.BYTE for ty in types)
    for name in ("unk", "bos", "eos"):  # pad may share an id with these; the wrapper tracks it instead
        i = ids[name]
        setattr(spec, f"{name}_id", -1 if i is None else i)
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[i])
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(add_prefix)
    norm.remove_extra_whitespaces = bool(remove_extra_ws)
    norm.escape_whitespaces = True
    if charsmap is not None and len(charsmap):
        norm.precompiled_charsmap = bytes(bytearray(charsmap))
    return m.SerializeToString()
