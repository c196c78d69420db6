"""Will the shipped big configs fit? `jlora-train --plan` for each, on the device counts they are for.

Each case runs `python -m jlora.cli.train --config C --plan --devices N` in its own process (the
fake CPU devices are fixed at process start) with the base model's shape from a preset, since the
checkpoints are not on this machine. Writes docs/results/will_it_fit.json: the commit, date, machine
and load average, then per case the command and its PLAN figures; bench/report.py renders it as the
"Will it fit" section of docs/benchmarks.md.
Run: python bench/will_it_fit.py            (about 20-30 minutes on 2 CPU cores)
     python bench/will_it_fit.py --only nf4 --out docs/results/qlora_plan.json   (the QLoRA cases)
     python bench/will_it_fit.py --only gemma3-27b --only qwen3-32b --merge   (some rows, keep the rest)
With --merge the cases run replace those with the same command in the result file and the others stay,
each with the provenance it was measured under ("measured"), so a few new rows need not recompile all.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys

from jlora.train.provenance import load_average, provenance, write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "will_it_fit.json"

FP32 = ["model.dtype=float32", "model.param_dtype=float32"]
# (config, devices, preset, extra --set overrides)
CASES = [
    ("configs/llama2-7b-lora.yaml", 8, "llama2-7b", []),
    ("configs/llama3-8b-lora.yaml", 8, "llama3-8b", []),
    ("configs/llama3-70b-tpu-pod.yaml", 64, "llama3-70b", []),
    ("configs/llama3-70b-tpu-pod.yaml", 256, "llama3-70b", ["train.micro_batch=256"]),  # 1 row per chip
    # QLoRA: the 8B base in nf4 on ONE device, one 2048-token row per step (a 24 GB GPU?)
    *[
        (
            "configs/llama3-8b-lora.yaml",
            1,
            "llama3-8b",
            [
                "model.quantize=nf4",
                "mesh.fsdp=1",
                "train.micro_batch=1",
                "train.global_batch=1",
                f"train.remat={remat}",
            ],
        )
        for remat in ("dots_saveable", "full")
    ],
    # QLoRA's own setting, the 70B base on ONE device: nf4 with double_quant, remat full, one row per step;
    # seq 2048 for an 80 GB GPU (and a v5p chip), seq 512 for a 48 GB one (L40S / A6000)
    ("configs/llama3-70b-qlora.yaml", 1, "llama3-70b", []),
    ("configs/llama3-70b-qlora.yaml", 1, "llama3-70b", ["data.max_seq_len=512"]),
    # the CPU compile computes bf16 in fp32: the same step in fp32 (equal temp: all of it is upcast), and in fp32
    # at half the sequence (what the activations of a bf16 device come to)
    *[("configs/llama3-70b-qlora.yaml", 1, "llama3-70b", [f"data.max_seq_len={seq}", *FP32]) for seq in (512, 256)],
    # Other families' biggest presets, by shape (the text model of multimodal Gemma 3): on one 8-GPU host
    # with the 8B config as shipped and with full remat, and on the v5p pod slice of the 70B config.
    *[
        (config, devices, preset, extra)
        for preset in ("gemma3-27b", "qwen3-32b")
        for config, devices, extra in (
            ("configs/llama3-8b-lora.yaml", 8, []),
            ("configs/llama3-8b-lora.yaml", 8, ["train.remat=full"]),
            ("configs/llama3-70b-tpu-pod.yaml", 64, []),
        )
    ],
]
PROVENANCE = ("commit", "date", "machine", "load_average", "load_average_after", "libraries")


def run_case(config: str, devices: int, preset: str, extra: list[str], timeout: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "jlora.cli.train",
        "--config",
        config,
        "--plan",
        "--devices",
        str(devices),
        "--set",
        f"model.preset={preset}",
    ]
    for s in extra:
        cmd += ["--set", s]
    shown = shlex.join(["jlora-train", *cmd[3:]])
    print(f"[will_it_fit] {shown}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines or not lines[-1].startswith("PLAN: "):
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"command": shown, "error": f"exit {proc.returncode}: {tail}"}
    return {"command": shown, "plan": json.loads(lines[-1][len("PLAN: ") :])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--out", default=str(OUT))
    p.add_argument(
        "--only",
        action="append",
        help="run only the cases whose config, preset or --set overrides contain this text (e.g. nf4, qwen3-32b); "
        "repeatable",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the result file's other cases, each with the provenance it was measured under",
    )
    a = p.parse_args(argv)
    started = provenance()
    cases = [c for c in CASES if a.only is None or any(o in s for o in a.only for s in (c[0], c[2], *c[3]))]
    command = shlex.join(["python", "bench/will_it_fit.py", *(sys.argv[1:] if argv is None else argv)])
    results = [run_case(*case, a.timeout) for case in cases]
    if a.merge:
        this_run = {**started, "load_average_after": load_average()}
        results = merged(pathlib.Path(a.out), [{**c, "measured": this_run} for c in results])
    out = write_result(a.out, started, {"bench": "will_it_fit", "command": command, "cases": results})
    print(f"wrote {out}")


def merged(path: pathlib.Path, new: list[dict]) -> list[dict]:
    """The result file's cases, each stamped with the provenance it was measured under, with `new` cases
    replacing those of the same command and the rest appended."""
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"cases": []}
    stamp = {k: old[k] for k in PROVENANCE if old.get(k)}
    fresh = {case["command"]: case for case in new}
    kept = [fresh.pop(case["command"], {**case, "measured": case.get("measured", stamp)}) for case in old["cases"]]
    return kept + list(fresh.values())


if __name__ == "__main__":
    main()
