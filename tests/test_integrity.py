"""What loads must be what was saved (issue 25, items 5-7): an adapter whose metadata was edited, a NaN in an
adapter or in base weights, NaN logits while generating, and a bit-flipped PEFT file. Each case drives the
console script a user would run (jlora-generate, jlora-export-gguf, jlora-merge) where one applies, else the
public load API, on the tiny 2-layer model; every error is one line naming the file and the key or tensor."""

import json
import os
import pathlib
import shutil
import struct
import subprocess

import gguf
import jax
import numpy as np
import pytest
from cli_testing import one_line_error, script
from flax import traverse_util
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import jlora
from jlora.checkpoint.adapter import load_adapter, save_adapter
from jlora.checkpoint.metadata import AdapterError
from jlora.cli.adapters import merge_main
from jlora.formats.gguf_adapter import GGUFAdapterError, gguf_lora_tensors
from jlora.formats.param_assembly import expected_tensors
from jlora.formats.peft_adapter import PeftError, export_peft, import_peft
from jlora.formats.weights import WeightsError, read_pretrained, save_pretrained
from jlora.formats.weights_on_device import load_pretrained_sharded
from jlora.infer.generate import Generator, NonFiniteLogitsError
from jlora.models.family import param_shapes
from jlora.models.llama import PRESETS
from jlora.peft.llama_adapter import AdapterConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}  # one device: quicker
CFG = PRESETS["tiny"].replace(bos_token_id=1, eos_token_id=2)  # untied, vocab 512, d=64, 2 layers
LCFG = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))  # scale alpha/rank = 2
Q = "layers.self_attn.q_proj.kernel"
PEFT_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
PEFT_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _generate(model: pathlib.Path, adapter: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    extra = ("--adapter", str(adapter)) if adapter else ()
    return _run(script("jlora-generate"), "--model", str(model), *extra, "--prompt", "w1 w2", "--max-new-tokens", "4")


def _model_dir(d: pathlib.Path, params) -> pathlib.Path:
    """An HF model dir (config.json + model.safetensors) with a word-level tokenizer covering all 512 ids."""
    save_pretrained(params, CFG, d)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(CFG.vocab_size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(model dir, params, trainable): random params drawn with numpy, LCFG's pairs with random nonzero A, B."""
    rng = np.random.default_rng(0)
    draw = lambda path, s: (
        np.ones(s.shape, np.float32) if path[-1].key == "weight" else rng.normal(0.0, 0.08, s.shape).astype(np.float32)
    )
    params = jax.tree_util.tree_map_with_path(draw, param_shapes(CFG))
    _, trainable = jlora.split(params, LCFG, jax.random.key(0))
    fill = lambda p: p.replace(
        a=0.2 * rng.standard_normal(p.a.shape, np.float32), b=0.2 * rng.standard_normal(p.b.shape, np.float32)
    )
    trainable = jax.tree.map(fill, trainable, is_leaf=lambda x: isinstance(x, jlora.LoraPair))
    return _model_dir(tmp_path_factory.mktemp("tiny") / "model", params), params, trainable


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# ---- item 5: adapter metadata is covered by a checksum, and each pair's scale must be what its config gives


@pytest.fixture
def adapter(base, tmp_path) -> pathlib.Path:
    _, params, trainable = base
    save_adapter(tmp_path / "adapter", trainable, LCFG, base=CFG, params=params)
    return tmp_path / "adapter"


def _edit_metadata(adapter: pathlib.Path, edit, *, sealed: bool = True) -> str:
    """Apply `edit` to the adapter's metadata; without `sealed`, as an adapter saved before the checksum."""
    file = adapter / "metadata" / "metadata"
    meta = json.loads(file.read_text())
    edit(meta)
    if not sealed:
        meta.pop("metadata_sha256", None)  # (an older jlora wrote none)
    file.write_text(json.dumps(meta))
    return str(file)


def _set_scale(meta: dict, value: float = 6.0) -> None:
    meta["trainable"]["pairs"][Q]["scale"][0] = value


def _rename_sample(meta: dict) -> None:
    samples = meta["base"]["fingerprint"]["samples"]
    samples["layers.mlp.up_proj.weights"] = samples.pop("layers.mlp.up_proj.kernel")


def test_an_edited_scale_is_refused_by_jlora_generate(base, adapter):
    """The issue's case: one per-layer scale 2.0 -> 6.0 contradicts rank 4 and alpha 8, and used to load."""
    file = _edit_metadata(adapter, _set_scale)
    one_line_error(_generate(base[0], adapter), file, f"trainable/pairs/{Q}", "checksum", prog="jlora-generate")


@pytest.mark.parametrize(
    "edit, names",
    [
        (_rename_sample, ["base/fingerprint/samples"]),  # a renamed tensor was never compared
        (lambda m: m["lora_config"].update(alpha=24), ["lora_config/alpha"]),  # contradicts every scale
        (lambda m: m["lora_config"].update(comment="x"), ["lora_config/comment", "added"]),
        (lambda m: m["base"].pop("fingerprint"), ["base/fingerprint", "missing"]),  # no base check at all
    ],
    ids=["fingerprint-key", "alpha", "added-key", "dropped-fingerprint"],
)
def test_edited_metadata_is_refused_naming_the_key(base, adapter, edit, names):
    _, params, _ = base
    file = _edit_metadata(adapter, edit)
    with pytest.raises(AdapterError) as err:
        load_adapter(adapter, base=CFG, params=params)
    assert file in str(err.value) and all(n in str(err.value) for n in names) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit, names",
    [
        (_set_scale, [f"trainable/pairs/{Q}/scale of layer 0 is 6", "alpha=8", "gives 2"]),
        (lambda m: m["lora_config"].update(alpha=24), [f"trainable/pairs/{Q}/scale of layer 0 is 2", "gives 6"]),
        (_rename_sample, ["base/fingerprint/samples names layers.mlp.up_proj.weights", "no tensor"]),
        (lambda m: m["base"]["fingerprint"]["samples"].pop("norm.weight"), ["norm.weight", "not both"]),
    ],
    ids=["scale", "alpha", "fingerprint-key", "dropped-sample"],
)
def test_an_adapter_saved_before_the_checksum_is_still_checked(base, adapter, edit, names):
    """Without the checksum (an older jlora's adapter), scales are derived from rank, alpha and patterns, and the
    fingerprint may name only the base's tensors, each with a shape and a sample."""
    _, params, trainable = base
    _edit_metadata(adapter, edit, sealed=False)
    with pytest.raises(AdapterError) as err:
        load_adapter(adapter, base=CFG, params=params)
    assert all(n in str(err.value) for n in names) and "\n" not in str(err.value), str(err.value)


def test_an_unedited_adapter_saved_before_the_checksum_loads_as_saved(base, adapter):
    _, params, trainable = base
    _edit_metadata(adapter, lambda m: None, sealed=False)
    lcfg, back = load_adapter(adapter, base=CFG, params=params, expect=LCFG)
    assert lcfg == LCFG and _leaves_equal(back, trainable)
    assert back["layers"]["self_attn"]["q_proj"]["kernel"].scale == (2.0, 2.0)


# ---- item 6: NaN or inf in an adapter or in base weights is refused at load; NaN logits stop generation


def _peft_dir(base, d: pathlib.Path, edit=None) -> pathlib.Path:
    export_peft(d, base[2], LCFG, CFG)
    if edit:
        tensors = load_file(d / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, d / "adapter_model.safetensors")
    return d


def test_a_nan_in_a_peft_lora_b_is_refused_by_jlora_generate(base, tmp_path):
    """It used to generate blank text and exit 0."""
    peft = _peft_dir(base, tmp_path / "peft", lambda t: t[PEFT_B].__setitem__((5, 1), np.nan))
    run = _generate(base[0], peft)
    one_line_error(run, str(peft / "adapter_model.safetensors"), PEFT_B, "1 NaN", prog="jlora-generate")
    assert not run.stdout.strip()


def test_nan_logits_stop_jlora_generate_with_an_error(base, tmp_path):
    """Finite weights (the load check passes) whose logits overflow: the CLI used to print garbage and exit 0."""
    _, params, _ = base
    huge = {**params, "lm_head": {"kernel": np.full_like(params["lm_head"]["kernel"], 3e38)}}
    run = _generate(_model_dir(tmp_path / "overflow", huge))
    one_line_error(run, "row 0", "NaN or inf logits", "new token 1", prog="jlora-generate")
    assert not run.stdout.strip()


def test_nan_logits_mid_stream_stop_before_the_bad_token(base):
    """The first token is fine; feeding it back hits a NaN embedding row: the stream yields the first token,
    then raises for the second, found in the jitted decode loop (not at the prefill)."""
    _, params, _ = base
    prompt = [1, 20, 30]
    model = jlora.Llama(CFG)
    (first,) = Generator(model, params).generate([prompt], max_new_tokens=1, eos_id=())[0]
    assert first not in prompt
    embedding = params["embed_tokens"]["embedding"].copy()
    embedding[first] = np.nan  # in memory: a file holding it would be refused at load
    poisoned = {**params, "embed_tokens": {"embedding": embedding}}
    stream = Generator(model, poisoned).stream([prompt], max_new_tokens=4, eos_id=())
    assert next(stream) == [[first]]
    with pytest.raises(NonFiniteLogitsError, match="row 0: the model gave NaN or inf logits for new token 2"):
        next(stream)


def test_a_nan_in_a_jlora_adapter_is_refused(base, tmp_path):
    _, params, trainable = base
    pair = trainable["layers"]["self_attn"]["v_proj"]["kernel"]
    b = np.asarray(pair.b).copy()
    b[1, 0, 3] = np.inf
    bad = jax.tree.map(lambda x: x, trainable, is_leaf=lambda x: isinstance(x, jlora.LoraPair))
    bad["layers"]["self_attn"]["v_proj"]["kernel"] = pair.replace(b=b)
    save_adapter(tmp_path / "a", bad, LCFG, base=CFG, params=params)
    with pytest.raises(AdapterError, match=r"tensor layers/self_attn/v_proj/kernel/b has non-finite values \(0 NaN, 1"):
        load_adapter(tmp_path / "a", base=CFG, params=params)


def test_nan_base_weights_are_refused_by_both_loaders(base, tmp_path):
    model = shutil.copytree(base[0], tmp_path / "model")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = load_file(model / "model.safetensors")
    tensors[name][3, 7] = np.nan
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(WeightsError) as err:
        read_pretrained(model)
    assert f"{model / 'model.safetensors'}: tensor {name} has non-finite values (1 NaN" in str(err.value)
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2, 1), ("data", "fsdp", "tensor"))
    with pytest.raises(WeightsError, match=f"tensor {name} has non-finite values"):
        load_pretrained_sharded(model, mesh)


