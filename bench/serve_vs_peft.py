"""Many adapters on one base: jlora's continuous-batching engine (what `jlora-serve` runs) vs HF PEFT's
mixed-batch `generate(..., adapter_names=[...])`, on SmolLM2-135M from its GGUF (fp32, CPU).

16 requests of 64 new tokens each (EOS disabled), sent at once, in three settings: all on one adapter;
8 different adapters of rank 8; 8 adapters of ranks 4-32. Adapters are random (A and B nonzero) on
q_proj and v_proj. jlora: the requests go straight into `jlora.infer.engine.Engine` (the server's engine,
without HTTP) with a stack sized to the setting; latency is each request's submit-to-last-token time.
PEFT: the 16 prompts as one left-padded batch, each row naming its adapter (the adapters are written by
`jlora.export_peft` and loaded with peft's `load_adapter`); every request's latency is the batch's time.
Threads: jlora runs XLA's CPU client as it comes (a pool of one thread per core; its decode steps are
compiled with `jlora.infer.generate.decode_compiler_options()`, recorded); PEFT runs at the faster of 1 torch
thread and torch's default, by a short probe (on a shared machine, spinning threads can cost torch several x).
Each figure is the best of --rounds interleaved rounds after a warm-up round that compiles. Prints
throughput and p50/p99 latency, the ratios, and writes every figure with the commit, date, machine and
load average to docs/results/serve_vs_peft.json (--out).
Targets: 8 adapters >= 0.8x the one-adapter throughput; mixed ranks >= 2x PEFT's mixed batch.
--baseline DIR measures jlora a second time, importing it from another checkout (e.g. `git worktree add
/tmp/base <commit>`). Then both jlora versions run in side processes (bench/baseline_side.py): each loads the
model and builds its engines once, and answers one timed setting at a time, so every round runs current jlora,
baseline jlora, then PEFT, setting by setting (round 0, which compiles, is not counted). The table, the result
rows ("<setting> @ <commit>: ...") and a ratio current / baseline per figure gain the baseline's; without it,
jlora runs in this process as it always did.
Usage: python bench/serve_vs_peft.py [--new-tokens 64] [--rounds 2] [--baseline DIR] [--out FILE]
"""

import argparse
import functools
import os
import pathlib
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import peft
import torch
import transformers
from baseline_side import Handler, SideProcess, serve_side, short_commit

import jlora

try:  # the package layout since 760039e
    from jlora import load_pretrained, resolve_model_path
    from jlora.formats.tokenizer import load_tokenizer
    from jlora.infer.decode import decode_compiler_options
    from jlora.infer.engine import Engine, Request
    from jlora.infer.generate import Generator
    from jlora.infer.lora_stack import AdapterStack
    from jlora.train.provenance import provenance, write_result
except ModuleNotFoundError:  # a --baseline checkout from before it
    from jlora.adapter_stack import AdapterStack
    from jlora.batching import Engine, Request
    from jlora.decode_model import decode_compiler_options
    from jlora.generate import Generator
    from jlora.provenance import provenance, write_result
    from jlora.tokenizer import load_tokenizer
    from jlora.weights import load_pretrained, resolve_model_path

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Explain why the sky is blue in one sentence.",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "Translate to French: I would like a cup of coffee, please.",
    "The largest planet in our solar system is",
    "List three fruits:",
    "import numpy as np\n",
    "A haiku about autumn:",
    "The opposite of hot is",
    "Summarize: the meeting moved to Tuesday because the room was booked.",
    "Q: What is 12 times 12?\nA:",
    "My favourite book is",
]
SETTINGS = {"one adapter": [8] * 1, "8 adapters r=8": [8] * 8, "8 adapters r=4-32": [4, 8, 12, 16, 20, 24, 28, 32]}
# each request's adapter per setting: setting k's adapters are named s<k>a<j>, and the requests take them in turn
NAMES = {s: [f"s{k}a{i % len(ranks)}" for i in range(len(PROMPTS))] for k, (s, ranks) in enumerate(SETTINGS.items())}
Tokens = list[list[int]]
Run = tuple[float, list[float], Tokens]  # (wall seconds, per-request latencies, per-request new tokens)


