"""Honest records: every figure in docs/benchmarks.md and the README's demo figures comes from a result
file in docs/results/ that a script wrote, with its commit, date, machine and load average; bench
scripts write such files; report.py takes in no file without them; train_vs_peft interleaves its sides."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROVENANCE = ("commit", "date", "machine", "load_average", "load_average_after")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/report.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_benchmarks_page_and_readme_figures_are_what_the_result_files_give():
    """docs/benchmarks.md and the README's demo block are regenerated from docs/results/*.json alone."""
    proc = _report("--check")
    assert proc.returncode == 0, proc.stderr


def test_without_result_files_every_section_says_not_run():
    report = _module("report")
    page = report.render({})
    for section in (
        "## forward_vs_hf",
        "## train_vs_peft",
        "## generate_vs_hf",
        "## dpo_vs_trl",
        "## SmolLM2-135M and Gemma 3 270M side by side",
        "## train_vs_peft_gemma3",
        "## generate_vs_hf_gemma3",
        "## The demo fine-tune",
        "## Will it fit?",
        "## GPU",
    ):
        body = page.split(section, 1)[1].split("\n## ", 1)[0]
        assert "Not run: docs/results/" in body, section
        assert "|---" not in body and "Measured at" not in body, section  # no table, no figure
    readme = report.with_readme_figures(f"a\n{report.README_BEGIN}\nold 71%\n{report.README_END}\nb", {})
    assert "No demo run is recorded yet" in readme and "71%" not in readme


def test_a_result_file_is_shown_with_where_and_when_it_was_measured():
    report = _module("report")
    res = {
        "bench": "train_vs_peft",
        "command": "python bench/train_vs_peft.py",
        "commit": "abc1234",
        "date": "2026-01-02T03:04:05+00:00",
        "machine": "Some CPU, 2 cores",
        "load_average": "1.00 2.00 3.00",
        "load_average_after": "1.50 2.00 3.00",
        "config": {"batch": 4},
        "rows": [
            {
                "metric": "train",
                "unit": "tokens/s",
                "jlora": 300.0,
                "peer": "HF PEFT",
                "peer_value": 150.0,
                "better": "higher",
            }
        ],
    }
    demo = {
        "bench": "demo",
        **{k: res[k] for k in PROVENANCE},
        "n_eval": 10,
        "train_steps": 3,
        "train_s": 120.0,
        "wall_s": 300.0,
        "tokens_per_s": 50.0,
        "base": {"loss": 0.8, "accuracy": 0.1},
        "finetuned": {"loss": 0.1, "accuracy": 0.7},
    }
    page = report.render({"train_vs_peft": res, "demo": demo})
    assert (
        "Measured at commit abc1234 on 2026-01-02T03:04:05+00:00, Some CPU, 2 cores, load average "
        "1.00 2.00 3.00 (before) / 1.50 2.00 3.00 (after)." in page
    )
    assert "| train (tokens/s) | 300 | HF PEFT | 150 | 2x | higher |" in page
    assert "| exact-match accuracy | 10.0% | 70.0% |" in page
    figures = report.demo_figures(demo)
    assert "Some CPU, 2 cores" in figures and "**70%**" in figures and "2 minutes" in figures


