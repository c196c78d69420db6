"""GGUF LoRA adapter export (jlora.formats.gguf_adapter, jlora-export-gguf): the file as gguf reads it back (every
family's arch and q/k row order), the refusals, and llama.cpp itself (llama-cpp-python) running the exported
adapter on the SmolLM2 and Gemma 3 270M GGUFs."""

import dataclasses
import subprocess

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_testing import one_line_error, script
from flax import traverse_util
from lora_testing import is_pair, randomize

import jlora
import jlora.formats.gguf_adapter as gguf_adapter
from jlora.checkpoint.adapter import save_adapter
from jlora.formats.gguf_adapter import GGUFAdapterError, export_gguf_adapter
from jlora.models import tables
from jlora.models.family import family_of
from jlora.models.layers import permute_rope_rows as permute_rows
from jlora.models.layers import unpermute_rope_rows as _unpermute

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _read(path):
    reader = gguf.GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return meta, {t.name: np.asarray(t.data) for t in reader.tensors}


def test_permute_rows_is_the_inverse_of_the_loaders_unpermute():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of head_dim 8, 3 columns
    assert not np.array_equal(permute_rows(w, 4), w)
    np.testing.assert_array_equal(_unpermute(permute_rows(w, 4), 4), w)


def test_file_reads_back_with_llama_cpp_names_shapes_metadata_and_deltas(tmp_path):
    cfg = jlora.PRESETS["tiny"]  # untied: embed_tokens and lm_head are separate tensors
    params = jlora.init_params(cfg, jax.random.key(0))
    lcfg = jlora.LoraConfig(
        rank=4,
        alpha=8,
        targets=(*ALL, "lm_head", "embed_tokens"),
        use_rslora=True,
        rank_pattern={"up_proj": 2},
        alpha_pattern={"v_proj": 3.0},
        layers=(1,),
    )
    _, trainable = jlora.split(params, lcfg, jax.random.key(1))
    trainable = randomize(trainable)
    export_gguf_adapter(tmp_path / "a.gguf", trainable, lcfg, cfg, base_name="tiny-base")
    meta, tensors = _read(tmp_path / "a.gguf")
    assert meta == {
        "general.architecture": "llama",
        "general.type": "adapter",
        "general.name": "tiny-base",
        "adapter.type": "lora",
        "adapter.lora.alpha": 8.0,
    }
    layer1 = [f"blk.1.{n}.weight" for n in GGUF_NAMES]  # layers=(1,): layer 0 is left out, as llama.cpp allows
    assert set(tensors) == {f"{n}.lora_{ab}" for n in [*layer1, "token_embd.weight", "output.weight"] for ab in "ab"}
    assert not list(tmp_path.glob(".*partial*"))

    # llama.cpp's reading (ggml ne reversed -> numpy): lora_a [R, in], lora_b [out, R] with scale alpha/R,
    # token_embd's lora_a [V, R] looked up by row. Every delta must be jlora's s * (A @ B), in disk layout.
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: is_pair(x))
    hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    want_shapes = {
        "attn_q": (heads * hd, 64),
        "attn_k": (kv * hd, 64),
        "attn_v": (kv * hd, 64),
        "attn_output": (64, heads * hd),
        "ffn_gate": (128, 64),
        "ffn_up": (128, 64),
        "ffn_down": (64, 128),
    }
    for hf, name in zip(ALL, GGUF_NAMES):
        pair = flat[("layers", "self_attn" if name.startswith("attn") else "mlp", hf, "kernel")]
        a, b = tensors[f"blk.1.{name}.weight.lora_a"], tensors[f"blk.1.{name}.weight.lora_b"]
        r = pair.rank
        assert (a.shape, b.shape, a.dtype) == ((r, want_shapes[name][1]), (want_shapes[name][0], r), np.float32)
        got = 8.0 / r * b @ a  # [out, in]
        if name in ("attn_q", "attn_k"):
            got = _unpermute(got, heads if name == "attn_q" else kv)
        want = pair.scale[1] * (np.asarray(pair.a[1]) @ np.asarray(pair.b[1])).T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, path, rows in (("token_embd", ("embed_tokens", "embedding"), 512), ("output", ("lm_head", "kernel"), 64)):
        pair, r = flat[path], flat[path].rank
        a, b = tensors[f"{name}.weight.lora_a"], tensors[f"{name}.weight.lora_b"]
        want = pair.scale * np.asarray(pair.a) @ np.asarray(pair.b)  # [V, D] (embed) or [D, V] (head kernel)
        if name == "token_embd":
            assert (a.shape, b.shape) == ((512, r), (64, r))
            np.testing.assert_allclose(8.0 / r * a @ b.T, want, rtol=1e-5, atol=1e-6)
        else:
            assert (a.shape, b.shape) == ((r, rows), (512, r))
            np.testing.assert_allclose(8.0 / r * b @ a, want.T, rtol=1e-5, atol=1e-6)


