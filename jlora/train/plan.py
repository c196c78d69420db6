"""`jlora-train --plan`: will this run fit, and what will it cost, before renting the machines.

AOT-compiles the run's real train step (jlora.train.step.make_train_step, the configured mesh, batch
and remat) for abstract inputs on N fake CPU devices, never materialising a weight, and reads the
compiled program: per-device bytes of the frozen params, adapters and optimizer state (from their
shardings), XLA's temp bytes (`memory_analysis()`), dot FLOPs per token and collective bytes per
step by kind (jlora.parallel.hlo_stats, loop-weighted), and whether it fits common accelerators. It does not
train, load weights or read data.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from jlora.train.config import ConfigError, RunConfig

# Memory per device as sold (bytes). A run "fits" when it needs at most FIT_MARGIN of it: the
# runtime, the allocator's fragmentation and the compiler's workspace take the rest.
ACCELERATORS = {
    "L4-24GB": 24e9,
    "H100-80GB": 80e9,
    "H200-141GB": 141e9,
    "A100-40GB": 40e9,
    "A100-80GB": 80e9,
    "TPU-v4": 32 * 2**30,
    "TPU-v5e": 16 * 2**30,
    "TPU-v5p": 95 * 2**30,
    "TPU-v6e": 32 * 2**30,
}
FIT_MARGIN = 0.9


def use_fake_devices(n: int) -> None:
    """Make jax see `n` CPU devices. Must run before jax's backend starts (first device use)."""
    import jax

    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def plan_devices(run: RunConfig, devices: int | None) -> int:
    """`devices`, or the product of the configured mesh sizes (an error if one of them is -1)."""
    sizes = (run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    if devices is not None:
        run.mesh.resolve(devices)  # a clear error when the mesh does not fit
        return devices
    if -1 in sizes:
        raise ConfigError(
            f"mesh (data, fsdp, tensor) = {sizes} has a -1 size: say how many devices to plan for with --devices N",
            "mesh",
        )
    return int(np.prod(sizes))


def model_config(run: RunConfig):
    """The base model's config without reading weights: a preset, "tiny", an HF checkpoint's
    config.json (and safetensors headers), or a GGUF file (small models: loaded whole)."""
    from jlora.formats.weights import hf_checkpoint, load_pretrained, resolve_model_path
    from jlora.train.builders import load_base, load_tok, model_overrides

    m = run.model
    if m.path == "tiny" or m.preset:
        return load_base(run, load_tok(run) if m.path == "tiny" else None)[0]
    try:
        path = pathlib.Path(resolve_model_path(m.path))
    except ValueError as e:
        raise ConfigError(
            f"{e}; to plan by shape alone, add --set model.preset=NAME (e.g. llama3-8b)", "model.path"
        ) from None
    dtypes = {"dtype": m.dtype, "param_dtype": m.param_dtype}
    cfg = hf_checkpoint(path, dtypes)[0] if path.is_dir() else load_pretrained(path, **dtypes)[0]
    return cfg.replace(**model_overrides(run))


def _device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs) placed by `shardings` (the largest shard)."""
    import jax

    total = 0
    for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += int(np.prod(sh.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    return total


def quantized_shapes(run: RunConfig, frozen):
    """The frozen tree's ShapeDtypeStructs as `model.quantize` stores them (a GGUF file's own blocks are read)."""
    from jlora.quant.quantize import quantize

    m = run.model
    if m.quantize in ("none", "int8", "nf4"):
        return quantize(frozen, m.quantize, double_quant=m.double_quant)
    import jax
    from flax import traverse_util

    from jlora.formats.weights import load_pretrained, resolve_model_path

    loaded = traverse_util.flatten_dict(load_pretrained(resolve_model_path(m.path), quantize="gguf")[1])
    flat = traverse_util.flatten_dict(frozen)
    return traverse_util.unflatten_dict({k: jax.eval_shape(lambda x: x, loaded[k]) for k in flat})


def compile_step(run: RunConfig, devices: list | None = None):
    """(compiled train step, its TrainState of ShapeDtypeStructs, model config, optimizer) for `run` on the current
    devices (or `devices`): the real `make_train_step`, lowered for abstract inputs, so no weight is
    materialised."""
    import jax
    import jax.numpy as jnp

    from jlora.models.family import build_model, param_shapes
    from jlora.parallel.sharding import BATCH_AXES, make_mesh
    from jlora.train.builders import method_config
    from jlora.train.step import BATCH_KEYS, TrainState, make_optimizer, make_train_step, split_for_training

    cfg = model_config(run)
    mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices=devices)
    rows = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if run.train.micro_batch % rows:
        raise ConfigError(
            f"must be a multiple of mesh data*fsdp = {rows}, got {run.train.micro_batch}", "train.micro_batch"
        )
    optimizer, _ = make_optimizer(run.optim, run.train.steps or 1000, run.train.max_nonfinite)
    key = jax.random.key(0)
    frozen, trainable = jax.eval_shape(
        lambda p, k: split_for_training(p, k, method_config(run, cfg)), param_shapes(cfg), key
    )
    frozen = quantized_shapes(run, frozen)
    state = TrainState(frozen, trainable, jax.eval_shape(optimizer.init, trainable), mesh, run.mesh.allow_replication)
    shape = (run.train.grad_accum, run.train.micro_batch, run.data.max_seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32) for k in BATCH_KEYS}
    step = make_train_step(build_model(cfg), optimizer, state)
    compiled = step.lower(frozen, trainable, state.opt_state, batch, key).compile()
    return compiled, state, cfg, optimizer


def plan(run: RunConfig) -> dict[str, Any]:
    """Compile `run`'s train step on the current devices (fake CPU ones under --plan) and report."""
    from jlora.parallel import hlo_stats
    from jlora.parallel.sharding import describe_mesh

    compiled, state, cfg, optimizer = compile_step(run)
    fsh, tsh, osh = state.shardings(optimizer)
    mesh = state.mesh
    mem = compiled.memory_analysis()
    stats = hlo_stats.analyze(compiled.as_text())
    tokens = run.train.global_batch * run.data.max_seq_len
    need = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {
        "devices": int(mesh.devices.size),
        "mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names},
        "mesh_text": describe_mesh(mesh),
        "model": cfg.name,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "remat": cfg.remat,
        "quantize": run.model.quantize + ("+dq" if run.model.double_quant else ""),
        "micro_batch": run.train.micro_batch,
        "grad_accum": run.train.grad_accum,
        "seq": run.data.max_seq_len,
        "param_bytes": _device_bytes(state.frozen, fsh),
        "adapter_bytes": _device_bytes(state.trainable, tsh),
        "opt_bytes": _device_bytes(state.opt_state, osh),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "device_bytes": int(need),
        "flops_per_token": stats.dot_flops * mesh.devices.size / tokens,
        "collective_bytes": {k: int(v) for k, v in sorted(stats.collective_bytes.items())},
        "collective_counts": {k: int(v) for k, v in sorted(stats.collective_counts.items())},
        "fits": {name: bool(need <= FIT_MARGIN * cap) for name, cap in ACCELERATORS.items()},
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def report(p: dict[str, Any]) -> str:
    """The human-readable plan; its last line is `PLAN: {json}`."""
    lines = [
        f"plan: {p['model']} (dtype={p['dtype']} param_dtype={p['param_dtype']} remat={p['remat']} "
        f"quantize={p.get('quantize', 'none')}), "
        f"mesh {p['mesh_text']}",
        f"  step: {p['grad_accum']} micro-batch(es) of {p['micro_batch']} rows x {p['seq']} tokens",
        "per device:",
        f"  frozen params   {_gib(p['param_bytes'])}",
        f"  adapters        {_gib(p['adapter_bytes'])}",
        f"  optimizer state {_gib(p['opt_bytes'])}",
        f"  temp            {_gib(p['temp_bytes'])}  (XLA's workspace: activations, gathered weights, gradients)",
        f"  needs           {_gib(p['device_bytes'])}  (arguments + outputs - donated + temp)",
        f"  dot FLOPs/token {p['flops_per_token'] / 1e9:,.2f} GFLOP (all devices, loop trip counts included)",
        "  collectives per step: "
        + (
            ", ".join(f"{k} {_gib(v)} ({p['collective_counts'][k]:,}x)" for k, v in p["collective_bytes"].items())
            or "none"
        ),
        "fits (needs <= 90% of the memory):",
    ]
    lines += [
        f"  {name:<11} {ACCELERATORS[name] / 2**30:6.0f} GiB  {'fits' if ok else 'does NOT fit'}"
        for name, ok in p["fits"].items()
    ]
    lines.append("note: compiled for CPU, which computes bf16 in fp32, so temp is an upper bound for accelerators.")
    lines.append("PLAN: " + json.dumps({k: v for k, v in p.items() if k != "mesh_text"}))
    return "\n".join(lines)
