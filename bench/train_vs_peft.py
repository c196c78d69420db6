"""LoRA train-step throughput and memory, jlora vs HF PEFT + transformers, on SmolLM2-135M (fp32, CPU).

The GGUF is dequantized once by jlora and written as an HF safetensors checkpoint; both sides load
that same checkpoint. Workload: batch 4 x 256 random tokens, every token trained, LoRA r=8 alpha=16 on
q_proj and v_proj, AdamW (lr 1e-4, weight decay 0.01) after global-norm clipping at 1.0. Each side
runs in its own subprocess, so each peak RSS (getrusage ru_maxrss) is that side's alone: loading,
compiling and training included. The sides run --rounds times each, interleaved (jlora, PEFT, jlora,
PEFT, ...), so a noisy minute on a shared machine hits both alike; a run's step time is the median of
its timed steps, and each side's figure is its best run (its fastest median; peak RSS: its largest,
the conservative side; compile: the fastest). Prints both, the ratios and jlora's compile time, and
writes every figure (each run's too), with the commit, date, machine and the load average after each
run, to docs/results/train_vs_peft.json (--out), which bench/report.py renders.
Usage: python bench/train_vs_peft.py [--steps 6] [--rounds 3] [--remat none] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from jlora.provenance import load_average, provenance, write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
RANK, ALPHA, TARGETS, LR, WD, CLIP = 8, 16.0, ("q_proj", "v_proj"), 1e-4, 0.01, 1.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def random_ids(batch: int, seq: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)).astype(np.int32)


def side_prep(hf_dir: str) -> dict:
    from jlora.weights import load_pretrained, resolve_model_path, save_pretrained

    cfg, params = load_pretrained(resolve_model_path("smollm2-135m"))
    save_pretrained(params, cfg, hf_dir)
    return {"hf_dir": hf_dir}


def side_jlora(a: argparse.Namespace) -> dict:
    from jlora.weights import load_pretrained

    cfg, params = load_pretrained(a.hf_dir)
    cfg = cfg.replace(remat=a.remat)
    state, opt = jlora_state(cfg, params, a.steps)
    del params
    return time_jlora_steps(cfg, state, opt, a)


def jlora_state(cfg, params, steps: int):
    """(TrainState on one device, optimizer): the bench's LoRA (RANK, ALPHA, TARGETS) and AdamW on `params`."""
    import jax

    from jlora.config import OptimConfig
    from jlora.lora import LoraConfig
    from jlora.sharding import make_mesh
    from jlora.trainer import init_state, make_optimizer

    lcfg = LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    opt, _ = make_optimizer(OptimConfig(lr=LR, schedule="constant", weight_decay=WD, grad_clip=CLIP), steps + 2)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return init_state(cfg, lcfg, mesh, jax.random.key(0), opt, params), opt


def time_jlora_steps(cfg, state, opt, a: argparse.Namespace) -> dict:
    """Compile jlora's train step for `state` and time a.steps steps after two warm-up steps, on random
    tokens [a.batch, a.seq]; the side's figures (compile, first step, step times, losses, peak RSS)."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # true fp32 matmuls, like torch
    import numpy as np

    from jlora.llama import Llama
    from jlora.trainer import make_train_step, put_batch

    ids = random_ids(a.batch, a.seq, cfg.vocab_size)
    host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((a.batch, a.seq), np.float32),
            "positions": np.tile(np.arange(a.seq, dtype=np.int32), (a.batch, 1)),
            "segment_ids": np.ones((a.batch, a.seq), np.int32)}
    batch = put_batch(host, state.mesh, 1)
    f, t, o = state.frozen, state.trainable, state.opt_state
    t0 = time.perf_counter()
    step = make_train_step(Llama(cfg), opt, state).lower(f, t, o, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(a.steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        t, o, m = step(f, t, o, batch, jax.random.key(i))
        losses.append(float(m["loss"]))  # blocks
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "first_step_s": compile_s + times[0], "step_s": times[2:], "losses": losses,
            "rss_mb": peak_rss_mb()}


def side_peft(a: argparse.Namespace) -> dict:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
    return time_peft_steps(peft_lora(model), a)


def peft_lora(model):
    """`model` wrapped by HF PEFT with the bench's LoRA (RANK, ALPHA, TARGETS, no dropout)."""
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                      lora_dropout=0.0))


