"""jlora.formats.tokenizer against HF references: transformers' tokenizers and the sentencepiece library.

The reference for each source, and where it is knowingly not followed:
- SmolLM2's GGUF vocabulary (byte-level BPE, tokenizer.ggml.pre="smollm"): transformers' GGUF loader,
  with the one change SmolLM2's published tokenizer.json (and llama.cpp's "smollm" split) makes and
  that loader lacks: every digit is split off before GPT-2's regex. Both the patched and the plain
  loader are compared, and the plain one differs only on the texts listed in its test.
- tokenizer.json: transformers' AutoTokenizer on the same directory.
- tokenizer.model (trained here): the sentencepiece library itself on text without special tokens;
  transformers' LlamaTokenizer on text that does not start with whitespace (transformers' Metaspace
  drops SentencePiece's dummy-prefix space before leading whitespace; jlora keeps sentencepiece's ids).
- a SentencePiece GGUF (written here from that model): the model itself, and transformers' GGUF loader.
"""

import copy
import io
import json
import os
import random
import shutil

import gguf
import pytest
import sentencepiece as spm
import transformers  # the test extra installs it: a missing one fails, never skips
from tokenizers import pre_tokenizers

from jlora.formats.gguf_vocab import gpt2_pre_tokenizer
from jlora.formats.tokenizer import TokenizerNotFoundError, load_tokenizer

TEXTS = [
    "",
    "Hello world",
    "Hello, world!",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple   spaces   inside",
    "tab\tseparated\tvalues",
    "\tleading tab",
    "line one\nline two",
    "para\n\npara",
    "\n\n\nnewlines first",
    "windows\r\nline end",
    "mixed \t \n whitespace",
    "naïve café façade",
    "Ünïcödé àccénts ñ",
    "Straße",
    "日本語のテキスト",
    "中文分词测试",
    "한국어 텍스트",
    "Привет, мир",
    "مرحبا بالعالم",
    "emoji 😀🚀👍🏽",
    "family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np  # comment",
    '<div class="a">&amp;</div>',
    "SELECT * FROM t WHERE id=42;",
    '{"key": [1, 2, 3]}',
    "12345",
    "3.14159",
    "1,000,000",
    "a  1",
    "x 2023-11-27 y",
    "year  2024\t\t7",
    "0x1F 0b1010 1e-9",
    "Ⅻ ½ ²",
    "<|im_start|>user\nHello<|im_end|>\n",
    "<|im_start|>assistant\n",
    "text<|im_end|>",
    "<|endoftext|>",
    "<|im_start|><|im_end|>",
    "before <|im_start|> after",
    "<|im_start|>  two spaces after",
    "<|im_start|",
    "<|im_end",
    "<s>hello</s>",
    "<s> spaced",
    "a<unk>b",
    "I'm can't won't you'll they've he'd",
    "ALL CAPS SHOUTING",
    "MiXeD CaSe",
    "punctuation!?!... ---",
    "~`@#$%^&*()_+-=[]{}|;:',.<>/?",
    "http://example.com/path?q=1&r=2",
    "\u00a0non-breaking\u2009thin",
    "zero\u200bwidth",
    "combining e\u0301",
    "word " * 40,
]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "ünïcode 😀\nnext line"},
    ],
]
SP_ADDED = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


def assert_same(ours, encode_ref, decode_ref, texts, **encode_kw):
    """Identical ids and identical decoded text (special tokens kept and skipped) on every text."""
    bad = []
    for t in texts:
        ids, ref = ours.encode(t, **encode_kw), encode_ref(t)
        if ids != ref:
            bad.append((t, "ids", ids, ref))
            continue
        for skip in (False, True):
            if ours.decode(ids, skip_special_tokens=skip) != decode_ref(ids, skip):
                bad.append(
                    (t, f"decode(skip={skip})", ours.decode(ids, skip_special_tokens=skip), decode_ref(ids, skip))
                )
    assert not bad, "\n".join(map(repr, bad))


def test_text_set_is_varied():
    assert len(TEXTS) >= 50 and "" in TEXTS


# --- SmolLM2's GGUF (byte-level BPE) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(jlora's tokenizer, transformers' tokenizer) for SmolLM2's GGUF vocabulary."""
    d, name = os.path.split(smollm2_gguf)
    return load_tokenizer(smollm2_gguf), transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


@pytest.fixture(scope="module")
def smollm2_hf_split_digits(smollm2):
    """transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's published tokenizer.json."""
    hf = copy.deepcopy(smollm2[1])
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return hf


