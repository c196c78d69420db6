"""The console scripts' persistent compilation cache (jlora.cli.compile_cache): where it goes, in order
(JLORA_COMPILE_CACHE_DIR, jax's own JAX_COMPILATION_CACHE_DIR, $XDG_CACHE_HOME/jlora/xla, ~/.cache/jlora/xla),
that JLORA_COMPILE_CACHE=0 turns it off, that a real jlora-generate run writes its programs there and a second
run reads them back, and that this test session never writes the user's cache."""

import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import pytest
from test_generate import _tiny_model_dir, tiny  # noqa: F401 - the shared fixture

GENERATE = [sys.executable, "-c", "import sys; from jlora.cli.generate import main; sys.exit(main())"]
WHERE = [sys.executable, "-c", "from jlora.cli.compile_cache import cache_dir; print(cache_dir())"]
OURS = ("JLORA_COMPILE_CACHE", "JLORA_COMPILE_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")


def _env(home: pathlib.Path, **set_) -> dict:
    """This process's environment without any cache setting, with HOME at `home` and `set_` added."""
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    return {**env, "HOME": str(home), **set_}


@pytest.mark.parametrize(
    "set_, expected",
    [
        ({}, "{home}/.cache/jlora/xla"),
        ({"XDG_CACHE_HOME": "{home}/xdg"}, "{home}/xdg/jlora/xla"),
        ({"JAX_COMPILATION_CACHE_DIR": "{home}/jax", "XDG_CACHE_HOME": "{home}/xdg"}, "{home}/jax"),
        ({"JLORA_COMPILE_CACHE_DIR": "{home}/mine", "JAX_COMPILATION_CACHE_DIR": "{home}/jax"}, "{home}/mine"),
        ({"JLORA_COMPILE_CACHE": "0", "JLORA_COMPILE_CACHE_DIR": "{home}/mine"}, "None"),
        ({"JLORA_COMPILE_CACHE": "off"}, "None"),
    ],
)
def test_cache_location_in_order_and_the_opt_out(tmp_path, set_, expected):
    env = _env(tmp_path, **{k: v.format(home=tmp_path) for k, v in set_.items()})
    out = subprocess.run(WHERE, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected.format(home=tmp_path)


def test_a_cli_run_fills_the_default_cache_and_the_opt_out_writes_nothing(tiny, tmp_path):  # noqa: F811
    """jlora-generate with only HOME set writes its compiled programs under ~/.cache/jlora/xla; the same run
    with JLORA_COMPILE_CACHE=0 creates no cache directory at all. (Every program is kept here: the tiny
    model's compile under jax's threshold, which a user may set too.)"""
    model_dir = _tiny_model_dir(tmp_path, tiny[1])
    args = [*GENERATE, "--model", model_dir, "--prompt", "hello", "--max-new-tokens", "2"]
    every = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    on, off = tmp_path / "on", tmp_path / "off"
    for home, extra in ((on, {}), (off, {"JLORA_COMPILE_CACHE": "0"})):
        home.mkdir()
        run = subprocess.run(args, env=_env(home, **every, **extra), capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-2000:]
    entries = list((on / ".cache" / "jlora" / "xla").iterdir())
    assert any(e.name.startswith("jit__prefill") for e in entries), sorted(e.name for e in entries)
    assert not (off / ".cache").exists()


def test_this_session_never_writes_the_users_cache():
    """conftest points the cache (the variable the CLIs read, and this process's jax) at a temporary dir."""
    session = pathlib.Path(os.environ["JLORA_COMPILE_CACHE_DIR"])
    assert session.parent == pathlib.Path(tempfile.gettempdir()) and session.name.startswith("jlora-test-xla-")
    assert jax.config.jax_compilation_cache_dir == str(session)
