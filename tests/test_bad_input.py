"""Bad input that `jlora-train` used to accept silently or answer with a traceback (issue 13: items 6,
8, 9, 11, 16). Each test drives the real console script in a subprocess on the tiny CPU config, the
way a user would meet the problem, and asserts one line on stderr naming the file or key and the fix."""

import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_testing import one_line_error, script
from tokenizers import Tokenizer, models, pre_tokenizers

from jlora.formats.weights import save_pretrained
from jlora.models.family import param_shapes
from jlora.models.llama import PRESETS

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TRAIN = script("jlora-train")
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi"},
]


def _train(tmp_path, *sets: str) -> subprocess.CompletedProcess:
    base = [
        "train.steps=2",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    args = [TRAIN, "--config", "configs/tiny-cpu.yaml", *[a for s in (*base, *sets) for a in ("--set", s)]]
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _word_tokenizer(d: pathlib.Path, n_words: int = 100, chat_template: str | None = None) -> pathlib.Path:
    """A real tokenizer.json (word level, `n_words` + 3 special tokens) with its tokenizer_config.json."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


# ---- item 6: a tokenizer whose vocab exceeds the model's trained on NaN and exited 0


def test_tokenizer_vocab_larger_than_the_models_is_refused(tmp_path):
    tok = _word_tokenizer(tmp_path / "tok", n_words=100)  # 103 tokens
    run = _train(tmp_path, f"tokenizer={tok}", "model.overrides={vocab_size: 64}")
    one_line_error(run, "103", "64", str(tok))


# ---- item 8: a chat role other than system/user/assistant/tool


def test_unknown_chat_role_names_the_file_and_line(tmp_path):
    bad = [
        {"role": "user", "content": "Say hi."},
        {"role": "asistant", "content": "hi"},
        {"role": "assistant", "content": "hi"},
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [CHAT] * 3 + [bad] + [CHAT] * 4))
    run = _train(tmp_path, f"data.train={data}", "data.format=chat", "data.val_fraction=0")
    one_line_error(run, f"{data}:4", "'asistant'", "system, user, assistant, tool")


# ---- item 9: warnings the user needs, one line each on stderr


def test_warmup_past_the_end_and_a_dataset_smaller_than_a_batch_warn_once(tmp_path):
    run = _train(tmp_path, "optim.warmup_steps=5", "train.global_batch=64", "train.micro_batch=32")
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if "warning:" in line]
    warmup = [w for w in warnings if "optim.warmup_steps" in w]
    small = [w for w in warnings if "train.global_batch" in w]
    assert len(warmup) == 1 and "5" in warmup[0] and "2 steps" in warmup[0], run.stderr[-3000:]
    assert len(small) == 1 and "56" in small[0] and "64" in small[0], run.stderr[-3000:]
    quiet = _train(tmp_path, "optim.warmup_steps=1", f"output_dir={tmp_path / 'run2'}")
    assert quiet.returncode == 0 and "warning:" not in quiet.stderr, quiet.stderr[-3000:]


# ---- item 11: one-line errors instead of tracebacks


def test_a_tokenizer_path_that_is_not_a_tokenizer(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    one_line_error(_train(tmp_path, f"tokenizer={tmp_path / 'tok'}"), str(tmp_path / "tok" / "tokenizer.json"))
    one_line_error(_train(tmp_path, "tokenizer=configs/tiny-cpu.yaml"), "configs/tiny-cpu.yaml", "tokenizer.json")


def test_chat_format_with_a_tokenizer_without_a_chat_template(tmp_path):
    tok = _word_tokenizer(tmp_path / "tok")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(8)))
    run = _train(tmp_path, f"tokenizer={tok}", f"data.train={data}", "data.format=chat", "data.val_fraction=0")
    one_line_error(run, "data.format", str(tok / "tokenizer.json"), "chat template")


@pytest.mark.parametrize(
    "key, value, regex",
    [
        ("lora.targets", "[q_proj, 'v_proj(']", "v_proj("),
        ("lora.rank_pattern", "{'q_proj[': 8}", "q_proj["),
        ("lora.alpha_pattern", "{'*_proj': 8}", "*_proj"),
        ("lora.train_extra", "norm)", "norm)"),
    ],
)
def test_an_invalid_regex_names_the_key_and_the_regex(tmp_path, key, value, regex):
    run = _train(tmp_path, f"{key}={value}")
    one_line_error(run, key, repr(regex))


# ---- item 16: Mistral's sliding_window was read and ignored


def _model_with_config(path: pathlib.Path, **changes) -> pathlib.Path:
    """The tiny LLaMA (vocab 128) as an HF dir whose config.json has `changes` written over it."""
    cfg = PRESETS["tiny"].replace(vocab_size=128)
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rs.standard_normal(s.shape).astype(s.dtype)), param_shapes(cfg))
    save_pretrained(params, cfg, path)
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, **changes}))
    return path


def test_an_unsupported_architecture_is_one_line_naming_the_families(tmp_path):
    model = _model_with_config(tmp_path / "mistral", model_type="phi3", architectures=["Phi3ForCausalLM"])
    tok = _word_tokenizer(tmp_path / "tok")
    run = _train(tmp_path, f"model.path={model}", f"tokenizer={tok}")
    one_line_error(run, str(model / "config.json"), "'phi3'", "qwen3", "gemma3_text")


def test_a_config_json_that_lies_about_its_family_is_refused(tmp_path):
    """Gemma 2 fields (soft-caps, a window, its attention scale) under model_type llama: jlora's LLaMA
    does not implement them, so training would compute another model. Refused naming the file and key."""
    lies = {"hidden_act": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 256}
    model = _model_with_config(tmp_path / "model", **lies)
    run = _train(tmp_path, f"model.path={model}", f"tokenizer={_word_tokenizer(tmp_path / 'tok')}")
    one_line_error(
        run, str(model / "config.json"), "attn_logit_softcapping=50.0", "query_pre_attn_scalar=256", "'llama'"
    )


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_output_dir_is_refused_before_anything_is_written(tmp_path, value):
    """`--set output_dir=` would mean the working directory (here the source tree): refused in one line,
    and nothing is written there."""
    before = sorted(p.name for p in ROOT.iterdir())
    run = _train(tmp_path, f"output_dir={value}")
    one_line_error(run, "output_dir", "empty")
    assert sorted(p.name for p in ROOT.iterdir()) == before


# ---- issue 25, items 9-12: bounds, YAML traps, text that is not Unicode, CLI edge cases


def test_max_seq_len_beyond_the_models_context_is_refused(tmp_path):
    """The tiny model's context is 512 positions: rows of 100,000 tokens ended in an out-of-memory traceback."""
    one_line_error(_train(tmp_path, "data.max_seq_len=100000", "data.packing=true"), "data.max_seq_len", "512")


def test_a_learning_rate_of_1e6_warns_once_and_stops_when_grad_norms_explode(tmp_path):
    """The loss of the tiny model stays near 5.7 while its grad norm goes from 0.6 to 1e6: the run warns at
    the start and stops in one line once the grad norm stays 1e4 times its first steps'."""
    run = _train(tmp_path, "optim.lr=1e6", "train.steps=12", "optim.warmup_steps=0")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]  # 1: a diverged run
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("jlora-train: step 6: training diverged") and "optim.lr=1e+06" in line, line
    assert run.stdout.count("optim.lr=1e+06 is far above") + run.stderr.count("optim.lr=1e+06 is far above") == 1
    assert not (tmp_path / "run" / "adapter").exists(), line