def hf_refs(hf, **kw):
    return (lambda t: hf.encode(t, **kw)), (lambda ids, skip: hf.decode(ids, skip_special_tokens=skip))


def test_smollm2_gguf_matches_hf(smollm2, smollm2_hf_split_digits):
    ours, hf = smollm2[0], smollm2_hf_split_digits
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert ours.vocab_size == len(hf) == 49152 and ours.add_bos is False
    assert_same(ours, *hf_refs(hf), TEXTS)  # add_bos=None: SmolLM2's GGUF says add_bos_token=False, as HF
    enc, dec = hf_refs(hf)
    assert_same(ours, lambda t: [hf.bos_token_id, *enc(t)], dec, TEXTS[:12], add_bos=True)
    assert ours.encode("hi", add_bos=True, add_eos=True) == [1, *hf.encode("hi"), 2]


def test_smollm2_gguf_vs_plain_hf_loader(smollm2):
    """transformers' GGUF loader does not split digits for "smollm"; only digits after whitespace runs
    (or non-ASCII numerals) come out differently, and there jlora follows SmolLM2's tokenizer.json."""
    ours, hf = smollm2
    differ = {t for t in TEXTS if ours.encode(t) != hf.encode(t)}
    assert differ == {"a  1", "year  2024\t\t7", "Ⅻ ½ ²"}
    assert ours.encode("a  1") == [hf.convert_tokens_to_ids(t) for t in ("a", "ĠĠ", "1")]


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_smollm2_chat_template(smollm2, generation_prompt):
    ours, hf = smollm2
    assert "<|im_start|>" in ours.chat_template
    for chat in CHATS:
        ref = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt) == ref


def test_smollm2_token_lookup(smollm2):
    ours, _ = smollm2
    assert ours.token_to_id("<|im_end|>") == 2 and ours.id_to_token(2) == "<|im_end|>"
    assert ours.token_to_id("no such token") is None
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([49152])


# --- tokenizer.json -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_json_dir(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_json")
    smollm2[1].save_pretrained(d)
    assert (d / "tokenizer.json").is_file()
    return d


def test_tokenizer_json_matches_hf(tokenizer_json_dir):
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_json_dir)
    for path in (tokenizer_json_dir, tokenizer_json_dir / "tokenizer.json"):
        ours = load_tokenizer(path)
        assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (
            hf.bos_token_id,
            hf.eos_token_id,
            hf.pad_token_id,
            len(hf),
        )
        assert_same(ours, *hf_refs(hf), TEXTS)
    for chat in CHATS:
        for gen in (False, True):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == hf.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen
            )


def _copy_dir(src, dst, edit_json):
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    for name, edit in edit_json.items():
        (dst / name).write_text(json.dumps(edit(json.loads((dst / name).read_text()))))
    return dst


def test_tokenizer_json_bos_from_post_processor(tokenizer_json_dir, tmp_path):
    """A tokenizer.json whose post-processor adds BOS (as LLaMA 3's does): that is the default, as in transformers."""
    bos_first = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    d = _copy_dir(tokenizer_json_dir, tmp_path, {"tokenizer.json": lambda j: {**j, "post_processor": bos_first}})
    hf = transformers.AutoTokenizer.from_pretrained(d)
    ours = load_tokenizer(d)
    assert ours.add_bos is True and hf.encode("hi")[0] == 1
    assert_same(ours, *hf_refs(hf), TEXTS[:12])
    assert ours.encode("hi", add_bos=False) == hf.encode("hi", add_special_tokens=False)


def test_tokenizer_json_add_bos_from_config(tokenizer_json_dir, tmp_path):
    """add_bos_token in tokenizer_config.json overrides the post-processor (as LLaMA 2's HF tokenizers and
    transformers 4.x do; transformers 5's generic TokenizersBackend ignores it, so no HF reference here)."""
    d = _copy_dir(tokenizer_json_dir, tmp_path, {"tokenizer_config.json": lambda c: {**c, "add_bos_token": True}})
    ours, plain = load_tokenizer(d), load_tokenizer(tokenizer_json_dir)
    assert ours.add_bos is True and plain.add_bos is False
    assert ours.encode("hi there") == [1, *plain.encode("hi there")]


