"""Weights and compiled code laid out for KV-cached decoding: what `jlora.infer.generate` and `jlora.infer.engine` run.

`DecodeLlama` is `jlora.models.llama.model.Llama` with its layers unrolled over per-layer weight buffers (`per_layer`):
slicing stacked [L, ...] weights inside the loop makes XLA:CPU copy them every token. `prefuse` joins the
fused q/k/v and gate/up kernels once and lays wide kernels (gate/up, the head) out in `column_blocks`,
and `init_decode_cache` cuts the cache per layer so each update is in place. `decode_jit` compiles a
per-token step with the XLA options that suit its short matmuls. It owns no sampling and no batching.
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

from jlora.models.fused import FusedDense
from jlora.models.llama.model import DTYPES, Block, LlamaConfig, RMSNorm, init_cache, rope_tables
from jlora.peft.routing import LoraPair

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


class DecodeLlama(nn.Module):
    """`Llama` for decoding: same blocks and names, layers unrolled as `layer_{i}`, the head always a matmul.

    It mirrors `Llama.__call__` around the blocks; the tests hold the two to the same greedy tokens.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, ids, positions, segment_ids, last_only: bool | jax.Array = False):
        """Logits [B,V] of the last column (every column's, with last_only False, is never needed), or with
        last_only an index array [B,n], the logits [B,n,V] of those columns (a packed prefill's prompt ends)."""
        cfg, dt, pdt = self.cfg, DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt, name="embed_tokens")(ids)  # [B,T,D]
        rope = rope_tables(cfg, positions)
        for i in range(cfg.num_hidden_layers):
            x, _ = Block(cfg, True, name=f"layer_{i}")(x, rope, segment_ids)  # [B,T,D]
        columns = not isinstance(last_only, bool)
        if columns:
            x = jnp.take_along_axis(x, last_only[..., None], axis=1)  # [B,n,D]
        elif last_only:  # prefill needs only the last position's logits
            x = x[:, -1:]
        x = RMSNorm(cfg.rms_norm_eps, pdt, name="norm")(x)
        lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt, name="lm_head")
        logits, = FusedDense((lm_head,), fuse=False, name="head")(x)  # lm_head, or its column blocks (prefuse)
        return (logits if columns else logits[:, -1]).astype(jnp.float32)  # [B,n,V] or [B,V]


def per_layer(tree: dict, n_layers: int) -> dict:
    """{"layers": stacked leaves} -> {"layer_i": leaves of layer i}; LoRA pairs keep their per-layer scale."""
    is_pair = lambda x: isinstance(x, LoraPair)  # noqa: E731
    out = {k: jax.tree.map(jnp.asarray, v) for k, v in tree.items() if k != "layers"}
    flat = traverse_util.flatten_dict(tree.get("layers", {}), is_leaf=lambda _, x: is_pair(x))
    for i in range(n_layers):
        layer = {}
        for path, leaf in flat.items():
            if not is_pair(leaf):
                layer[path] = jax.tree.map(lambda x: jnp.asarray(x[i]), leaf)  # an array or a QuantizedKernel
                continue
            scales = np.asarray(leaf.scale, np.float32).reshape(-1)
            scale = float(scales[i] if scales.size > 1 else scales[0])
            if scale == 0.0:  # a layer the adapter leaves alone (LoraConfig.layers)
                continue
            mag = None if leaf.magnitude is None else jnp.asarray(leaf.magnitude[i])
            layout = dataclasses.replace(leaf.layout, stack=leaf.layout.stack - 1)
            layer[path] = LoraPair(jnp.asarray(leaf.a[i]), jnp.asarray(leaf.b[i]), mag, scale, layout, 0.0)
        if layer:
            out[f"layer_{i}"] = traverse_util.unflatten_dict(layer)
    return out


# FusedDense modules of a block and their parts: the parts' kernels are concatenated once, for decoding
_FUSED = {("self_attn", "qkv"): ("q_proj", "k_proj", "v_proj"), ("mlp", "gate_up"): ("gate_proj", "up_proj")}


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
    return [w[:, a:b] for a, b in zip(edges[:-1], edges[1:])]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prefuse(frozen: dict, trainable: dict) -> dict:
    """Per-layer params with each fused group's kernels (and biases) joined into the FusedDense's own
    `kernel` [D, sum out]: joined inside the step, they were copied at every token (~1 s of CPU time per
    SmolLM2 token at 16 rows). A group stays split where a kernel is quantized or the trainable tree
    routes anything into its module (unmerged LoRA reads a part's own kernel, LLaMA-Adapter's prompts
    read k_proj and v_proj). Wide joined kernels, and the head, are laid out in `column_blocks`."""
    out = dict(frozen)
    head = frozen.get("lm_head", {}).get("kernel")
    if isinstance(head, jax.Array) and not trainable.get("lm_head"):
        out["head"] = {"kernel": column_blocks(out.pop("lm_head")["kernel"])}
    for layer, params in frozen.items():
        if not layer.startswith("layer_"):
            continue
        params = out[layer] = {k: dict(v) for k, v in params.items()}
        for (group, name), parts in _FUSED.items():
            mods = params.get(group, {})
            if trainable.get(layer, {}).get(group):
                continue
            if not all(isinstance(mods.get(p, {}).get("kernel"), jax.Array) for p in parts):
                continue
            split = [mods.pop(p) for p in parts]
            mods[name] = {k: jnp.concatenate([m[k] for m in split], axis=-1) for k in split[0]}  # kernel [D, sum out]
            mods[name]["kernel"] = column_blocks(mods[name]["kernel"])
    return out


def init_decode_cache(cfg: LlamaConfig, batch: int, max_len: int) -> dict:
    """`jlora.models.llama.model.init_cache`'s cache cut into one buffer per layer, so each layer's update is in place."""
    stacked = init_cache(cfg, batch, max_len)["layers"]  # inside jit: the zeros are never materialized stacked
    return {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(cfg.num_hidden_layers)}
