"""Quantize on the way in (issue 27, item 1): with int8 / nf4 a base is read leaf by leaf, packed, and only the
packed form is kept, so the dense base never exists whole on a device or on the host.

The RSS test trains a random 0.47B-parameter LLaMA that transformers writes (1.9 GB fp32) for one step
through jlora-train, dense and nf4, each in its own process."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- peak RSS of jlora-train, dense vs nf4, on a 0.47B checkpoint ----

RSS_MODEL = {  # 0.468B params: 24 x 16.8M per layer + 2 x 32.8M embedding and head, 1.87 GB in fp32
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 256,
}


def _write_rss_checkpoint(path: pathlib.Path) -> int:
    """RSS_MODEL, randomly initialised by transformers, as an fp32 HF checkpoint with a byte-level tokenizer;
    returns its number of parameters."""
    import torch
    from test_families import byte_tokenizer_files
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.no_grad():
        model = LlamaForCausalLM(LlamaConfig(**RSS_MODEL, tie_word_embeddings=False))
    model.save_pretrained(path, safe_serialization=True, max_shard_size="1GB")
    byte_tokenizer_files(path)
    return sum(p.numel() for p in model.parameters())


# Runs argv[1:] as a console script's main (or only imports jlora), then prints this process's peak RSS. VmHWM,
# not getrusage: a child's ru_maxrss also counts the parent's memory at the fork (here, the pytest process).
PEAK_RSS = r"""
import atexit, sys

def peak():
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"PEAK_RSS {hwm * 1024}", flush=True)

atexit.register(peak)
import jlora
if len(sys.argv) > 1:
    from jlora.cli.train import main
    sys.argv = sys.argv[1:]
    sys.exit(main())
"""


def _peak_rss(args: list[str]) -> int:
    """Peak RSS in bytes of `jlora-train ARGS` (or, with no args, of `import jlora`) on one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, not the tests' eight
    cmd = [sys.executable, "-c", PEAK_RSS, *(["jlora-train", *args] if args else [])]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return int(run.stdout.split("PEAK_RSS ")[1].split()[0])


@pytest.mark.slow
def test_nf4_training_peaks_at_about_half_the_dense_rss(tmp_path_factory):
    """One jlora-train step on a 0.47B checkpoint: the nf4 run's peak RSS growth over a bare `import jlora` is at
    most 0.55x the dense run's (the packed base is ~0.15x the fp32 one; the step's own memory is the same)."""
    root = tmp_path_factory.mktemp("qlora_rss")
    try:
        n_params = _write_rss_checkpoint(root / "model")
        assert 0.46e9 <= n_params <= 0.5e9
        bare = _peak_rss([])
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps({"text": f"record {i}: the quick brown fox"}) + "\n" for i in range(8)))
        sets = {
            "model.path": root / "model",
            "data.train": data,
            "data.format": "text",
            "data.max_seq_len": 64,
            "data.val_fraction": 0,
            "train.steps": 1,
            "train.global_batch": 1,
            "train.micro_batch": 1,
            "train.eval_interval": 0,
            "checkpoint.interval": 0,
        }
        growth = {}
        for quantize in ("none", "nf4"):
            run = {**sets, "model.quantize": quantize, "output_dir": root / f"run-{quantize}"}
            args = ["--config", "configs/tiny-cpu.yaml"]
            args += [a for k, v in run.items() for a in ("--set", f"{k}={v}")]
            growth[quantize] = _peak_rss(args) - bare
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)  # 1.9 GB: not left for pytest's kept tmp dirs
    ratio = growth["nf4"] / growth["none"]
    print(
        "RSS: "
        + json.dumps(
            {
                "params": n_params,
                "bare_gib": round(bare / 2**30, 3),
                "dense_growth_gib": round(growth["none"] / 2**30, 3),
                "nf4_growth_gib": round(growth["nf4"] / 2**30, 3),
                "ratio": round(ratio, 3),
            }
        )
    )
    assert ratio <= 0.55, f"nf4 peak RSS growth is {ratio:.2f}x the dense run's"