# --- SentencePiece: tokenizer.model trained here, and a GGUF written from it -------------------------


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A LLaMA-style SentencePiece BPE model (byte fallback, identity normalizer, two user-defined tokens)."""
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over lazy dog hello world token model train data learn rate lora rank "
        "alpha matrix café naïve Straße 東京 日本語 中文 模型 😀 🚀 def return import print if else for 0 1 2 3 "
        "42 3.14 ( ) : = , . ! ?"
    ).split()
    lines = [
        "".join(rng.choice(["", " ", "  ", "\t"]) + rng.choice(words) for _ in range(rng.randint(3, 15)))
        for _ in range(2000)
    ]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        minloglevel=2,
    )
    d = tmp_path_factory.mktemp("sp")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return d


@pytest.fixture(scope="module")
def sp_ref(sp_dir):
    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


def test_sentencepiece_matches_sentencepiece_library(sp_dir, sp_ref):
    ours = load_tokenizer(sp_dir)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, 500) and ours.add_bos
    plain = [t for t in TEXTS if not any(a in t for a in SP_ADDED)]
    assert_same(ours, sp_ref.encode, lambda ids, skip: sp_ref.decode(ids), plain, add_bos=False)
    assert ours.encode(" x") == [1, *sp_ref.encode(" x")]
    assert ours.encode("x", add_eos=True) == [1, *sp_ref.encode("x"), 2]


def test_sentencepiece_matches_hf_llama_tokenizer(sp_dir):
    hf = transformers.LlamaTokenizer.from_pretrained(sp_dir)
    ours = load_tokenizer(sp_dir / "tokenizer.model")
    texts = [t for t in TEXTS if not t[:1].isspace()]
    assert_same(ours, *hf_refs(hf, add_special_tokens=False), texts, add_bos=False)
    # With BOS in front, decoding still matches (BOS is written out, or skipped).
    for t in texts:
        ids = ours.encode(t, add_bos=True)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), t


def test_sentencepiece_special_tokens_in_text(sp_dir):
    ours = load_tokenizer(sp_dir)
    ids = ours.encode("<s>hi<|im_end|>", add_bos=False)
    assert ids[0] == 1 and ids[-1] == ours.token_to_id("<|im_end|>") == 4
    assert ours.token_to_id("<unk>") == 0 and ours.token_to_id("no such piece") is None


def test_sentencepiece_reads_tokenizer_config(sp_dir, tmp_path):
    """tokenizer_config.json beside a tokenizer.model: add_bos_token, pad_token, named chat templates."""
    config = {
        "add_bos_token": False,
        "pad_token": {"content": "<|im_end|>", "__type": "AddedToken"},
        "chat_template": [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
        ],
    }
    d = _copy_dir(sp_dir, tmp_path, {})
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(d)
    assert ours.add_bos is False and ours.pad_id == 4 and ours.encode("hi") == load_tokenizer(sp_dir).encode("hi")[1:]
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"


@pytest.fixture(scope="module")
def sp_gguf(sp_ref, tmp_path_factory):
    """A SentencePiece-kind GGUF holding the trained model's pieces, scores and types (tokenizer only)."""
    # Its own directory: transformers would read a tokenizer.model lying beside it instead of the GGUF.
    path = tmp_path_factory.mktemp("sp_gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [
        ("context_length", 64),
        ("embedding_length", 8),
        ("block_count", 1),
        ("feed_forward_length", 16),
        ("head_count", 2),
        ("head_count_kv", 2),
    ]:
        getattr(w, f"add_{key}")(value)  # enough of a config for transformers' GGUF loader
    w.add_layer_norm_rms_eps(1e-5)
    n = sp_ref.get_piece_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp_ref.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp_ref.get_score(i) for i in range(n)])
    w.add_token_types([_sp_type(sp_ref, i) for i in range(n)])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0), w.add_add_bos_token(True)
    w.add_chat_template(
        "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def _sp_type(sp, i):
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.USER_DEFINED if sp.id_to_piece(i) in SP_ADDED else gguf.TokenType.NORMAL


def test_sentencepiece_gguf_matches_model(sp_gguf, sp_dir, sp_ref):
    ours, model = load_tokenizer(sp_gguf), load_tokenizer(sp_dir)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size, ours.add_bos) == (1, 2, 2, 500, True)
    plain = [t for t in TEXTS if not any(a in t for a in SP_ADDED)]
    assert_same(ours, sp_ref.encode, lambda ids, skip: sp_ref.decode(ids), plain, add_bos=False)
    assert_same(ours, model.encode, lambda ids, skip: model.decode(ids, skip_special_tokens=skip), TEXTS)


