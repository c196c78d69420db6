"""The demo pipeline end to end on a tiny random model and the shipped demo data: generate the data,
train a few steps, evaluate base vs fine-tuned, plot, export to PEFT. Same code path as `jlora-demo`."""

import importlib.util
import json
import math
import pathlib
import shutil
import sys

import pytest
from safetensors.numpy import load_file

from jlora.cli import demo as demo_cli
from jlora.train import demo
from jlora.train.config import load

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "demo"


def _module(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _answers(path: pathlib.Path) -> list[dict]:
    return [json.loads(json.loads(ln)["messages"][-1]["content"]) for ln in path.read_text().splitlines()]


def test_shipped_data_is_what_the_script_writes(tmp_path):
    make = _module(DEMO_DATA / "make.py", "demo_make")
    train, val = make.write(tmp_path)
    assert train.read_bytes() == (DEMO_DATA / "train.jsonl").read_bytes()
    assert val.read_bytes() == (DEMO_DATA / "val.jsonl").read_bytes()


def test_held_out_split_shares_no_entity_with_training():
    def entities(path):
        out = set()
        for a in _answers(path):
            first, last = a["name"].split()
            out |= {first, last, a["city"]}
        return out

    tr, va = entities(DEMO_DATA / "train.jsonl"), entities(DEMO_DATA / "val.jsonl")
    assert tr and va and not tr & va
    assert all(set(a) == {"name", "age", "city", "job"} for a in _answers(DEMO_DATA / "val.jsonl"))


@pytest.mark.parametrize(
    "pred, ok",
    [
        ('{"name":"Ana Li","age":3}', True),
        ('  {"name": "Ana Li",\n "age": 3}  ', True),  # spacing is not held against a model
        ('```json\n{"name": "Ana Li", "age": 3}\n```', True),
        ('{"name":"Ana Li","age":"3"}', False),
        ('{"name":"Ana Li"}', False),
        ("Ana Li is 3", False),
        ("", False),
    ],
)
def test_answers_match(pred, ok):
    assert demo.answers_match(pred, '{"name":"Ana Li","age":3}') is ok


def test_answers_match_plain_text():
    assert demo.answers_match(" Paris\n", "Paris") and not demo.answers_match("paris", "Paris")


def test_demo_end_to_end_on_tiny_model(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DEMO_DATA / "make.py", data / "make.py")  # the demo writes missing data with it
    out = tmp_path / "run"
    run = load(
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        [
            f"data.train={data / 'train.jsonl'}",
            f"data.val={data / 'val.jsonl'}",
            "data.val_fraction=0",
            "data.format=chat",
            "data.max_seq_len=384",
            "train.global_batch=8",
            "train.steps=4",
            "train.eval_interval=2",
            "train.eval_batches=1",
            "train.log_interval=1",
            f"output_dir={out}",
        ],
    )
    lines = []
    result = demo.run_demo(run, eval_limit=4, say=lambda *a: lines.append(" ".join(map(str, a))))

    assert (data / "train.jsonl").read_bytes() == (DEMO_DATA / "train.jsonl").read_bytes()
    for side in ("base", "finetuned"):
        assert math.isfinite(result[side]["loss"]) and result[side]["loss"] > 0
        assert 0.0 <= result[side]["accuracy"] <= 1.0
    assert result["n_eval"] == 4 and len(result["examples"]) == 3
    assert result["train_steps"] == 4
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert (out / "loss.png").stat().st_size > 1000
    tensors = load_file(out / "peft" / "adapter_model.safetensors")
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["r"] == run.lora.rank and config["peft_type"] == "LORA"
    assert any(k.endswith("lora_A.weight") for k in tensors) and any(k.endswith("lora_B.weight") for k in tensors)
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["finetuned"] == result["finetuned"]
    # where and when it ran: bench/report.py shows only results that say so
    assert saved["bench"] == "demo" and saved["command"] == "jlora-demo"
    assert all(saved[k] for k in ("commit", "date", "machine", "load_average", "load_average_after"))
    assert config["base_model_name_or_path"] == "tiny"  # a path or preset stays as given (smollm2: test_cli_files)
    text = "\n".join(lines)
    assert "fine-tuned :" in text and "accuracy (exact match)" in text
    err = capsys.readouterr().err  # each evaluation shows progress (minutes on a CPU with the real model)
    assert err.count("held-out loss") >= 2 and err.count("generating answers") >= 2 and "4/4" in err


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 1, "val_loss": 2.1}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    msg = demo.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert "matplotlib is not installed" in msg and not (tmp_path / "loss.png").exists()


def test_main_reports_a_missing_config_in_one_line(capsys):
    assert demo_cli.main(["--config", "no/such.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jlora-demo: error:") and "no/such.yaml" in err and "\n" not in err
