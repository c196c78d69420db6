"""HF PEFT interop and merge, checked against the real `peft` and `transformers` on a tiny LlamaForCausalLM."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from lora_testing import save_tiny_hf_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

import jlora
from jlora.checkpoint.adapter import save_adapter
from jlora.cli.adapters import export_main, merge_main
from jlora.formats.peft_adapter import PeftError, export_peft, import_peft
from jlora.formats.weights import read_pretrained

IDS = np.random.RandomState(0).randint(0, 128, (2, 9))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = save_tiny_hf_llama(tmp_path_factory.mktemp("base"))
    cfg, params = read_pretrained(path)
    model = jlora.Llama(cfg)
    logits = jax.jit(lambda fr, tr: jlora.apply(model, fr, tr, jnp.asarray(IDS)))
    return path, cfg, params, logits


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits.numpy()


def random_adapter(params, lcfg, seed: int):
    """(frozen, trainable) shaped by `jlora.split`, filled with random A, B, magnitudes and extras.

    Shapes come from eval_shape (cheap); values from numpy, so every part of the adapter shows in
    the logits. Inactive layers (scale 0) keep zero A/B and DoRA magnitude |W|, as split leaves them.
    """
    from flax import traverse_util

    shapes = jax.eval_shape(lambda p: jlora.split(p, lcfg, jax.random.key(0))[1], params)
    flat_params, rs = traverse_util.flatten_dict(params), np.random.RandomState(seed)
    noise = lambda s: 0.1 * rs.standard_normal(s.shape).astype(np.float32)
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes, is_leaf=lambda _, x: isinstance(x, jlora.LoraPair)).items():
        if not isinstance(leaf, jlora.LoraPair):
            out[path] = jnp.asarray(np.asarray(flat_params[path]) + noise(leaf))
            continue
        on = leaf.scale_array() != 0
        mask = lambda x: x * on.reshape(on.shape + (1,) * (x.ndim - on.ndim))
        a, b, mag = mask(noise(leaf.a)), mask(noise(leaf.b)), None
        if leaf.magnitude is not None:
            mag = np.linalg.norm(np.asarray(flat_params[path], np.float32), axis=-2) + mask(noise(leaf.magnitude))
        out[path] = leaf.replace(
            a=jnp.asarray(a), b=jnp.asarray(b), magnitude=None if mag is None else jnp.asarray(mag)
        )
    frozen = {k: v for k, v in flat_params.items() if not (k in out and not isinstance(out[k], jlora.LoraPair))}
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(out)


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_export_loads_in_peft(base, tmp_path):
    path, cfg, params, logits = base
    lcfg = jlora.LoraConfig(
        rank=4,
        alpha=8,
        targets=("q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"),
        rank_pattern=(("v_proj", 2),),
        alpha_pattern=(("layers.1.self_attn.q_proj", 3.0),),
        use_rslora=True,
        train_extra="norm",
    )
    frozen, trainable = random_adapter(params, lcfg, 2)
    export_peft(tmp_path, trainable, lcfg, cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["use_rslora"]
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["rank_pattern"] == {"v_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.1.self_attn.q_proj": 3}
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 2)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert keys["base_model.model.lm_head.lora_B.weight"].shape == (128, 4)

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), tmp_path)
    want = np.asarray(logits(frozen, trainable))
    np.testing.assert_allclose(_hf_logits(peft_model), want, atol=1e-5, rtol=0)

    lcfg2, trainable2 = import_peft(tmp_path, cfg)  # every layer active: the tree comes back exactly
    assert jax.tree.structure(trainable2) == jax.tree.structure(trainable) and _leaves_equal(trainable2, trainable)
    rebuilt = jax.eval_shape(lambda p: jlora.split(p, lcfg2, jax.random.key(0))[1], params)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(trainable)


def test_export_dora_layer_subset(base, tmp_path):
    path, cfg, params, logits = base
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "o_proj", "gate_proj"), use_dora=True, layers=(1,))
    frozen, trainable = random_adapter(params, lcfg, 3)  # layer 0: zero A/B, magnitude |W|
    export_peft(tmp_path, trainable, lcfg, cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] and config["layers_to_transform"] == [1]
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_magnitude_vector" in load_file(
        tmp_path / "adapter_model.safetensors"
    )
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), tmp_path)
    np.testing.assert_allclose(_hf_logits(peft_model), np.asarray(logits(frozen, trainable)), atol=1e-5, rtol=0)

    with pytest.raises(PeftError, match="needs the base params"):
        import_peft(tmp_path, cfg)
    lcfg2, trainable2 = import_peft(tmp_path, cfg, params)
    assert lcfg2.layers == (1,) and lcfg2.use_dora
    np.testing.assert_allclose(
        np.asarray(logits(frozen, trainable2)), np.asarray(logits(frozen, trainable)), atol=1e-5, rtol=0
    )

    # onto a QLoRA base: a skipped layer's magnitude is |W| of the kernel as it is used, dequantized
    packed = jlora.quantize(frozen, "int8")
    _, trainable3 = import_peft(tmp_path, cfg, packed)
    q = trainable3["layers"]["self_attn"]["q_proj"]["kernel"]
    used = np.asarray(jlora.dequantize(packed["layers"]["self_attn"]["q_proj"]["kernel"], jnp.float32))[0]
    np.testing.assert_allclose(np.asarray(q.magnitude)[0], np.linalg.norm(used, axis=0), rtol=1e-6)


def test_import_peft_made_adapter(base, tmp_path):
    path, cfg, params, logits = base
    torch.manual_seed(1)
    pcfg = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "up_proj": 3},
        alpha_pattern={"k_proj": 5, "model.layers.0.mlp.down_proj": 2},
        use_rslora=True,
        use_dora=True,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(path), pcfg)
    with torch.no_grad():  # random A, B and magnitudes
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    want = _hf_logits(peft_model)
    peft_model.save_pretrained(tmp_path)

    lcfg, trainable = import_peft(tmp_path, cfg)
    assert lcfg.use_rslora and lcfg.use_dora and set(lcfg.targets) == {"q_proj", "k_proj", "up_proj", "down_proj"}
    assert trainable["layers"]["self_attn"]["q_proj"]["kernel"].rank == 4  # layer 1's rank 2 is zero-padded
    np.testing.assert_allclose(np.asarray(logits(params, trainable)), want, atol=1e-5, rtol=0)


def test_cli_export_and_merge(base, tmp_path):
    path, cfg, params, logits = base
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets="all-linear", train_extra="^norm")
    frozen, trainable = random_adapter(params, lcfg, 5)
    want = np.asarray(logits(frozen, trainable))
    save_adapter(tmp_path / "adapter", trainable, lcfg, base=cfg, params=params)
    export_peft(tmp_path / "peft", trainable, lcfg, cfg)
    assert (
        export_main(["--model", str(path), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "cli")]) == 0
    )
    assert _leaves_equal(import_peft(tmp_path / "cli", cfg)[1], trainable)
    for src in ("adapter", "peft"):  # a jlora adapter dir and a PEFT dir both merge
        assert (
            merge_main(["--model", str(path), "--adapter", str(tmp_path / src), "--out", str(tmp_path / f"m-{src}")])
            == 0
        )
        merged = LlamaForCausalLM.from_pretrained(tmp_path / f"m-{src}")
        np.testing.assert_allclose(_hf_logits(merged), want, atol=1e-5, rtol=0)


def test_export_warns_about_what_vllm_refuses(base, tmp_path, capsys):
    """DoRA and modules_to_save load in PEFT but not in vLLM: jlora-export-peft says so, one line each."""
    path, cfg, params, _ = base
    cases = {
        "dora": (jlora.LoraConfig(rank=4, alpha=8, use_dora=True), ["use_dora"]),
        "extra": (jlora.LoraConfig(rank=4, alpha=8, train_extra="^norm"), ["modules_to_save"]),
        "both": (
            jlora.LoraConfig(rank=4, alpha=8, use_dora=True, train_extra="^norm"),
            ["use_dora", "modules_to_save"],
        ),
        "plain": (jlora.LoraConfig(rank=4, alpha=8), []),
    }
    for name, (lcfg, keys) in cases.items():
        _, trainable = random_adapter(params, lcfg, 7)
        save_adapter(tmp_path / name, trainable, lcfg, base=cfg, params=params)
        capsys.readouterr()
        assert (
            export_main(
                ["--model", str(path), "--adapter", str(tmp_path / name), "--out", str(tmp_path / f"peft-{name}")]
            )
            == 0
        )
        warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
        assert len(warnings) == len(keys), (name, warnings)
        for key, line in zip(keys, warnings):
            assert key in line and "vLLM" in line, line


# --------------------------------------------------------------------------- bad input: one-line errors


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    path, cfg, params, _ = base
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    _, trainable = random_adapter(params, lcfg, 1)
    out = tmp_path_factory.mktemp("peft")
    export_peft(out, trainable, lcfg, cfg)
    return out


def _copy(src, dst, edit_tensors=None, edit_config=None):
    tensors = load_file(src / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    dst.mkdir(exist_ok=True)
    save_file(tensors, dst / "adapter_model.safetensors")
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_and_extra_keys(base, peft_dir, tmp_path):
    cfg = base[1]
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    bad = _copy(peft_dir, tmp_path / "missing", edit_tensors=lambda t: t.pop(gone))
    _one_line_error(lambda: import_peft(bad, cfg), "layers.1.self_attn.v_proj has lora_A but not lora_B")
    bad = _copy(
        peft_dir, tmp_path / "absent", edit_tensors=lambda t: [t.pop(k) for k in list(t) if ".1.self_attn.v" in k]
    )
    _one_line_error(lambda: import_peft(bad, cfg), r"missing base_model.model.model.layers.1.self_attn.v_proj")
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    bad = _copy(peft_dir, tmp_path / "extra", edit_tensors=lambda t: t.update({extra: np.zeros((4, 64), np.float32)}))
    _one_line_error(lambda: import_peft(bad, cfg), r"unexpected base_model.model.model.layers.0.mlp.up_proj")
    bad = _copy(peft_dir, tmp_path / "junk", edit_tensors=lambda t: t.update({"foo.bar": np.zeros(3, np.float32)}))
    _one_line_error(lambda: import_peft(bad, cfg), "unexpected key foo.bar")


def test_shape_and_type_errors(base, peft_dir, tmp_path):
    cfg = base[1]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = _copy(peft_dir, tmp_path / "shape", edit_tensors=lambda t: t.update({key: np.zeros((4, 65), np.float32)}))
    _one_line_error(lambda: import_peft(bad, cfg), r"q_proj.lora_A has shape \(4, 65\), expected \(4, 64\)")
    bad = _copy(peft_dir, tmp_path / "rank", edit_config=lambda c: c.update(r=8))
    _one_line_error(lambda: import_peft(bad, cfg), "has rank 4, adapter_config.json says 8")
    bad = _copy(peft_dir, tmp_path / "ia3", edit_config=lambda c: c.update(peft_type="IA3"))
    _one_line_error(lambda: import_peft(bad, cfg), "peft_type is 'IA3'; jlora reads only LORA adapters")
    other = cfg.replace(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    _one_line_error(lambda: import_peft(peft_dir, other), "does not fit base")
    _one_line_error(lambda: import_peft(tmp_path / "nowhere", cfg), "missing; not a PEFT adapter directory")


def test_cli_errors_are_one_line(base, peft_dir, tmp_path, capsys):
    path = base[0]
    # the exit status (the console script's sys.exit(main())) is 2, the message one line
    assert merge_main(["--model", str(path), "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jlora-merge: error:") and "no such adapter directory" in err and "\n" not in err
    assert export_main(["--model", str(path), "--adapter", str(peft_dir), "--out", str(tmp_path / "e")]) == 2
    assert "an HF PEFT adapter, not a jlora one" in capsys.readouterr().err
