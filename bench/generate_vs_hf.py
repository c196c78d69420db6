"""Greedy decode throughput, jlora vs HF `generate`, on SmolLM2-135M from its GGUF (fp32, CPU), with a LoRA adapter.

--model gemma3-270m runs the same on Gemma 3 270M (the base model's Q4_K_M GGUF; jlora keeps a ring of 512
slots for its local layers, HF its own sliding-window cache), writing docs/results/generate_vs_hf_gemma3.json.
Both sides read the same GGUF: jlora dequantizes it itself, HF through transformers' GGUF loader.
The adapter is random r=8 on q_proj and v_proj (A and B both nonzero). jlora runs it unmerged (factored,
through lora_apply) and merged; HF runs the same adapter through `peft` (unmerged) and after
`merge_and_unload()`. Batch 1 and batch 8 (prompts of different lengths, left-padded), 128 new tokens,
EOS disabled so every run makes all 128. Each timing is the best of --iters interleaved runs (the machine may
be shared), after a jlora warm-up run that compiles, and includes prefill. HF runs at its faster torch thread
setting (a short probe). Prints tokens/s and the ratios jlora / HF (target >= 1.6 at batch 1), and writes
every figure, with the commit, date, machine and load average, to docs/results/generate_vs_hf.json (--out).
--baseline DIR measures jlora a second time, importing it from another checkout (e.g. `git worktree add
/tmp/base <commit>`). Then both jlora versions run in side processes (bench/baseline_side.py): each loads the
model and builds its decoders once, and answers one timed decode at a time, so every round runs current jlora,
baseline jlora, then HF, and each batch's warm-up (compiling) request is not counted. The table, the result rows
("... @ <commit>") and a ratio current / baseline per figure gain the baseline's; without it, jlora runs in
this process as it always did.
Usage: python bench/generate_vs_hf.py [--model smollm2-135m] [--new-tokens 128] [--iters 2] [--baseline DIR]
                                     [--out FILE]
"""

import argparse
import copy
import functools
import os
import pathlib
import shlex
import sys
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
    from jlora.infer.generate import Generator
    from jlora.train.provenance import provenance, write_result
except ModuleNotFoundError:  # a --baseline checkout from before it
    from jlora.generate import Generator
    from jlora.provenance import provenance, write_result
    from jlora.tokenizer import load_tokenizer
    from jlora.weights import load_pretrained, resolve_model_path

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results"
# --model: resolve_model_path alias -> (what the result calls it, its default result file)
MODELS = {
    "smollm2-135m": ("SmolLM2-135M (GGUF, dequantized)", "generate_vs_hf.json"),
    "gemma3-270m": ("Gemma 3 270M base (GGUF Q4_K_M, dequantized)", "generate_vs_hf_gemma3.json"),
}
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Explain why the sky is blue in one sentence.",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "Translate to French: I would like a cup of coffee, please.",
]
Tokens = list[list[int]]
Runner = Callable[[Tokens], tuple[float, Tokens]]  # prompt rows -> (seconds, new tokens per row)


def random_adapter(params: dict, key) -> dict:
    """A q,v rank-8 adapter with random nonzero A and B (a fresh LoRA has B = 0, which would hide its cost)."""
    lcfg = jlora.LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    _, trainable = jlora.split(params, lcfg, key)

    def fill(pair):
        ka, kb = jax.random.split(jax.random.fold_in(key, pair.a.size))
        return pair.replace(a=0.05 * jax.random.normal(ka, pair.a.shape), b=0.05 * jax.random.normal(kb, pair.b.shape))

    return jax.tree.map(fill, trainable, is_leaf=lambda x: isinstance(x, jlora.LoraPair))


def to_peft(hf_model, trainable: dict):
    """Wrap the HF model with peft and copy the jlora pairs in (A stored [r, in], B [out, r])."""
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(hf_model, config)
    state = {}
    for name, sub in trainable["layers"]["self_attn"].items():
        a, b = np.asarray(sub["kernel"].a), np.asarray(sub["kernel"].b)  # [L,in,r], [L,r,out]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            state[f"{prefix}.lora_A.default.weight"] = torch.from_numpy(a[i].T.copy())
            state[f"{prefix}.lora_B.default.weight"] = torch.from_numpy(b[i].T.copy())
    missing = set(state) - set(model.state_dict())
    assert not missing, f"peft names differ: {sorted(missing)[:3]}"
    model.load_state_dict(state, strict=False)
    return model.eval()


