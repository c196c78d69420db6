"""One tokenizer interface over SentencePiece, tokenizer.json and the vocabulary inside a GGUF.

`load_tokenizer(path)` takes a model directory (tokenizer.json first, then tokenizer.model), one
of those files, or a .gguf file. Encoding follows HF: special tokens written in the text become
their ids, and `add_bos=None` means the tokenizer's own default (HF's add_special_tokens=True).
tokenizer.json and byte-level GGUF vocabularies run on the `tokenizers` library; tokenizer.model
and SentencePiece GGUF vocabularies on the `sentencepiece` library itself, the encoder LLaMA was
trained with. Chat templates render with sandboxed jinja2, as HF's apply_chat_template does.
Batching, padding and loss masks are jlora.train.data's job.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors

from jlora.errors import JloraError
from jlora.formats.gguf_vocab import read_gguf_vocab

_LOOKED_FOR = ("tokenizer.json", "tokenizer.model")


class TokenizerNotFoundError(JloraError, FileNotFoundError):
    """No tokenizer file where one was asked for."""


class TokenizerError(JloraError, ValueError):
    """A file that is not a usable tokenizer, or a tokenizer that lacks what was asked of it; one line
    naming the file."""


def unicode_error(text: str) -> str | None:
    """Why `text` is not valid Unicode, or None. Python hands over undecodable bytes (a non-UTF-8 command-line
    argument) as lone surrogates U+DC80..U+DCFF, and JSON's "\\ud800" escapes decode to lone surrogates too;
    no tokenizer takes them."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        return f"not valid UTF-8 text ({what} at character {e.start})"


