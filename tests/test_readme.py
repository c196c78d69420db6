"""The README's Python API example runs as written: extracted from README.md, run in a fresh process."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def python_api_snippet() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README.md: no ```python block under '## Python API'"
    return blocks[0]


@pytest.mark.slow
def test_readme_python_api_snippet_runs_as_written(smollm2_gguf, tmp_path):
    code = python_api_snippet()
    for name in (
        "load_pretrained",
        "load_tokenizer",
        "Llama",
        "LoraConfig",
        "split",
        "apply",
        "merge",
        "causal_lm_loss",
        "make_train_step",
        "save_adapter",
        "load_adapter",
        "export_peft",
        "import_peft",
        "generate",
        "preference_loss",
    ):  # the README's API (docs/architecture.md)
        assert f"jlora.{name}(" in code, name
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path)}
    env.pop("XLA_FLAGS", None)  # one device, as a user's script gets
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "q_proj" in proc.stdout and lines[-1].strip(), proc.stdout  # describe(), then the generated text
    assert "'rewards/margins'" in proc.stdout and "'logps/rejected'" in proc.stdout, proc.stdout  # the DPO step's
