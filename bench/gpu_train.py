"""LoRA training throughput and MFU at the LLaMA-3.2-1B shape on one GPU (random weights).

bf16 frozen weights and compute, fp32 LoRA adapters (r=16, all linear layers), seq 2048, cuDNN flash
attention (LlamaConfig.attention="cudnn"; --smoke lets "auto" pick), with jlora's own sharded train
step (jlora.train.step: init_state, make_train_step, put_batch), so the figure is the library's, not a
benchmark-only path. Prints tokens/s and MFU against the dense bf16 peak of an H100 / H200 SXM
(989 TFLOP/s), and writes every figure, with the commit, date, machine (the GPU named) and load average,
to docs/results/gpu_train.json (--out), which bench/report.py renders. `--smoke` runs a tiny shape for a
few steps on any backend (CPU included) as a check; it writes a result file only where --out says.
Run: python bench/gpu_train.py            (one GPU, no arguments needed)
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
import time

import jax
import numpy as np

from jlora.models.attention import TRAIN_IMPLS, resolve_impl
from jlora.models.family import param_shapes
from jlora.models.layers import DTYPES
from jlora.models.llama import PRESETS, Llama, LlamaConfig
from jlora.parallel.sharding import make_mesh
from jlora.peft.lora import LoraConfig, count_params
from jlora.train.config import OptimConfig
from jlora.train.provenance import provenance, write_result
from jlora.train.step import init_state, make_optimizer, make_train_step, put_batch

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results"
PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16 tensor-core peak (no sparsity)
FLOPS_FORMULA = (
    "per step: tokens * (4 * N_base + 6 * N_lora) + 12 * L * T * (N_heads * H) * tokens; "
    "N_base = every frozen matmul weight (attention, MLP, LM head; not the embedding lookup): "
    "forward 2*N_base + backward activation grads 2*N_base (frozen weights get no weight grads); "
    "N_lora: forward 2 + backward 4 (activation and weight grads); attention QK^T and PV: "
    "4*T*N*H forward per token per layer, x3 with backward, causal mask not discounted (as PaLM)"
)


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights that take part in a matmul: every kernel, plus the (tied) LM head."""
    shapes = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    n = sum(int(np.prod(s.shape)) for path, s in shapes if getattr(path[-1], "key", None) == "kernel")
    return n + (cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0)


def step_flops(cfg: LlamaConfig, n_lora: int, batch: int, seq: int) -> float:
    """Model FLOPs of one LoRA train step (FLOPS_FORMULA); recomputation from remat is not counted."""
    tokens = batch * seq
    attn = 12 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim * tokens
    return tokens * (4 * matmul_params(cfg) + 6 * n_lora) + attn


