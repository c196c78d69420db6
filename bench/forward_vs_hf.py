"""Forward-pass throughput, jlora vs HF transformers, on SmolLM2-135M from its GGUF (fp32, CPU).

Both models get the same dequantized weights and the same random batch [4, 256]. jlora runs a jitted
forward with params as an argument; HF runs under torch.inference_mode() with torch's default threads.
Prints tokens/s for both, their ratio (jlora / HF, target >= 1.0) and jlora's first-compile time,
then the `JSON: {...}` line that bench/report.py reads (its contract is described there).
Usage: python bench/forward_vs_hf.py [--batch 4] [--seq 256] [--iters 5]
"""

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # true fp32 matmuls, like torch's default

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jlora.llama import Llama  # noqa: E402
from jlora.weights import load_pretrained, resolve_model_path  # noqa: E402


def timed(fn) -> float:
    """Seconds taken by one call of fn."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    path = pathlib.Path(resolve_model_path("smollm2-135m"))
    cfg, params = load_pretrained(path)
    params = jax.device_put(params)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq

    forward = jax.jit(lambda p, x: Llama(cfg).apply({"params": p}, x))
    x = jnp.asarray(ids, jnp.int32)
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = forward.lower(params, x).compile()  # trace + XLA compile, without the first run
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    ours_logits = compiled(params, x).block_until_ready()  # warm-up, and the sanity-check reference

    hf = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    xt = torch.as_tensor(ids)
    with torch.inference_mode():
        hf_logits = hf(xt).logits  # warm-up
        # Interleaved, best of `iters` each: a neighbour's load on a shared machine hits both sides alike.
        ours_s, hf_s = float("inf"), float("inf")
        for _ in range(args.iters):
            ours_s = min(ours_s, timed(lambda: compiled(params, x).block_until_ready()))
            hf_s = min(hf_s, timed(lambda: hf(xt)))

    diff = float(np.abs(np.asarray(ours_logits) - hf_logits.numpy()).max())
    print(f"SmolLM2-135M fp32 forward, batch {args.batch} x {args.seq}, CPU, torch threads {torch.get_num_threads()}")
    # CPU seconds too: on a shared machine they say more about the compiler's work than the wall clock.
    print(f"jlora first compile (jit of the forward): {compile_s:.1f} s wall, {compile_cpu_s:.1f} s CPU")
    print(f"jlora: {tokens / ours_s:,.0f} tokens/s ({ours_s * 1e3:.0f} ms/forward)")
    print(f"HF:    {tokens / hf_s:,.0f} tokens/s ({hf_s * 1e3:.0f} ms/forward)")
    print(f"ratio jlora/HF: {hf_s / ours_s:.2f}   (max |d logits| = {diff:.1e})")
    rows = [
        {"metric": "forward tokens/s", "unit": "tokens/s", "jlora": tokens / ours_s, "peer": "HF transformers",
         "peer_value": tokens / hf_s, "better": "higher"},
        {"metric": "first compile", "unit": "s", "jlora": compile_s, "peer": None, "peer_value": None,
         "better": "lower"},
    ]
    config = {"model": "SmolLM2-135M (GGUF, dequantized)", "dtype": "float32", "batch": args.batch,
              "seq": args.seq, "device": "cpu", "torch_threads": torch.get_num_threads()}
    print("JSON: " + json.dumps({"bench": "forward_vs_hf", "config": config, "rows": rows}))


if __name__ == "__main__":
    main()