class Tokenizer:
    """The common interface. Subclasses supply `_encode_text`, `_decode`, `id_to_token`, `token_to_id`, `vocab_size`."""

    def __init__(
        self,
        source: str,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        unk_id: int | None,
        add_bos: bool,
        chat_template: str | None,
    ):
        self.source = source
        self._bos_id, self._eos_id, self._pad_id, self._unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = add_bos  # the default `encode` uses when add_bos is None
        self.chat_template = chat_template

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        """The pad token, or EOS when the tokenizer defines none (the usual choice for LLaMA models)."""
        return self._pad_id if self._pad_id is not None else self._eos_id

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. "<|im_start|>") map to their ids."""
        if (bad := unicode_error(text)) is not None:
            raise TokenizerError(f"cannot tokenize: {bad}")
        ids = self._encode_text(text)
        if self.add_bos if add_bos is None else add_bos:
            ids.insert(0, self._need(self._bos_id, "BOS"))
        if add_eos:
            ids.append(self._need(self._eos_id, "EOS"))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are written out unless `skip_special_tokens`."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary of {n} ({self.source})")
        return self._decode(ids, skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Render `messages` with the tokenizer's chat template, as HF's apply_chat_template(tokenize=False).

        As there, a message key whose value is None is left out (an API's tool-call turn with `"content": None`
        must read as having no content, which templates test for), `tools` and `documents` are None unless
        given, and `kwargs` (e.g. Qwen3's enable_thinking) may override the special token strings."""
        if self.chat_template is None:
            raise TokenizerError(f"tokenizer {self.source} has no chat template")
        # HF hands templates its special token strings; pad is the tokenizer's own, without the EOS fallback.
        ids = {
            "bos_token": self._bos_id,
            "eos_token": self._eos_id,
            "unk_token": self._unk_id,
            "pad_token": self._pad_id,
        }
        variables = {name: self.id_to_token(i) for name, i in ids.items() if i is not None}
        variables |= {"tools": None, "documents": None, **kwargs}
        messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except (TokenizerError, jinja2.TemplateError) as e:  # a template that does not parse, or raise_exception()
            raise TokenizerError(f"{self.source}: chat template: {' '.join(str(e).split())}") from None

    def _need(self, i: int | None, name: str) -> int:
        if i is None:
            raise TokenizerError(f"tokenizer {self.source} has no {name} token")
        return i

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json, or a byte-level GGUF vocabulary)."""

    def __init__(self, tok: _HFTokenizer, source: str, *, add_bos: bool | None, **kw: Any):
        self._tok = tok
        if add_bos is None:  # no explicit setting: add BOS exactly when the post-processor does
            with_special = tok.encode("a", add_special_tokens=True).ids
            plain = tok.encode("a", add_special_tokens=False).ids
            add_bos = kw["bos_id"] is not None and with_special[:1] == [kw["bos_id"]] and plain[:1] != [kw["bos_id"]]
        super().__init__(source, add_bos=add_bos, **kw)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i: int) -> str:
        token = self._tok.id_to_token(i)
        if token is None:
            raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size} ({self.source})")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _encode_text(self, text: str) -> list[int]:
        # BOS/EOS are added by `encode`, so the post-processor must not add them as well.
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, run by the sentencepiece library, with HF's handling of special tokens.

    Special (control, unknown) and user-defined pieces written in the text are split out first and
    mapped to their ids. Text at the very start gets SentencePiece's dummy-prefix space if the model has
    one (Gemma's has not); text after a special token does not (HF's LlamaTokenizer with legacy=False,
    i.e. Metaspace prepend_scheme="first").
    """

    def __init__(self, proto: bytes, source: str, **kw: Any):
        model = sp_pb2.ModelProto()
        try:
            model.ParseFromString(proto)
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
            self.add_dummy_prefix = bool(model.normalizer_spec.add_dummy_prefix)  # False for Gemma
            model.normalizer_spec.add_dummy_prefix = False
            self._sp_inner = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
        except Exception as e:  # protobuf's DecodeError and sentencepiece's RuntimeError
            raise ValueError(f"{source}: not a valid SentencePiece model ({e})") from e
        types = sp_pb2.ModelProto.SentencePiece
        special_types = (types.CONTROL, types.UNKNOWN)
        self._special = {i for i, p in enumerate(model.pieces) if p.type in special_types}
        self._added = {
            p.piece: i for i, p in enumerate(model.pieces) if p.piece and p.type in (*special_types, types.USER_DEFINED)
        }
        self._added_ids = set(self._added.values())
        longest_first = sorted(self._added, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        super().__init__(source, **kw)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size} ({self.source})")
        return self._sp.id_to_piece(i)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def _encode_text(self, text: str) -> list[int]:
        parts = self._splitter.split(text) if self._splitter else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):  # re.split with one group: text, token, text, token, ...
            if k % 2:
                ids.append(self._added[part])
            elif part:
                ids += (self._sp if k == 0 else self._sp_inner).encode(part)
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special]
        out, run, run_start = [], [], 0
        for pos, i in enumerate(ids + [None]):
            if i is not None and i not in self._added_ids:
                run.append(i)
                continue
            if run:  # only a run at position 0 loses its dummy-prefix space, as in HF and sentencepiece
                out.append((self._sp if run_start == 0 else self._sp_inner).decode(run))
                run = []
            if i is not None:
                out.append(self._sp.id_to_piece(i))
            run_start = pos + 1
        return "".join(out)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `Tokenizer` from a model directory, a tokenizer.json / tokenizer.model file, or a .gguf file."""
    p = Path(path)
    if p.is_dir():
        found = next((p / name for name in _LOOKED_FOR if (p / name).is_file()), None)
        if found is None:
            raise TokenizerNotFoundError(f"{p}: no tokenizer in this directory (looked for {', '.join(_LOOKED_FOR)})")
        p = found
    elif not p.is_file():
        raise TokenizerNotFoundError(
            f"{p}: no such file (expected a directory holding {' or '.join(_LOOKED_FOR)}, one of those files, "
            f"or a .gguf)"
        )
    loaders = {".gguf": _from_gguf, ".json": _from_tokenizer_json, ".model": _from_sentencepiece}
    if p.suffix not in loaders:
        raise TokenizerError(
            f"{p}: not a tokenizer (expected a directory holding tokenizer.json or tokenizer.model, "
            f"one of those files, or a .gguf)"
        )
    try:
        return loaders[p.suffix](p)
    except TokenizerError:
        raise
    except ValueError as e:  # every reader names the file; one type lets the CLIs print it as one line
        raise TokenizerError(" ".join(str(e).split())) from None


def save_hf_files(tok: Tokenizer, out_dir: str | Path) -> list[str]:
    """Write `tok` as files that transformers' AutoTokenizer and `load_tokenizer` both read: tokenizer.json
    (a `tokenizers`-backed vocabulary) or tokenizer.model (SentencePiece), and tokenizer_config.json with
    the special tokens, add_bos_token and the chat template. For a GGUF's tokenizer, which has no such
    files; an HF dir's own files are better copied. Returns the names written."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"add_bos_token": bool(tok.add_bos), "add_eos_token": False}
    for name in ("bos", "eos", "pad", "unk"):
        i = getattr(tok, f"_{name}_id")
        if i is not None:
            config[f"{name}_token"] = tok.id_to_token(i)
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    if isinstance(tok, HFTokenizer):
        hf = _HFTokenizer.from_str(tok._tok.to_str())  # a copy: the post-processor below is for the file only
        if tok.add_bos and tok.bos_id is not None:  # transformers adds BOS through the post-processor
            bos = tok.id_to_token(tok.bos_id)
            hf.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)]
            )
        hf.save(str(d / "tokenizer.json"))
        written, config["tokenizer_class"] = ["tokenizer.json"], "PreTrainedTokenizerFast"
    elif isinstance(tok, SentencePieceTokenizer):
        (d / "tokenizer.model").write_bytes(tok._sp.serialized_model_proto())
        # legacy=False: Metaspace prepend_scheme="first", as SentencePieceTokenizer encodes. add_prefix_space
        # carries the model's dummy prefix: LlamaTokenizer assumes one, which Gemma's vocabulary has not.
        written, config["tokenizer_class"], config["legacy"] = ["tokenizer.model"], "LlamaTokenizer", False
        config["add_prefix_space"] = tok.add_dummy_prefix
    else:
        raise TokenizerError(f"{tok.source}: a {type(tok).__name__} has no HF file form")
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [*written, "tokenizer_config.json"]


