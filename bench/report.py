"""Runs the benchmark scripts and writes docs/benchmarks.md from what they measured.

The contract every bench script follows: its LAST line of stdout is
    JSON: {"bench": "<name>", "config": {...}, "rows": [ROW, ...]}
one line, where each ROW is
    {"metric": str, "unit": str, "jlora": float, "peer": str | null, "peer_value": float | null,
     "better": "higher" | "lower"}
(peer null: a figure with nothing to compare against, e.g. compile time). "config" is free-form
shape information, printed as given. This script computes ratio = jlora / peer_value itself.
`bench/gpu_train.py` prints the same line; its output can come from another machine (--gpu-log).
The raw results go to docs/benchmarks.json, so `--reuse` can redraw the page (say, with a GPU log
or a new demo run) without running the CPU benches again. The demo section reads the
demo_results.json that `jlora-demo` writes (--demo-results); without one, it keeps the saved demo results.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHES = ("forward_vs_hf", "train_vs_peft", "generate_vs_hf")
DEMO_RESULTS = ROOT / "runs" / "smollm2-135m-demo" / "demo_results.json"


class BenchError(RuntimeError):
    """A bench script that failed or broke the output contract; the message names it."""


def parse_json_line(text: str, source: str) -> dict:
    """The `JSON: {...}` result from the last non-empty line of a bench's stdout."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[-1].startswith("JSON: "):
        raise BenchError(f"{source}: the last line of stdout is not 'JSON: {{...}}'")
    try:
        result = json.loads(lines[-1][len("JSON: "):])
    except json.JSONDecodeError as e:
        raise BenchError(f"{source}: bad JSON on the last line: {e}") from None
    rows = result.get("rows") if isinstance(result, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "metric" in r and "jlora" in r for r in rows):
        raise BenchError(f"{source}: the JSON needs 'rows', a list of objects with 'metric' and 'jlora'")
    return result