def _write_gguf(path: pathlib.Path, edit) -> pathlib.Path:
    """A tiny llama GGUF: F32 tensors, blk.0.attn_v as Q8_0 blocks (llama.cpp's layout); `edit(name, x)` may
    change a tensor as written (numbers, or a block type's raw bytes)."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(CFG.num_hidden_layers)
    w.add_context_length(CFG.max_position_embeddings)
    w.add_embedding_length(CFG.hidden_size)
    w.add_feed_forward_length(CFG.intermediate_size)
    w.add_head_count(CFG.num_attention_heads)
    w.add_head_count_kv(CFG.num_key_value_heads)
    w.add_rope_freq_base(CFG.rope_theta)
    w.add_layer_norm_rms_eps(CFG.rms_norm_eps)
    w.add_vocab_size(CFG.vocab_size)
    for _, _, names, shape in expected_tensors(CFG, 1):
        for name in names:
            x = rng.normal(0.0, 0.08, shape).astype(np.float32)
            if name == "blk.0.attn_v.weight":
                x = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(name, edit(name, x), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(name, edit(name, x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _nan_scale(name: str, x: np.ndarray) -> np.ndarray:
    if name == "blk.0.attn_v.weight":  # Q8_0 block: fp16 scale d, then 32 int8 quants
        x = x.copy()
        x[1, 34:36] = np.array([np.nan], np.float16).view(np.uint8)  # row 1, second block's d
    return x


def _inf_norm(name: str, x: np.ndarray) -> np.ndarray:
    return np.where(np.arange(x.size) == 5, np.float32(np.inf), x) if name == "blk.1.ffn_norm.weight" else x


@pytest.mark.parametrize(
    "edit, name, quantize",
    [
        (_inf_norm, "blk.1.ffn_norm.weight", "none"),
        (_nan_scale, "blk.0.attn_v.weight", "none"),  # dequantized: every value of that block is NaN
        (_nan_scale, "blk.0.attn_v.weight", "gguf"),  # kept as blocks: its fp16 scale is checked
    ],
    ids=["f32", "q8_0-dense", "q8_0-blocks"],
)
def test_non_finite_gguf_tensors_are_refused(tmp_path, edit, name, quantize):
    path = _write_gguf(tmp_path / "tiny.gguf", edit)
    read_pretrained(_write_gguf(tmp_path / "ok.gguf", lambda _, x: x), quantize=quantize)  # the file is sound
    with pytest.raises(WeightsError, match=f"{path}: tensor {name} has non-finite values"):
        read_pretrained(path, quantize=quantize)


# ---- item 7: a damaged PEFT file (no checksum) is refused before anything is derived from it


def _flip_exponent_bit(file: pathlib.Path, key: str) -> float:
    """Flip the top exponent bit of `key`'s first float32 in the safetensors file, as a bad disk or copy would;
    return the value it now holds."""
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + json.loads(raw[8 : 8 + n])[key]["data_offsets"][0]
    (before,) = struct.unpack("<f", raw[start : start + 4])
    assert 0 < abs(before) < 2  # its top exponent bit is 0: the flip makes it huge
    raw[start + 3] ^= 0x40  # bit 30 of the little-endian float32
    file.write_bytes(bytes(raw))
    return struct.unpack("<f", raw[start : start + 4])[0]


def test_a_bit_flipped_peft_file_is_not_exported_to_gguf(base, tmp_path):
    peft = _peft_dir(base, tmp_path / "peft")
    flipped = _flip_exponent_bit(peft / "adapter_model.safetensors", PEFT_A)
    assert np.isfinite(flipped) and abs(flipped) > 1e30  # finite: only the range check can catch it
    out = tmp_path / "out" / "adapter.gguf"
    run = _run(script("jlora-export-gguf"), "--model", str(base[0]), "--adapter", str(peft), "--out", str(out))
    one_line_error(run, str(peft / "adapter_model.safetensors"), PEFT_A, "beyond", prog="jlora-export-gguf")
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written, not even a partial file


def test_a_bit_flipped_peft_file_is_not_merged(base, tmp_path, capsys):
    peft = _peft_dir(base, tmp_path / "peft")
    _flip_exponent_bit(peft / "adapter_model.safetensors", PEFT_B)
    out = tmp_path / "merged"
    assert merge_main(["--model", str(base[0]), "--adapter", str(peft), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jlora-merge: error:") and PEFT_B in err and "\n" not in err, err
    assert not out.exists()


def test_a_damaged_adaption_prompt_file_is_refused(base, tmp_path):
    """PEFT's other adapter type (LLaMA-Adapter prompts and gates) is checked the same way."""
    acfg = AdapterConfig(len=4, layers=1)
    _, trainable = jlora.split(base[1], acfg, jax.random.key(0))
    export_peft(tmp_path / "ap", trainable, acfg, CFG)
    import_peft(tmp_path / "ap", CFG)  # sound as exported
    tensors = load_file(tmp_path / "ap" / "adapter_model.safetensors")
    gate = "base_model.model.model.layers.1.self_attn.adaption_gate"
    tensors[gate][0] = np.nan
    save_file(tensors, tmp_path / "ap" / "adapter_model.safetensors")
    with pytest.raises(PeftError, match=f"tensor {gate} has non-finite values"):
        import_peft(tmp_path / "ap", CFG)


def test_gguf_export_refuses_a_tree_that_does_not_fit_or_is_not_finite(base):
    """Trees made in memory skip the loaders' checks; the llama.cpp export checks shapes and values itself."""
    trainable = base[2]
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, jlora.LoraPair))
    pair = flat[tuple(Q.split("."))]
    for leaf, match in [
        (pair.replace(a=np.zeros((2, 48, 4), np.float32)), "does not fit the base's kernel"),
        (pair.replace(b=np.full(pair.b.shape, np.nan, np.float32)), "blk.0.attn_q.weight.lora_b has non-finite"),
    ]:
        bad = traverse_util.unflatten_dict({**flat, tuple(Q.split(".")): leaf})
        with pytest.raises(GGUFAdapterError, match=match):
            gguf_lora_tensors(bad, LCFG, CFG)
