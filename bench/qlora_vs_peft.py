"""QLoRA train step, jlora's quantized frozen bases vs HF PEFT + bitsandbytes 4-bit NF4, on SmolLM2-135M (CPU).

The workload is bench/train_vs_peft.py's, reusing its functions: batch 4 x 256 random tokens, LoRA r=8
alpha=16 on q_proj and v_proj, AdamW after global-norm clipping, two warm-up steps, then --steps timed
ones. Sides, each in its own subprocess (so each peak RSS, getrusage ru_maxrss, is that side's alone,
loading included):
  jlora none   fp32 dense base, from the GGUF dequantized to an HF checkpoint (as train_vs_peft does);
  jlora int8 / nf4   the same dense load, init_state, then trainer.quantize_frozen(state, method);
  jlora gguf   read_pretrained(gguf, quantize="gguf"): the file's own Q4_1 / Q8_0 blocks;
  PEFT bnb nf4   transformers + BitsAndBytesConfig(load_in_4bit, nf4, fp32 compute) on CPU, then
                 peft.prepare_model_for_kbit_training (no gradient checkpointing) and get_peft_model;
  PEFT fp32    plain PEFT on the fp32 checkpoint, for reference.
Frozen bytes: jlora's quantize.frozen_bytes(state.frozen); PEFT's frozen parameters + buffers + the
bitsandbytes quant states (absmax, code; get_memory_footprint() leaves those out and is recorded too).
The sides run --rounds times, interleaved round by round; each side's figure is its best run (fastest
median step; peak RSS: its largest run). A side that fails (bnb on this CPU, say) is recorded with its
error instead of figures. Targets: frozen bytes <= 0.2x jlora fp32 for nf4 and gguf; tokens/s >= 0.7x
jlora fp32 for the quantized sides; and the ratios against PEFT + bnb. Writes every figure, each run's
too, with commit, date, machine and the load average after each run, to docs/results/qlora_vs_peft.json.
Usage: python bench/qlora_vs_peft.py [--steps 4] [--rounds 2] [--sides none,nf4,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import traceback

import train_vs_peft as base  # bench/ is on sys.path when this runs as a script

from jlora.train.provenance import load_average, provenance, write_result

JLORA_SIDES = ("none", "int8", "nf4", "gguf")
PEFT_SIDES = ("peft-bnb-nf4", "peft-fp32")
SIDES = (*JLORA_SIDES, *PEFT_SIDES)
LABEL = {
    "none": "jlora fp32",
    "int8": "jlora int8",
    "nf4": "jlora nf4",
    "gguf": "jlora gguf (Q4_1/Q8_0)",
    "peft-bnb-nf4": "HF PEFT + bnb nf4",
    "peft-fp32": "HF PEFT fp32",
}
MB = 2**20


def side_jlora(method: str, a: argparse.Namespace) -> dict:
    """A jlora side: the frozen base held as `method`, then train_vs_peft's timed steps."""
    from jlora.formats.weights import read_pretrained, resolve_model_path
    from jlora.quant.quantize import frozen_bytes
    from jlora.train.step import quantize_frozen

    if method == "gguf":
        cfg, params = read_pretrained(resolve_model_path("smollm2-135m"), quantize="gguf")
    else:
        cfg, params = read_pretrained(a.hf_dir)
    cfg = cfg.replace(remat=a.remat)
    state, opt = base.jlora_state(cfg, params, a.steps)
    del params
    if method in ("int8", "nf4"):
        quantize_frozen(state, method, double_quant=a.double_quant)
    return {"frozen_bytes": frozen_bytes(state.frozen), **base.time_jlora_steps(cfg, state, opt, a)}


def torch_frozen_bytes(model) -> int:
    """Bytes of `model`'s frozen parameters and buffers, with each bitsandbytes quant state's tensors
    (absmax, code, nested double-quant state), each storage counted once (tied weights)."""
    seen, total = set(), 0

    def add(t) -> None:
        nonlocal total
        if t is None or t.numel() == 0 or (t.data_ptr(), t.numel()) in seen:
            return
        seen.add((t.data_ptr(), t.numel()))
        total += t.numel() * t.element_size()

    for p in model.parameters():
        if p.requires_grad:
            continue
        add(p)
        qs = getattr(p, "quant_state", None)
        for s in (qs, getattr(qs, "state2", None)):
            if s is not None:
                add(s.absmax), add(s.code), add(getattr(s, "offset", None))
    for b in model.buffers():
        add(b)
    return total


