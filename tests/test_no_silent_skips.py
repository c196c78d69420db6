"""No test skips itself or assumes where its venv is. The test extra installs every package the suite needs
(transformers, peft, torch, matplotlib) and CI installs the demo model, so a missing one is a broken setup: a
test fails with the install hint (conftest's smollm2_gguf fixture, a plain import), it never skips silently."""

import pathlib
import re

TESTS = pathlib.Path(__file__).resolve().parent
# pytest.skip(...), pytest.importorskip(...), @pytest.mark.skip / skipif, however imported
SKIPS = re.compile(r"\b(importorskip|skipif)\b|\bskip\s*\(|mark\.skip\b")


def test_no_test_skips_or_importorskips():
    found = [
        f"{f.name}:{n}: {line.strip()}"
        for f in sorted(TESTS.glob("*.py"))
        if f.name != pathlib.Path(__file__).name
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if SKIPS.search(line.split("#", 1)[0])
    ]
    assert not found, "tests that skip instead of failing:\n" + "\n".join(found)


def test_no_test_names_a_venv_path():
    """CI installs into .ci-venv, a user into any venv: console scripts are found next to sys.executable
    (cli_testing.script), never at a hard-coded `.venv/bin`."""
    found = [
        f"{f.name}:{n}: {line.strip()}"
        for f in sorted(TESTS.glob("*.py"))
        if f.name != pathlib.Path(__file__).name
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\.venv\b|venv\W+bin", line)
    ]
    assert not found, "tests that assume where the venv is:\n" + "\n".join(found)
