"""Every family against HF transformers: tiny random checkpoints of llama, mistral, qwen2, qwen3, gemma2 and
gemma3 (text, and the same inside a multimodal checkpoint), saved with `save_pretrained` and loaded through
`jlora.load_pretrained` + `jlora.build_model`: logits on a sequence longer than the sliding window, and
greedy KV-cached generation (ring-buffer caches for local layers) past the window, against HF `generate`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

import jlora
from jlora.infer.generate import generate

WINDOW = 16
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
# HF config class, its overrides: each family's features on, windows smaller than the test's sequences.
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(num_hidden_layers=2, attention_bias=True)),
    "mistral": (transformers.MistralConfig, dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "qwen2": (
        transformers.Qwen2Config,
        dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen3": (transformers.Qwen3Config, dict(num_hidden_layers=2, head_dim=24)),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        ),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            num_hidden_layers=7,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
}
CAUSAL_LM = {"gemma3": transformers.Gemma3ForCausalLM}


def tiny_hf_model(family: str, seed: int = 0):
    """A tiny random HF model of `family`, weights large enough (std 0.1; norms ~1 or ~0 for Gemma's 1+w)
    that a wrong detail shows in the logits."""
    torch.manual_seed(seed)
    config_cls, overrides = FAMILIES[family]
    config = config_cls(**{**TINY, **overrides}, attn_implementation="eager")
    model = CAUSAL_LM.get(family, transformers.AutoModelForCausalLM.from_config)(config)
    model = model.eval()
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@functools.cache
def checkpoint(family: str, tmp_root: str) -> str:
    path = os.path.join(tmp_root, family)
    tiny_hf_model(family).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("families"))
    return lambda family: checkpoint(family, root)


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def random_ids(shape, vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_hf(family, ckpts):
    path = ckpts(family)
    cfg, params = jlora.load_pretrained(path)
    assert type(cfg).family == family
    model = jlora.build_model(cfg)
    ids = random_ids((2, 3 * WINDOW + 5))  # longer than the window: local layers must drop old keys
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), ids)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, atol=1e-4 * scale, rtol=0)


def test_llama_reads_hidden_act_and_mlp_bias_like_hf(tmp_path):
    """LlamaForCausalLM honours config.json's hidden_act and mlp_bias; so must jlora's LLaMA."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        **TINY, num_hidden_layers=2, hidden_act="gelu_pytorch_tanh", mlp_bias=True, attn_implementation="eager"
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    cfg, params = jlora.load_pretrained(tmp_path)
    assert (cfg.hidden_act, cfg.mlp_bias) == ("gelu_pytorch_tanh", True)
    ids = random_ids((2, 12))
    ours = np.asarray(jax.jit(jlora.build_model(cfg).apply)({"params": params}, ids))
    ref = hf_logits(model, ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_past_the_window_equals_hf(family, ckpts):
    path = ckpts(family)
    cfg, params = jlora.load_pretrained(path)
    prompts = [random_ids((WINDOW + 3,), seed=1).tolist(), random_ids((5,), seed=2).tolist()]
    new = 2 * WINDOW  # decoding runs well past the window
    ours = generate(jlora.build_model(cfg), params, {}, prompts, max_new_tokens=new, eos_id=())
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    for prompt, got in zip(prompts, ours):
        with torch.inference_mode():
            out = hf.generate(torch.as_tensor([prompt]), max_new_tokens=new, do_sample=False)
        assert got == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_linear_lora_equals_peft_on_the_exported_files(family, ckpts, tmp_path):
    """A random LoRA on every linear layer, exported with `export_peft`, run by real `peft` on the HF
    model: the same logits as `jlora.apply`; importing the files back gives the same tree."""
    from peft import PeftModel
    from test_peft import random_adapter

    from jlora.formats.peft_adapter import export_peft, import_peft

    path = ckpts(family)
    cfg, params = jlora.load_pretrained(path)
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets="all-linear")
    frozen, trainable = random_adapter(params, lcfg, 3)
    ids = random_ids((2, 2 * WINDOW + 3), seed=4)
    ours = np.asarray(jax.jit(lambda f, t: jlora.apply(jlora.build_model(cfg), f, t, ids))(frozen, trainable))
    export_peft(tmp_path, trainable, lcfg, cfg)
    hf = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path), tmp_path)
    ref = hf_logits(hf.eval(), ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    _, back = import_peft(tmp_path, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(trainable)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)))