def random_adapter(params: dict, rank: int, seed: int):
    """(LoraConfig, trainable) on q_proj and v_proj with random nonzero A and B (alpha = 2 rank)."""
    lcfg = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=("q_proj", "v_proj"))
    _, trainable = jlora.split(params, lcfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    fill = lambda p: p.replace(
        a=np.float32(0.05) * rng.standard_normal(p.a.shape, np.float32),
        b=np.float32(0.05) * rng.standard_normal(p.b.shape, np.float32),
    )
    return lcfg, jax.tree.map(fill, trainable, is_leaf=lambda x: isinstance(x, jlora.LoraPair))


def run_engine(engine: Engine, rows: Tokens, names: list[str], n: int) -> Run:
    """Submit every request at once; (wall seconds, per-request latencies, outputs)."""
    done, lock, left = threading.Event(), threading.Lock(), [len(rows)]
    lat, outs = [0.0] * len(rows), [[] for _ in rows]
    start = time.perf_counter()

    def emitter(i):
        def emit(new, fin):
            outs[i].extend(new)
            if fin:
                lat[i] = time.perf_counter() - start
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        return emit

    for i, (ids, name) in enumerate(zip(rows, names)):
        assert engine.submit(Request(ids, name, n, emitter(i)))
    done.wait()
    return time.perf_counter() - start, lat, outs


def bench_adapters(params: dict) -> dict[str, list[tuple]]:
    """Each setting's random adapters, (LoraConfig, trainable) per rank, seeded by the setting and the place."""
    return {
        s: [random_adapter(params, r, 100 * k + j) for j, r in enumerate(ranks)]
        for k, (s, ranks) in enumerate(SETTINGS.items())
    }


def jlora_engines(cfg, params: dict, adapters: dict, rows: Tokens, n: int) -> dict[str, Engine]:
    """One Engine per setting over an AdapterStack of that setting's adapters (s<k>a<j>), sized for the requests."""
    model = jlora.Llama(cfg)
    engines = {}
    for k, (s, ranks) in enumerate(SETTINGS.items()):
        stack = AdapterStack(cfg, capacity=len(ranks), max_rank=max(ranks), targets=("q_proj", "v_proj"))
        for j, (_, tree) in enumerate(adapters[s]):
            stack.add(f"s{k}a{j}", tree)
        engines[s] = Engine(
            Generator(model, params, stack=stack),
            max_batch=len(rows),
            max_len=max(map(len, rows)) + n + 16,
            max_queue=len(rows),
            eos=[],
        )
    return engines


def peft_with_adapters(path: pathlib.Path, cfg, adapters: dict) -> peft.PeftModel:
    """HF's model from the GGUF (EOS disabled) under PEFT, with every setting's adapters loaded by name
    (s<k>a<j>, each written by `jlora.export_peft`)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    tmp = pathlib.Path(tempfile.mkdtemp())
    peft_model = None
    for k, s in enumerate(SETTINGS):
        for j, (lcfg, tree) in enumerate(adapters[s]):
            d = tmp / f"s{k}a{j}"
            jlora.export_peft(d, tree, lcfg, cfg)
            if peft_model is None:
                peft_model = peft.PeftModel.from_pretrained(hf, str(d), adapter_name=d.name)
            else:
                peft_model.load_adapter(str(d), adapter_name=d.name)
    return peft_model.eval()


def start_side(setup: dict) -> tuple[dict, Handler]:
    """The jlora side process (--side jlora): load setup["model"] and build the engines for setup["rows"] and
    setup["new_tokens"]; then each request {"setting"} is run and answered with {"wall", "lat", "outs"}."""
    cfg, params = load_pretrained(setup["model"])
    rows, n = setup["rows"], setup["new_tokens"]
    engines = jlora_engines(cfg, params, bench_adapters(params), rows, n)

    def handle(request: dict) -> dict:
        wall, lat, outs = run_engine(engines[request["setting"]], rows, NAMES[request["setting"]], n)
        return {"wall": wall, "lat": lat, "outs": outs}

    return {"jlora": jlora.__file__, "decode_compiler_options": decode_compiler_options()}, handle


def ask_engine(side: SideProcess, setting: str) -> Run:
    """One run of a setting's requests by a side process's engine, as the side timed it."""
    answer = side.ask({"setting": setting})
    return answer["wall"], answer["lat"], answer["outs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["jlora"], help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", help="a jlora checkout to measure too, in the same rounds")
    parser.add_argument("--out", default=str(RESULTS / "serve_vs_peft.json"), help="the result file")
    args = parser.parse_args()
    if args.side:
        serve_side(start_side)
        return
    started = provenance()
    n, b = args.new_tokens, len(PROMPTS)
    commit = short_commit(args.baseline) if args.baseline else None
    base = f" @ {commit}" if commit else ""  # the baseline's names: "<setting> @ <commit>"
    tags = ("", base) if commit else ("",)  # this checkout's names, the baseline's

    path = pathlib.Path(resolve_model_path("smollm2-135m"))
    cfg, params = load_pretrained(path)
    tok = load_tokenizer(path)
    rows = [tok.encode(p) for p in PROMPTS]
    with ExitStack() as stack:
        jlora_runs: dict[str, Callable[[str], Run]] = {}  # by tag: setting -> its run
        sides: dict[str, SideProcess] = {}
        if commit:  # both jlora versions as side processes, started first so that they load while this one does
            setup = {"model": str(path), "rows": rows, "new_tokens": n}
            for tag, checkout in zip(tags, (None, args.baseline)):
                side = SideProcess(__file__, "jlora", setup, f"jlora{tag}", jlora_from=checkout)
                sides[tag] = stack.enter_context(side)
                jlora_runs[tag] = functools.partial(ask_engine, side)
        adapters = bench_adapters(params)
        if not sides:  # jlora in this process
            engines = jlora_engines(cfg, params, adapters, rows, n)
            jlora_runs[""] = lambda s: run_engine(engines[s], rows, NAMES[s], n)

        peft_model = peft_with_adapters(path, cfg, adapters)
        width = max(map(len, rows))
        hf_in = {
            "input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }

        def run_peft(setting, new_tokens=n):
            start = time.perf_counter()
            with torch.inference_mode():
                out = peft_model.generate(
                    **hf_in,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    adapter_names=NAMES[setting],
                )
            return time.perf_counter() - start, out[:, -new_tokens:].tolist()

        def timed_peft(setting: str) -> Run:
            wall, outs = run_peft(setting)
            return wall, [wall] * b, outs  # every request waits for the whole batch

        side_info = {tag: side.ready() for tag, side in sides.items()}  # every side has loaded before any timing
        probe = {}  # torch's spinning threads can cost it several x on a shared machine: take its faster setting
        for t in sorted({torch.get_num_threads(), 1}):
            torch.set_num_threads(t)
            run_peft("one adapter", 2)
            probe[t] = run_peft("one adapter", 8)[0]
        torch.set_num_threads(min(probe, key=probe.get))

        contenders = {**{f"jlora{tag}": run for tag, run in jlora_runs.items()}, "peft": timed_peft}
        best: dict[tuple[str, str], Run] = {}  # by (contender, setting): its fastest run
        for rnd in range(args.rounds + 1):  # round 0 compiles jlora's shapes and warms every side
            for s in SETTINGS:  # interleaved: current jlora, baseline jlora, PEFT
                for contender, run in contenders.items():
                    got = run(s)
                    if rnd and got[0] < best.get((contender, s), (float("inf"),))[0]:
                        best[contender, s] = got

    print(
        f"SmolLM2-135M fp32, {b} requests x {n} new tokens sent at once, random LoRA on q,v, CPU "
        f"({os.cpu_count()} cores), best of {args.rounds}; PEFT torch threads {torch.get_num_threads()}"
    )
    print(f"{'':20s}{'jlora tok/s':>12s}{'p50 s':>8s}{'p99 s':>8s}{'PEFT tok/s':>12s}{'PEFT s':>8s}{'ratio':>7s}")
    rows_out, rate, figures = [], {}, {}
    for tag in tags:  # the baseline's rows after this checkout's
        for s in SETTINGS:
            wall, lat, outs = best[f"jlora{tag}", s]
            pwall, _, pouts = best["peft", s]
            rate[tag, s] = b * n / wall
            p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
            figures[tag, s] = {"throughput": rate[tag, s], "p50 latency": p50, "p99 latency": p99}
            if not tag:
                print(
                    f"{s:20s}{rate[tag, s]:12.1f}{p50:8.2f}{p99:8.2f}{b * n / pwall:12.1f}{pwall:8.2f}"
                    f"{rate[tag, s] / (b * n / pwall):7.2f}x"
                )
                first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), n) for x, y in zip(outs, pouts)]
                print(f"  first token where jlora and PEFT differ, per request ({n} = none): {first}")
            rows_out += [
                {
                    "metric": f"{s}{tag}: throughput",
                    "unit": "tokens/s",
                    "jlora": rate[tag, s],
                    "peer": "HF PEFT mixed batch",
                    "peer_value": b * n / pwall,
                    "better": "higher",
                },
                {
                    "metric": f"{s}{tag}: p50 latency",
                    "unit": "s",
                    "jlora": p50,
                    "peer": "HF PEFT mixed batch",
                    "peer_value": pwall,
                    "better": "lower",
                },
                {
                    "metric": f"{s}{tag}: p99 latency",
                    "unit": "s",
                    "jlora": p99,
                    "peer": "HF PEFT mixed batch",
                    "peer_value": pwall,
                    "better": "lower",
                },
            ]
    if base:
        print(f"jlora{base}:")
        for s in SETTINGS:
            pwall, outs = best["peft", s][0], best[f"jlora{base}", s][2]
            f = figures[base, s]
            print(
                f"{s:20s}{f['throughput']:12.1f}{f['p50 latency']:8.2f}{f['p99 latency']:8.2f}{b * n / pwall:12.1f}"
                f"{pwall:8.2f}{f['throughput'] / (b * n / pwall):7.2f}x"
            )
            print(
                f"  ratio jlora / jlora{base}: " + ", ".join(f"{k} {figures['', s][k] / v:.2f}x" for k, v in f.items())
            )
            first = [
                next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), n) for x, y in zip(best["jlora", s][2], outs)
            ]
            print(f"  first token where jlora and jlora{base} differ, per request ({n} = none): {first}")
    peft_mixed = b * n / best["peft", "8 adapters r=4-32"][0]
    for tag in tags:
        many, mixed = rate[tag, "8 adapters r=8"] / rate[tag, "one adapter"], rate[tag, "8 adapters r=4-32"]
        print(
            f"{'jlora' + tag + ': ' if tag else ''}8 adapters / one adapter: {many:.2f}x (target >= 0.8); "
            f"mixed ranks jlora / PEFT: {mixed / peft_mixed:.2f}x (target >= 2)"
        )
    config = {
        "model": "SmolLM2-135M (GGUF, dequantized)",
        "dtype": "float32",
        "requests": b,
        "new_tokens": n,
        "lora": "random, q_proj,v_proj",
        "settings": {s: r for s, r in SETTINGS.items()},
        "peft_threads": torch.get_num_threads(),
        "best_of": args.rounds,
        "jlora_decode_compiler_options": decode_compiler_options(),
        "jlora_side": "jlora.infer.engine.Engine in process (jlora-serve's engine, no HTTP)",
    }
    if base:
        config |= {
            "baseline": commit,
            "baseline_decode_compiler_options": side_info[base]["decode_compiler_options"],
            "jlora_side": "jlora's Engine (jlora-serve's engine, no HTTP) in side processes, this checkout's "
            "and the baseline's",
        }
    command = shlex.join(["python", "bench/serve_vs_peft.py", *sys.argv[1:]])
    out = write_result(
        args.out, started, {"bench": "serve_vs_peft", "command": command, "config": config, "rows": rows_out}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