def test_two_models_side_by_side_take_each_models_own_files():
    """The side-by-side rows read each model's own train / decode result and kv_cache.json: a model with no
    file is "Not run" in its row, never another model's figures; greedy tokens vs HF come from first_diff."""
    report = _module("report")
    prov = {k: "x" for k in PROVENANCE} | {"commit": "abc1234", "date": "2026-01-02T03:04:05+00:00"}
    train = {
        "bench": "train_vs_peft",
        "command": "python bench/train_vs_peft.py --model gemma3-270m",
        **prov,
        "config": {"batch": 4, "seq": 256},
        "rows": [
            {"metric": "jlora-train step: train tokens/s", "jlora": 30.0, "peer": "HF PEFT", "peer_value": 20.0},
            {"metric": "jlora-train step: peak RSS", "jlora": 2000.0, "peer": "HF PEFT", "peer_value": 5000.0},
            {"metric": "jlora-train step: compile", "jlora": 9.0, "peer": None, "peer_value": None},
        ],
    }
    decode = {
        "bench": "generate_vs_hf",
        "command": "python bench/generate_vs_hf.py --model gemma3-270m",
        **prov,
        "config": {"new_tokens": 16},
        "rows": [
            {"metric": f"greedy decode, batch {b}, adapter {k}", "jlora": 12.0, "peer": "HF", "peer_value": 6.0}
            for b in (1, 8)
            for k in ("unmerged", "merged")
        ],
        "first_diff": {"jlora unmerged vs HF peft, batch 1": [16], "jlora merged vs HF merged, batch 8": [16, 9]},
    }
    kv = {
        "bench": "kv_cache",
        "command": "python bench/kv_cache.py",
        **prov,
        "config": {"context": 4096, "batch": 1},
        "models": {
            "gemma3-270m": {
                "title": "Gemma 3 270M",
                "layers": 18,
                "local_layers": 15,
                "sliding_window": 512,
                "kv_heads": 1,
                "head_dim": 256,
                "dtype": "float32",
                "linear": {"bytes": 4 * 2**20},
                "ring": {"bytes": 2**20},
            }
        },
        "rows": [],
    }
    page = report.render({"train_vs_peft_gemma3": train, "generate_vs_hf_gemma3": decode, "kv_cache": kv})
    body = page.split("## SmolLM2-135M and Gemma 3 270M side by side", 1)[1].split("\n## ", 1)[0]
    assert "| SmolLM2-135M | — | — | — | — | — | Not run: docs/results/train_vs_peft.json does not exist |" in body
    assert "| Gemma 3 270M (base) | 4 x 256 | 30 / 20 = 1.5x | 2,000 / 5,000 = 0.4x | 9 |" in body
    assert "| 12 / 6 = 2x | 12 / 6 = 2x | 12 / 6 = 2x | 12 / 6 = 2x |" in body
    assert "| jlora merged vs HF merged, batch 8: rows differ from token [9] |" in body
    decode["first_diff"]["jlora merged vs HF merged, batch 8"] = [16, 16]
    page = report.render({"generate_vs_hf_gemma3": decode})
    assert "| all 16 tokens of every row equal (2 comparisons) |" in page
    assert "| Gemma 3 270M | 18 (15) | 512 | 1 x 256 | float32 | 4.0 | 1.0 | 0.250x |" in body


def test_report_refuses_a_demo_result_without_provenance(tmp_path):
    """jlora-demo's results before this change had no commit/date/machine/load: refused, one line, nothing copied."""
    old = tmp_path / "demo_results.json"
    old.write_text(
        json.dumps(
            {
                "n_eval": 100,
                "base": {"loss": 0.8187, "accuracy": 0.0},
                "train_steps": 12,
                "finetuned": {"loss": 0.0774, "accuracy": 0.71},
                "train_s": 325,
                "wall_s": 551,
            }
        )
    )
    before = sorted(p.name for p in (ROOT / "docs" / "results").glob("*.json"))
    proc = _report("--add", str(old))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert str(old) in proc.stderr and "commit, date, machine, load_average" in proc.stderr
    assert sorted(p.name for p in (ROOT / "docs" / "results").glob("*.json")) == before


