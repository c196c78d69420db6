"""Greedy decode throughput, jlora vs HF `generate`, on SmolLM2-135M from its GGUF (fp32, CPU), with a LoRA adapter.

The adapter is random r=8 on q_proj and v_proj (A and B both nonzero). jlora runs it unmerged (factored,
through lora_apply) and merged; HF runs the same adapter through `peft` (unmerged) and after
`merge_and_unload()`. Batch 1 and batch 8 (prompts of different lengths, left-padded), 128 new tokens,
EOS disabled so every run makes all 128. Each timing is the best of --iters interleaved runs (the machine may
be shared), after a jlora warm-up run that compiles, and includes prefill. HF runs at its faster torch thread
setting (a short probe). Prints tokens/s and the ratios jlora / HF (target >= 1.6 at batch 1), and writes
every figure, with the commit, date, machine and load average, to docs/results/generate_vs_hf.json (--out).
Usage: python bench/generate_vs_hf.py [--new-tokens 128] [--iters 2] [--out FILE]
"""

import argparse
import copy
import os
import pathlib
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import jlora  # noqa: E402
from jlora.infer.generate import Generator  # noqa: E402
from jlora.train.provenance import provenance, write_result  # noqa: E402
from jlora.formats.tokenizer import load_tokenizer  # noqa: E402
from jlora.formats.weights import load_pretrained, resolve_model_path  # noqa: E402

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
]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "generate_vs_hf.json"), help="the result file")
    args = parser.parse_args()
    started = provenance()
    n = args.new_tokens

    path = pathlib.Path(resolve_model_path("smollm2-135m"))
    cfg, params = load_pretrained(path)
    tok = load_tokenizer(path)
    params = jax.device_put(params)
    trainable = random_adapter(params, jax.random.key(0))
    prompts = {b: [tok.encode(p) for p in PROMPTS[:b]] for b in (1, 8)}

    model = jlora.Llama(cfg)
    t0 = time.perf_counter()
    unmerged = Generator(model, params, trainable)
    merged = Generator(model, jlora.merge(params, trainable), None)
    prep_s = (time.perf_counter() - t0) / 2

    hf = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # always make n tokens, like jlora's eos_id=()
    hf.generation_config.pad_token_id = 0
    hf_merged = to_peft(copy.deepcopy(hf), trainable).merge_and_unload().eval()
    hf_peft = to_peft(hf, trainable)

    def hf_inputs(rows):
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def run_hf(model, rows, threads, new_tokens=n):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model.generate(**hf_inputs(rows), do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens)
        return out[:, -new_tokens:].tolist()

    # torch's threads spin while they wait, which on a shared 2-core machine can cost HF several x. A short
    # probe picks HF's faster thread setting (default or 1), and that is the baseline.
    probe = {}
    for t in sorted({torch.get_num_threads(), 1}):
        run_hf(hf_merged, prompts[1], t, 4)
        start = time.perf_counter()
        run_hf(hf_merged, prompts[1], t, 16)
        probe[t] = 16 / (time.perf_counter() - start)
    hf_threads = max(probe, key=probe.get)
    runs = {"jlora unmerged": lambda rows: unmerged.generate(rows, max_new_tokens=n, eos_id=()),
            "jlora merged": lambda rows: merged.generate(rows, max_new_tokens=n, eos_id=()),
            "HF peft": lambda rows: run_hf(hf_peft, rows, hf_threads),
            "HF merged": lambda rows: run_hf(hf_merged, rows, hf_threads)}
    seconds, outputs = {}, {}
    for b, rows in prompts.items():
        for name in ("jlora unmerged", "jlora merged"):
            runs[name](rows)  # warm-up: compiles this batch's shapes
        for _ in range(args.iters):  # interleaved, so a noisy minute hurts every contender alike
            for name, fn in runs.items():
                start = time.perf_counter()
                out = fn(rows)
                seconds[name, b] = min(seconds.get((name, b), float("inf")), time.perf_counter() - start)
                outputs[name, b] = out
    rate = {(name, b): b * n / s for (name, b), s in seconds.items()}

    print(f"SmolLM2-135M fp32 greedy decode, {n} new tokens (prefill included), random r=8 q,v LoRA, "
          f"CPU ({os.cpu_count()} cores), best of {args.iters}")
    print(f"jlora one-time weight layout (Generator) per model: {prep_s:.1f} s, not in the timings")
    print(f"HF threads: {hf_threads} (16-token probe at batch 1, tokens/s by thread count: "
          + ", ".join(f"{t}: {r:.1f}" for t, r in probe.items()) + ")")
    print(f"{'tokens/s':16s}{'batch 1':>10s}{'batch 8':>10s}")
    for name in runs:
        print(f"{name:16s}" + "".join(f"{rate[name, b]:10.1f}" for b in prompts))
    for ours, theirs in (("jlora unmerged", "HF peft"), ("jlora merged", "HF merged"), ("jlora merged", "HF peft")):
        ratios = "   ".join(f"batch {b}: {rate[ours, b] / rate[theirs, b]:.2f}x" for b in prompts)
        print(f"ratio {ours} / {theirs}: {ratios}")
    for b in prompts:  # greedy outputs should agree; a late flip from fp32 rounding is possible
        ours, theirs = outputs["jlora unmerged", b], outputs["HF peft", b]
        first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), n) for x, y in zip(ours, theirs)]
        print(f"batch {b}: first token where jlora and HF peft differ, per row ({n} = none): {first}")
    rows = [{"metric": f"greedy decode, batch {b}, {label}", "unit": "tokens/s", "jlora": rate[ours, b],
             "peer": theirs, "peer_value": rate[theirs, b], "better": "higher"}
            for b in prompts
            for label, ours, theirs in (("adapter unmerged", "jlora unmerged", "HF peft"),
                                        ("adapter merged", "jlora merged", "HF merged"))]
    config = {"model": "SmolLM2-135M (GGUF, dequantized)", "dtype": "float32", "new_tokens": n,
              "lora": "random r=8 q_proj,v_proj", "hf_threads": hf_threads, "best_of": args.iters}
    command = shlex.join(["python", "bench/generate_vs_hf.py", *sys.argv[1:]])
    out = write_result(args.out, started, {"bench": "generate_vs_hf", "command": command, "config": config,
                                           "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
