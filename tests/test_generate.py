"""jlora.infer.generate: cached decoding vs full forwards, LoRA unmerged vs merged, mixed-length batches,
sampling, streaming, stop strings, one-line errors, greedy parity with HF on SmolLM2, and the CLI."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.infer.generate import GenerateError, Generator, generate

# 2 layers, d=64, vocab 512; the context is exactly the longest prompt (20) + N, so the main tests run at the limit.
CFG = jlora.PRESETS["tiny"].replace(max_position_embeddings=52)
N = 32


@pytest.fixture(scope="module")
def tiny():
    """The model and random params, drawn with numpy (no jitted init to compile)."""
    rng = np.random.default_rng(0)
    draw = lambda path, s: (
        np.ones(s.shape, np.float32) if path[-1].key == "weight" else rng.normal(0.0, 0.08, s.shape).astype(np.float32)
    )
    return jlora.Llama(CFG), jax.tree_util.tree_map_with_path(draw, jlora.models.family.param_shapes(CFG))


@pytest.fixture(scope="module")
def adapter(tiny):
    """(frozen, trainable) with random nonzero A and B on attention and MLP kernels."""
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    frozen, trainable = jlora.split(tiny[1], lcfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    fill = lambda p: p.replace(
        a=0.2 * rng.standard_normal(p.a.shape, np.float32), b=0.2 * rng.standard_normal(p.b.shape, np.float32)
    )
    return frozen, jax.tree.map(fill, trainable, is_leaf=lambda x: isinstance(x, jlora.LoraPair))


# Mixed lengths (3, 20 and 1 tokens): a batch of them left-pads to 32, alone they pad to 16 or 32.
PROMPTS = [[1, 17, 250], [1, 400, 22, 9, 13, 77, 5, 6, 301, 44, 12, 90, 91, 92, 93, 94, 95, 96, 8, 2], [7]]


def full_forward_greedy(forward, prompt: list[int], n: int) -> list[int]:
    """Argmax decoding with no cache: one full forward over [1, 64] per token (the tail is ignored by
    the causal mask, so one compiled shape serves every prompt and step)."""
    ids = np.zeros((1, 64), np.int32)
    ids[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        ids[0, t] = int(jnp.argmax(forward(jnp.asarray(ids))[0, t - 1]))
    return ids[0, len(prompt) : len(prompt) + n].tolist()


def test_cached_decoding_equals_full_forward_argmax(tiny):
    model, params = tiny
    forward = jax.jit(lambda x: model.apply({"params": params}, x))
    out = generate(model, params, None, PROMPTS, max_new_tokens=N, eos_id=())
    assert out == [full_forward_greedy(forward, p, N) for p in PROMPTS]
    assert len(set(out[0])) > 4  # a real sequence, not one repeated token


def test_lora_unmerged_equals_full_forward_and_merged(tiny, adapter):
    model, _ = tiny
    frozen, trainable = adapter
    forward = jax.jit(lambda x: jlora.apply(model, frozen, trainable, x))
    unmerged = generate(model, frozen, trainable, PROMPTS, max_new_tokens=N, eos_id=())
    assert unmerged == [full_forward_greedy(forward, p, N) for p in PROMPTS]
    assert generate(model, jlora.merge(frozen, trainable), None, PROMPTS, max_new_tokens=N, eos_id=()) == unmerged
    assert generate(model, frozen, None, PROMPTS, max_new_tokens=N, eos_id=()) != unmerged  # the adapter matters


def test_bfloat16_decoding_equals_its_full_forward(tiny):
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    model, params = jlora.Llama(cfg), jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tiny[1])
    forward = jax.jit(lambda x: model.apply({"params": params}, x))
    out = generate(model, params, None, PROMPTS[:1], max_new_tokens=8, eos_id=())
    assert out == [full_forward_greedy(forward, PROMPTS[0], 8)]


def test_mixed_length_batch_equals_one_by_one(tiny, adapter):
    model, _ = tiny
    frozen, trainable = adapter
    gen = Generator(model, frozen, trainable)
    alone = [gen.generate([p], max_new_tokens=N, eos_id=())[0] for p in PROMPTS]
    assert gen.generate(PROMPTS, max_new_tokens=N, eos_id=()) == alone
    # Per-row EOS: a token row 0 makes at step 5 ends row 0 there (EOS not returned); the others run on.
    eos = alone[0][5]
    batch = gen.generate(PROMPTS, max_new_tokens=N, eos_id=eos)
    for row, ref in zip(batch, alone):
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)
    assert len(batch[0]) <= 5
    # A right-padded [B, T] array with lengths gives the same as the lists; fewer new tokens, a prefix.
    arr = np.zeros((3, 20), np.int32)
    for i, p in enumerate(PROMPTS):
        arr[i, : len(p)] = p
    assert gen.generate(arr, lengths=[len(p) for p in PROMPTS], max_new_tokens=20, eos_id=()) == [r[:20] for r in alone]


def test_sampling_seed_topk_topp_and_streaming(tiny):
    model, params = tiny
    gen = Generator(model, params)
    kw = dict(max_new_tokens=N, eos_id=())
    greedy = gen.generate(PROMPTS, **kw)
    sampled = gen.generate(PROMPTS, temperature=1.0, seed=3, **kw)
    assert gen.generate(PROMPTS, temperature=1.0, seed=3, **kw) == sampled
    assert gen.generate(PROMPTS, temperature=1.0, seed=4, **kw) != sampled
    assert sampled != greedy
    assert gen.generate(PROMPTS, temperature=1.5, top_k=1, top_p=0.5, seed=5, **kw) == greedy
    assert gen.generate(PROMPTS, temperature=1.0, top_p=1e-6, seed=5, **kw) == greedy
    for chunk in (1, 5):  # streamed chunks concatenate to the one-shot result
        parts = list(gen.stream(PROMPTS, temperature=1.0, seed=3, chunk=chunk, **kw))
        assert [sum((p[i] for p in parts), []) for i in range(3)] == sampled
        assert len(parts) == -(-(N - 1) // chunk) + 1


class IdsText:
    """A stand-in tokenizer whose text shows every id, so a stop string names one token."""

    def decode(self, ids, **_):
        return "".join(f"<{i}>" for i in ids)


def test_stop_strings_truncate_and_stream_the_same(tiny):
    model, params = tiny
    gen = Generator(model, params)
    ref = gen.generate(PROMPTS, max_new_tokens=N, eos_id=())
    stop = f"<{ref[1][6]}>"
    out = gen.generate(PROMPTS, max_new_tokens=N, eos_id=(), stop_strings=[stop], tokenizer=IdsText())
    for row, full in zip(out, ref):
        cut = [k for k in range(1, N + 1) if stop in IdsText().decode(full[:k])]
        assert row == (full[: cut[0]] if cut else full)
    assert len(out[1]) <= 7
    parts = list(gen.stream(PROMPTS, max_new_tokens=N, eos_id=(), stop_strings=[stop], tokenizer=IdsText()))
    assert [sum((p[i] for p in parts), []) for i in range(3)] == out


@pytest.mark.parametrize(
    "prompts, kw, message",
    [
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([], {}, "no prompts given"),
        (
            [[1] * 20],
            {"max_new_tokens": 33},
            "prompt of 20 tokens + max_new_tokens 33 = 53 exceeds the model's context of 52",
        ),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ([[1, 512]], {}, "token id 512, outside the vocabulary [0, 512)"),
        ([[1]], {"temperature": 1.0, "top_p": 0.0}, "top_p must be in (0, 1]"),
        ([[1]], {"stop_strings": ["x"]}, "stop_strings need a tokenizer"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny, prompts, kw, message):
    model, params = tiny
    with pytest.raises(GenerateError) as err:
        generate(model, params, None, prompts, **{"max_new_tokens": 4, **kw})
    assert message in str(err.value) and "\n" not in str(err.value)


def _tiny_model_dir(tmp_path, params, cfg=CFG) -> str:
    """A tiny HF-style model dir: config.json + model.safetensors + a byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jlora.formats.weights import save_pretrained

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tok.add_tokens([f"<x{i}>" for i in range(CFG.vocab_size - tok.get_vocab_size())])  # cover every model id
    model_dir = tmp_path / "tiny"
    save_pretrained(params, cfg.replace(bos_token_id=1, eos_token_id=2), model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return str(model_dir)


def test_cli_streams_text(tiny, adapter, tmp_path):
    from jlora.checkpoint.adapter import save_adapter

    frozen, trainable = adapter
    model_dir = _tiny_model_dir(tmp_path, frozen)
    adapter_dir = tmp_path / "adapter"
    save_adapter(
        adapter_dir,
        trainable,
        jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")),
        base=CFG.replace(bos_token_id=1, eos_token_id=2),
    )
    cli = [sys.executable, "-c", "import sys; from jlora.cli.generate import main; sys.exit(main())"]  # jlora-generate
    args = [
        *cli,
        "--model",
        model_dir,
        "--adapter",
        str(adapter_dir),
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.7",
        "--top-k",
        "50",
        "--seed",
        "1",
    ]
    run = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() and "tokens in" in run.stderr
    bad = subprocess.run(
        [*cli, "--model", model_dir, "--prompt", "x", "--max-new-tokens", "1000"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert bad.returncode == 2 and "exceeds the model's context" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# SmolLM2's ids for "The capital of France is", "def add(a, b):", "Once upon a time, a little fox" and a
# chat turn asking "What is 2+2?" (which ends in EOS early), written out to skip a second read of the GGUF.
HF_PROMPTS = [
    [504, 3575, 282, 4649, 314],
    [1604, 803, 24, 81, 28, 278, 727],
    [6403, 1980, 253, 655, 28, 253, 1838, 16438],
    [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],
]


@pytest.mark.slow
def test_greedy_matches_hf_generate_on_smollm2(smollm2_gguf, tmp_path):
    """jlora reads the GGUF; HF gets the same weights through a safetensors copy (reading the GGUF again
    would double the test's time; GGUF parity is test_weights' job). Both decode the batch left-padded."""
    import torch
    import transformers

    from jlora.formats.weights import read_pretrained, save_pretrained

    cfg, params = read_pretrained(smollm2_gguf)
    ours = Generator(jlora.Llama(cfg), params).generate(HF_PROMPTS, max_new_tokens=20)
    save_pretrained(params, cfg, tmp_path)
    del params
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    width = max(map(len, HF_PROMPTS))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in HF_PROMPTS])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in HF_PROMPTS])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine torch's spinning threads make this 10x slower
    try:
        with torch.inference_mode():
            ref = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=20,
                eos_token_id=cfg.eos_token_id,
                pad_token_id=0,
            )[:, width:].tolist()
    finally:
        torch.set_num_threads(threads)
    eos = cfg.eos_token_id
    assert ours == [r[: r.index(eos)] if eos in r else r for r in ref]
    assert any(len(out) < 20 for out in ours) and any(len(out) == 20 for out in ours)  # EOS both hit and not