def _from_gguf(p: Path) -> Tokenizer:
    v = read_gguf_vocab(str(p))
    kw = dict(
        bos_id=v.bos_id,
        eos_id=v.eos_id,
        pad_id=v.pad_id,
        unk_id=v.unk_id,
        add_bos=v.add_bos,
        chat_template=v.chat_template,
    )
    if v.tokenizer is not None:
        return HFTokenizer(v.tokenizer, str(p), **kw)
    return SentencePieceTokenizer(v.sp_model_proto, str(p), **kw)


def _from_tokenizer_json(p: Path) -> Tokenizer:
    text = p.read_text(encoding="utf-8", errors="replace")  # an unreadable file: the OSError says why, in one line
    try:
        tok = _HFTokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise ValueError(f"{p}: not a valid tokenizer.json ({e})") from e
    cfg = _read_hf_config(p.parent)
    ids = _special_ids(_special_strings(cfg), tok.token_to_id, p.parent)
    return HFTokenizer(tok, str(p), add_bos=cfg.get("add_bos_token"), chat_template=cfg.get("chat_template"), **ids)


def _from_sentencepiece(p: Path) -> Tokenizer:
    cfg = _read_hf_config(p.parent)
    # add_bos defaults to True: LLaMA's convention, and llama.cpp's for SentencePiece vocabularies.
    tok = SentencePieceTokenizer(
        p.read_bytes(),
        str(p),
        bos_id=None,
        eos_id=None,
        pad_id=None,
        unk_id=None,
        add_bos=cfg.get("add_bos_token", True),
        chat_template=cfg.get("chat_template"),
    )
    # The model's own special pieces are the default; tokenizer_config.json beside it may name others.
    sp = tok._sp
    own = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "pad_token": sp.pad_id(), "unk_token": sp.unk_id()}
    strings = {name: sp.id_to_piece(i) for name, i in own.items() if i >= 0} | _special_strings(cfg)
    ids = _special_ids(strings, tok.token_to_id, p.parent)
    tok._bos_id, tok._eos_id, tok._pad_id, tok._unk_id = ids["bos_id"], ids["eos_id"], ids["pad_id"], ids["unk_id"]
    return tok


def _read_hf_config(d: Path) -> dict[str, Any]:
    """bos/eos/pad/unk token strings, add_bos_token and chat_template from the HF files in `d`, if any."""
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        cfg |= _read_json(d / name)
    jinja_file = d / "chat_template.jinja"  # where transformers >= 4.43 saves the template
    if jinja_file.is_file():
        cfg["chat_template"] = jinja_file.read_text(encoding="utf-8")
    elif "chat_template" not in cfg and "chat_template" in (extra := _read_json(d / "chat_template.json")):
        cfg["chat_template"] = extra["chat_template"]
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        cfg["chat_template"] = named.get("default", next(iter(named.values()), None))
    return cfg


def _read_json(f: Path) -> dict[str, Any]:
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data


def _special_strings(cfg: dict[str, Any]) -> dict[str, str]:
    """Token strings named in the config; HF writes each as a string or as an AddedToken dict."""
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            out[key] = str(value)
    return out


def _special_ids(strings: dict[str, str], lookup: Callable[[str], int | None], d: Path) -> dict[str, int | None]:
    """{bos,eos,pad,unk}_id of the named token strings; a name missing from the vocabulary is an error."""
    ids: dict[str, int | None] = {}
    for name in ("bos", "eos", "pad", "unk"):
        token = strings.get(f"{name}_token")
        ids[f"{name}_id"] = None if token is None else lookup(token)
        if token is not None and ids[f"{name}_id"] is None:
            raise ValueError(f"{d}: {name}_token {token!r} is not in the vocabulary")
    return ids


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}`, which marks assistant text for a loss mask: rendered
    as its body, as HF renders it when no mask is asked for (jlora.train.data finds assistant turns by
    rendering message prefixes instead). Without it a template that uses the tag does not parse."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """A chat template in the environment HF renders it in: sandboxed, trim_blocks and lstrip_blocks."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"does not parse: {e} (line {e.lineno})") from e
