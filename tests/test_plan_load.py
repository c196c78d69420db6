"""`--plan` counts the base's load, not only the step (issue 27, item 2): the load peak per device (the base as
stored plus one dense tensor being read) and per host, "fits" by the larger of load and step, and a run whose
load would not fit stops before any weight is read or made."""

import os
import pathlib
import subprocess

import jax
import numpy as np
from cli_testing import one_line_error, script
from flax import traverse_util

from jlora.quant.quantize import frozen_bytes
from jlora.train import plan
from jlora.train.config import from_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(quantize: str):
    return from_dict(
        {
            "model": {
                "path": "unused",
                "preset": "tiny",
                "quantize": quantize,
                "overrides": {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 768, "vocab_size": 4096},
            },
            "data": {"train": "unused.jsonl", "max_seq_len": 64},
            "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]},
            "train": {"global_batch": 1, "micro_batch": 1, "remat": "full"},
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        }
    )


def test_the_plan_reports_the_load_peak_and_fits_by_the_larger_of_load_and_step(monkeypatch):
    run = _run("nf4")
    one = jax.devices()[:1]
    p = plan.plan(run, devices_per_host=8, devices=one)
    _, state, cfg, _ = plan.compile_step(run, one)
    dense = traverse_util.flatten_dict(plan.split_shapes(run, cfg)[0])
    packed = traverse_util.flatten_dict(state.frozen)
    pieces = [
        int(np.prod(x.shape)) * x.dtype.itemsize // (cfg.num_hidden_layers if k[0] == "layers" else 1)
        for k, x in dense.items()
        if jax.tree.structure(packed[k]) != jax.tree.structure(x)  # packed on the way in
    ]
    assert p["load_bytes_per_device"] == frozen_bytes(state.frozen) + max(pieces)
    assert p["load_bytes_per_host"] == max(pieces) and p["devices_per_host"] == 1  # one device on this "host"
    assert p["peak_bytes"] == max(p["device_bytes"], p["load_bytes_per_device"])
    assert "load peak" in plan.report(p)

    # a load bigger than the step: "fits" follows the load
    monkeypatch.setattr(plan, "load_bytes", lambda *a, **k: (3 * p["device_bytes"], 1))
    monkeypatch.setattr(plan, "ACCELERATORS", {"small": 2 * p["device_bytes"] / plan.FIT_MARGIN})
    q = plan.plan(run, devices=one)
    assert q["peak_bytes"] == 3 * p["device_bytes"] and q["fits"] == {"small": False}
    monkeypatch.undo()
    monkeypatch.setattr(plan, "ACCELERATORS", {"small": 2 * p["device_bytes"] / plan.FIT_MARGIN})
    assert plan.plan(run, devices=one)["fits"] == {"small": True}


def test_a_run_whose_load_cannot_fit_stops_before_reading_weights(tmp_path):
    """LLaMA-3-70B in int8 on this CPU host: ~70 GB of base on a 24 GB machine used to be made leaf by leaf
    until the host ran out of memory. One line instead, before any weight exists, with what would fit."""
    sets = ["model.preset=llama3-70b", "model.quantize=int8", "mesh.data=1", "train.global_batch=8",
            f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    args = [script("jlora-train"), "--config", "configs/tiny-cpu.yaml", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    line = one_line_error(run, "model: loading llama3-70b with quantize=int8 needs", "GiB on this host", "available")
    assert not (tmp_path / "run" / "checkpoints").exists(), line
