"""A real install: the wheel built from this repository, installed into a fresh venv, runs from an empty
directory with the configs and data it ships (jlora.train.config_files).

The wheel is built from a clean copy of the working tree. The fresh venv sees this environment's
dependencies through one plain path line in a .pth file. Such a line does not run the .pth files of that
directory, so the repository's editable install is not on the path: the jlora that runs is the wheel's,
which the test checks before running it.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _source_tree(dst: pathlib.Path) -> None:
    """The repository's files as git sees them (tracked, and new ones it does not ignore), links kept as links,
    copied to `dst`: a build there starts clean, where the checkout's build/ and *.egg-info keep files that
    an earlier build packed (a file dropped from the package data would still ship)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in names)):
        if os.path.lexists(ROOT / name):  # a file deleted in the working tree is not part of it
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name, follow_symlinks=False)


def test_the_wheel_runs_a_shipped_config_by_name_from_an_empty_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    src, wheels, fresh, empty = (tmp_path / name for name in ("src", "wheels", "fresh-env", "empty"))
    _source_tree(src)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src], src, env)
    (wheel,) = wheels.glob("jlora-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", fresh], tmp_path, env)
    scripts = fresh / "bin"
    python = scripts / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], tmp_path, env)
    site = pathlib.Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    empty.mkdir()
    where = _run([python, "-c", "import importlib.util; print(importlib.util.find_spec('jlora').origin)"], empty, env)
    assert pathlib.Path(where.stdout.strip()).is_relative_to(fresh), f"not the wheel's jlora: {where.stdout}"

    sets = ["train.steps=2", "train.eval_interval=0", "checkpoint.interval=0"]
    run = _run([scripts / "jlora-train", "--config", "tiny-cpu", *[a for s in sets for a in ("--set", s)]], empty, env)
    assert "done: 2 steps" in run.stdout, run.stdout[-2000:]
    assert (empty / "runs" / "tiny-cpu" / "adapter").is_dir(), sorted(p.name for p in empty.rglob("*"))
    assert not any(site.rglob("runs")), "the run wrote inside the installed package"

    demo = _run([scripts / "jlora-demo", "--help"], empty, env)
    assert "default: smollm2-135m-demo" in " ".join(demo.stdout.split()), demo.stdout