def side_peft(kind: str, a: argparse.Namespace) -> dict:
    """A PEFT side: the fp32 checkpoint as it is, or quantized by bitsandbytes to 4-bit NF4 on load."""
    import torch
    import transformers

    if kind == "peft-fp32":
        model = transformers.LlamaForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
    else:
        import peft

        bnb = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=a.double_quant,
        )
        model = transformers.LlamaForCausalLM.from_pretrained(
            a.hf_dir, quantization_config=bnb, device_map="cpu", dtype=torch.float32
        )
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    footprint = model.get_memory_footprint()
    model = base.peft_lora(model)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "frozen_bytes": torch_frozen_bytes(model),
        "memory_footprint": footprint,
        "trainable_bytes": trainable,
        **base.time_peft_steps(model, a),
    }


def run_side(side: str, a: argparse.Namespace) -> dict:
    """One side in a subprocess; the PEFT sides may fail (bnb on CPU) and are then recorded with their error."""
    extra = ("--double-quant",) if a.double_quant else ()
    return base.run_side(side, a, script=__file__, extra=extra, check=side in JLORA_SIDES)


def summarize(runs: dict[str, list[dict]], tokens: int) -> dict[str, dict]:
    """Each side's figures: its best run (fastest median step) for speed, first step and losses; its largest
    peak RSS; its fastest compile. A side with no successful run gives {"error": ...}."""
    out = {}
    for s, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[s] = {"error": rs[-1]["error"]}
            continue
        best = min(ok, key=lambda r: r["median_step_s"])
        out[s] = {
            "tokens_per_s": tokens / best["median_step_s"],
            "median_step_s": best["median_step_s"],
            "frozen_mb": best["frozen_bytes"] / MB,
            "rss_mb": max(r["rss_mb"] for r in ok),
            "first_step_s": best["first_step_s"],
            "loss_first": best["losses"][0],
            "loss_last": best["losses"][-1],
            "compile_s": min((r["compile_s"] for r in ok if "compile_s" in r), default=None),
        }
    return out


def _row(metric: str, unit: str, s: str, peer: str, key: str, summary: dict, better: str) -> dict | None:
    """jlora side `s` vs side `peer` on summary[.][key]; None when `s` has no figures."""
    mine, theirs = summary.get(s, {}), summary.get(peer, {})
    if key not in mine:
        return None
    failed = " (failed: no figure)" if "error" in theirs else ""
    return {
        "metric": f"{metric}, {LABEL[s]}",
        "unit": unit,
        "jlora": mine[key],
        "peer": LABEL[peer] + failed,
        "peer_value": theirs.get(key),
        "better": better,
    }


def comparison_rows(summary: dict[str, dict]) -> list[dict]:
    """The rows docs/benchmarks.md shows: the quantized sides against jlora fp32 (the targets) and each jlora side
    against its PEFT counterpart, then jlora's compile times."""
    pairs = [
        ("frozen weights", "MB", "frozen_mb", "lower"),
        ("train tokens/s", "tokens/s", "tokens_per_s", "higher"),
        ("peak RSS", "MB", "rss_mb", "lower"),
    ]
    rows = []
    for metric, unit, key, better in pairs:
        rows += [_row(metric, unit, q, "none", key, summary, better) for q in ("int8", "nf4", "gguf")]
        rows += [_row(metric, unit, q, "peft-bnb-nf4", key, summary, better) for q in ("nf4", "gguf")]
        rows.append(_row(metric, unit, "none", "peft-fp32", key, summary, better))
    rows += [
        {
            "metric": f"train step compile, {LABEL[s]}",
            "unit": "s",
            "jlora": summary[s]["compile_s"],
            "peer": None,
            "peer_value": None,
            "better": "lower",
        }
        for s in JLORA_SIDES
        if summary.get(s, {}).get("compile_s") is not None
    ]
    return [r for r in rows if r is not None]


def _ratio(summary: dict, s: str, peer: str, key: str) -> str:
    mine, theirs = summary.get(s, {}), summary.get(peer, {})
    return f"{mine[key] / theirs[key]:.2f}x" if key in mine and theirs.get(key) else "n/a"