@pytest.mark.parametrize(
    "family", ["gemma3", *(pytest.param(f, marks=pytest.mark.slow) for f in ("gemma2", "mistral", "qwen2", "qwen3"))]
)
def test_sharded_train_step_equals_one_device(family, ckpts):
    """8 devices (data 2 x fsdp 2 x tensor 2), 2 micro-batches, rows longer than the window: the trainer's
    loss and gradients equal one value_and_grad of causal_lm_loss on one device (the mixed local/global
    stacks take their `lax.cond` under the mesh; Gemma 2's soft-capped logits take the chunked loss)."""
    import optax
    from test_train_api import FAST, assert_trees_close, gradients_from_update, sgd

    from jlora.parallel.sharding import make_mesh
    from jlora.train import step as T

    cfg, params = jlora.load_pretrained(ckpts(family))
    model = jlora.build_model(cfg)
    lcfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
    frozen, trainable = jlora.split(params, lcfg, jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), trainable)
    ids = random_ids((8, 3 * WINDOW + 1), seed=5).astype(np.int32)
    batch = T.full_batch({"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
    loss, grads = jax.jit(jax.value_and_grad(lambda t: jlora.causal_lm_loss(model, frozen, t, batch)))(trainable)
    mesh = make_mesh(2, 2, 2, devices=jax.devices()[:8])
    state = T.place_state(frozen, trainable, mesh, sgd())
    step = T.make_train_step(model, sgd(), state, FAST)
    new, _, metrics = step(
        state.frozen, state.trainable, state.opt_state, T.put_batch(jax.device_get(batch), mesh, 2), jax.random.key(0)
    )
    assert abs(float(metrics["loss"]) - float(loss)) < 1e-5 * max(1.0, float(loss))
    assert_trees_close(gradients_from_update(trainable, jax.device_get(new)), grads, atol=2e-6)
    assert float(optax.tree.norm(grads)) > 1e-3


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3"])
def test_llama_adapter_is_refused_in_one_line_where_attention_differs(family, ckpts):
    """LLaMA-Adapter's prompt attention is LLaMA's; families whose attention has q/k norms, soft-caps or
    another scale refuse it in one line (the train config path refuses before loading a train state)."""
    from jlora.peft.llama_adapter import AdapterConfig, AdapterConfigError, check_attention

    cfg, params = jlora.load_pretrained(ckpts(family))
    with pytest.raises(AdapterConfigError) as e:
        check_attention(cfg)
    assert "\n" not in str(e.value) and family in str(e.value) and "method: lora" in str(e.value)
    frozen, trainable = jlora.split(params, AdapterConfig(len=4, layers=1), jax.random.key(0))
    with pytest.raises(AdapterConfigError):
        jlora.apply(jlora.build_model(cfg), frozen, trainable, random_ids((1, 8)))


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_llama_adapter_runs_on_llama_style_attention(family, ckpts):
    """Mistral and Qwen2 attention is LLaMA's (plus a window or q/k/v biases): LLaMA-Adapter runs, and with
    a non-zero gate it changes the logits."""
    from jlora.peft.llama_adapter import AdapterConfig

    cfg, params = jlora.load_pretrained(ckpts(family))
    frozen, trainable = jlora.split(params, AdapterConfig(len=4, layers=1), jax.random.key(0))
    trainable = jax.tree.map(lambda x: x + 0.5, trainable)
    ids = random_ids((1, 8))
    model = jlora.build_model(cfg)
    base = np.asarray(model.apply({"params": params}, ids))
    adapted = np.asarray(jlora.apply(model, frozen, trainable, ids))
    assert np.isfinite(adapted).all() and np.abs(adapted - base).max() > 1e-3


def test_serving_engine_with_adapters_past_the_window_equals_offline(ckpts):
    """The serving engine on Gemma 3 (local layers keep a ring of window slots, global ones every slot) with
    two LoRA adapters and the base, prompts longer than the window, rows joining, leaving and shifted when
    the cache fills: every answer equals offline `generate`."""
    import queue

    from test_peft import random_adapter

    from jlora.infer.engine import Engine, Request
    from jlora.infer.generate import Generator
    from jlora.infer.lora_stack import AdapterStack

    cfg, params = jlora.load_pretrained(ckpts("gemma3"))
    model = jlora.build_model(cfg)
    adapters = {
        name: random_adapter(params, jlora.LoraConfig(rank=r, alpha=8, targets=t), seed)[1]
        for name, r, t, seed in (("qv", 4, ("q_proj", "v_proj"), 1), ("all", 8, "all-linear", 2))
    }
    stack = AdapterStack(cfg, 2, 8)
    for name, tree in adapters.items():
        stack.add(name, tree)
    jobs = [
        (random_ids((WINDOW + 2 * i,), seed=10 + i).tolist(), [None, "qv", "all"][i % 3], 2 * WINDOW) for i in range(4)
    ]
    want = [
        generate(model, params, adapters[a] if a else None, [p], max_new_tokens=n, eos_id=())[0] for p, a, n in jobs
    ]
    engine = Engine(Generator(model, params, stack=stack), max_batch=2, max_len=64, max_queue=8, eos=[])
    assert {s["self_attn"]["k"].shape[-1] for s in engine.cache.values()} == {WINDOW, 64}
    got, ends = [[] for _ in jobs], queue.Queue()
    for i, (p, a, n) in enumerate(jobs):
        engine.submit(Request(p, a, n, lambda new, fin, i=i: (got[i].extend(new), fin and ends.put(fin))))
    assert [ends.get(timeout=300) for _ in jobs] == ["length"] * len(jobs)
    assert got == want


GGUF_ARCH = {"mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3"}


def write_gguf_like_llama_cpp(path, model, family: str) -> str:
    """Write an HF model as llama.cpp's converter would, with names from gguf-py's own tensor-name map:
    F32 tensors, q/k rows permuted for LLaMA-style archs, Gemma norms stored as 1 + w, and the header keys
    llama.cpp reads (what it hard-codes, like Gemma's layer pattern, is not written)."""
    import gguf

    from jlora.models.layers import permute_rope_rows

    c, arch = model.config, GGUF_ARCH[family]
    # llama.cpp converts Mistral 7B with its LLaMA names; the header says "mistral" here to test that string
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH["LLAMA" if family == "mistral" else arch.upper()], c.num_hidden_layers
    )
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None):
            getattr(w, f"add_{key}")(getattr(c, key))
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, suffix = name.rsplit(".", 1)
        out, x = f"{names.get_name(stem)}.{suffix}", t.float().numpy()
        if family.startswith("gemma") and stem.endswith("norm"):
            x = x + 1
        if family == "mistral" and ".attn_q." in out:
            x = permute_rope_rows(x, c.num_attention_heads)
        elif family == "mistral" and ".attn_k." in out:
            x = permute_rope_rows(x, c.num_key_value_heads)
        w.add_tensor(out, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("family", sorted(GGUF_ARCH))
def test_gguf_bases_read_like_their_hf_models(family, tmp_path):
    """Each family's GGUF architecture string: a tiny HF model written as llama.cpp would, read back by
    `jlora.load_pretrained`: the same family, the same window layout, and HF's logits past the window.
    (llama.cpp has no key for Gemma's query_pre_attn_scalar or Qwen2's window: these use the defaults it
    assumes, head_dim and no window.)"""
    import gguf  # noqa: F401 - the writer

    config_cls, overrides = FAMILIES[family]
    overrides = {**overrides, "query_pre_attn_scalar": 16} if family.startswith("gemma") else dict(overrides)
    if family == "qwen2":
        overrides.update(use_sliding_window=False)
    torch.manual_seed(7)
    config = config_cls(**{**TINY, **overrides}, attn_implementation="eager")
    model = CAUSAL_LM.get(family, transformers.AutoModelForCausalLM.from_config)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(("norm" in name and not family.startswith("gemma")) + 0.1 * torch.randn_like(p))
    path = write_gguf_like_llama_cpp(tmp_path / f"{family}.gguf", model, family)
    cfg, params = jlora.load_pretrained(path)
    assert type(cfg).family == family
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    want = [window if t == "sliding_attention" else None for t in types] if types else [window] * len(cfg.layer_windows)
    assert list(cfg.layer_windows) == want
    ids = random_ids((2, 3 * WINDOW + 5))
    ours = np.asarray(jax.jit(jlora.build_model(cfg).apply)({"params": params}, ids))
    ref = hf_logits(model, ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_multimodal_gemma3_checkpoint_loads_its_text_model(tmp_path, capsys):
    """A Gemma3ForConditionalGeneration checkpoint (how Gemma 3 4B-27B ship): jlora reads its text model,
    says in one line that the vision tensors are skipped, and gives the multimodal model's logits on text."""
    config_cls, overrides = FAMILIES["gemma3"]
    text = config_cls(**{**TINY, **overrides})
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(3)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    cfg, params = jlora.load_pretrained(tmp_path)
    said = capsys.readouterr().out
    assert type(cfg).family == "gemma3" and "multimodal" in said and "vision tensors skipped" in said
    ids = random_ids((1, 2 * WINDOW + 3))
    ours = np.asarray(jax.jit(jlora.build_model(cfg).apply)({"params": params}, ids))
    ref = hf_logits(model, ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def byte_tokenizer_files(path) -> None:
    """A byte-level tokenizer.json (ids 0-255 = bytes) beside a tiny checkpoint, so the CLIs can run on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(b) if 32 < b < 127 else f"<0x{b:02X}>": b for b in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0x00>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # Gemma's ids: BOS 2, EOS 1
        f.write('{"bos_token": "<0x02>", "eos_token": "<0x01>"}')


def test_cli_train_int8_then_generate_and_export_on_gemma3(ckpts, tmp_path):
    """The console scripts on a Gemma 3 checkpoint: jlora-train with an int8 base on rows longer than the
    window, then jlora-generate with the adapter and jlora-export-peft, each exiting 0."""
    import shutil
    import subprocess

    from cli_testing import script

    model_dir = tmp_path / "gemma3"
    shutil.copytree(ckpts("gemma3"), model_dir)
    byte_tokenizer_files(model_dir)
    run_dir = tmp_path / "run"
    sets = {
        "model.path": model_dir,
        "model.quantize": "int8",
        "data.max_seq_len": 256,
        "train.steps": 3,
        "train.global_batch": 8,
        "train.eval_interval": 3,
        "checkpoint.interval": 0,
        "output_dir": run_dir,
    }
    args = [script("jlora-train"), "--config", "configs/tiny-cpu.yaml"]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (run_dir / "adapter").is_dir() and "final loss" in run.stdout
    gen = [script("jlora-generate"), "--model", str(model_dir), "--adapter", str(run_dir / "adapter")]
    run = subprocess.run(
        [*gen, "--prompt", "hello " * 8, "--max-new-tokens", "20"], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    export = [script("jlora-export-peft"), "--model", str(model_dir), "--adapter", str(run_dir / "adapter")]
    run = subprocess.run([*export, "--out", str(tmp_path / "peft")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_sharded_loading_reads_each_devices_slices_like_the_whole_load(family, ckpts):
    """`load_pretrained_sharded` on 8 devices (fsdp 4 x tensor 2), which reads only each device's slices of
    each tensor (per host on a pod), gives the arrays `load_pretrained` gives: q/k norms, biases and
    Gemma's four norms included."""
    from flax import traverse_util

    from jlora.formats.weights_on_device import load_pretrained_sharded
    from jlora.parallel.sharding import make_mesh

    path = ckpts(family)
    cfg, whole = jlora.load_pretrained(path)
    cfg2, sharded = load_pretrained_sharded(path, make_mesh(1, 4, 2, devices=jax.devices()[:8]))
    assert cfg2 == cfg
    flat, flat2 = traverse_util.flatten_dict(whole), traverse_util.flatten_dict(sharded)
    assert flat.keys() == flat2.keys()
    for key, x in flat.items():
        assert np.array_equal(np.asarray(x), np.asarray(flat2[key])), key
    assert any(len(x.sharding.device_set) > 1 for x in flat2.values())


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_scanned_kv_cache_decode_past_the_window_equals_the_full_forward(family, ckpts):
    """The public decode path on the scanned stack (`jlora.init_cache`, decode=True): a stack that mixes
    local and global layers reads each layer's kind as a traced flag, and masks the window by it. A prefill
    then one-token steps past the window give the full forward's logits."""
    cfg, params = jlora.load_pretrained(ckpts(family))
    model = jlora.build_model(cfg)
    ids = random_ids((2, 3 * WINDOW), seed=6).astype(np.int32)
    full = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    step = jax.jit(
        lambda p, cache, x, pos: model.apply({"params": p, "cache": cache}, x, pos, decode=True, mutable=["cache"])
    )
    cache = jlora.init_cache(cfg, 2, ids.shape[1])
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    prompt = WINDOW - 3
    logits, new = step(params, cache, ids[:, :prompt], pos[:, :prompt])
    chunks = [np.asarray(logits)]
    for i in range(prompt, ids.shape[1]):
        logits, new = step(params, new["cache"], ids[:, i : i + 1], pos[:, i : i + 1])
        chunks.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=1e-4 * np.abs(full).max(), rtol=0)