def run_bench(name: str, args: list[str], timeout: float) -> tuple[str, dict | str]:
    """(command, result or the reason it has none) for bench/<name>.py."""
    script = ROOT / "bench" / f"{name}.py"
    cmd = ["python", f"bench/{name}.py", *args]
    if not script.exists():
        return shlex.join(cmd), f"not run: {script.relative_to(ROOT)} does not exist"
    print(f"[report] running {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return shlex.join(cmd), f"not run: timed out after {timeout:.0f} s"
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return shlex.join(cmd), f"failed (exit {proc.returncode}): {tail}"
    try:
        return shlex.join(cmd), parse_json_line(proc.stdout, f"bench/{name}.py")
    except BenchError as e:
        return shlex.join(cmd), f"failed: {e}"


def hardware() -> dict[str, str]:
    """CPU model, cores, RAM and the library versions the figures were taken with."""
    cpu = platform.processor() or platform.machine()
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = "unknown"
    try:
        kb = int(next(ln.split()[1] for ln in pathlib.Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")))
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for dist in ("jax", "jaxlib", "flax", "torch", "transformers", "peft"):
        try:  # metadata, not import: importing torch + transformers takes tens of seconds
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"CPU": cpu, "cores usable": str(usable), "RAM": ram,
            "OS": f"{platform.system()} {platform.release()}", "Python": platform.python_version(),
            "libraries": ", ".join(versions)}


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _table(name: str, result: dict) -> list[str]:
    out = ["| metric | jlora | peer | peer value | jlora / peer | better |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        unit = f" ({r['unit']})" if r.get("unit") else ""
        peer_v = r.get("peer_value")
        ratio = r["jlora"] / peer_v if peer_v else None
        out.append(f"| {r['metric']}{unit} | {_fmt(r['jlora'])} | {r.get('peer') or '—'} | {_fmt(peer_v)} "
                   f"| {_fmt(ratio) + 'x' if ratio is not None else '—'} | {r.get('better', '')} |")
    if result.get("config"):
        out.append("")
        out.append("Setup: " + ", ".join(f"{k}={v}" for k, v in result["config"].items()))
    return out


def gpu_section(gpu_log: str | None) -> list[str]:
    """The GPU section: bench/gpu_train.py's result from `gpu_log`, or why there is none."""
    lines = ["## GPU: LoRA training at the LLaMA-3.2-1B shape", "",
             "Command (one GPU, no arguments): `python bench/gpu_train.py`", ""]
    if not gpu_log:
        return lines + ["Not run: no GPU was lent to the session that generated this report. "
                        "The script is tested on CPU with `python bench/gpu_train.py --smoke`."]
    text = pathlib.Path(gpu_log).read_text()
    result = parse_json_line(text, gpu_log)
    lines += _table("gpu_train", result)
    if result.get("flops_formula"):
        lines += ["", f"MFU formula: {result['flops_formula']}"]
    return lines


def load_demo(path: pathlib.Path, saved: dict | None = None) -> dict | str:
    """jlora-demo's results from `path`, else `saved` (those of the last report), else why there are none."""
    if path.is_file():
        return json.loads(path.read_text())
    return saved or f"Not run: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} does not exist."


def demo_section(demo: dict | str) -> list[str]:
    """The real fine-tune's outcome from jlora-demo's results (see load_demo), or why there is none."""
    lines = ["## The demo fine-tune (`jlora-demo`)", "",
             "Command: `jlora-demo` (configs/smollm2-135m-demo.yaml: SmolLM2-135M-Instruct, LoRA r=8 on every "
             "linear layer, the person-facts-to-JSON task of data/demo/make.py)", ""]
    if isinstance(demo, str):
        return lines + [demo]
    b, t = demo["base"], demo["finetuned"]
    return lines + [
        f"| held-out split ({demo['n_eval']} examples) | base | fine-tuned |", "|---|---|---|",
        f"| loss (mean per answer token) | {b['loss']:.4f} | {t['loss']:.4f} |",
        f"| exact-match accuracy | {100 * b['accuracy']:.1f}% | {100 * t['accuracy']:.1f}% |", "",
        f"Training: {demo['train_steps']} steps in {demo['train_s']:.0f} s ({demo['tokens_per_s']:,.0f} tokens/s); "
        f"the whole demo (both evaluations, export) took {demo['wall_s']:.0f} s."]


FIT_RESULTS = ROOT / "docs" / "results" / "will_it_fit.json"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f}"


def fit_section(path: pathlib.Path = FIT_RESULTS) -> list[str]:
    """"Will it fit": the `jlora-train --plan` figures bench/will_it_fit.py wrote for each shipped big config."""
    lines = ["## Will it fit? (`jlora-train --plan`)", "",
             "Command: `python bench/will_it_fit.py` (each row's own command is below the table). The real "
             "train step is compiled for N fake CPU devices and read back: per-device memory from the shardings "
             "and `memory_analysis()`, collectives and dot FLOPs from the partitioned HLO with every loop weighted "
             "by its trip count. A CPU compile computes bf16 in fp32, so temp is an upper bound for accelerators. "
             "\"Fits\" means the need is at most 90% of the memory.", ""]
    if not path.is_file():
        return lines + [f"Not run: {path.relative_to(ROOT)} does not exist."]
    res = json.loads(path.read_text())
    lines += [f"Measured at commit {res['commit']} on {res['date']}, {res['machine']}, load average "
              f"{res['load_average']} (before) / {res.get('load_average_after', '?')} (after).", "",
              "| config | devices (data, fsdp, tensor) | micro-batch x seq | frozen / adapters / optimizer per device "
              "(GiB) | temp per device (GiB) | needs per device (GiB) | dot GFLOP per token | collectives per step "
              "per device (GiB) | fits |", "|---|---|---|---|---|---|---|---|---|"]
    for case in res["cases"]:
        config = case["command"].split("--config ")[1].split()[0]
        if "error" in case:
            lines.append(f"| {config} | — | — | — | — | — | — | — | failed: {case['error']} |")
            continue
        p = case["plan"]
        mesh = p["mesh"]
        coll = ", ".join(f"{k} {_gib(v)}" for k, v in p["collective_bytes"].items())
        fits = ", ".join(k for k, ok in p["fits"].items() if ok) or "none listed"
        lines.append(f"| {config} | {p['devices']} ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) | "
                     f"{p['micro_batch']} x {p['seq']} (x{p['grad_accum']} accum) | {_gib(p['param_bytes'])} / "
                     f"{_gib(p['adapter_bytes'])} / {_gib(p['opt_bytes'])} | {_gib(p['temp_bytes'])} | "
                     f"{_gib(p['device_bytes'])} | {p['flops_per_token'] / 1e9:,.1f} | {coll} | {fits} |")
    lines += [""] + [f"- `{case['command']}`" for case in res["cases"]]
    return lines


def render(results: dict[str, tuple[str, dict | str]], gpu_log: str | None, demo: dict | str) -> str:
    """docs/benchmarks.md as text."""
    lines = ["# Benchmarks", "",
             f"Generated by `python bench/report.py` on {datetime.date.today().isoformat()}. Every figure is "
             "measured by the command shown, on the hardware below; none is an estimate. A ratio above 1 "
             "means jlora's number is larger (good for throughput, bad for memory and time).", "",
             "## Hardware", ""]
    lines += [f"- {k}: {v}" for k, v in hardware().items()]
    for name, (cmd, result) in results.items():
        lines += ["", f"## {name}", "", f"Reproduce: `{cmd}`", ""]
        lines += _table(name, result) if isinstance(result, dict) else [result]
    lines += [""] + demo_section(demo)
    lines += [""] + fit_section()
    lines += [""] + gpu_section(gpu_log)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the bench scripts and write docs/benchmarks.md.")
    p.add_argument("--only", action="append", choices=BENCHES,
                   help="run only these benches, keeping the others' saved results (repeatable)")
    p.add_argument("--bench-args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one bench, e.g. train_vs_peft='--steps 5'")
    p.add_argument("--gpu-log", help="stdout of `python bench/gpu_train.py` taken on a GPU machine")
    p.add_argument("--demo-results", default=str(DEMO_RESULTS), help="the demo_results.json of a jlora-demo run")
    p.add_argument("--reuse", action="store_true", help="redraw from the saved .json instead of running the benches")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per bench")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    a = p.parse_args(argv)
    extra = {}
    for item in a.bench_args:
        name, eq, args = item.partition("=")
        if not eq or name not in BENCHES:
            p.error(f"--bench-args: expected NAME=ARGS with NAME in {BENCHES}, got {item!r}")
        extra[name] = shlex.split(args)
    out = pathlib.Path(a.out)
    saved = out.with_suffix(".json")
    if a.reuse and not saved.is_file():
        p.error(f"--reuse: {saved} does not exist (run without --reuse first)")
    # --only reruns some benches and keeps the others' saved results; --reuse reruns none
    old = json.loads(saved.read_text()) if saved.is_file() else {}
    demo = load_demo(pathlib.Path(a.demo_results), old.pop("demo", None))
    results = {name: tuple(v) for name, v in old.items()} if a.reuse or a.only else {}
    if not a.reuse:
        results.update({name: run_bench(name, extra.get(name, []), a.timeout) for name in (a.only or BENCHES)})
    results = {name: results[name] for name in BENCHES if name in results}
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = {**results, **({"demo": demo} if isinstance(demo, dict) else {})}
    saved.write_text(json.dumps(keep, indent=1) + "\n", encoding="utf-8")
    out.write_text(render(results, a.gpu_log, demo), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
