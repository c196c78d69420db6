"""`jlora-train --plan`: will this run fit, and what will it cost, before renting the machines.

AOT-compiles the run's real train step (jlora.train.step.make_train_step, the configured mesh, batch
and remat) for abstract inputs on N fake CPU devices, never materialising a weight, and reads the
compiled program: per-device bytes of the frozen params, adapters and optimizer state (from their
shardings), XLA's temp bytes (`memory_analysis()`), dot FLOPs per token and collective bytes per
step by kind (jlora.parallel.hlo_stats, loop-weighted), the peak of loading the base (per device: the base as
stored plus one dense tensor being read; per host: that tensor's slices for its devices), and whether the
larger of load and step fits common accelerators. It does not train, load weights or read data.
`check_load_fits` runs the same load count before a real run reads any weight.
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
    "L40S-48GB": 48e9,  # and the RTX A6000's 48 GB
    "A100-40GB": 40e9,
    "A100-80GB": 80e9,
    "TPU-v4": 32 * 2**30,
    "TPU-v5e": 16 * 2**30,
    "TPU-v5p": 95 * 2**30,
    "TPU-v6e": 32 * 2**30,
}
FIT_MARGIN = 0.9
DEVICES_PER_HOST = 8  # a GPU node's usual count (a TPU v5p host drives 4): host RAM per host during the load


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
    from jlora.formats.weights import hf_checkpoint, read_pretrained, resolve_model_path
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
    cfg = hf_checkpoint(path, dtypes)[0] if path.is_dir() else read_pretrained(path, **dtypes)[0]
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

    from jlora.formats.weights import read_pretrained, resolve_model_path

    loaded = traverse_util.flatten_dict(read_pretrained(resolve_model_path(m.path), quantize="gguf")[1])
    flat = traverse_util.flatten_dict(frozen)
    return traverse_util.unflatten_dict({k: jax.eval_shape(lambda x: x, loaded[k]) for k in flat})


def load_bytes(frozen_dense, frozen_stored, mesh, allow_replication: bool = False) -> tuple[int, int]:
    """(bytes one device holds at the peak of loading the base, bytes of the largest dense piece one device
    receives) for a frozen tree of ShapeDtypeStructs, dense and as stored (packed when quantized).

    The loader reads one tensor of the checkpoint at a time (one layer's slice of a stacked leaf) and, with
    int8 / nf4, packs it before reading the next, so a device holds the packed base plus one dense tensor:
    its shard of that tensor. Unquantized, the base is the stored tree itself."""
    import jax
    from flax import traverse_util

    from jlora.parallel.sharding import param_specs, to_shardings

    stored = _device_bytes(frozen_stored, to_shardings(mesh, param_specs(frozen_stored, mesh, allow_replication)))
    dense = traverse_util.flatten_dict(frozen_dense)
    shardings = traverse_util.flatten_dict(to_shardings(mesh, param_specs(frozen_dense, mesh, allow_replication)))
    packed = traverse_util.flatten_dict(frozen_stored)
    piece = 0
    for path, x in dense.items():
        if jax.tree.structure(packed[path]) == jax.tree.structure(x):  # kept as it is: part of `stored` already
            continue
        shard = int(np.prod(shardings[path].shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        piece = max(piece, shard // (x.shape[0] if path[0] == "layers" else 1))  # one layer of a stacked leaf
    return stored + piece, piece


def device_memory(device) -> tuple[int | None, str]:
    """(bytes a run may use on `device`, what they are): the accelerator's own limit, or on a CPU the host's
    available memory shared by all its devices (None when unknown)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if ":" in line}
        return info["MemAvailable"], "available host memory"
    except (OSError, KeyError, ValueError):
        return None, ""


