"""JAX's persistent compilation cache for the console scripts: on by default, so a second run loads its programs.

Every console script turns it on through `jlora.cli.run.run_cli`. The directory, first match wins:
`JLORA_COMPILE_CACHE_DIR`; a directory the user already gave jax (`JAX_COMPILATION_CACHE_DIR` or
`jax.config`'s `jax_compilation_cache_dir`); `$XDG_CACHE_HOME/jlora/xla` (default `~/.cache/jlora/xla`).
`JLORA_COMPILE_CACHE=0` (or off/false/no) turns it off. A directory that cannot be made leaves the cache off:
a cache is a speed-up, never a reason to fail. It owns no eviction (jax's `jax_compilation_cache_max_size`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import jax

OFF_VALUES = ("0", "off", "false", "no")

# jax caches only programs that took >= 1 s to compile (its default, tuned for accelerators). On a CPU most of
# a cold start is programs of 0.1-1 s (sampling, the cache insert, a small model's prefill), and loading one
# from disk takes milliseconds, so every program that took 0.1 s or more is kept.
MIN_COMPILE_SECS = 0.1


def cache_dir(environ: Mapping[str, str] = os.environ) -> pathlib.Path | None:
    """The directory the cache would use under `environ`, or None when `JLORA_COMPILE_CACHE` turns it off."""
    if environ.get("JLORA_COMPILE_CACHE", "").strip().lower() in OFF_VALUES:
        return None
    chosen = environ.get("JLORA_COMPILE_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if chosen:  # jax reads JAX_COMPILATION_CACHE_DIR into its config at import
        return pathlib.Path(chosen).expanduser()
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jlora" / "xla"


def enable_compile_cache(environ: Mapping[str, str] = os.environ) -> pathlib.Path | None:
    """Point jax's persistent compilation cache at `cache_dir(environ)`; the directory, or None when off."""
    path = cache_dir(environ)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:  # else the user's own threshold stands
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return path