def test_a_section_written_twice_is_refused_with_both_lines(tmp_path):
    text = (ROOT / "configs/tiny-cpu.yaml").read_text() + "lora:\n  rank: 8\n"
    config = tmp_path / "twice.yaml"
    config.write_text(text)
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("lora:"))
    last = len(text.splitlines()) - 1
    run = subprocess.run(
        [TRAIN, "--config", str(config)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    one_line_error(run, f"{config}:{last}", "'lora' is set twice", f"line {first}")


def test_val_equal_to_train_and_empty_responses_warn_once_each(tmp_path):
    data = tmp_path / "empty.jsonl"
    rows = [json.loads(line) for line in (ROOT / "data/tiny/train.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "output": ""}) + "\n" for r in rows))
    run = _train(tmp_path, f"data.train={data}", f"data.val={data}", "data.val_fraction=0")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert out.count("data.val is data.train") == 1, out[-3000:]
    assert out.count("every record's response is empty") == 1, out[-3000:]


@pytest.mark.parametrize(
    "content, where, needle",
    [
        (b'{"instruction": "hi", "output": "ok"}\n{"instruction": "x\\ud800y", "output": "ok"}\n', 2, "U+D800"),
        (b'{"instruction": "hi", "output": "ok"}\n\n{"instruction": "caf\xe9", "output": "ok"}\n', 3, "byte 0xe9"),
    ],
)
def test_text_that_is_not_unicode_names_the_file_and_line(tmp_path, content, where, needle):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    one_line_error(_train(tmp_path, f"data.train={data}"), f"{data}:{where}", needle)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--stop", ""], "--stop: an empty stop string"),
        ([b"--prompt", b"caf\xe9"], "--prompt: not valid UTF-8 text (byte 0xe9"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
    ],
)
def test_generate_refuses_an_empty_stop_and_a_prompt_that_is_not_utf8(tmp_path, args, needle):
    """Checked before the model loads: an empty --stop ended generation after one token."""
    argv = [script("jlora-generate"), "--model", str(tmp_path / "never-read"), "--prompt", "hi", *args]
    run = subprocess.run(argv, env=ENV, capture_output=True, timeout=600)
    run = subprocess.CompletedProcess(
        run.args, run.returncode, run.stdout.decode(), run.stderr.decode(errors="replace")
    )
    one_line_error(run, needle, prog="jlora-generate")


def test_an_unreadable_tokenizer_says_permission_denied(tmp_path):
    """Run without root's right to read any file (setpriv drops it), a tokenizer.json owned by another user
    with mode 600 was called "not a valid tokenizer.json"."""
    tok = _word_tokenizer(tmp_path / "tok")
    os.chown(tok / "tokenizer.json", 65534, 65534)
    os.chmod(tok / "tokenizer.json", 0o600)
    base = _train(tmp_path, f"tokenizer={tok}").args
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    run = subprocess.run(drop + base, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    line = one_line_error(run, str(tok / "tokenizer.json"), "Permission denied")
    assert "not a valid" not in line


def test_a_peft_alpha_that_is_not_a_number_names_the_file_and_key(tmp_path):
    import jlora
    from jlora.formats.peft_adapter import export_peft

    cfg = PRESETS["tiny"].replace(vocab_size=128)
    params = jlora.init_params(cfg, jax.random.key(0))
    save_pretrained(params, cfg, tmp_path / "model")
    _word_tokenizer(tmp_path / "model")
    lcfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    _frozen, trainable = jlora.split(params, lcfg, jax.random.key(1))
    export_peft(tmp_path / "peft", trainable, lcfg, cfg, base_name="tiny")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "sixteen"}))
    argv = [script("jlora-generate"), "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "peft")]
    run = subprocess.run([*argv, "--prompt", "w1"], env=ENV, capture_output=True, text=True, timeout=600)
    one_line_error(run, "adapter_config.json", "lora_alpha='sixteen'", prog="jlora-generate")