def time_peft_steps(model, a: argparse.Namespace) -> dict:
    """Time a.steps PEFT train steps (AdamW, clipping) after two warm-up steps on random tokens; the side's figures."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    ids = torch.as_tensor(random_ids(a.batch, a.seq, model.config.vocab_size)[:, :-1], dtype=torch.long)
    times, losses = [], []
    for _ in range(a.steps + 2):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    return {"first_step_s": times[0], "step_s": times[2:], "losses": losses, "rss_mb": peak_rss_mb(),
            "torch_threads": torch.get_num_threads()}


# One thread each (the JAX FAQ's XLA flags; torch reads OMP_NUM_THREADS): a fairer comparison on a
# shared machine, where multi-threaded steps stall on preempted threads.
SINGLE_THREAD_ENV = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                     "OMP_NUM_THREADS": "1"}


def run_side(side: str, a: argparse.Namespace, script: str = __file__, extra: tuple[str, ...] = (),
             check: bool = True) -> dict:
    """Run `script --side SIDE` in its own process and return the JSON its "SIDE: " line carries. A side that
    fails exits this process, or with check=False gives {"error": its exit status and last stderr line}."""
    cmd = [sys.executable, script, "--side", side, "--hf-dir", a.hf_dir, "--batch", str(a.batch),
           "--seq", str(a.seq), "--steps", str(a.steps), "--remat", a.remat, *extra]
    env = {**os.environ, **(SINGLE_THREAD_ENV if a.single_thread and side != "prep" else {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SIDE: ")]
    if proc.returncode or not lines:
        if not check:
            last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            return {"error": f"exit {proc.returncode}: {last}"}
        sys.exit(f"{pathlib.Path(script).stem}: the {side} side failed (exit {proc.returncode}):\n"
                 f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("SIDE: "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=["prep", "jlora", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help="the converted checkpoint (default: a temporary dir)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run, after 2 warm-up steps")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved; each figure is the best run")
    p.add_argument("--remat", default="dots_saveable", choices=["none", "full", "dots_saveable"],
                   help="jlora's remat policy: dots_saveable keeps matmul outputs, recomputes the rest")
    p.add_argument("--only", choices=["jlora", "peft"], help="run one side (for tuning)")
    p.add_argument("--single-thread", action="store_true", help="one compute thread per side")
    p.add_argument("--out", default=str(RESULTS / "train_vs_peft.json"), help="the result file")
    a = p.parse_args()
    if a.side:
        out = {"prep": lambda: side_prep(a.hf_dir), "jlora": lambda: side_jlora(a), "peft": lambda: side_peft(a)}
        print("SIDE: " + json.dumps(out[a.side]()), flush=True)
        return

    if a.rounds < 1 or a.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    started = provenance()
    tmp = None
    if a.hf_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="jlora-bench-")
        a.hf_dir = tmp.name
    if not (pathlib.Path(a.hf_dir) / "config.json").exists():
        run_side("prep", a)
    sides = [s for s in ("jlora", "peft") if a.only in (None, s)]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(a.rounds):  # interleaved: jlora, peft, jlora, peft, ...
        for s in sides:
            print(f"[train_vs_peft] round {r + 1}/{a.rounds}: {s}", file=sys.stderr, flush=True)
            run = run_side(s, a)
            run["median_step_s"] = statistics.median(run["step_s"])
            run["load_average_after"] = load_average()
            runs[s].append(run)
    best = {s: min(rs, key=lambda run: run["median_step_s"]) for s, rs in runs.items()}
    tokens = a.batch * a.seq
    tps = {s: tokens / r["median_step_s"] for s, r in best.items()}
    rss = {s: max(run["rss_mb"] for run in rs) for s, rs in runs.items()}
    print(f"SmolLM2-135M fp32 LoRA train step (r={RANK}, alpha={ALPHA:g}, {'+'.join(TARGETS)}, AdamW), "
          f"batch {a.batch} x {a.seq}, CPU{' (1 thread per side)' * a.single_thread}; jlora remat={a.remat}; "
          f"best of {a.rounds} interleaved runs per side")
    for s, r in best.items():
        medians = ", ".join(f"{run['median_step_s']:.2f}" for run in runs[s])
        print(f"{s:6s} {tps[s]:7,.0f} tokens/s (best run's median step {r['median_step_s']:.2f} s; each run's: "
              f"{medians})  peak RSS {rss[s]:,.0f} MB  losses {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
    rows = []
    if "jlora" in runs:
        compile_s = min(run["compile_s"] for run in runs["jlora"])
        print(f"jlora compile: {compile_s:.1f} s (target <= 20); first step incl. compile "
              f"{best['jlora']['first_step_s']:.1f} s")
    if len(runs) == 2:
        print(f"ratio jlora/PEFT: tokens/s {tps['jlora'] / tps['peft']:.2f}x (target >= 1.2), "
              f"peak RSS {rss['jlora'] / rss['peft']:.2f}x (target <= 0.6)")
        rows = [{"metric": "train tokens/s", "unit": "tokens/s", "jlora": tps["jlora"], "peer": "HF PEFT",
                 "peer_value": tps["peft"], "better": "higher"},
                {"metric": "peak RSS", "unit": "MB", "jlora": rss["jlora"], "peer": "HF PEFT",
                 "peer_value": rss["peft"], "better": "lower"},
                {"metric": "train step compile", "unit": "s", "jlora": compile_s,
                 "peer": None, "peer_value": None, "better": "lower"}]
    config = {"model": "SmolLM2-135M (GGUF, dequantized)", "dtype": "float32", "batch": a.batch, "seq": a.seq,
              "lora": f"r={RANK} alpha={ALPHA:g} {','.join(TARGETS)}", "remat": a.remat, "timed_steps": a.steps,
              "best_of": a.rounds, "threads": 1 if a.single_thread else "default"}
    command = shlex.join(["python", "bench/train_vs_peft.py", *sys.argv[1:]])
    out = write_result(a.out, started, {"bench": "train_vs_peft", "command": command, "config": config,
                                        "rows": rows, "runs": runs})
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