def check_load_fits(run: RunConfig, mesh) -> None:
    """ConfigError, before any weight is read or made, when the base's load would not fit this process's
    devices: one line with what would (nf4 instead of int8, double_quant, more devices). For a preset or an HF
    checkpoint (its config.json); a GGUF file's blocks are read as they are stored."""
    import jax

    from jlora.models.family import param_shapes
    from jlora.quant.quantize import quantize

    m = run.model
    if m.quantize == "gguf" or not (m.path == "tiny" or m.preset or pathlib.Path(m.path).is_dir()):
        return
    cfg = model_config(run)
    local = mesh.local_devices if hasattr(mesh, "local_devices") else jax.local_devices()
    cap, what = device_memory(local[0])
    if cap is None:
        return
    shared = local[0].platform == "cpu"  # CPU devices are one host's memory
    dense = param_shapes(cfg)

    def need(method: str, dq: bool) -> int:
        per_device, _ = load_bytes(dense, quantize(dense, method, double_quant=dq), mesh, run.mesh.allow_replication)
        return per_device * (len(local) if shared else 1)

    have = int(FIT_MARGIN * cap)
    needed = need(m.quantize, m.double_quant)
    if needed <= have:
        return
    options = []
    if m.quantize in ("none", "int8") and (n := need("nf4", False)) <= have:
        options.append(f"model.quantize: nf4 ({_gib(n)})")
    if m.quantize in ("none", "int8", "nf4") and not m.double_quant and (n := need("nf4", True)) <= have:
        options.append(f"nf4 with model.double_quant: true ({_gib(n)})")
    if not shared:
        devices = -(-needed * mesh.devices.size // have)
        options.append(f"about {devices} devices with the base sharded over fsdp")
    raise ConfigError(
        f"loading {cfg.name} with quantize={m.quantize}{'+dq' if m.double_quant else ''} needs {_gib(needed)} "
        f"{'on this host' if shared else 'per device'}, more than {FIT_MARGIN:.0%} of the {_gib(cap)} of {what}; "
        + ("it would fit with " + ", or ".join(options) if options else "nothing jlora offers makes it fit here"),
        "model",
    )


def split_shapes(run: RunConfig, cfg):
    """(frozen, trainable) ShapeDtypeStructs of `run`'s split of the dense base."""
    import jax

    from jlora.models.family import param_shapes
    from jlora.train.builders import method_config
    from jlora.train.step import split_for_training

    return jax.eval_shape(
        lambda p, k: split_for_training(p, k, method_config(run, cfg)), param_shapes(cfg), jax.random.key(0)
    )


def compile_step(run: RunConfig, devices: list | None = None):
    """(compiled train step, its TrainState of ShapeDtypeStructs, model config, optimizer) for `run` on the current
    devices (or `devices`): the real `make_train_step`, lowered for abstract inputs, so no weight is
    materialised."""
    import jax
    import jax.numpy as jnp

    from jlora.models.family import build_model
    from jlora.parallel.sharding import BATCH_AXES, make_mesh
    from jlora.train.step import REFERENCE_KEY, Objective, TrainState, make_optimizer, make_train_step

    cfg = model_config(run)
    mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices=devices)
    rows = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if run.train.micro_batch % rows:
        raise ConfigError(
            f"must be a multiple of mesh data*fsdp = {rows}, got {run.train.micro_batch}", "train.micro_batch"
        )
    optimizer, _ = make_optimizer(run.optim, run.train.steps or 1000, run.train.max_nonfinite)
    key = jax.random.key(0)
    frozen, trainable = split_shapes(run, cfg)
    frozen = quantized_shapes(run, frozen)
    state = TrainState(frozen, trainable, jax.eval_shape(optimizer.init, trainable), mesh, run.mesh.allow_replication)
    objective = Objective.of_run(run)  # a preference micro-batch of P pairs is 2P rows; its reference runs in it
    if run.reference_adapter:  # the adapter the run starts from is the reference: its copy is counted
        state.reference = trainable
    shape = (run.train.grad_accum, run.train.micro_batch * (1 if run.objective == "sft" else 2), run.data.max_seq_len)
    dtype = lambda k: jnp.float32 if k in ("loss_mask", REFERENCE_KEY) else jnp.int32
    batch = {k: jax.ShapeDtypeStruct(shape[: 2 if k == REFERENCE_KEY else 3], dtype(k)) for k in objective.batch_keys}
    step = make_train_step(build_model(cfg), optimizer, state, objective=objective)
    compiled = step.lower(frozen, trainable, state.opt_state, batch, key, *state.reference_args()).compile()
    return compiled, state, cfg, optimizer