# llama.cpp's arch for each family (its converter writes MistralForCausalLM as llama) and whether it permutes q/k rows
FAMILY_ARCH = {
    "tiny": ("llama", True),
    "mistral-tiny": ("llama", True),
    "qwen2-tiny": ("qwen2", False),
    "qwen3-tiny": ("qwen3", False),
    "gemma2-tiny": ("gemma2", False),
    "gemma3-tiny": ("gemma3", False),
}


@pytest.mark.parametrize("preset", sorted(FAMILY_ARCH))
def test_each_family_exports_under_llama_cpps_arch_and_row_order(preset, tmp_path):
    """llama.cpp refuses an adapter whose arch is not its base's, and only its LLaMA converter permutes q/k rows:
    a Qwen or Gemma adapter written with LLaMA's permutation loads fine and computes the wrong q/k."""
    cfg = jlora.PRESETS[preset]
    arch, permuted = FAMILY_ARCH[preset]
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=ALL)
    _, trainable = jlora.split(jlora.init_params(cfg, jax.random.key(0)), lcfg, jax.random.key(1))
    trainable = randomize(trainable)
    export_gguf_adapter(tmp_path / "a.gguf", trainable, lcfg, cfg)
    meta, tensors = _read(tmp_path / "a.gguf")
    assert meta["general.architecture"] == arch and meta["general.type"] == "adapter"
    layers = range(cfg.num_hidden_layers)
    assert set(tensors) == {f"blk.{i}.{n}.weight.lora_{ab}" for i in layers for n in GGUF_NAMES for ab in "ab"}
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: is_pair(x))
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for hf, name in zip(ALL, GGUF_NAMES):
        pair = flat[("layers", "self_attn" if name.startswith("attn") else "mlp", hf, "kernel")]
        for i in range(cfg.num_hidden_layers):
            a, b = tensors[f"blk.{i}.{name}.weight.lora_a"], tensors[f"blk.{i}.{name}.weight.lora_b"]
            want = pair.scale[i] * (np.asarray(pair.a[i]) @ np.asarray(pair.b[i])).T  # [out, in] in HF row order
            if permuted and name in heads:
                want = permute_rows(want, heads[name])
            np.testing.assert_allclose(8.0 / pair.rank * b @ a, want, rtol=1e-5, atol=1e-6, err_msg=f"{name} {i}")


