"""Weights and compiled code laid out for KV-cached decoding: what `jlora.infer.generate` and `jlora.infer.engine` run.

Decoding runs the family's own module (`decode_model`: the same `__call__`, with `unrolled=True`) over a
transformation of its params and cache, for any family: `per_layer` cuts layer-stacked [L, ...] weights
into per-layer buffers (slicing them inside the loop makes XLA:CPU copy them every token), `prefuse` joins
the family's fused groups (q/k/v, gate/up) once and lays wide kernels (gate/up, the head) out in
`column_blocks`, and `init_decode_cache` cuts the cache per layer so each update is in place. `decode_jit`
compiles a per-token step with the XLA options that suit its short matmuls. It owns no sampling and no batching.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jlora.infer.lora_stack import RowAdapters, apply_rows
from jlora.models.config import ModelConfig
from jlora.models.decoder import cache_slots, layer_cache
from jlora.models.family import family_of
from jlora.peft.routing import LoraPair
from jlora.peft.routing import apply as apply_lora
from jlora.quant.quantize import is_quantized, transposed

# XLA:CPU's YNNPACK fusions (on by default in recent jaxlib) run a decode step's short products, a few rows
# times a [D, F] weight, ~1.4x slower than XLA's own dot emitter: SmolLM2's 30 layers at 16 rows took 101 ms
# without them and 140 ms with, its [576, 49152] head 48 vs 65 ms (2-core EPYC, load ~6). A prefill's tall
# products are as fast or faster with them, so only the per-token steps opt out. Other backends ignore it.
_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def decode_compiler_options() -> dict:
    """XLA options for the per-token decode steps: `_DECODE_OPTIONS` where this jaxlib knows them, else none."""
    try:
        jax.jit(lambda x: x, compiler_options=_DECODE_OPTIONS).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option" on a jaxlib without YNNPACK
        return {}
    return dict(_DECODE_OPTIONS)


def decode_jit(fn=None, **jit_kwargs):
    """`jax.jit` for a per-token decode step, compiled with `decode_compiler_options()`. The jitted function
    is made at the first call, since probing the options needs a backend (not at import)."""
    if fn is None:
        return functools.partial(decode_jit, **jit_kwargs)
    jitted = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fn, compiler_options=decode_compiler_options() or None, **jit_kwargs)
        return jitted(*args, **kwargs)

    return call


def decode_model(cfg: ModelConfig) -> nn.Module:
    """The family's own module in its decode layout: layers unrolled as `layer_{i}`, the head a matmul."""
    return family_of(cfg).module(cfg, unrolled=True)


def forward(dmodel: nn.Module, frozen: dict, trainable, cache: dict, ids, positions, segment_ids, last_only):
    """One KV-cached call of a `decode_model` on laid-out params: (logits, updated cache).

    `last_only` True gives the last column's logits [B,V] (a prefill needs no others), False the same
    for a one-token step; an index array [B,n] gives those columns' logits [B,n,V] (a packed prefill's
    prompt ends). LoRA runs unmerged when `trainable` is non-empty, per-row adapters when it is a
    `RowAdapters`."""
    b, t = ids.shape
    columns, pick = last_only, (lambda x: x)
    if isinstance(last_only, bool):
        columns = jnp.full((b, 1), t - 1, jnp.int32) if last_only else None
        pick = lambda x: x[:, -1]
    kwargs = {"decode": True, "columns": columns, "mutable": ["cache"]}
    if isinstance(trainable, RowAdapters):
        logits, new = apply_rows(
            dmodel, frozen, trainable, ids, positions, segment_ids, variables={"cache": cache}, **kwargs
        )
    elif trainable:
        logits, new = apply_lora(
            dmodel, frozen, trainable, ids, positions, segment_ids, variables={"cache": cache}, **kwargs
        )
    else:
        logits, new = dmodel.apply({"params": frozen, "cache": cache}, ids, positions, segment_ids, **kwargs)
    return pick(logits), new["cache"]


def host_view(x):
    """`x` as a numpy array where it lives in host memory (a numpy array, or a jax array on the CPU: no copy),
    else as it is. `layout` cuts and joins weights there and places them all in one `jax.device_put`: as eager
    jax ops, each distinct slice or concatenation compiled a program and each cut was a dispatch, and a
    30-layer model's layout took ~1.2 s of a start."""
    if isinstance(x, jax.Array) and x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()):
        return np.asarray(x)
    return x


def per_layer(tree: dict, n_layers: int) -> dict:
    """{"layers": stacked leaves} -> {"layer_i": leaves of layer i}; LoRA pairs keep their per-layer scale."""
    is_pair = lambda x: isinstance(x, LoraPair)
    out = {k: jax.tree.map(host_view, v) for k, v in tree.items() if k != "layers"}
    flat = traverse_util.flatten_dict(tree.get("layers", {}), is_leaf=lambda _, x: is_pair(x))
    for i in range(n_layers):
        layer = {}
        for path, leaf in flat.items():
            if not is_pair(leaf):
                layer[path] = jax.tree.map(lambda x: host_view(x)[i], leaf)  # an array or a QuantizedKernel
                continue
            scales = np.asarray(leaf.scale, np.float32).reshape(-1)
            scale = float(scales[i] if scales.size > 1 else scales[0])
            if scale == 0.0:  # a layer the adapter leaves alone (LoraConfig.layers)
                continue
            cut = lambda x: host_view(x)[i]
            mag = None if leaf.magnitude is None else cut(leaf.magnitude)
            layout = dataclasses.replace(leaf.layout, stack=leaf.layout.stack - 1)
            layer[path] = LoraPair(cut(leaf.a), cut(leaf.b), mag, scale, layout, 0.0)
        if layer:
            out[f"layer_{i}"] = traverse_util.unflatten_dict(layer)
    return out


