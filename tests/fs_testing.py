"""File-system helpers shared by the tests that make a disk read-only or full (root only)."""

import contextlib
import pathlib
import subprocess

import pytest


@contextlib.contextmanager
def tmpfs(where: pathlib.Path, options: str):
    """A tmpfs mounted at `where` (mount -o `options`) for the block. A test that cannot mount one
    fails: it does not skip."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if mount.returncode:
        pytest.fail(f"this test needs to mount a tmpfs (root): {mount.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
