"""Where a measured figure came from: the commit, date, machine, load average and library versions.

Every result file that a benchmark (bench/*.py) or `jlora-demo` writes carries these fields, and
bench/report.py builds docs/benchmarks.md only from such files: no figure on that page or in the
README is typed in by hand (docs/architecture.md, "Honest records"). This module only describes the run; what
was measured, and where the file goes, is the writer's business.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
FIELDS = ("commit", "date", "machine", "load_average")  # what a result file must carry to be shown
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")


def _commit() -> str:
    """The short commit of the jlora checkout, "+dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:  # no git on this machine
        return "unknown (git not found)"
    if head.returncode:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def machine(device: str | None = None) -> str:
    """CPU model, usable cores, RAM and OS, plus `device` (an accelerator) when one did the work."""
    cpu = platform.processor() or platform.machine()
    ram = ""
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
        kib = next(
            int(ln.split()[1])
            for ln in pathlib.Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        )
        ram = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{device + ' with ' if device else ''}{cpu}, {cores} cores{ram}, {platform.system()} {platform.release()}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was (a shared machine skews timings)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def provenance(device: str | None = None) -> dict[str, str]:
    """Commit, date (UTC), machine, load average and library versions of a run starting now."""
    versions = []
    for dist in _LIBRARIES:
        try:  # metadata, not import: importing torch + transformers takes tens of seconds
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(device),
        "load_average": load_average(),
        "libraries": ", ".join(versions),
    }


def write_result(path: str | pathlib.Path, started: dict[str, str], result: dict) -> pathlib.Path:
    """Write `result` as JSON to `path` after the `started` provenance, with the load average now added
    as load_average_after; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**started, **result, "load_average_after": load_average()}
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def missing_fields(record: dict) -> list[str]:
    """The provenance FIELDS a result record lacks (empty: it can be shown)."""
    return [k for k in FIELDS if not record.get(k)]
