"""The real Gemma 3 270M (base, Q4_K_M GGUF from its chunk wheels) against HF transformers reading the
same file: logits over text longer than the 512-token sliding window, greedy generation, and the same
model with the GGUF's own blocks kept packed (quantize="gguf")."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers

import jlora
from jlora.formats.tokenizer import load_tokenizer
from jlora.infer.generate import generate

pytestmark = pytest.mark.slow

TEXT = (
    "Gemma is a family of lightweight open models. In 1969 the first crewed landing on the Moon took place; "
    "the Apollo 11 crew returned on July 24. def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "Die Hauptstadt von Deutschland ist Berlin. 東京は日本の首都です。 La ville de Lyon compte 522 000 habitants. "
)


@pytest.fixture(scope="module")
def hf_gemma3(gemma3_gguf):
    path = pathlib.Path(gemma3_gguf)
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def jlora_gemma3(gemma3_gguf):
    cfg, params = jlora.load_pretrained(gemma3_gguf)
    return cfg, params, load_tokenizer(gemma3_gguf)


def long_ids(tok, n: int = 600) -> np.ndarray:
    ids = tok.encode(TEXT * 12)
    assert len(ids) >= n
    return np.asarray([ids[:n]])


def test_logits_equal_hf_past_the_window(hf_gemma3, jlora_gemma3):
    cfg, params, tok = jlora_gemma3
    assert cfg.sliding_window == 512 and cfg.layer_windows[:6] == (512,) * 5 + (None,)
    ids = long_ids(tok)
    ours = np.asarray(jax.jit(jlora.build_model(cfg).apply)({"params": params}, ids))[0]
    with torch.inference_mode():
        ref = hf_gemma3(torch.as_tensor(ids)).logits[0].float().numpy()
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max(axis=-1)  # per position
    assert err.max() <= 2e-3 * scale, (err.max() / scale, int(err.argmax()))
    assert (ours[520:].argmax(-1) == ref[520:].argmax(-1)).mean() > 0.99  # past the window too


def test_greedy_tokens_equal_hf(hf_gemma3, jlora_gemma3):
    cfg, params, tok = jlora_gemma3
    prompt = tok.encode("The three primary colors are")
    ours = generate(jlora.build_model(cfg), params, {}, [prompt], max_new_tokens=24, eos_id=())[0]
    with torch.inference_mode():
        out = hf_gemma3.generate(torch.as_tensor([prompt]), max_new_tokens=24, do_sample=False)
    assert ours == out[0, len(prompt) :].tolist(), (tok.decode(ours), tok.decode(out[0, len(prompt) :].tolist()))


def test_packed_gguf_blocks_equal_the_dequantized_model(gemma3_gguf, jlora_gemma3):
    """quantize="gguf" keeps the file's Q5_0 / Q4_K / Q6_K / Q8_0 blocks (mixed across layers too) and
    decodes them at the matmul: the logits are the dequantized model's, and the frozen bytes ~1/4 of fp32."""
    cfg, params, tok = jlora_gemma3
    cfg_q, packed = jlora.load_pretrained(gemma3_gguf, quantize="gguf")
    dense_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    packed_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(packed))
    assert packed_bytes < 0.35 * dense_bytes, (packed_bytes, dense_bytes)
    ids = long_ids(tok, 64)
    model = jlora.build_model(cfg)
    ref = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    ours = np.asarray(jax.jit(lambda f: jlora.apply(model, f, {}, ids))(packed))
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_qlora_steps_on_the_gguf_blocks_leave_them_bit_identical(gemma3_gguf, jlora_gemma3):
    """Two LoRA steps on the base kept as the file's own Q5_0 / Q4_K / Q6_K / Q8_0 blocks (some params mixing
    types across layers): the adapters move, every packed field stays bit-identical."""
    import optax

    from jlora.parallel.sharding import make_mesh
    from jlora.train import step as T

    _, _, tok = jlora_gemma3
    cfg, packed = jlora.load_pretrained(gemma3_gguf, quantize="gguf")
    lcfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
    frozen, trainable = jlora.split(packed, lcfg, jax.random.key(0))
    before = [np.asarray(x).copy() for x in jax.tree.leaves(frozen)]
    opt = optax.adam(1e-2)
    state = T.place_state(frozen, trainable, make_mesh(1, 1, 1, devices=jax.devices()[:1]), opt)
    step = T.make_train_step(jlora.build_model(cfg), opt, state)
    ids = long_ids(tok, 65)
    batch = T.full_batch({"input_ids": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32)})
    fr, tr, os_ = state.frozen, state.trainable, state.opt_state
    losses = []
    for i in range(2):
        tr, os_, metrics = step(fr, tr, os_, T.put_batch(jax.device_get(batch), state.mesh, 1), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(fr)))
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(tr))
    ]
    assert min(moved) > 0