def plan(run: RunConfig, devices_per_host: int = DEVICES_PER_HOST, devices: list | None = None) -> dict[str, Any]:
    """Compile `run`'s train step on the current devices (fake CPU ones under --plan) and report: the step's
    needs and the base's load (per device, and per host of `devices_per_host` devices); it fits where the
    larger of the two does."""
    from jlora.parallel import hlo_stats
    from jlora.parallel.sharding import describe_mesh

    compiled, state, cfg, optimizer = compile_step(run, devices)
    dense_frozen = split_shapes(run, cfg)[0]
    fsh, tsh, osh = state.shardings(optimizer)
    mesh = state.mesh
    mem = compiled.memory_analysis()
    stats = hlo_stats.analyze(compiled.as_text())
    tokens = run.train.global_batch * (1 if run.objective == "sft" else 2) * run.data.max_seq_len
    need = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    load, piece = load_bytes(dense_frozen, state.frozen, mesh, run.mesh.allow_replication)
    per_host = min(devices_per_host, mesh.devices.size)
    peak = max(need, load)
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
        "objective": run.objective,
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
        "load_bytes_per_device": int(load),
        "load_bytes_per_host": int(per_host * piece),
        "devices_per_host": per_host,
        "peak_bytes": int(peak),
        "flops_per_token": stats.dot_flops * mesh.devices.size / tokens,
        "collective_bytes": {k: int(v) for k, v in sorted(stats.collective_bytes.items())},
        "collective_counts": {k: int(v) for k, v in sorted(stats.collective_counts.items())},
        "fits": {name: bool(peak <= FIT_MARGIN * cap) for name, cap in ACCELERATORS.items()},
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def report(p: dict[str, Any]) -> str:
    """The human-readable plan; its last line is `PLAN: {json}`."""
    lines = [
        f"plan: {p['model']} (dtype={p['dtype']} param_dtype={p['param_dtype']} remat={p['remat']} "
        f"quantize={p.get('quantize', 'none')}), "
        f"mesh {p['mesh_text']}",
        f"  step: {p['grad_accum']} micro-batch(es) of {p['micro_batch']} "
        + ("rows" if p.get("objective", "sft") == "sft" else f"pairs ({p['objective']}: 2 rows each)")
        + f" x {p['seq']} tokens",
        "per device:",
        f"  frozen params   {_gib(p['param_bytes'])}",
        f"  adapters        {_gib(p['adapter_bytes'])}",
        f"  optimizer state {_gib(p['opt_bytes'])}",
        f"  temp            {_gib(p['temp_bytes'])}  (XLA's workspace: activations, gathered weights, gradients)",
        f"  needs           {_gib(p['device_bytes'])}  (arguments + outputs - donated + temp)",
        f"  load peak       {_gib(p['load_bytes_per_device'])}  (the base as stored + one dense tensor being read)",
        f"per host of {p['devices_per_host']} devices: load {_gib(p['load_bytes_per_host'])} of host memory "
        f"(the slices of one dense tensor read for its devices)",
        f"  dot FLOPs/token {p['flops_per_token'] / 1e9:,.2f} GFLOP (all devices, loop trip counts included)",
        "  collectives per step: "
        + (
            ", ".join(f"{k} {_gib(v)} ({p['collective_counts'][k]:,}x)" for k, v in p["collective_bytes"].items())
            or "none"
        ),
        "fits (the larger of needs and load peak <= 90% of the memory):",
    ]
    lines += [
        f"  {name:<11} {ACCELERATORS[name] / 2**30:6.0f} GiB  {'fits' if ok else 'does NOT fit'}"
        for name, ok in p["fits"].items()
    ]
    lines.append("note: compiled for CPU, which computes bf16 in fp32, so temp is an upper bound for accelerators.")
    lines.append("PLAN: " + json.dumps({k: v for k, v in p.items() if k != "mesh_text"}))
    return "\n".join(lines)