def test_method_comparison_takes_each_methods_demo_from_its_own_file(tmp_path):
    """A LLaMA-Adapter demo result goes to demo_llama_adapter.json, beside LoRA's demo.json, and each row of the
    comparison shows its own file's figures; a field an older run did not record is a dash, never a number."""
    report = _module("report")
    prov = {k: "x" for k in PROVENANCE} | {"commit": "abc1234", "date": "2026-01-02T03:04:05+00:00"}
    common = {
        "bench": "demo",
        "command": "jlora-demo",
        **prov,
        "n_eval": 100,
        "train_steps": 12,
        "train_s": 300.0,
        "wall_s": 600.0,
    }
    adapter = {
        **common,
        "method": "llama_adapter",
        "trainable_params": 161308,
        "tokens_per_s": 123.4,
        "peak_rss_bytes": 3 * 2**30,
        "base": {"loss": 0.82, "accuracy": 0.0},
        "finetuned": {"loss": 0.31, "accuracy": 0.25},
    }
    src = tmp_path / "demo_results.json"
    src.write_text(json.dumps(adapter))
    assert report.add_result(src, tmp_path / "results").name == "demo_llama_adapter.json"
    lora = {
        **common,
        "tokens_per_s": 98.0,
        "base": {"loss": 0.82, "accuracy": 0.0},
        "finetuned": {"loss": 0.08, "accuracy": 0.71},
    }
    page = report.render({"demo": lora, "demo_llama_adapter": adapter})
    body = page.split("## LoRA vs LLaMA-Adapter on the demo task", 1)[1]
    assert "| LLaMA-Adapter | 161,308 | 123 | 3.0 GiB | 0.82 -> 0.31 | 0% -> 25% | 12 in 300 s |" in body
    assert (
        "| LoRA | — (not recorded by this run) | 98 | — (not recorded by this run) | 0.82 -> 0.08 | 0% -> 71% |" in body
    )


def test_a_dpo_demo_result_goes_to_demo_dpo_and_shows_both_sides(tmp_path):
    """jlora-demo with objective dpo: its demo_results.json is filed as demo_dpo.json, not over the SFT demo's
    demo.json, and its section shows the starting adapter's and the DPO adapter's figures from that file."""
    report = _module("report")
    prov = {k: "x" for k in PROVENANCE} | {"commit": "abc1234", "date": "2026-01-02T03:04:05+00:00"}
    res = {
        "bench": "demo",
        "command": "jlora-demo --config smollm2-135m-demo-dpo",
        **prov,
        "model": "smollm2-135m",
        "objective": "dpo",
        "beta": 0.5,
        "n_eval": 100,
        "train_steps": 30,
        "train_pairs": 240,
        "train_s": 500.0,
        "peak_rss_bytes": 3 * 2**30,
        "before": {"model": "SFT adapter", "preference_accuracy": 0.93, "accuracy": 0.71},
        "after": {"model": "SFT adapter + DPO", "preference_accuracy": 0.99, "accuracy": 0.75},
    }
    src = tmp_path / "demo_results.json"
    src.write_text(json.dumps(res))
    assert report.add_result(src, tmp_path / "results").name == "demo_dpo.json"
    body = report.render({"demo_dpo": res}).split("## DPO on the demo task", 1)[1]
    assert "| SFT adapter | 93% | 71% |" in body and "| SFT adapter + DPO | 99% | 75% |" in body
    assert "30 steps of 8 pairs in 500 s" in body and "commit abc1234" in body
    src.write_text(json.dumps(res | {"objective": "kto"}))
    with pytest.raises(report.ReportError, match="no row for a kto demo"):
        report.add_result(src, tmp_path / "results")


def test_gpu_train_smoke_writes_a_result_file_with_provenance(tmp_path):
    out = tmp_path / "gpu_train.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_train.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert all(res[k] for k in PROVENANCE) and res["bench"] == "gpu_train" and res["smoke"] is True
    assert res["command"] == f"python bench/gpu_train.py --smoke --out {out}"
    assert {r["metric"] for r in res["rows"]} >= {"train throughput", "first step incl. compile"}
    report = _module("report")
    try:  # a smoke run checks the script; it is never taken in as a benchmark figure
        report.add_result(out, tmp_path / "results")
        raise AssertionError("a --smoke result was taken in")
    except report.ReportError as e:
        assert "--smoke" in str(e)


