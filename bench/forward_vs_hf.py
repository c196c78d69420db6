"""Forward-pass throughput, jlora vs HF transformers, on SmolLM2-135M from its GGUF (fp32, CPU).

Both models get the same dequantized weights and the same random batch [4, 256]. jlora runs a jitted
forward with params as an argument; HF runs under torch.inference_mode() with torch's default threads.
Prints tokens/s for both, their ratio (jlora / HF, target >= 1.0) and jlora's first-compile time.
Then the LoRA overhead: the same forward with a random r=16 adapter on every linear layer, jlora
factored (`jlora.apply`, W+AB never formed) vs the same adapter loaded by HF `peft` from jlora's PEFT
export, each side's slowdown against its own base forward. Writes every figure, with the commit, date,
machine and load average, to docs/results/forward_vs_hf.json (--out), which bench/report.py renders.
Usage: python bench/forward_vs_hf.py [--batch 4] [--seq 256] [--iters 5] [--out FILE]
"""

import argparse
import os
import pathlib
import shlex
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # true fp32 matmuls, like torch's default

import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers

import jlora
from jlora.formats.peft_adapter import export_peft
from jlora.formats.weights import read_pretrained, resolve_model_path
from jlora.models.llama import Llama
from jlora.train.provenance import provenance, write_result

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results"


def timed(fn) -> float:
    """Seconds taken by one call of fn."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_adapter(cfg, params, rank: int = 16):
    """(LoraConfig, trainable) on every linear layer, with B nonzero so the adapter changes the logits."""
    lcfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets="all-linear")
    _, trainable = jlora.split(params, lcfg, jax.random.key(0))
    fill = lambda p: p.replace(b=0.02 * jax.random.normal(jax.random.key(1), p.b.shape, p.b.dtype))
    return lcfg, jax.tree.map(fill, trainable, is_leaf=lambda x: isinstance(x, jlora.LoraPair))


def interleaved_best(fns: dict, iters: int) -> dict:
    """Best seconds of `iters` calls of each fn, interleaved: a neighbour's load hits every side alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(iters):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "forward_vs_hf.json"), help="the result file")
    args = parser.parse_args()
    started = provenance()

    path = pathlib.Path(resolve_model_path("smollm2-135m"))
    cfg, params = read_pretrained(path)
    params = jax.device_put(params)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq

    forward = jax.jit(lambda p, x: Llama(cfg).apply({"params": p}, x))
    x = jnp.asarray(ids, jnp.int32)
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = forward.lower(params, x).compile()  # trace + XLA compile, without the first run
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    ours_logits = compiled(params, x).block_until_ready()  # warm-up, and the sanity-check reference

    lcfg, trainable = random_adapter(cfg, params)
    lora_forward = jax.jit(lambda p, t, x: jlora.apply(Llama(cfg), p, t, x))
    ours_lora_logits = lora_forward(params, trainable, x).block_until_ready()  # compile + warm-up

    hf = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    xt = torch.as_tensor(ids)
    with tempfile.TemporaryDirectory() as adapter_dir:
        export_peft(adapter_dir, jax.device_get(trainable), lcfg, cfg)
        hf_lora = peft.PeftModel.from_pretrained(
            transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32),
            adapter_dir,
        ).eval()
    with torch.inference_mode():
        hf_logits, hf_lora_logits = hf(xt).logits, hf_lora(xt).logits  # warm-up
        best = interleaved_best(
            {
                "jlora": lambda: compiled(params, x).block_until_ready(),
                "hf": lambda: hf(xt),
                "jlora_lora": lambda: lora_forward(params, trainable, x).block_until_ready(),
                "hf_lora": lambda: hf_lora(xt),
            },
            args.iters,
        )
    ours_s, hf_s = best["jlora"], best["hf"]
    lora_diff = float(np.abs(np.asarray(ours_lora_logits) - hf_lora_logits.numpy()).max())
    overhead = {side: best[f"{side}_lora"] / best[side] for side in ("jlora", "hf")}  # time with / without LoRA

    diff = float(np.abs(np.asarray(ours_logits) - hf_logits.numpy()).max())
    print(f"SmolLM2-135M fp32 forward, batch {args.batch} x {args.seq}, CPU, torch threads {torch.get_num_threads()}")
    # CPU seconds too: on a shared machine they say more about the compiler's work than the wall clock.
    print(f"jlora first compile (jit of the forward): {compile_s:.1f} s wall, {compile_cpu_s:.1f} s CPU")
    print(f"jlora: {tokens / ours_s:,.0f} tokens/s ({ours_s * 1e3:.0f} ms/forward)")
    print(f"HF:    {tokens / hf_s:,.0f} tokens/s ({hf_s * 1e3:.0f} ms/forward)")
    print(f"ratio jlora/HF: {hf_s / ours_s:.2f}   (max |d logits| = {diff:.1e})")
    print(
        f"with a random r=16 all-linear adapter (max |d logits| = {lora_diff:.1e}): "
        f"jlora {tokens / best['jlora_lora']:,.0f} tokens/s, HF peft {tokens / best['hf_lora']:,.0f} tokens/s, "
        f"ratio {best['hf_lora'] / best['jlora_lora']:.2f}"
    )
    print(
        f"LoRA overhead (forward time with the adapter / without): jlora {overhead['jlora']:.3f}x, "
        f"HF peft {overhead['hf']:.3f}x"
    )
    rows = [
        {
            "metric": "forward tokens/s",
            "unit": "tokens/s",
            "jlora": tokens / ours_s,
            "peer": "HF transformers",
            "peer_value": tokens / hf_s,
            "better": "higher",
        },
        {
            "metric": "forward with LoRA r=16 all-linear (unmerged)",
            "unit": "tokens/s",
            "jlora": tokens / best["jlora_lora"],
            "peer": "HF peft",
            "peer_value": tokens / best["hf_lora"],
            "better": "higher",
        },
        {
            "metric": "LoRA overhead: forward time with / without the adapter",
            "unit": "x",
            "jlora": overhead["jlora"],
            "peer": "HF peft",
            "peer_value": overhead["hf"],
            "better": "lower",
        },
        {
            "metric": "first compile",
            "unit": "s",
            "jlora": compile_s,
            "peer": None,
            "peer_value": None,
            "better": "lower",
        },
    ]
    config = {
        "model": "SmolLM2-135M (GGUF, dequantized)",
        "dtype": "float32",
        "batch": args.batch,
        "seq": args.seq,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "best_of": args.iters,
    }
    command = shlex.join(["python", "bench/forward_vs_hf.py", *sys.argv[1:]])
    out = write_result(
        args.out, started, {"bench": "forward_vs_hf", "command": command, "config": config, "rows": rows}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