def test_decoding_past_the_cache_is_refused_or_poisoned_never_clamped(tiny):
    """Llama(decode=True): a call longer than the cache is a one-line error before anything runs; a write
    that would run past the cache's end (the position is a traced value there) gives NaN logits, where
    dynamic_update_slice alone would clamp and silently overwrite the last slots."""
    model, params = tiny
    step = jax.jit(lambda c, ids: model.apply({"params": params, "cache": c}, ids, decode=True, mutable=["cache"]))
    ids = jnp.asarray([PROMPTS[1][:6]], jnp.int32)
    with pytest.raises(ValueError) as err:
        step(jlora.init_cache(CFG, 1, 4), ids)
    assert "6 tokens" in str(err.value) and "cache of 4" in str(err.value) and "\n" not in str(err.value)
    logits, cache = step(jlora.init_cache(CFG, 1, 8), ids)  # 6 of 8 slots
    assert np.isfinite(np.asarray(logits)).all()
    for i in range(2):  # slots 7 and 8: still inside
        logits, cache = step(cache["cache"], jnp.asarray([[5 + i]], jnp.int32))
        assert np.isfinite(np.asarray(logits)).all()
    logits, _ = step(cache["cache"], jnp.asarray([[9]], jnp.int32))  # a 9th token in 8 slots
    assert np.isnan(np.asarray(logits)).all()