def report(summary: dict[str, dict]) -> None:
    """Print each side's figures, then the ratios with their targets."""
    for s, f in summary.items():
        if "error" in f:
            print(f"{LABEL[s]:24s} FAILED: {f['error']}")
            continue
        compile_s = f" compile {f['compile_s']:.1f} s," if f["compile_s"] is not None else ""
        print(
            f"{LABEL[s]:24s} frozen {f['frozen_mb']:7.1f} MB  {f['tokens_per_s']:6,.0f} tokens/s (median step "
            f"{f['median_step_s']:.2f} s)  peak RSS {f['rss_mb']:,.0f} MB {compile_s} first step "
            f"{f['first_step_s']:.1f} s  loss {f['loss_first']:.3f} -> {f['loss_last']:.3f}"
        )
    print(
        "frozen bytes vs jlora fp32: "
        + ", ".join(
            f"{q} {_ratio(summary, q, 'none', 'frozen_mb')}{' (target <= 0.2)' if q != 'int8' else ''}"
            for q in ("int8", "nf4", "gguf")
        )
    )
    print(
        "train tokens/s vs jlora fp32: "
        + ", ".join(f"{q} {_ratio(summary, q, 'none', 'tokens_per_s')}" for q in ("int8", "nf4", "gguf"))
        + " (target >= 0.7)"
    )
    for q in ("nf4", "gguf"):
        print(
            f"{LABEL[q]} / HF PEFT + bnb nf4: tokens/s {_ratio(summary, q, 'peft-bnb-nf4', 'tokens_per_s')}, "
            f"frozen bytes {_ratio(summary, q, 'peft-bnb-nf4', 'frozen_mb')}, "
            f"peak RSS {_ratio(summary, q, 'peft-bnb-nf4', 'rss_mb')}"
        )
    print(
        f"jlora fp32 / HF PEFT fp32: tokens/s {_ratio(summary, 'none', 'peft-fp32', 'tokens_per_s')}, "
        f"peak RSS {_ratio(summary, 'none', 'peft-fp32', 'rss_mb')}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help="the converted fp32 checkpoint (default: a temporary dir)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run, after 2 warm-up steps")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved; each figure is the best run")
    p.add_argument(
        "--remat",
        default="dots_saveable",
        choices=["none", "full", "dots_saveable"],
        help="jlora's remat policy (train_vs_peft's default)",
    )
    p.add_argument("--double-quant", action="store_true", help="nf4 with double-quantized scales, both libraries")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--single-thread", action="store_true", help="one compute thread per side")
    p.add_argument("--out", default=str(base.RESULTS / "qlora_vs_peft.json"), help="the result file")
    a = p.parse_args()
    if a.side:
        if a.side in JLORA_SIDES:
            out = side_jlora(a.side, a)
        else:
            try:
                out = side_peft(a.side, a)
            except Exception as e:  # recorded in the result, not hidden: e.g. bnb 4-bit training on this CPU
                out = {"error": "".join(traceback.format_exception_only(e)).strip()}
                traceback.print_exc()
        print("SIDE: " + json.dumps(out), flush=True)
        return

    sides = a.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown or a.rounds < 1 or a.steps < 1:
        p.error(f"--sides must name some of {','.join(SIDES)} (got {unknown}); --rounds and --steps must be >= 1")
    started = provenance()
    tmp = base.ensure_hf_dir(a)  # the GGUF dequantized, saved as an HF checkpoint, unless --hf-dir has one
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(a.rounds):  # interleaved: every side once per round
        for s in sides:
            print(f"[qlora_vs_peft] round {r + 1}/{a.rounds}: {s}", file=sys.stderr, flush=True)
            run = run_side(s, a)
            if "error" not in run:
                run["median_step_s"] = statistics.median(run["step_s"])
            run["load_average_after"] = load_average()
            runs[s].append(run)
    summary = summarize(runs, a.batch * a.seq)
    print(
        f"SmolLM2-135M QLoRA train step (r={base.RANK}, alpha={base.ALPHA:g}, {'+'.join(base.TARGETS)}, AdamW), "
        f"batch {a.batch} x {a.seq}, CPU; jlora remat={a.remat}; best of {a.rounds} interleaved runs per side"
    )
    report(summary)
    config = {
        "model": "SmolLM2-135M (Q4_1 GGUF; fp32/int8/nf4/PEFT from it dequantized)",
        "batch": a.batch,
        "seq": a.seq,
        "lora": f"r={base.RANK} alpha={base.ALPHA:g} {','.join(base.TARGETS)}",
        "remat": a.remat,
        "double_quant": a.double_quant,
        "timed_steps": a.steps,
        "best_of": a.rounds,
        "threads": 1 if a.single_thread else "default",
        "peft_bnb": "BitsAndBytesConfig(load_in_4bit, nf4, compute fp32), device_map=cpu, "
        "prepare_model_for_kbit_training(use_gradient_checkpointing=False)",
    }
    command = shlex.join(["python", "bench/qlora_vs_peft.py", *sys.argv[1:]])
    errors = {s: f["error"] for s, f in summary.items() if "error" in f}
    out = write_result(
        a.out,
        started,
        {
            "bench": "qlora_vs_peft",
            "command": command,
            "config": config,
            "rows": comparison_rows(summary),
            "sides": summary,
            "errors": errors,
            "runs": runs,
        },
    )
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
