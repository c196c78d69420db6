"""Scale is proven by compiling, not by comparing numbers: the real train step of a LLaMA-3-8B-width
model cut to 4 layers (seq 2048, micro-batch 8, bf16, dots_saveable, LoRA on every linear layer) is
AOT-compiled for 1 device and for 8 fake devices, and the compiled programs are read: XLA's per-device
temp bytes, and the collectives of the partitioned HLO weighted by loop trip counts (jlora.parallel.hlo_stats).
Also: `jlora-train --plan` prints what the compiler says, and hlo_stats counts loops right."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jlora.parallel import hlo_stats
from jlora.train import plan
from jlora.train.config import from_dict

LAYERS, MICRO, SEQ, D = 4, 8, 2048, 4096


def _run(fsdp: int, tensor: int = 1, **model):
    return from_dict(
        {
            "model": {
                "path": "unused",
                "preset": "llama3-8b",
                "dtype": "bfloat16",
                "param_dtype": "bfloat16",
                "overrides": {"num_hidden_layers": LAYERS},
                **model,
            },
            "data": {"train": "unused.jsonl", "max_seq_len": SEQ},
            "lora": {"rank": 16, "alpha": 32.0, "targets": "all-linear"},
            "train": {"global_batch": MICRO, "micro_batch": MICRO, "remat": "dots_saveable"},
            "mesh": {"data": 1, "fsdp": fsdp, "tensor": tensor},
        }
    )


def _compile(fsdp: int, tensor: int = 1):
    """(memory_analysis, hlo_stats, LoRA bytes) of the step compiled on the first fsdp*tensor devices."""
    compiled, state, _, _ = plan.compile_step(_run(fsdp, tensor), devices=jax.devices()[: fsdp * tensor])
    lora_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.trainable))
    return compiled.memory_analysis(), hlo_stats.analyze(compiled.as_text()), lora_bytes


@pytest.fixture(scope="module")
def one_device():
    return _compile(1)


@pytest.fixture(scope="module")
def fsdp8():
    return _compile(8)


@pytest.mark.slow
def test_fsdp_step_holds_an_eighth_of_the_activations(one_device, fsdp8):
    mem1, _, _ = one_device
    mem8, _, _ = fsdp8
    assert mem8.temp_size_in_bytes <= 0.35 * mem1.temp_size_in_bytes, (mem8.temp_size_in_bytes, mem1.temp_size_in_bytes)


@pytest.mark.slow
def test_fsdp_step_gathers_weights_per_layer_and_reduces_only_lora_gradients(fsdp8):
    _, stats, lora_bytes = fsdp8
    # FSDP: every layer's 7 frozen kernels are all-gathered inside the layer loop (forward and backward)
    assert stats.collective_counts.get("all-gather", 0) >= 2 * 7 * LAYERS
    # no activation is all-reduced over fsdp: only the LoRA gradients (plus scalars: loss, counts, norms)
    assert stats.collective_bytes.get("all-reduce", 0) <= 2 * lora_bytes + 2**20, (stats, lora_bytes)
    assert "reduce-scatter" not in stats.collective_bytes or stats.collective_bytes["reduce-scatter"] <= 2 * lora_bytes


@pytest.mark.slow
def test_tensor_parallel_step_reduces_only_per_layer_activations(one_device):
    mem1, _, _ = one_device
    mem, stats, lora_bytes = _compile(4, 2)
    assert mem.temp_size_in_bytes <= 0.35 * mem1.temp_size_in_bytes
    rows = MICRO // 4
    act = rows * SEQ * D * 4  # one [rows per device, T, D] fp32 reduction (CPU computes bf16 in fp32)
    # Megatron: o_proj and down_proj reduce forward, their column-parallel inputs backward (the LoRA and
    # frozen parts may be reduced apart), + the embedding lookup and the CE gradient: no whole micro-batch
    assert stats.collective_bytes["all-reduce"] <= 2 * lora_bytes + (8 * LAYERS + 2) * act, stats
    assert stats.collective_max_bytes["all-reduce"] < MICRO * SEQ * D * 4, stats


def test_plan_line_reports_what_the_compiler_says(tmp_path):
    """`jlora-train --plan` on the tiny config (a fresh process with 8 fake devices) prints a PLAN line
    whose memory figures equal memory_analysis() of the same step compiled here."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jlora.cli.train",
            "--config",
            "configs/tiny-cpu.yaml",
            "--plan",
            "--devices",
            "8",
            "--set",
            "mesh.fsdp=4",
            "--set",
            "mesh.data=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("PLAN: ")
    got = json.loads(last[len("PLAN: ") :])
    for key in (
        "devices",
        "mesh",
        "param_bytes",
        "adapter_bytes",
        "opt_bytes",
        "temp_bytes",
        "flops_per_token",
        "collective_bytes",
        "fits",
    ):
        assert key in got, key
    assert got["devices"] == 8 and got["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}

    from jlora.train.config import load

    compiled, state, _, _ = plan.compile_step(load("configs/tiny-cpu.yaml", ["mesh.fsdp=4", "mesh.data=2"]))
    mem = compiled.memory_analysis()
    assert got["temp_bytes"] == mem.temp_size_in_bytes
    assert got["argument_bytes"] == mem.argument_size_in_bytes
    assert got["param_bytes"] + got["adapter_bytes"] + got["opt_bytes"] <= mem.argument_size_in_bytes
    assert got["fits"]["TPU-v5e"] is True


def test_plan_refuses_a_mesh_with_a_free_size_without_devices():
    out = subprocess.run(
        [sys.executable, "-m", "jlora.cli.train", "--config", "configs/llama3-8b-lora.yaml", "--plan"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--devices N" in out.stderr, out.stderr


def test_hlo_stats_weights_loop_bodies_by_their_trip_count():
    """A 4-layer scan over fsdp-sharded weights: 4 all-gathers forward + 4 backward, 4 weight-gradient
    reductions, and dot FLOPs of 3 matmuls per layer, where cost_analysis() counts one iteration."""
    mesh = jax.make_mesh((8,), ("f",))

    def loss(w, x):
        def layer(h, wl):
            return jnp.tanh(h @ wl), None

        return jax.lax.scan(layer, x, w)[0].sum()

    w = jax.ShapeDtypeStruct((4, 256, 256), jnp.float32, sharding=NamedSharding(mesh, P(None, "f", None)))
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P("f", None)))
    stats = hlo_stats.analyze(jax.jit(jax.grad(loss)).lower(w, x).compile().as_text())
    assert stats.collective_counts == {"all-gather": 8, "all-reduce": 4}
    assert stats.collective_bytes == {"all-gather": 8 * 256 * 256 * 4, "all-reduce": 4 * 256 * 256 * 4}
    assert stats.dot_flops == 3 * 4 * 2 * 8 * 256 * 256  # fwd, dx, dW per layer; 8 rows per device


def test_plan_of_an_hf_checkpoint_reads_its_config(tmp_path):
    """--plan takes the shape from an HF checkpoint's config.json and headers, and the error for a
    missing checkpoint says how to plan by shape instead."""
    from jlora.formats.weights import save_pretrained
    from jlora.models.family import init_params
    from jlora.models.llama import PRESETS
    from jlora.train.config import ConfigError

    cfg = PRESETS["tiny"].replace(vocab_size=320, num_hidden_layers=3)
    save_pretrained(jax.device_get(init_params(cfg, jax.random.key(0))), cfg, tmp_path / "base")
    run = from_dict({"model": {"path": str(tmp_path / "base")}, "data": {"train": "unused.jsonl"}})
    got = plan.model_config(run)
    assert (got.vocab_size, got.num_hidden_layers, got.hidden_size) == (320, 3, 64)
    with pytest.raises(ConfigError, match="model.preset=NAME"):
        plan.model_config(from_dict({"model": {"path": str(tmp_path / "nowhere")}, "data": {"train": "x"}}))
