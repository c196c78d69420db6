"""Where a run config is found and where its paths point (jlora.train.config_files): `--config` takes a file or a
shipped config's name; the paths a config reads are relative to its directory, output_dir and --set values to
the working directory; a missing input is one line before anything is loaded; and each shipped big config
names its preset, so `--plan` works before its checkpoint is downloaded."""

import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from jlora.models.family import presets
from jlora.train import plan
from jlora.train.config import ConfigError, load
from jlora.train.config_files import (
    ConfigFileError,
    check_inputs,
    checkpoint_over_preset,
    find_config,
    shipped_configs,
    shipped_configs_dir,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = (ROOT / "configs" / "tiny-cpu.yaml").read_text()
BIG = {
    "llama2-7b-lora": "llama2-7b",
    "llama3-8b-lora": "llama3-8b",
    "llama3-70b-qlora": "llama3-70b",
    "llama3-70b-tpu-pod": "llama3-70b",
}


def test_the_repositorys_configs_are_the_shipped_ones():
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) == shipped_configs()
    assert (ROOT / "configs").resolve() == shipped_configs_dir().resolve()
    assert {"tiny-cpu", "smollm2-135m-demo", *BIG} <= set(shipped_configs())


def test_a_file_first_then_a_shipped_name_else_one_line_listing_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = str(shipped_configs_dir() / "tiny-cpu.yaml")
    assert find_config("tiny-cpu") == find_config("tiny-cpu.yaml") == shipped
    (tmp_path / "tiny-cpu.yaml").write_text(TINY)  # a file of that name here is the user's: it wins
    assert find_config("tiny-cpu.yaml") == "tiny-cpu.yaml" and find_config("tiny-cpu") == shipped
    for name in ("nope", "configs/tiny-cpu.yaml", "nope.yaml"):
        with pytest.raises(ConfigFileError) as e:
            find_config(name)
        assert str(e.value).startswith(f"{name}: no such file") and "\n" not in str(e.value)
        assert ", ".join(shipped_configs()) in str(e.value)