def test_train_vs_peft_interleaves_the_sides_and_takes_each_ones_best_run(tmp_path, monkeypatch):
    bench = _module("train_vs_peft")
    (tmp_path / "config.json").write_text("{}")  # a converted checkpoint is there: no prep run
    calls = []
    medians = {
        "jlora": [0.5, 0.3, 0.4],
        "api": [0.4, 0.35, 0.5],
        "peft": [0.6, 0.9, 0.45],
        "jlora@base": [0.7, 0.6, 0.8],
        "naive@base": [0.9, 0.8, 0.7],
    }

    def fake_side(side, a, extra, jlora_from, one_core):
        name = side + ("@base" if jlora_from else "")
        assert jlora_from in (None, str(tmp_path)) and extra == ("--rank", "8", "--targets", "q_proj,v_proj")
        calls.append((name, one_core))
        if side == "peak":
            return {"jax_peak": 200.0 - 100 * one_core, "torch_peak": 150.0 - 75 * one_core}
        k = sum(c == (name, one_core) for c in calls) - 1
        step = medians[name][k] * (2 if one_core else 1)
        return {
            "step_s": [step * 1.1, step, step * 0.9 + 0.1 * step],
            "losses": [2.0, 1.9],
            "rss_mb": 1000.0 + 100 * k,
            "compile_s": 5.0 - k,
            "first_step_s": 9.0,
        }

    monkeypatch.setattr(bench, "run_side", fake_side)
    monkeypatch.setattr(bench, "model_flops_per_token", lambda hf_dir, a: 0.5e9)
    out = tmp_path / "train_vs_peft.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train_vs_peft.py",
            "--hf-dir",
            str(tmp_path),
            "--rounds",
            "3",
            "--out",
            str(out),
            "--batch",
            "1",
            "--seq",
            "10",
            "--baseline",
            str(tmp_path),
            "--sides",
            "jlora,api,peft",
        ],
    )
    bench.main()
    one_round = ["jlora", "api", "peft", "jlora@base", "naive@base", "peak"]
    assert calls == [(s, core) for core in (False, True) for s in one_round] * 3  # interleaved, both thread modes
    res = json.loads(out.read_text())
    assert all(res[k] for k in PROVENANCE) and res["config"]["best_of"] == 3
    assert [r["load_average_after"] for r in res["runs"]["default"]["jlora"]]
    rows = {r["metric"]: r for r in res["rows"]}
    step = rows["jlora-train step: train tokens/s"]
    assert step["jlora"] == pytest.approx(10 / 0.3)  # each side's fastest run's median
    assert step["peer_value"] == pytest.approx(10 / 0.45)
    assert rows["custom loop (causal_lm_loss): train tokens/s"]["jlora"] == pytest.approx(10 / 0.35)
    base = next(r for m, r in rows.items() if m.startswith("custom loop (CE on logits), baseline @ "))
    assert base["jlora"] == pytest.approx(10 / 0.7)
    assert rows["jlora-train step: peak RSS"]["jlora"] == 1200.0
    assert rows["jlora-train step: compile"]["jlora"] == 3.0
    one_core = rows["jlora-train step (one core): train tokens/s"]  # the second row: each side pinned to a core
    assert one_core["jlora"] == pytest.approx(10 / 0.6) and one_core["peer_value"] == pytest.approx(10 / 0.9)
    gflops = rows["jlora-train step: model GFLOP/s"]  # tokens/s x the model FLOPs per token
    assert gflops["jlora"] == pytest.approx(10 / 0.3 * 0.5) and gflops["peer_value"] == pytest.approx(10 / 0.45 * 0.5)
    assert rows["fp32 matmul peak"]["jlora"] == 200.0 and rows["fp32 matmul peak (one core)"]["peer_value"] == 75.0