def test_merge_for_inference_is_one_path_for_generate_and_jlora_merge(tiny, tmp_path):
    """`jlora-generate --merge` and `jlora-merge` fold an adapter the same way: on a tied model an
    embed_tokens adapter is refused by both (merged into the shared table it would change the LM head
    too, which the unmerged model does not), while the unmerged run works; an untied adapter merges."""
    from jlora.checkpoint.adapter import save_adapter

    tied = CFG.replace(tie_word_embeddings=True)
    params = {k: v for k, v in tiny[1].items() if k != "lm_head"}
    model_dir = _tiny_model_dir(tmp_path, params, tied)
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=("embed_tokens", "q_proj"))
    frozen, trainable = jlora.split(params, lcfg, jax.random.key(1))
    save_adapter(tmp_path / "adapter", trainable, lcfg, base=tied.replace(bos_token_id=1, eos_token_id=2))
    gen = [sys.executable, "-c", "import sys; from jlora.cli.generate import main; sys.exit(main())"]  # jlora-generate
    merge = [sys.executable, "-c", "import sys; from jlora.cli.adapters import merge_main; sys.exit(merge_main())"]
    common = ["--model", model_dir, "--adapter", str(tmp_path / "adapter")]
    runs = {
        "generate --merge": [*gen, *common, "--prompt", "hello", "--max-new-tokens", "2", "--merge"],
        "jlora-merge": [*merge, *common, "--out", str(tmp_path / "merged")],
        "generate": [*gen, *common, "--prompt", "hello", "--max-new-tokens", "2"],
    }
    done = {name: subprocess.run(args, capture_output=True, text=True, timeout=240) for name, args in runs.items()}
    for name in ("generate --merge", "jlora-merge"):
        err = done[name].stderr.strip()
        assert done[name].returncode == 2 and len(err.splitlines()) == 1, (name, err[-2000:])
        assert "embed_tokens" in err and "tied" in err and "unmerged" in err, (name, err)
    assert done["generate"].returncode == 0, done["generate"].stderr[-2000:]