def test_inputs_resolve_against_the_config_output_dir_and_set_values_against_the_working_dir(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "d").mkdir(parents=True)
    (tmp_path / "cfg" / "d" / "train.jsonl").write_text((ROOT / "data/tiny/train.jsonl").read_text())
    text = "model: {path: ../ckpt}\ntokenizer: tok/tokenizer.json\ndata: {train: d/train.jsonl, val: /abs/v.jsonl}\n"
    (tmp_path / "cfg" / "run.yaml").write_text(text + "output_dir: out\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = load(str(tmp_path / "cfg" / "run.yaml"))
    assert run.model.path == str(tmp_path / "ckpt")  # `..` folded away
    assert run.tokenizer == str(tmp_path / "cfg" / "tok" / "tokenizer.json")
    assert (run.data.train, run.data.val) == (str(tmp_path / "cfg" / "d" / "train.jsonl"), "/abs/v.jsonl")
    assert run.output_dir == "out"  # where the run writes: the working directory
    run = load(str(tmp_path / "cfg" / "run.yaml"), ["data.train=mine.jsonl", "model.path=m"])
    assert (run.data.train, run.model.path) == ("mine.jsonl", "m")  # typed here: relative to here
    # names, not paths: "tiny" and an installable model stay as written
    for name in ("tiny", "smollm2-135m", "gemma3-270m"):
        (tmp_path / "cfg" / "n.yaml").write_text(f"model: {{path: {name}}}\ntokenizer: {name}\ndata: {{train: x}}\n")
        run = load(str(tmp_path / "cfg" / "n.yaml"))
        assert (run.model.path, run.tokenizer) == (name, name)


def test_a_shipped_config_reads_its_shipped_data_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny-cpu", "smollm2-135m-demo"):
        run = load(name)
        check_inputs(run)
        assert pathlib.Path(run.data.train).resolve().is_relative_to(shipped_configs_dir().parent.resolve())
    assert load(str(ROOT / "configs" / "tiny-cpu.yaml")).output_dir == "runs/tiny-cpu"


def test_a_missing_input_is_one_line_and_names_the_old_rule_when_that_would_have_found_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # data/tiny/train.jsonl exists here, not beside the config
    config = tmp_path / "mine.yaml"
    config.write_text(TINY.replace("../data/tiny", "data/tiny"))
    run = load(str(config))
    with pytest.raises(ConfigFileError) as e:
        check_inputs(run, str(config))
    line = str(e.value)
    assert line.startswith(f"{config}: data.train: {tmp_path}/data/tiny/train.jsonl: no such file") and "\n" not in line
    assert "relative to the config's directory" in line and "--set data.train=data/tiny/train.jsonl" in line
    assert f"write {ROOT}/data/tiny/train.jsonl" in line
    with pytest.raises(ConfigFileError) as e:  # a --set value is the user's own: no hint about the config
        check_inputs(load(str(config), ["data.train=nowhere.jsonl"]), str(config), ["data.train=nowhere.jsonl"])
    assert str(e.value) == f"{config}: data.train: nowhere.jsonl: no such file or directory"
    # a preset beside a path is the checkpoint's shape, not a model to train
    with pytest.raises(ConfigFileError, match="model.path: .*Meta-Llama-3-8B-Instruct: no such file"):
        check_inputs(load("llama3-8b-lora", [f"data.train={ROOT}/data/tiny/train.jsonl", "data.val=null"]))
    check_inputs(load(str(config), ["data.train=data/tiny/train.jsonl"]), str(config))


def test_jlora_train_checks_inputs_before_loading_anything(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(TINY.replace("../data/tiny", "data/tiny"))
    args = [sys.executable, "-m", "jlora.cli.train", "--config", str(config), "--set", f"output_dir={tmp_path}/out"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"jlora-train: error: {config}: data.train: ") and "working directory" in proc.stderr
    assert not (tmp_path / "out").exists(), "the run claimed its output_dir before checking its inputs"


@pytest.mark.parametrize("name", sorted(BIG))
def test_each_big_config_names_its_preset_so_plan_needs_no_checkpoint(name):
    raw = yaml.safe_load((shipped_configs_dir() / f"{name}.yaml").read_text())
    assert raw["model"]["preset"] == BIG[name]
    run = load(name)
    assert not os.path.exists(run.model.path), "the checkpoint is here: this test would not test the preset"
    cfg, want = plan.model_config(checkpoint_over_preset(run)), presets()[BIG[name]]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (
        want.num_hidden_layers,
        want.hidden_size,
        want.vocab_size,
    )


def test_a_checkpoint_that_is_here_wins_over_the_preset(tmp_path):
    (tmp_path / "ckpt").mkdir()
    run = load("llama3-8b-lora", [f"model.path={tmp_path}/ckpt"])
    assert checkpoint_over_preset(run).model.preset is None
    assert checkpoint_over_preset(load("tiny-cpu", ["model.preset=llama3-8b"])).model.preset == "llama3-8b"


def test_plan_of_a_shipped_big_config_before_the_download():
    """`jlora-train --config configs/llama3-8b-lora.yaml --plan` on a machine without the checkpoint (cut to
    1 layer here, to compile fast): the preset in the config gives the shape."""
    args = ["--config", "configs/llama3-8b-lora.yaml", "--plan", "--devices", "8"]
    sets = ["model.overrides={num_hidden_layers: 1}", "data.max_seq_len=64", "train.global_batch=8"]
    cmd = [sys.executable, "-m", "jlora.cli.train", *args, *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("PLAN: {"), proc.stdout[-2000:]


def test_load_refuses_an_unknown_config_name_as_a_config_error():
    with pytest.raises(ConfigError, match="not the name of a shipped config"):
        load("no-such-config")


@pytest.mark.parametrize(
    "main, default",
    [
        ("jlora.cli.train:main", "(default: 8)"),  # --devices-per-host
        ("jlora.cli.demo:main", "(default: smollm2-135m-demo)"),
        ("jlora.cli.demo:main", "(default: 100)"),  # --eval-limit
        ("jlora.cli.adapters:export_main", "(default: --model"),  # --base-name says what None means
    ],
)
def test_help_shows_the_defaults(main, default, capsys):
    import importlib

    module, _, name = main.partition(":")
    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), name)(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and default in text, text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("main", ["merge_main", "export_main", "gguf_main"])
def test_the_adapter_commands_check_their_inputs_before_reading_a_weight(main, tmp_path, capsys):
    from jlora.cli import adapters

    out = tmp_path / ("out.gguf" if main == "gguf_main" else "out")
    run = getattr(adapters, main)
    assert run(["--model", "tiny-cpu.gguf", "--adapter", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--adapter {tmp_path}/nowhere: no such adapter directory" in err, err
    assert run(["--model", str(tmp_path / "no-model"), "--adapter", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/no-model" in err and "no such file" in err, err
    assert not out.exists()