def column_blocks(w: jax.Array) -> jax.Array | list[jax.Array]:
    """A wide kernel [D, N] as the column blocks a decode step multiplies one by one, or as it is.

    On XLA:CPU a few rows times a wide kernel run faster as independent narrower matmuls, two per
    core, that the runtime spreads over its threads: at 16 rows on 2 cores SmolLM2's [576, 49152]
    head took 13.5 ms in 4 blocks against 20 ms whole, and its [576, 3072] gate/up in 4 blocks saved
    another ~12 ms over the 30 layers (of a 62 ms step of plain matmuls). Kernels under 2048 columns
    stay whole (SmolLM2's q/k/v, o and down measured slower split), as does every kernel on other
    backends."""
    n = w.shape[-1]
    blocks = min(2 * _cores(), n // 512)
    if jax.default_backend() != "cpu" or n < 2048 or blocks < 2:
        return w
    edges = np.linspace(0, n, blocks + 1).astype(int)
    w = host_view(w)
    return [w[:, a:b] for a, b in zip(edges[:-1], edges[1:])]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prefuse(cfg: ModelConfig, frozen: dict, trainable: dict) -> dict:
    """Per-layer params with each fused group's kernels (and biases) joined into the FusedDense's own
    `kernel` [D, sum out]: joined inside the step, they were copied at every token (~1 s of CPU time per
    SmolLM2 token at 16 rows). A group stays split where a kernel is quantized or the trainable tree
    routes anything into its module (unmerged LoRA reads a part's own kernel, LLaMA-Adapter's prompts
    read the key and value projections). Wide joined kernels, and the head, are laid out in `column_blocks`."""
    fam = family_of(cfg)
    head_module = fam.head[:-1]
    out = dict(frozen)
    head = _get(frozen, fam.head)
    if isinstance(head, (jax.Array, np.ndarray)) and not _get(trainable, head_module):
        _pop(out, head_module)
        out[fam.head_module] = {"kernel": column_blocks(head)}
    for layer, params in frozen.items():
        if not layer.startswith("layer_"):
            continue
        params = out[layer] = jax.tree.map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))
        for group, parts in fam.fused.items():
            parent = _get(params, group[:-1]) or {}
            if _get(trainable.get(layer, {}), group[:-1]):
                continue
            if not all(isinstance(parent.get(p, {}).get("kernel"), (jax.Array, np.ndarray)) for p in parts):
                continue
            split = [parent.pop(p) for p in parts]
            joined = {k: _concatenate([m[k] for m in split]) for k in split[0]}  # kernel [D, sum out]
            joined["kernel"] = column_blocks(joined["kernel"])
            parent[group[-1]] = joined
    return out


def _concatenate(parts: list) -> jax.Array:
    """`parts` joined on the last axis: on the host where they all live there (`host_view`), else by jax."""
    host = [host_view(x) for x in parts]
    if all(isinstance(x, np.ndarray) for x in host):
        return np.concatenate(host, axis=-1)
    return jnp.concatenate(parts, axis=-1)


def _get(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _pop(tree: dict, path: tuple) -> None:
    """Remove `path` from `tree`, copying the dicts along it (the caller's tree is not changed)."""
    if len(path) == 1:
        tree.pop(path[0], None)
        return
    tree[path[0]] = dict(tree[path[0]])
    _pop(tree[path[0]], path[1:])


def layout(cfg: ModelConfig, frozen: dict, trainable: dict) -> tuple[dict, dict]:
    """(frozen, trainable) laid out for a `decode_model`: per-layer buffers (`per_layer`), an explicit [D,V]
    head (a tied embedding transposed once: attending to [V,D] would transpose it every token), and fused
    groups joined (`prefuse`). Weights in host memory are cut and joined there (`host_view`), then placed at once."""
    fam = family_of(cfg)
    n = cfg.num_hidden_layers
    routed = per_layer(trainable, n)
    layers = per_layer(frozen, n)
    if cfg.tie_word_embeddings:
        emb = _get(trainable, fam.embed)
        emb = _get(frozen, fam.embed) if emb is None or isinstance(emb, LoraPair) else emb
        if is_quantized(emb):
            head = transposed(emb)
        else:
            head = host_view(emb)
            head = head.T if isinstance(head, np.ndarray) else jnp.transpose(head)
        layers[fam.head[0]] = traverse_util.unflatten_dict({fam.head[1:]: head})
    return jax.device_put((prefuse(cfg, layers, routed), routed))  # one call places every piece cut on the host


def init_decode_cache(cfg: ModelConfig, batch: int, max_len: int, ring: bool = False) -> dict:
    """The family's KV cache cut into one buffer per layer, so each layer's update is in place. With `ring`,
    a local (sliding-window) layer keeps only its window's slots, reused in turn, instead of `max_len`
    (Gemma 3's local layers then hold 512 slots whatever the context); callers that move slots around
    themselves (the serving engine) keep every layer linear."""
    return {
        f"layer_{i}": {"self_attn": layer_cache(cfg, batch, slots)}
        for i, slots in enumerate(cache_slots(cfg, max_len, ring))
    }


def cache_bytes(cache: dict) -> int:
    """Bytes held by a KV cache (any layout)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