# a template whose generation prompt opens the assistant turn, as real ones do (training locates answers by it)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def test_cli_prompts_and_answers_as_training_and_the_demo_eval(tmp_path):
    """`jlora-generate --system S --chat --prompt P` feeds the ids the training pipeline builds before the
    answer of the record (system S, user P, assistant A): the demo's own eval_items; its greedy answer with an
    adapter is the demo's `score` for it. `--config` of an Alpaca run (Gemma 3's demo) takes S as the
    instruction and P as the input, as that run's records were built."""
    from test_adapter_stack import CFG as STACK_CFG
    from test_adapter_stack import LCFGS, randomize
    from test_serve import _model_dir

    from jlora.train.config import load
    from jlora.train.demo import eval_items, score

    rng = np.random.default_rng(0)
    draw = lambda path, s: (
        np.ones(s.shape, np.float32) if path[-1].key == "weight" else rng.normal(0.0, 0.08, s.shape).astype(np.float32)
    )
    params = jax.tree_util.tree_map_with_path(draw, jlora.models.family.param_shapes(STACK_CFG))
    model_dir = _model_dir(tmp_path / "base", params, CHAT_TEMPLATE)
    trainable = randomize(jlora.split(params, LCFGS["qv4"], jax.random.key(0))[1], seed=0, std=0.3)
    jlora.save_adapter(tmp_path / "adapter", trainable, LCFGS["qv4"], base=STACK_CFG)
    system, user, answer = "w11 w12 w13", "w40 w41 w42 w43", "w7 w8"
    records = {
        "chat": {
            "messages": [
                {"role": r, "content": c} for r, c in zip(("system", "user", "assistant"), (system, user, answer))
            ]
        },
        "alpaca": {"instruction": system, "input": user, "output": answer},
    }
    runs = {}
    for fmt, rec in records.items():
        (tmp_path / f"{fmt}.jsonl").write_text(json.dumps(rec) + "\n")
        (tmp_path / f"{fmt}.yaml").write_text(
            f"model:\n  path: {model_dir}\ndata:\n  format: {fmt}\n  train: {tmp_path / f'{fmt}.jsonl'}\n"
            f"  val: {tmp_path / f'{fmt}.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
        )
        runs[fmt] = load(str(tmp_path / f"{fmt}.yaml"))
    tok = jlora.load_tokenizer(model_dir)
    items = {fmt: eval_items(run, tok) for fmt, run in runs.items()}
    room = STACK_CFG.max_position_embeddings - len(items["chat"][0].prompt_ids)
    max_new = max(1, min(len(tok.encode(answer, add_bos=False)) + 8, room))  # as score sizes it
    _, (expected,) = score(jlora.Llama(STACK_CFG), params, trainable, items["chat"], tok)

    cli = [sys.executable, "-c", "import sys; from jlora.cli.generate import main; sys.exit(main())"]  # jlora-generate
    common = ["--system", system, "--prompt", user, "--show-prompt-ids"]
    chat = [*cli, "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--chat", *common]
    alpaca = [*cli, "--config", str(tmp_path / "alpaca.yaml"), *common, "--max-new-tokens", "1"]
    done = {
        name: subprocess.run(args, capture_output=True, text=True, timeout=240)
        for name, args in (("chat", [*chat, "--max-new-tokens", str(max_new)]), ("alpaca", alpaca))
    }
    for fmt, run in done.items():
        assert run.returncode == 0, run.stderr[-2000:]
        fed = json.loads(run.stderr.split("prompt ids: ", 1)[1].splitlines()[0])
        assert fed == items[fmt][0].prompt_ids, fmt
    assert done["chat"].stdout.strip() == expected and expected


def test_prompt_lengths_share_power_of_two_buckets_and_keep_greedy_outputs(tiny, monkeypatch):
    """Prompts of 40, 60, 90 and 120 tokens compile two prefills (64, 128), not one per multiple of 16, and
    their greedy answers equal those of prefills sized to each prompt's multiple of 16 (the path before)."""
    import jlora.infer.generate as generate_module

    model, params = tiny
    cfg = CFG.replace(max_position_embeddings=160)  # a model no other test compiles for
    gen = Generator(jlora.Llama(cfg), params)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (40, 60, 90, 120)]
    before = generate_module._prefill._cache_size()
    bucketed = [gen.generate([p], max_new_tokens=8, eos_id=())[0] for p in prompts]
    assert generate_module._prefill._cache_size() - before == 2
    monkeypatch.setattr(generate_module, "bucket", lambda n, cap: -(-n // 16) * 16)
    assert [gen.generate([p], max_new_tokens=8, eos_id=())[0] for p in prompts] == bucketed
    assert generate_module._prefill._cache_size() - before == 4  # 48 and 96 besides: the sizes above were others