def hf_models(path: pathlib.Path, trainable: dict) -> tuple:
    """HF's two models of the adapter from the GGUF: (through peft, merged with merge_and_unload), EOS disabled."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # always make n tokens, like jlora's eos_id=()
    hf.generation_config.pad_token_id = 0
    hf_merged = to_peft(copy.deepcopy(hf), trainable).merge_and_unload().eval()
    return to_peft(hf, trainable), hf_merged


def run_hf(model, rows: Tokens, threads: int, new_tokens: int) -> Tokens:
    """HF's greedy decode of the prompt rows (left-padded) on `threads` torch threads; the new tokens per row."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.set_num_threads(threads)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
    return out[:, -new_tokens:].tolist()


def timed_hf(model, threads: int, n: int, rows: Tokens) -> tuple[float, Tokens]:
    """(seconds, new tokens) of one `run_hf`."""
    start = time.perf_counter()
    out = run_hf(model, rows, threads, n)
    return time.perf_counter() - start, out


def hf_thread_probe(model, rows: Tokens) -> tuple[int, dict[int, float]]:
    """HF's faster torch thread setting (default or 1) by a short decode at each, and tokens/s by setting.

    torch's threads spin while they wait, which on a shared 2-core machine can cost HF several x."""
    probe = {}
    for t in sorted({torch.get_num_threads(), 1}):
        run_hf(model, rows, t, 4)
        start = time.perf_counter()
        run_hf(model, rows, t, 16)
        probe[t] = 16 / (time.perf_counter() - start)
    return max(probe, key=probe.get), probe


def jlora_decoders(params: dict, trainable: dict, cfg) -> tuple[dict[str, Generator], float]:
    """jlora's decoders of the adapter, {"unmerged": factored, "merged": folded into the weights}, and the
    one-time weight layout (Generator construction) in seconds per decoder."""
    model = jlora.build_model(cfg) if hasattr(jlora, "build_model") else jlora.Llama(cfg)  # a baseline may predate it
    t0 = time.perf_counter()
    gens = {
        "unmerged": Generator(model, params, trainable),
        "merged": Generator(model, jlora.merge(params, trainable), None),
    }
    return gens, (time.perf_counter() - t0) / 2


def timed_decode(gen: Generator, n: int, rows: Tokens) -> tuple[float, Tokens]:
    """(seconds, new tokens) of one jlora greedy decode of the prompt rows, n new tokens each (EOS disabled)."""
    start = time.perf_counter()
    out = gen.generate(rows, max_new_tokens=n, eos_id=())
    return time.perf_counter() - start, out


def start_side(setup: dict) -> tuple[dict, Handler]:
    """The jlora side process (--side jlora): load setup["model"], build both decoders of the bench's adapter;
    then each request {"decoder", "rows", "new_tokens"} is timed and answered with {"seconds", "out"}."""
    cfg, params = load_pretrained(setup["model"])
    params = jax.device_put(params)
    gens, prep_s = jlora_decoders(params, random_adapter(params, jax.random.key(0)), cfg)

    def handle(request: dict) -> dict:
        seconds, out = timed_decode(gens[request["decoder"]], request["new_tokens"], request["rows"])
        return {"seconds": seconds, "out": out}

    return {"jlora": jlora.__file__, "prep_s": prep_s}, handle


