"""jlora.train.config: shipped configs load, --set overrides convert by type hint, bad input is a one-line error."""

import dataclasses
import pathlib
import re

import pytest
import yaml

from jlora.models.config import ModelConfigError
from jlora.peft.lora import LoraConfig
from jlora.train import config as C

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml"))
BASE = "model: {path: tiny}\ndata: {train: data/tiny/train.jsonl}\n"


def write(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_configs_dir_holds_the_shipped_runs():
    assert {
        "configs/tiny-cpu.yaml",
        "configs/smollm2-135m-demo.yaml",
        "configs/llama2-7b-lora.yaml",
        "configs/llama3-8b-lora.yaml",
        "configs/llama3-70b-tpu-pod.yaml",
    } <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_loads_and_holds_only_differences(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = C.load(path)
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert C.load(path, ["optim.lr=1e-5"]).optim.lr == 1e-5
    raw = yaml.safe_load((REPO / path).read_text())
    for section, values in raw.items():
        if not isinstance(values, dict):
            continue
        cls = type(getattr(cfg, section))
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        for key in values:
            if key in defaults:
                assert getattr(getattr(cfg, section), key) != defaults[key], f"{path}: {section}.{key} is the default"


def test_lit_llama_recipe():
    cfg = C.load(str(REPO / "configs/llama2-7b-lora.yaml"))
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (8, 16.0, 0.05, ("q_proj", "v_proj"))
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.data.max_seq_len) == (3e-4, 100, 256)
    # lit-llama's micro-batch of 4 was for one GPU; 8 rows give each of 8 devices one row, same global batch
    assert (cfg.train.micro_batch, cfg.train.global_batch, cfg.train.grad_accum) == (8, 128, 16)


def test_pod_config_shards_fsdp_over_every_device():
    cfg = C.load(str(REPO / "configs/llama3-70b-tpu-pod.yaml"))
    assert cfg.mesh.resolve(256) == (1, 256, 1) and cfg.mesh.distributed == "auto"
    assert cfg.model.param_dtype == "bfloat16"


def test_tiny_config_needs_no_tokenizer_files():
    cfg = C.load(str(REPO / "configs/tiny-cpu.yaml"))
    assert cfg.tokenizer_path is None and (REPO / cfg.data.train).is_file()
    assert C.from_dict({"model": {"path": "m.gguf"}, "data": {"train": "t"}}).tokenizer_path == "m.gguf"


def test_overrides_convert_to_the_field_type(tmp_path):
    cfg = C.load(
        write(tmp_path, BASE),
        [
            "optim.lr=1e-4",  # plain YAML 1.1 would read this as a string
            "optim.grad_clip=null",  # Optional
            "train.steps=7",
            "train.epochs=2",  # int; int -> float
            "data.packing=true",
            "data.format=chat",  # bool; Literal
            "lora.targets=[q_proj, k_proj]",  # tuple[str, ...] | str
            "lora.layers=[0, 1]",
            "lora.rank_pattern={q_proj: 4, 'v_.*': 2}",  # ordered mapping -> pairs
            "mesh.distributed=auto",
            "mesh.fsdp=-1",
            "mesh.data=1",
            "model.overrides={num_hidden_layers: 3, rope_theta: 1e4}",
            "output_dir=007",  # a str field takes the text verbatim
            "tokenizer=tok.json",
        ],
    )
    assert cfg.optim.lr == 1e-4 and cfg.optim.grad_clip is None
    assert cfg.train.steps == 7 and cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.data.packing is True and cfg.data.format == "chat"
    assert cfg.lora.targets == ("q_proj", "k_proj") and cfg.lora.layers == (0, 1)
    assert cfg.lora.rank_pattern == (("q_proj", 4), ("v_.*", 2))
    assert cfg.mesh.distributed == "auto" and cfg.mesh.resolve(8) == (1, 8, 1)
    assert cfg.model.overrides == (("num_hidden_layers", 3), ("rope_theta", 1e4))
    assert cfg.output_dir == "007" and cfg.tokenizer == "tok.json"
    cfg = C.load(write(tmp_path, BASE), ["lora.targets=all-linear", "mesh.distributed=false", "train.steps=None"])
    assert cfg.lora.targets == "all-linear" and cfg.mesh.distributed is False and cfg.train.steps is None
    assert C.load(write(tmp_path, BASE), ["lora.targets=[qv]_proj"]).lora.targets == ("[qv]_proj",)


def test_yaml_mappings_become_pairs_and_round_trip(tmp_path):
    text = BASE + "lora:\n  rank_pattern:\n    'layers\\.0\\..*': 16\n    q_proj: 4\n  alpha_pattern: {q_proj: 8}\n"
    cfg = C.load(write(tmp_path, text))
    assert cfg.lora.rank_pattern == (("layers\\.0\\..*", 16), ("q_proj", 4))
    assert isinstance(cfg.lora, LoraConfig) and cfg.lora.alpha_pattern == (("q_proj", 8.0),)
    assert C.load(write(tmp_path, C.dump(cfg), "dumped.yaml")) == cfg


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        (BASE + "optim: {lrr: 1.0e-4}\n", [], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (BASE + "optimizer: {lr: 1.0e-4}\n", [], "unknown key 'optimizer' (did you mean 'optim'?)"),
        (BASE + "optim: {lr: abc}\n", [], "optim.lr: expected float, got 'abc'"),
        (BASE + "optim: {lr: -1}\n", [], "optim.lr: must be > 0"),
        (BASE + "train: {steps: 1.5}\n", [], "train.steps: expected int | None, got 1.5"),
        (
            BASE + "train: {global_batch: 10, micro_batch: 4}\n",
            [],
            "train.micro_batch: must divide train.global_batch (10), got 4",
        ),
        (
            "model: {path: tiny}\ndata: {train: x, format: xml}\n",
            [],
            "data.format: must be one of 'alpaca' | 'chat' | 'text', got 'xml'",
        ),
        (
            BASE + "data: {train: x, format: text}\n",  # a section written twice: YAML would keep the last
            [],
            "3: invalid YAML: 'data' is set twice (first on line 2); keep one",
        ),
        (
            "model: {path: tiny}\ndata: {train: x, val: v, val_fraction: 0.1}\n",
            [],
            "data.val_fraction: set data.val or data.val_fraction, not both",
        ),
        (
            "data: {train: data/tiny/train.jsonl}\nmodel: {path: tiny, dtype: fp16}\n",
            [],
            "model.dtype: must be one of 'float32' | 'bfloat16', got 'fp16'",
        ),
        (BASE + "mesh: {data: -1, fsdp: -1}\n", [], "mesh.tensor: at most one mesh size may be -1"),
        (BASE + "mesh: {distributed: maybe}\n", [], "mesh.distributed: expected bool | 'auto', got 'maybe'"),
        (BASE + "lora: {rank: 0}\n", [], "lora: LoRA rank must be a positive integer, got rank=0"),
        (BASE + "lora: {targets: 3}\n", [], "lora.targets: expected tuple | str, got 3"),
        (BASE + "train: 5\n", [], "train: expected a mapping, got 5"),
        ("model: {path: tiny}\n", [], "missing required key 'data'"),
        ("- a\n- b\n", [], "expected a mapping at the top level, got list"),
        ("model: {path: tiny\n", [], "invalid YAML"),
        (BASE, ["optim.lrr=1"], "--set optim.lrr=1: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (BASE, ["trian.steps=1"], "--set trian.steps=1: unknown key 'trian.steps' (did you mean 'train'?)"),
        (BASE, ["train.steps=ten"], "--set train.steps=ten: train.steps: expected int | None, got 'ten'"),
        (BASE, ["optim.lr.x=1"], "--set optim.lr.x=1: unknown key 'optim.lr.x'"),
        (BASE, ["optim.lr"], "--set optim.lr: expected KEY=VALUE, got 'optim.lr'"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_file_and_key(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(C.ConfigError) as err:
        C.load(path, overrides)
    msg = str(err.value)
    assert msg.startswith(path + ":") and message in msg and "\n" not in msg, msg


def test_missing_file_is_named(tmp_path):
    shipped = "no such file, and not the name of a shipped config (shipped: "
    with pytest.raises(C.ConfigError, match=re.escape(f"{tmp_path}/nope.yaml: {shipped}")):
        C.load(str(tmp_path / "nope.yaml"))


def test_sections_validate_when_built_in_python():
    with pytest.raises(C.ConfigError, match="^lr: must be > 0"):
        C.OptimConfig(lr=0.0)
    with pytest.raises(C.ConfigError, match="^remat: must be one of"):
        C.TrainConfig(remat="some")
    assert C.TrainConfig(global_batch=32, micro_batch=8).grad_accum == 4
    assert C.DataConfig(train="t", val_fraction=0).val_fraction == 0.0  # normalised to the hint
    with pytest.raises(C.ConfigError, match=r"^model.pth: |unknown key 'model.pth'"):
        C.RunConfig(model={"pth": "x"}, data={"train": "t"})


def test_mesh_resolve():
    assert C.MeshConfig().resolve(8) == (8, 1, 1)
    assert C.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert C.MeshConfig(data=8, fsdp=1, tensor=1).resolve(8) == (8, 1, 1)
    for mesh in (C.MeshConfig(data=3, fsdp=-1), C.MeshConfig(data=2, fsdp=2, tensor=1)):
        with pytest.raises(C.ConfigError, match="does not fit 8 devices"):
            mesh.resolve(8)


@pytest.mark.parametrize(
    "model_type, key, value",
    [
        ("llama", "sliding_window", 4096),
        ("llama", "final_logit_softcapping", 30.0),
        ("llama", "layer_types", ["sliding_attention", "full_attention"]),
        ("llama", "partial_rotary_factor", 0.5),
        ("llama", "quantization_config", {"quant_method": "gptq", "bits": 4}),
        ("mistral", "num_local_experts", 8),
        ("qwen3", "attn_logit_softcapping", 50.0),
        ("gemma2", "rope_local_base_freq", 10000.0),
        ("gemma3_text", "use_bidirectional_attention", True),
    ],
)
def test_config_json_keys_that_change_the_maths_are_read_or_refused(model_type, key, value):
    """A config.json key that changes the maths and that the family does not implement is refused, naming
    it; the same key at its neutral value, and every family's own HF defaults, load."""
    import transformers

    from jlora.models.family import config_from_hf

    hf_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }[model_type]
    hf = hf_class(num_hidden_layers=2).to_dict()
    assert config_from_hf(hf).hf_model_type == model_type
    with pytest.raises(ModelConfigError, match=f"^{key}=.*{model_type}"):
        config_from_hf({**hf, key: value})