def test_a_family_llama_cpp_has_no_arch_for_is_one_line(tmp_path, monkeypatch):
    cfg = jlora.PRESETS["qwen2-tiny"]
    monkeypatch.setitem(gguf_adapter.LLAMA_CPP_ARCH, "qwen2", "qwen2-nope")
    lcfg = jlora.LoraConfig(targets=("q_proj",))
    _, trainable = jlora.split(jlora.init_params(cfg, jax.random.key(0)), lcfg, jax.random.key(1))
    with pytest.raises(GGUFAdapterError, match="family qwen2: llama.cpp has no GGUF architecture") as e:
        export_gguf_adapter(tmp_path / "x.gguf", trainable, lcfg, cfg)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_refuses_what_llama_cpp_cannot_run(tmp_path):
    cfg = jlora.PRESETS["tiny"]
    params = jlora.init_params(cfg, jax.random.key(0))
    cases = {
        "DoRA": (jlora.LoraConfig(targets=("q_proj",), use_dora=True), cfg),
        "train_extra": (jlora.LoraConfig(targets=("q_proj",), train_extra="norm"), cfg),
        # exported anyway, llama-cpp-python 0.3.36 aborts the process on SmolLM2: GGML_ASSERT(ggml_can_mul_mat)
        "ties its output head": (jlora.LoraConfig(targets=("embed_tokens",)), cfg.replace(tie_word_embeddings=True)),
    }
    for needle, (lcfg, base) in cases.items():
        _, trainable = jlora.split(params, lcfg, jax.random.key(1))
        with pytest.raises(GGUFAdapterError, match=needle) as e:
            export_gguf_adapter(tmp_path / "x.gguf", trainable, lcfg, base)
        assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_cli_one_line_errors(tmp_path):
    from lora_testing import save_tiny_hf_llama

    model = save_tiny_hf_llama(tmp_path / "base")
    cfg, params = jlora.load_pretrained(model)
    run = lambda adapter, out, *extra: subprocess.run(
        [script("jlora-export-gguf"), "--model", str(model), "--adapter", str(adapter), "--out", str(out), *extra],
        capture_output=True,
        text=True,
    )
    dora = jlora.LoraConfig(targets=("q_proj", "v_proj"), use_dora=True)
    save_adapter(tmp_path / "dora", jlora.split(params, dora, jax.random.key(0))[1], dora, base=cfg, params=params)
    one_line_error(run(tmp_path / "dora", tmp_path / "d.gguf"), "DoRA", "jlora-merge", prog="jlora-export-gguf")
    assert not (tmp_path / "d.gguf").exists()

    lcfg = jlora.LoraConfig(targets=ALL)
    save_adapter(tmp_path / "ok", jlora.split(params, lcfg, jax.random.key(0))[1], lcfg, base=cfg, params=params)
    one_line_error(
        run(tmp_path / "ok", model / "model.safetensors", "--force"),
        "lies inside the --model",
        prog="jlora-export-gguf",
    )
    one_line_error(run(tmp_path / "ok", tmp_path / "ok"), "is a directory", prog="jlora-export-gguf")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "a.gguf").write_text("keep me")
    one_line_error(run(tmp_path / "ok", tmp_path / "ro" / "a.gguf"), "exists", "--force", prog="jlora-export-gguf")
    assert (tmp_path / "ro" / "a.gguf").read_text() == "keep me"
    done = run(tmp_path / "ok", tmp_path / "ro" / "a.gguf", "--force")
    assert done.returncode == 0, done.stderr
    assert _read(tmp_path / "ro" / "a.gguf")[0]["general.type"] == "adapter"


# --------------------------------------------------------------------------- llama.cpp itself


def _memorise(model, frozen, trainable, prompt, target, steps: int):
    """A few Adam steps on one sequence: the adapter then says `target` after `prompt`, confidently."""
    ids = jnp.asarray([prompt + target])  # [1, T]

    def loss_fn(tr, frozen):
        logits = jlora.apply(model, frozen, tr, ids[:, :-1])  # [1, T-1, V]
        logp = jax.nn.log_softmax(logits[:, len(prompt) - 1 :], -1)
        return -jnp.take_along_axis(logp, ids[:, len(prompt) :, None], -1).mean()

    opt = optax.adam(3e-3)

    @jax.jit
    def step(tr, state, frozen):  # frozen is an argument: closed over, XLA would constant-fold the 135M weights
        loss, grads = jax.value_and_grad(loss_fn)(tr, frozen)
        updates, state = opt.update(grads, state, tr)
        return optax.apply_updates(tr, updates), state, loss

    state = opt.init(trainable)
    for _ in range(steps):
        trainable, state, loss = step(trainable, state, frozen)
    return trainable, float(loss)


