"""Where jlora's LoRA train step spends its time on this CPU: a jax.profiler trace, broken down by part.

Compiles the trainer's step (jlora.train.step.make_train_step) for SmolLM2-135M fp32 with the workload of
bench/train_vs_peft.py (batch 4 x 256, LoRA r=8 on q,v unless --rank / --targets say otherwise), runs
two warm-up steps, then traces --steps steps with jax.profiler. Every op the trace shows is matched to
its compiled HLO instruction, and the instruction's op_name (jax's name stack: module path, einsum,
forward `jvp` or backward `transpose`) puts it in one part: frozen projections, LoRA, attention, norms
and the MLP's elementwise work, the chunked CE / output head, scan buffers (layer slicing and stacking),
the optimizer. Prints each part's share of op time, forward and backward apart, and writes them with
the step time, commit, date, machine and load average to docs/results/profile_step.json (--out).
Usage: python bench/profile_step.py [--steps 2] [--rank 8] [--targets q_proj,v_proj] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import shlex
import sys
import tempfile
import time

from jlora.train.provenance import provenance, write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from train_vs_peft import fp32_matmuls, jlora_dtypes, jlora_state, train_batch

# (part, pattern over an op's op_name), first match wins. An XLA fusion carries the op_name of its root.
PARTS = (
    ("LoRA A/B", r"\.\.\.i,ir|\.\.\.r,ro|lora"),
    ("frozen projections", r"(_proj|/qkv|/gate_up)/(.*dot_general|concatenate)$"),  # concatenate: fused kernels
    ("output head + chunked CE", r"bcv|bcd|cross_entropy|jvp\(\)"),
    ("attention", r"self_attn/(?!(.*_proj|qkv)/)"),
    ("norms, rope, MLP elementwise", r"layernorm|/mlp/|_proj/|/qkv/|rope"),
    (
        "scan buffers (layer slices, stacking)",
        r"while/body/(jit\(dynamic|slice|concatenate|copy|dynamic)|"
        r"while/body$|while/body/closed_call$",
    ),
    ("optimizer", r"cond|adam|clip|norm|optax|apply_updates|^jit\(step\)/[a-z_]+$"),
)


def instructions(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: op_name} of the compiled module."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def part_of(op_name: str) -> str:
    return next((part for part, pat in PARTS if re.search(pat, op_name)), "other")


def breakdown(trace_dir: str, hlo_text: str) -> tuple[dict, float]:
    """({part: {"forward": ms, "backward": ms, "other": ms}}, ms of ops the HLO does not name)."""
    names = instructions(hlo_text)
    trace = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))[-1]))
    parts: dict = collections.defaultdict(lambda: collections.defaultdict(float))
    unnamed = 0.0
    for ev in trace["traceEvents"]:
        if ev.get("ph") != "X" or ev["name"] not in names:
            if ev.get("ph") == "X" and re.fullmatch(r"[\w.\-]+\.\d+", ev["name"]):
                unnamed += ev["dur"] / 1e3
            continue
        op = names[ev["name"]]
        phase = "backward" if "transpose(" in op else "forward" if "jvp(" in op else "other"
        parts[part_of(op)][phase] += ev["dur"] / 1e3
    return {p: dict(v) for p, v in parts.items()}, unnamed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="traced steps, after 2 warm-up steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute and frozen dtype")
    p.add_argument("--remat", default="dots_saveable", choices=["none", "full", "dots_saveable"])
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "profile_step.json"))
    a = p.parse_args()
    started = provenance()
    import jax

    fp32_matmuls(a)
    from jlora.formats.weights import read_pretrained, resolve_model_path
    from jlora.models.llama import Llama
    from jlora.train.step import make_train_step

    cfg, params = read_pretrained(resolve_model_path("smollm2-135m"), **jlora_dtypes(a))
    cfg = cfg.replace(remat=a.remat)
    state, opt = jlora_state(cfg, params, a.steps + 2, rank=a.rank, targets=tuple(a.targets.split(",")))
    del params
    batch = train_batch(state.mesh, a.batch, a.seq, cfg.vocab_size)
    f, t, o = state.frozen, state.trainable, state.opt_state
    step = make_train_step(Llama(cfg), opt, state).lower(f, t, o, batch, jax.random.key(0)).compile()
    for i in range(2):
        t, o, m = step(f, t, o, batch, jax.random.key(i))
        float(m["loss"])
    with tempfile.TemporaryDirectory(prefix="jlora-profile-") as tmp:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp):
            for i in range(a.steps):
                t, o, m = step(f, t, o, batch, jax.random.key(10 + i))
                float(m["loss"])
        step_s = (time.perf_counter() - t0) / a.steps
        parts, unnamed = breakdown(tmp, step.as_text())
    total = sum(sum(v.values()) for v in parts.values())
    rows = []
    print(f"train step {step_s:.2f} s ({a.batch * a.seq / step_s:.0f} tokens/s, traced); op time per step by part:")
    for part, v in sorted(parts.items(), key=lambda kv: -sum(kv[1].values())):
        ms = {k: x / a.steps for k, x in v.items()}
        share = sum(v.values()) / total
        print(
            f"  {part:40s} {share:6.1%}  fwd {ms.get('forward', 0):7.0f} ms  bwd {ms.get('backward', 0):7.0f} ms"
            f"  other {ms.get('other', 0):6.0f} ms"
        )
        rows.append({"part": part, "share": share, **{f"{k}_ms": x for k, x in ms.items()}})
    config = {
        "model": "SmolLM2-135M (GGUF, dequantized)",
        "dtype": a.dtype,
        "batch": a.batch,
        "seq": a.seq,
        "lora": f"r={a.rank} {a.targets}",
        "remat": a.remat,
        "traced_steps": a.steps,
    }
    command = shlex.join(["python", "bench/profile_step.py", *sys.argv[1:]])
    out = write_result(
        a.out,
        started,
        {
            "bench": "profile_step",
            "command": command,
            "config": config,
            "step_s": step_s,
            "op_ms_per_step": total / a.steps,
            "unnamed_ms_per_step": unnamed / a.steps,
            "parts": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
