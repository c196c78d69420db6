"""Will the shipped big configs fit? `jlora-train --plan` for each, on the device counts they are for.

Each case runs `python -m jlora.train_loop --config C --plan --devices N` in its own process (the
fake CPU devices are fixed at process start) with the base model's shape from a preset, since the
checkpoints are not on this machine. Writes docs/results/will_it_fit.json: the commit, date, machine
and load average, then per case the command and its PLAN figures; bench/report.py renders it as the
"Will it fit" section of docs/benchmarks.md.
Run: python bench/will_it_fit.py            (about 10-20 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "will_it_fit.json"

# (config, devices, preset, extra --set overrides)
CASES = [
    ("configs/llama2-7b-lora.yaml", 8, "llama2-7b", []),
    ("configs/llama3-8b-lora.yaml", 8, "llama3-8b", []),
    ("configs/llama3-70b-tpu-pod.yaml", 64, "llama3-70b", []),
    ("configs/llama3-70b-tpu-pod.yaml", 256, "llama3-70b", ["train.micro_batch=256"]),  # 1 row per chip
]


def provenance() -> dict[str, str]:
    """Commit, date, machine and load average of this run."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    cpu = platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"commit": commit.stdout.strip() + ("+dirty" if dirty else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def run_case(config: str, devices: int, preset: str, extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "jlora.train_loop", "--config", config, "--plan", "--devices", str(devices),
           "--set", f"model.preset={preset}"]
    for s in extra:
        cmd += ["--set", s]
    shown = shlex.join(["jlora-train", *cmd[3:]])
    print(f"[will_it_fit] {shown}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines or not lines[-1].startswith("PLAN: "):
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"command": shown, "error": f"exit {proc.returncode}: {tail}"}
    return {"command": shown, "plan": json.loads(lines[-1][len("PLAN: "):])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    result = {**provenance(), "cases": [run_case(*case, a.timeout) for case in CASES]}
    result["load_average_after"] = provenance()["load_average"]
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