def _llama_cpp(model_path: str, ids: list[int], prompt: list[int], n: int, lora_path=None):
    """(logits [T, V] over `ids`, greedy new tokens after `prompt`) from llama.cpp, with or without an adapter."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=model_path, lora_path=lora_path, n_ctx=128, n_threads=2, seed=0, logits_all=True, verbose=False
    )
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])  # [T, V]
    greedy = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        greedy.append(int(token))
        if len(greedy) == n:
            break
    return logits, greedy


@pytest.mark.slow
def test_llama_cpp_runs_the_exported_adapter_as_jlora_does(smollm2_gguf, tmp_path):
    cfg, params = jlora.load_pretrained(smollm2_gguf)  # the Q4_1 GGUF, dequantized to fp32
    tok = jlora.load_tokenizer(smollm2_gguf)
    model = jlora.Llama(cfg)
    prompt = tok.encode("The secret password is")
    target = tok.encode(" purple elephant dances under seven silver moons tonight, said Bob")
    # rsLoRA (scale alpha/sqrt r, which llama.cpp's alpha/r cannot say) and a left-out layer 0: the export
    # folds the scales into B and omits layer 0; q/k carry the rope permutation.
    lcfg = jlora.LoraConfig(
        rank=8,
        alpha=16,
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        use_rslora=True,
        layers=tuple(range(1, cfg.num_hidden_layers)),
    )
    frozen, trainable = jlora.split(params, lcfg, jax.random.key(0))
    trainable, loss = _memorise(model, frozen, trainable, prompt, target, steps=12)
    n = len(target)
    ours = jlora.generate(model, frozen, trainable, [prompt], max_new_tokens=n, eos_id=())[0]
    ours_base = jlora.generate(model, frozen, None, [prompt], max_new_tokens=n, eos_id=())[0]
    assert ours == target, (loss, tok.decode(ours))

    adapter = tmp_path / "adapter"
    save_adapter(adapter, trainable, lcfg, base=cfg, params=params)
    out = tmp_path / "smollm2-lora.gguf"
    done = subprocess.run(
        [script("jlora-export-gguf"), "--model", "smollm2-135m", "--adapter", str(adapter), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ids = prompt + target
    theirs_logits, theirs = _llama_cpp(smollm2_gguf, ids, prompt, n, lora_path=str(out))
    base_logits, theirs_base = _llama_cpp(smollm2_gguf, ids, prompt, n)
    print(
        f"jlora base: {tok.decode(ours_base)!r}\nllama.cpp base: {tok.decode(theirs_base)!r}\n"
        f"jlora+adapter: {tok.decode(ours)!r}\nllama.cpp+adapter: {tok.decode(theirs)!r}"
    )
    assert theirs_base != target and ours_base != target  # the adapter is what says the target
    assert theirs == ours, (tok.decode(theirs), tok.decode(ours))

    # Greedy alone survives a wrong q/k permutation (v/o carry most of this adapter). The logits do not:
    # llama.cpp's Q4_1 matmuls (quantized activations) put its logits within ~1.1 of jlora's fp32 on the
    # base and ~1.6 with the adapter, 3% of the adapter's change; unpermuted q/k rows give 12.7 and 14%.
    ours_logits = np.asarray(jlora.apply(model, frozen, trainable, jnp.asarray([ids]))[0])  # [T, V]
    ours_base_logits = np.asarray(model.apply({"params": params}, jnp.asarray([ids]))[0])
    change, their_change = ours_logits - ours_base_logits, theirs_logits - base_logits
    rel = np.linalg.norm(their_change - change) / np.linalg.norm(change)
    worst = np.abs(theirs_logits - ours_logits).max()
    print(f"adapter logits: max |llama.cpp - jlora| {worst:.2f}, relative error of the adapter's change {rel:.3f}")
    assert worst < 4.0 and rel < 0.07, (worst, rel)


def _llama_cpp_logits(model_path: str, ids: list[int], lora_path=None) -> np.ndarray:
    """llama.cpp's logits [T, V] over `ids` (every position's next-token logits), with or without an adapter."""
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, lora_path=lora_path, n_ctx=32, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.slow
def test_llama_cpp_runs_an_exported_gemma3_adapter_as_jlora_does(gemma3_gguf, tmp_path, monkeypatch):
    """A random LoRA on every linear layer of the real Gemma 3 270M (Q4_K_M), exported, changes llama.cpp's
    logits as it changes jlora's. The two bases differ by llama.cpp's quantized matmuls (it rounds activations
    to 8 bits for Q4_K/Q6_K blocks; jlora decodes the blocks to fp32): that base gap G is the noise floor. An
    exact export leaves (llama.cpp's change) - (jlora's change) = (its adapted error) - (its base error), about
    G in size each (measured 1.7 G, with an adapted gap 1.4 G), so the bound is 3 G; the adapter moves the
    logits 14 G. The same adapter with LLaMA's q/k row permutation, a 10% scale error, a dropped rsLoRA fold,
    gate/up swapped or q left out measured 7-15 G; the permuted export is checked below as the control."""
    cfg, params = jlora.load_pretrained(gemma3_gguf)  # Q4_K_M blocks dequantized to fp32
    assert type(cfg).family == "gemma3" and cfg.tie_word_embeddings
    model = jlora.build_model(cfg)
    ids = jlora.load_tokenizer(gemma3_gguf).encode("The three primary colors are")  # BOS first
    assert ids[0] == cfg.bos_token_id
    # rsLoRA (alpha/sqrt r, which llama.cpp's alpha/r cannot say): the export folds 2^1.5 into every B
    lcfg = jlora.LoraConfig(rank=8, alpha=16, targets=ALL, use_rslora=True)
    frozen, trainable = jlora.split(params, lcfg, jax.random.key(0))
    trainable = randomize(trainable, seed=0, std=0.02)  # big enough to move the logits, small enough not to scramble
    zero = jax.tree.map(lambda p: p.replace(b=jnp.zeros_like(p.b)), trainable, is_leaf=is_pair)  # B = 0: the base
    # one compile for both; frozen is an argument: closed over, XLA would constant-fold the 270M weights
    forward = jax.jit(lambda fr, tr, ids: jlora.apply(model, fr, tr, ids)[0])
    ours_base, ours = (np.asarray(forward(frozen, tr, jnp.asarray([ids]))) for tr in (zero, trainable))  # [T, V]

    out = tmp_path / "gemma3-lora.gguf"
    export_gguf_adapter(out, trainable, lcfg, cfg)
    meta, tensors = _read(out)
    assert meta["general.architecture"] == "gemma3" and len(tensors) == 2 * len(ALL) * cfg.num_hidden_layers
    theirs_base = _llama_cpp_logits(gemma3_gguf, ids)
    theirs = _llama_cpp_logits(gemma3_gguf, ids, lora_path=str(out))

    norm = np.linalg.norm
    gap = norm(theirs_base - ours_base)  # llama.cpp's quantization noise on this prompt
    change = norm(ours - ours_base)
    err = norm((theirs - theirs_base) - (ours - ours_base))
    top = lambda x: np.argsort(-x, -1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top(ours), top(theirs))])
    print(
        f"base gap {gap:.1f} (max {np.abs(theirs_base - ours_base).max():.2f}); "
        f"adapter change {change / gap:.1f} gaps; change error {err / gap:.2f} gaps ({err / change:.3f} of the "
        f"change); adapted gap {norm(theirs - ours) / gap:.2f} gaps; top-10 overlap {overlap:.2f}"
    )
    assert (theirs_base.argmax(-1) == ours_base.argmax(-1)).all()  # the bases agree before any adapter
    assert change > 10 * gap, (change, gap)  # the adapter moves the logits far past the noise
    assert err < 3 * gap, (err, gap)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all() and overlap >= 0.8, (theirs.argmax(-1), ours.argmax(-1))
    assert (theirs.argmax(-1) != theirs_base.argmax(-1)).any()  # and what agrees is the adapter's

    # the control: Gemma's converter keeps HF's q/k rows, so LLaMA's permutation must show above the bound
    llama_rows = dataclasses.replace(family_of(cfg), gguf_rope_heads=tables.llamacpp_rope_heads)
    monkeypatch.setattr(gguf_adapter, "family_of", lambda cfg: llama_rows)
    export_gguf_adapter(tmp_path / "permuted.gguf", trainable, lcfg, cfg)
    wrong = _llama_cpp_logits(gemma3_gguf, ids, lora_path=str(tmp_path / "permuted.gguf"))
    wrong_err = norm((wrong - theirs_base) - (ours - ours_base))
    print(f"with LLaMA's q/k permutation: change error {wrong_err / gap:.2f} gaps")
    assert wrong_err > 3 * gap, (wrong_err, gap)