def test_sentencepiece_gguf_matches_hf_gguf_loader(sp_gguf):
    hf = transformers.AutoTokenizer.from_pretrained(sp_gguf.parent, gguf_file=sp_gguf.name)
    ours = load_tokenizer(sp_gguf)
    assert_same(ours, *hf_refs(hf), [t for t in TEXTS if not t[:1].isspace()])  # both add BOS by default
    for chat in CHATS:
        assert ours.apply_chat_template(chat, add_generation_prompt=True) == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )


# --- pre-tokenizer table and errors ----------------------------------------------------------------


def test_gguf_pre_tokenizer_splits():
    text = "Hello  123456\n\nworld"
    split = lambda pre: [s for s, _ in gpt2_pre_tokenizer(pre).pre_tokenize_str(text)]
    assert split("llama-bpe") == ["Hello", "Ġ", "Ġ", "123", "456", "ĊĊ", "world"]
    assert split("qwen2") == ["Hello", "Ġ", "Ġ", "1", "2", "3", "4", "5", "6", "ĊĊ", "world"]
    assert split("smollm") == ["Hello", "ĠĠ", "1", "2", "3", "4", "5", "6", "Ċ", "Ċ", "world"]
    assert split("gpt2") == split(None) == ["Hello", "Ġ", "Ġ123456", "Ċ", "Ċ", "world"]


def test_an_unknown_gguf_pre_tokenizer_is_an_error():
    """GPT-2's split in place of one jlora does not know would give other ids, and nothing would say so."""
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='some-new-model' .*knows .*qwen2"):
        gpt2_pre_tokenizer("some-new-model")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="tokenizer.json") as e:
        load_tokenizer(tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError) and str(tmp_path / "nope") in str(e.value)
    with pytest.raises(FileNotFoundError, match="looked for tokenizer.json, tokenizer.model") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_bad_files_are_clear_errors(tmp_path, sp_dir):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="x.gguf"):
        load_tokenizer(tmp_path / "x.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "notok.gguf"), "llama")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        load_tokenizer(tmp_path / "notok.gguf")
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(sp_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_a_path_that_is_not_a_tokenizer_is_one_tokenizer_error(tmp_path, sp_dir):
    """Every file that is not a tokenizer is a TokenizerError, which the CLIs print as one line (no traceback)."""
    from jlora.errors import JloraError
    from jlora.formats.tokenizer import TokenizerError

    assert issubclass(TokenizerError, JloraError)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    (tmp_path / "config.yaml").write_text("model: {path: tiny}\n")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "tokenizer.model").write_bytes(b"garbage")
    for path, named in (
        (tmp_path / "x.gguf", "x.gguf"),
        (tmp_path / "config.yaml", "config.yaml"),
        (tmp_path / "j", "j/tokenizer.json"),
        (tmp_path / "s", "s/tokenizer.model"),
    ):
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(path)
        assert named in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TokenizerError, match="no chat template"):
        load_tokenizer(sp_dir).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", ["smollm2", "sp_gguf"])
def test_a_gguf_tokenizer_saved_as_hf_files_loads_the_same_in_jlora_and_transformers(source, request, tmp_path):
    """save_hf_files (what jlora-merge writes beside a model merged from a GGUF): jlora and transformers'
    AutoTokenizer read the files back as the GGUF's own tokenizer: ids, specials, BOS default, chat."""
    from jlora.formats.tokenizer import save_hf_files

    gguf_tok = request.getfixturevalue(source)
    gguf_tok = gguf_tok[0] if isinstance(gguf_tok, tuple) else load_tokenizer(gguf_tok)
    assert save_hf_files(gguf_tok, tmp_path)[-1] == "tokenizer_config.json"
    ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [t for t in TEXTS if not t[:1].isspace()]  # transformers' Metaspace differs there (module doc)
    for t in texts:
        assert ours.encode(t) == gguf_tok.encode(t) == hf.encode(t), t
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (
        gguf_tok.bos_id,
        gguf_tok.eos_id,
        gguf_tok.pad_id,
        gguf_tok.add_bos,
    )
    assert (hf.bos_token_id, hf.eos_token_id) == (gguf_tok.bos_id, gguf_tok.eos_id)
    for chat in CHATS:
        want = gguf_tok.apply_chat_template(chat, add_generation_prompt=True)
        assert ours.apply_chat_template(chat, add_generation_prompt=True) == want
        assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want