def random_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    """One host batch in jlora.train.data's layout: every token trained, one sequence per row."""
    ids = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape, 3 steps: checks the script on any backend")
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per forward/backward (grad accumulation)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear", help='"all-linear" or comma-separated module names')
    p.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"])
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 2 warm-up steps")
    p.add_argument(
        "--attention",
        choices=TRAIN_IMPLS,
        help='training attention kernel (default: "cudnn", so the figure is never the fallback\'s; '
        '"auto" with --smoke)',
    )
    p.add_argument("--out", help="the result file (default: docs/results/gpu_train.json; none with --smoke)")
    a = p.parse_args(argv)
    command = shlex.join(["python", "bench/gpu_train.py", *(sys.argv[1:] if argv is None else argv)])
    if a.smoke:
        a.preset, a.seq, a.batch, a.micro_batch, a.steps = "tiny", 128, 4, 2, 3
    a.attention = a.attention or ("auto" if a.smoke else "cudnn")
    if a.batch % a.micro_batch:
        p.error(f"--micro-batch {a.micro_batch} must divide --batch {a.batch}")

    dev = jax.devices()[0]
    started = provenance(device=dev.device_kind if dev.platform != "cpu" else None)
    cfg = PRESETS[a.preset].replace(dtype="bfloat16", param_dtype="bfloat16", remat=a.remat, attention=a.attention)
    try:
        kernel = resolve_impl(cfg.attention, DTYPES[cfg.dtype], cfg.head_dim)  # what the step will trace
    except ValueError as e:
        p.error(str(e))
    if a.seq > cfg.max_position_embeddings:
        p.error(f"--seq {a.seq} exceeds {a.preset}'s context of {cfg.max_position_embeddings}")
    targets = a.targets if a.targets == "all-linear" else tuple(a.targets.split(","))
    lcfg = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, targets=targets, adapter_dtype="float32")
    mesh = make_mesh(data=1, devices=[dev])  # one device: the figure is per chip
    optimizer, _ = make_optimizer(OptimConfig(lr=1e-4), total_steps=a.steps + 2)
    t0 = time.perf_counter()
    state = init_state(cfg, lcfg, mesh, jax.random.key(0), optimizer, model_key=jax.random.key(1))
    n_lora = count_params(state.trainable)
    step = make_train_step(Llama(cfg), optimizer, state)
    n_micro = a.batch // a.micro_batch
    rng = np.random.default_rng(0)
    batch = put_batch(random_batch(rng, a.batch, a.seq, cfg.vocab_size), mesh, n_micro)
    init_s = time.perf_counter() - t0

    frozen, trainable, opt_state = state.frozen, state.trainable, state.opt_state
    key = jax.random.key(2)
    t0 = time.perf_counter()
    trainable, opt_state, metrics = step(frozen, trainable, opt_state, batch, key)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    trainable, opt_state, metrics = step(frozen, trainable, opt_state, batch, key)  # second warm-up
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for i in range(a.steps):
        trainable, opt_state, metrics = step(frozen, trainable, opt_state, batch, jax.random.fold_in(key, i))
    loss = float(jax.block_until_ready(metrics["loss"]))
    step_s = (time.perf_counter() - t0) / a.steps

    tokens = a.batch * a.seq
    flops = step_flops(cfg, n_lora, a.batch, a.seq)
    mfu = flops / step_s / PEAK_BF16_FLOPS
    mem = getattr(dev, "memory_stats", lambda: None)() or {}
    peak_gib = mem.get("peak_bytes_in_use", 0) / 2**30
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}")
    print(
        f"shape: {a.preset}, bf16 weights + compute, fp32 LoRA r={a.rank} on {a.targets} "
        f"({n_lora:,} trainable / {matmul_params(cfg):,} frozen matmul params), remat={a.remat}, "
        f"attention={kernel}"
    )
    print(
        f"batch {a.batch} x seq {a.seq} = {tokens:,} tokens/step, micro-batch {a.micro_batch}; "
        f"init {init_s:.1f} s, first step (compile) {compile_s:.1f} s, loss {loss:.3f}"
    )
    print(
        f"step {step_s * 1e3:.1f} ms -> {tokens / step_s:,.0f} tokens/s; "
        f"model FLOPs/step {flops / 1e12:.2f} T -> {flops / step_s / 1e12:.1f} TFLOP/s, "
        f"MFU {100 * mfu:.1f}% of {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s"
        + (f"; peak device memory {peak_gib:.1f} GiB" if peak_gib else "")
    )
    print(f"MFU formula: {FLOPS_FORMULA}")
    if a.smoke or dev.platform != "gpu":
        print("(smoke / non-GPU run: MFU against the H100 peak is meaningless here)")
    result = {
        "bench": "gpu_train",
        "command": command,
        "smoke": a.smoke,
        "flops_formula": FLOPS_FORMULA,
        "config": {
            "device": dev.device_kind,
            "preset": a.preset,
            "seq": a.seq,
            "batch": a.batch,
            "micro_batch": a.micro_batch,
            "rank": a.rank,
            "targets": a.targets,
            "remat": a.remat,
            "attention": kernel,
            "dtype": "bf16 base + compute, fp32 adapters",
            "timed_steps": a.steps,
        },
        "rows": [
            {
                "metric": "train throughput",
                "unit": "tokens/s",
                "jlora": tokens / step_s,
                "peer": None,
                "peer_value": None,
                "better": "higher",
            },
            {
                "metric": "MFU (bf16 peak 989 TFLOP/s)",
                "unit": "%",
                "jlora": 100 * mfu,
                "peer": None,
                "peer_value": None,
                "better": "higher",
            },
            {
                "metric": "first step incl. compile",
                "unit": "s",
                "jlora": compile_s,
                "peer": None,
                "peer_value": None,
                "better": "lower",
            },
        ],
    }
    if peak_gib:
        result["rows"].append(
            {
                "metric": "peak device memory",
                "unit": "GiB",
                "jlora": peak_gib,
                "peer": None,
                "peer_value": None,
                "better": "lower",
            }
        )
    out = a.out or (None if a.smoke else str(RESULTS / "gpu_train.json"))
    if out:
        print(f"wrote {write_result(out, started, result)}")
    return result


if __name__ == "__main__":
    main()