def ask_decode(side: SideProcess, decoder: str, n: int, rows: Tokens) -> tuple[float, Tokens]:
    """One decode by a side process's decoder: (seconds, as the side timed it; new tokens)."""
    answer = side.ask({"decoder": decoder, "rows": rows, "new_tokens": n})
    return answer["seconds"], answer["out"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["jlora"], help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", choices=MODELS, help="the GGUF both sides decode with")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--baseline", help="a jlora checkout to measure too, in the same rounds")
    parser.add_argument("--out", help="the result file (default: docs/results/, the --model's file)")
    args = parser.parse_args()
    if args.side:
        serve_side(start_side)
        return
    title, result_file = MODELS[args.model]
    args.out = args.out or str(RESULTS / result_file)
    started = provenance()
    n = args.new_tokens
    commit = short_commit(args.baseline) if args.baseline else None
    base = f" @ {commit}" if commit else ""  # the baseline's names: "jlora unmerged @ <commit>"
    tags = ("", base) if commit else ("",)  # this checkout's names, the baseline's

    path = pathlib.Path(resolve_model_path(args.model))
    with ExitStack() as stack:
        sides: dict[str, SideProcess] = {}
        if commit:  # both jlora versions as side processes, started first so that they load while this one does
            for tag, checkout in zip(tags, (None, args.baseline)):
                side = SideProcess(__file__, "jlora", {"model": str(path)}, f"jlora{tag}", jlora_from=checkout)
                sides[tag] = stack.enter_context(side)
        cfg, params = load_pretrained(path)
        tok = load_tokenizer(path)
        params = jax.device_put(params)
        trainable = random_adapter(params, jax.random.key(0))
        prompts = {b: [tok.encode(p) for p in PROMPTS[:b]] for b in (1, 8)}
        jlora_runs: dict[str, Runner] = {}
        prep_s: dict[str, float] = {}
        if not sides:  # jlora in this process
            gens, prep_s[""] = jlora_decoders(params, trainable, cfg)
            jlora_runs = {f"jlora {d}": functools.partial(timed_decode, gen, n) for d, gen in gens.items()}
        hf_peft, hf_merged = hf_models(path, trainable)
        for tag, side in sides.items():  # every side has loaded before anything is timed
            prep_s[tag] = side.ready()["prep_s"]
            jlora_runs |= {f"jlora {d}{tag}": functools.partial(ask_decode, side, d, n) for d in ("unmerged", "merged")}

        hf_threads, probe = hf_thread_probe(hf_merged, prompts[1])
        runs: dict[str, Runner] = {
            **jlora_runs,
            "HF peft": functools.partial(timed_hf, hf_peft, hf_threads, n),
            "HF merged": functools.partial(timed_hf, hf_merged, hf_threads, n),
        }
        seconds: dict[tuple[str, int], float] = {}
        outputs: dict[tuple[str, int], Tokens] = {}
        for b, rows in prompts.items():
            for run in jlora_runs.values():
                run(rows)  # warm-up: compiles this batch's shapes
            for _ in range(args.iters):  # interleaved, so a noisy minute hurts every contender alike
                for name, run in runs.items():
                    took, outputs[name, b] = run(rows)
                    seconds[name, b] = min(seconds.get((name, b), float("inf")), took)
    rate = {(name, b): b * n / s for (name, b), s in seconds.items()}

    print(
        f"{title.split(' (')[0]} fp32 greedy decode, {n} new tokens (prefill included), random r=8 q,v LoRA, "
        f"CPU ({os.cpu_count()} cores), best of {args.iters}"
    )
    also = f" (jlora{base}: {prep_s[base]:.1f} s)" if base else ""
    print(f"jlora one-time weight layout (Generator) per model: {prep_s['']:.1f} s{also}, not in the timings")
    print(
        f"HF threads: {hf_threads} (16-token probe at batch 1, tokens/s by thread count: "
        + ", ".join(f"{t}: {r:.1f}" for t, r in probe.items())
        + ")"
    )
    width = max(16, *(len(name) + 2 for name in runs))
    print(f"{'tokens/s':{width}s}{'batch 1':>10s}{'batch 8':>10s}")
    for name in runs:
        print(f"{name:{width}s}" + "".join(f"{rate[name, b]:10.1f}" for b in prompts))
    pairs = [("jlora unmerged", "HF peft"), ("jlora merged", "HF merged"), ("jlora merged", "HF peft")]
    pairs += [(f"jlora {d}", f"jlora {d}{base}") for d in ("unmerged", "merged") if base]
    for ours, theirs in pairs:
        ratios = "   ".join(f"batch {b}: {rate[ours, b] / rate[theirs, b]:.2f}x" for b in prompts)
        print(f"ratio {ours} / {theirs}: {ratios}")
    agree = [("jlora unmerged", "HF peft"), ("jlora merged", "HF merged")]
    agree += [("jlora unmerged", f"jlora unmerged{base}")] if base else []
    first_diff: dict[str, list[int]] = {}  # "<ours> vs <theirs>, batch <b>": per row, the first differing token
    for b in prompts:  # greedy outputs should agree; a late flip from fp32 rounding is possible
        for ours_name, other in agree:
            ours, theirs = outputs[ours_name, b], outputs[other, b]
            first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), n) for x, y in zip(ours, theirs)]
            first_diff[f"{ours_name} vs {other}, batch {b}"] = first
            print(f"batch {b}: first token where {ours_name} and {other} differ, per row ({n} = none): {first}")
    rows = [
        {
            "metric": f"greedy decode, batch {b}, {label}{tag}",
            "unit": "tokens/s",
            "jlora": rate[ours + tag, b],
            "peer": theirs,
            "peer_value": rate[theirs, b],
            "better": "higher",
        }
        for tag in tags  # the baseline's rows after this checkout's
        for b in prompts
        for label, ours, theirs in (
            ("adapter unmerged", "jlora unmerged", "HF peft"),
            ("adapter merged", "jlora merged", "HF merged"),
        )
    ]
    config = {
        "model": title,
        "dtype": "float32",
        "new_tokens": n,
        "lora": "random r=8 q_proj,v_proj",
        "hf_threads": hf_threads,
        "best_of": args.iters,
    }
    if base:
        config |= {"baseline": commit, "jlora_sides": "side processes, this checkout's and the baseline's"}
    command = shlex.join(["python", "bench/generate_vs_hf.py", *sys.argv[1:]])
    out = write_result(
        args.out,
        started,
        {"bench": "generate_vs_hf", "command": command, "config": config, "rows": rows, "first_diff": first_diff},
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
