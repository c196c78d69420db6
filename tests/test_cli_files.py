"""What the command lines print and write, as a new user meets it (issue 13, item 20): jlora-train's
progress (compiling, no tok_s=nan, a rounded final loss), and what jlora-export-peft / jlora-merge write
for the demo model: files readable as the umask allows (safetensors alone writes 0600), a PEFT
base_model_name_or_path that PEFT users can load, one slash in the printed path, and a merged dir with
a tokenizer that jlora-generate and transformers use. Each test drives the real CLI in a subprocess."""

import json
import os
import pathlib
import re
import stat
import subprocess

import jax
import pytest
from cli_testing import script

import jlora

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(cmd: list[str], umask: int = 0o022, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    old = os.umask(umask)  # inherited by the child (a preexec_fn would fork this multithreaded process)
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, **kw)
    finally:
        os.umask(old)


def _modes(d: pathlib.Path) -> dict[str, int]:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in d.iterdir() if f.is_file()}


def test_train_progress_says_compiling_shows_no_nan_and_rounds_the_final_loss(tmp_path):
    sets = [
        f"output_dir={tmp_path / 'run'}",
        "train.steps=3",
        "train.eval_interval=0",
        "train.log_interval=1",
        "checkpoint.interval=0",
        "data.max_seq_len=192",
        "train.global_batch=8",
        "train.micro_batch=8",
    ]
    proc = _run([script("jlora-train"), "--config", "configs/tiny-cpu.yaml", *[a for s in sets for a in ("--set", s)]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "step 1/3: compiling the train step" in proc.stdout
    assert "nan" not in out.lower(), out[-2000:]  # the first step used to show tok_s=nan
    assert "tok_s=" in out  # measured from the second step on
    done = next(ln for ln in proc.stdout.splitlines() if ln.startswith("done:"))
    assert re.fullmatch(r"done: 3 steps, final loss \d+\.\d{4}, adapter in .*", done), done


@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_gguf, tmp_path_factory):
    """A jlora adapter on the demo model, with random nonzero B (as if trained)."""
    cfg, params = jlora.load_pretrained(smollm2_gguf)
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    _, trainable = jlora.split(params, lcfg, jax.random.key(0))
    trainable = jax.tree.map(
        lambda p: p.replace(b=0.01 * jax.random.normal(jax.random.key(1), p.b.shape)),
        trainable,
        is_leaf=lambda x: isinstance(x, jlora.LoraPair),
    )
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    jlora.save_adapter(out, trainable, lcfg, base=cfg)
    return out


@pytest.mark.slow
def test_export_peft_of_the_demo_model(smollm2_adapter, tmp_path):
    out = f"{tmp_path / 'peft-adapter'}/"  # the README writes --out peft-adapter/
    proc = _run(
        [script("jlora-export-peft"), "--model", "smollm2-135m", "--adapter", str(smollm2_adapter), "--out", out],
        umask=0o027,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "//" not in proc.stderr and f"{tmp_path / 'peft-adapter' / 'adapter_model.safetensors'}" in proc.stderr
    peft_dir = tmp_path / "peft-adapter"
    assert _modes(peft_dir) == {"adapter_model.safetensors": 0o640, "adapter_config.json": 0o640}  # umask 027
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_merge_of_the_demo_model_is_usable_alone(smollm2_adapter, smollm2_gguf, tmp_path):
    """The merged dir (from a GGUF base) carries a tokenizer: jlora-generate runs on it, and transformers'
    AutoTokenizer reads it as the GGUF's own. Its files are 0644 under umask 022."""
    import transformers

    merged = tmp_path / "merged-model"
    proc = _run(
        [script("jlora-merge"), "--model", "smollm2-135m", "--adapter", str(smollm2_adapter), "--out", str(merged)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = _modes(merged)
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
    ours = jlora.load_tokenizer(smollm2_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(merged)
    text = "Turn this into JSON: Ana Li, 34, lives in Porto."
    assert hf.encode(text) == ours.encode(text) and hf.eos_token_id == ours.eos_id
    gen = _run([script("jlora-generate"), "--model", str(merged), "--prompt", "Hi", "--chat", "--max-new-tokens", "3"])
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-3000:]
