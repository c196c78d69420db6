"""LLaMA-Adapter (Zhang et al., 2023) as a transformation of parameter trees: `AdapterConfig`, `split`,
and the routing that runs it.

Each of the top `layers` attention layers learns `len` adaption prompts [len, D]. Their keys and values
come from the layer's own frozen k/v projections (no rope), every query attends to them in a softmax of
their own, and the result enters the attention output through a gate that starts at zero, so training
starts exactly at the base model. Names and shapes follow HF PEFT's AdaptionPrompt (`adapter_len`,
`adapter_layers`, a gate of shape [1] per layer). The trainable tree holds only the adapted layers:
{"layers": {"self_attn": {"adaption_prompt": [A, len, D], "adaption_gate": [A, 1]}}}; the frozen tree is
the params as given. The model meets it through `Attention.extra_attention`, the hook `prompt_interceptor`
fills in; `jlora.peft.routing.apply` installs it. PEFT files are jlora.formats.peft_adaption's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from jlora.errors import JloraError
from jlora.parallel.sharding import add_rules
from jlora.quant.quantize import dense_value

PROMPT, GATE = "adaption_prompt", "adaption_gate"
# Prompts [len, D] and gates [1] are small: replicated on every device
add_rules(((r"\.adaption_prompt$", P(None, None)), (r"\.adaption_gate$", P(None))))
ATTENTION = ("layers", "self_attn")  # where the scanned attention modules' variables live
HOOK = "extra_attention"  # the Attention method (jlora.models.decoder) the routing intercepts
START_LAYER = 2  # lit-llama's adapter_start_layer: with layers=None every layer from the third on is adapted


class AdapterConfigError(JloraError, ValueError):
    """A bad LLaMA-Adapter setting or a tree that does not fit; the message is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """LLaMA-Adapter settings. len: prompts per adapted layer (PEFT adapter_len); layers: how many of the
    top layers are adapted (PEFT adapter_layers), None for all but the first two as lit-llama does."""

    len: int = 10
    layers: int | None = None

    def __post_init__(self):
        for key in ("len", "layers"):
            value = getattr(self, key)
            if value is None and key == "layers":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AdapterConfigError(f"{key}: must be a positive integer, got {value!r}")

    def n_layers(self, model_layers: int) -> int:
        """How many top layers are adapted in a model of `model_layers` layers; beyond it is an error."""
        n = max(model_layers - START_LAYER, 1) if self.layers is None else self.layers
        if n > model_layers:
            raise AdapterConfigError(
                f"adapter.layers: {n} is beyond the model's {model_layers} layers (at most {model_layers})"
            )
        return n


def model_layers(params) -> int:
    """The scanned layer count L of a params tree: the leading dim of its layer-stacked leaves."""
    layers = params.get("layers") if isinstance(params, dict) else None
    leaves = jax.tree_util.tree_leaves(layers)
    if not leaves:
        raise AdapterConfigError("LLaMA-Adapter needs a params tree with layer-stacked 'layers' (a jlora.Llama)")
    return int(leaves[0].shape[0])


def _hidden_size(params) -> int:
    """D, from the token embedding [V, D] (the one top-level `embedding` leaf)."""
    for module in params.values():
        if isinstance(module, dict) and "embedding" in module:
            return int(module["embedding"].shape[-1])
    raise AdapterConfigError("LLaMA-Adapter needs a params tree with a token embedding")


def split(params, acfg: AdapterConfig, key: jax.Array) -> tuple[Any, dict]:
    """params -> (frozen, trainable): the params untouched, and normal(0, 1) prompts [A, len, D] with
    zero gates [A, 1] for the top A = acfg.n_layers(L) layers (PEFT's and the paper's init)."""
    n = acfg.n_layers(model_layers(params))
    prompt = jax.random.normal(key, (n, acfg.len, _hidden_size(params)), jnp.float32)  # [A, len, D]
    gate = jnp.zeros((n, 1), jnp.float32)  # [A, 1]
    return params, {"layers": {"self_attn": {PROMPT: prompt, GATE: gate}}}


def is_adapter_tree(trainable) -> bool:
    """Whether a trainable tree is (or holds) LLaMA-Adapter prompts and gates."""
    if not isinstance(trainable, dict):
        return False
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: not isinstance(x, dict))
    return any(path[-1] in (PROMPT, GATE) for path in flat)


def is_adapter_leaf(path: tuple) -> bool:
    return bool(path) and path[-1] in (PROMPT, GATE)


def adapted_layers(trainable, n_layers: int) -> list[int]:
    """The layer indices the prompts of `trainable` sit in (the top ones)."""
    gate = trainable["layers"]["self_attn"][GATE]
    return list(range(n_layers - gate.shape[0], n_layers))


def expand(trainable, n_layers: int):
    """The trainable tree with the stacked prompts and gates [A, ...] padded with zeros to all
    `n_layers` layers [L, ...] (zero gates below: exactly no change there, and no gradient to train).
    What `nn.scan` slices per layer. Other leaves, and a tree without prompts, pass through."""
    attn = (trainable.get("layers") or {}).get("self_attn") if isinstance(trainable, dict) else None
    if not isinstance(attn, dict) or PROMPT not in attn:
        return trainable
    prompt, gate = attn[PROMPT], attn[GATE]
    n = prompt.shape[0]
    if n > n_layers:
        raise AdapterConfigError(f"adaption prompts for {n} layers do not fit a model of {n_layers} layers")
    if n < n_layers:
        pad = lambda x: jnp.concatenate([jnp.zeros((n_layers - n, *x.shape[1:]), x.dtype), x])
        prompt, gate = pad(prompt), pad(gate)
    return {**trainable, "layers": {**trainable["layers"], "self_attn": {**attn, PROMPT: prompt, GATE: gate}}}


def _projection(variables: dict, name: str) -> dict | None:
    """The {kernel, bias?} of projection `name` among a module's params, at any depth (a fused module keeps names)."""
    for key, sub in variables.items():
        if not isinstance(sub, dict):
            continue
        if key == name and "kernel" in sub:
            return sub
        found = _projection(sub, name)
        if found is not None:
            return found
    return None


def prompt_attention(q: jax.Array, prompt: jax.Array, gate: jax.Array, key: dict, value: dict, n_kv: int) -> jax.Array:
    """gate * softmax(q . pk / sqrt(H)) @ pv [B,T,N,H] for queries q [B,T,N,H], prompts [P,D], gate [1],
    pk / pv = the prompts through the frozen k/v projections [P,K,H]; query head n reads kv head n // G."""
    b, t, n, h = q.shape
    dt = q.dtype

    def project(proj):
        y = prompt.astype(dt) @ dense_value(proj["kernel"], dt)  # [P, K*H]
        if "bias" in proj:
            y = y + proj["bias"].astype(dt)
        return y.reshape(prompt.shape[0], n_kv, h)  # [P,K,H]

    pk, pv = project(key), project(value)
    qg = q.reshape(b, t, n_kv, n // n_kv, h)  # [B,T,K,G,H]
    scores = jnp.einsum("btkgh,pkh->btkgp", qg, pk) / math.sqrt(h)  # [B,T,K,G,P]
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dt) * gate.astype(dt)  # PEFT: fp32 softmax
    return jnp.einsum("btkgp,pkh->btkgh", probs, pv.astype(dt)).reshape(b, t, n, h)  # [B,T,N,H]


def check_attention(cfg) -> None:
    """Refuse, in one line, attention that LLaMA-Adapter's prompt attention (plain softmax(q.k/sqrt(H)) over
    prompt keys through the frozen k/v projections, as PEFT's AdaptionPrompt computes it) would not match:
    q/k norms, soft-capped scores or a query_pre_attn_scalar (Qwen3, Gemma 2/3)."""
    differs = [
        what
        for what, on in (
            ("q/k norms", cfg.qk_norm),
            ("soft-capped attention scores", cfg.attn_logit_softcapping is not None),
            ("query_pre_attn_scalar", cfg.query_pre_attn_scalar not in (None, cfg.head_dim)),
        )
        if on
    ]
    if differs:
        raise AdapterConfigError(
            f"LLaMA-Adapter (method: llama_adapter) runs on LLaMA-style attention (llama, mistral, qwen2); "
            f"this {type(cfg).family} model's attention has {' and '.join(differs)}: use method: lora"
        )


def prompt_interceptor(next_fun, args, kwargs, context):
    """nn.intercept_methods hook: at `Attention.extra_attention` of a layer whose params hold prompts,
    add their gated attention to the output. Every other call runs as it is."""
    module = context.module
    if context.method_name != HOOK or not module.has_variable("params", PROMPT):
        return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    q = args[0] if args else kwargs["q"]
    params = module.variables["params"]
    names = getattr(module, "kv_projections", ())  # the attention module names its key and value projections
    key, value = (_projection(params, n) for n in names) if len(names) == 2 else (None, None)
    if key is None or value is None:
        raise AdapterConfigError(
            f"{'/'.join(module.path)}: LLaMA-Adapter needs the layer's key and value "
            f"projections {names or '(the attention module names none)'}"
        )
    check_attention(module.cfg)
    extra = prompt_attention(q, params[PROMPT], params[GATE], key, value, module.cfg.num_key_value_heads)
    return out + extra.astype(out.dtype)


def routed_trainable(frozen, trainable):
    """`trainable` as `jlora.peft.routing.apply` routes it: stacked prompts padded to the frozen tree's layers.
    A tree already cut per layer (generation's `layer_i`) or one without prompts passes through."""
    if not is_adapter_tree(trainable) or "layers" not in (trainable or {}):
        return trainable
    return expand(trainable, model_layers(frozen))


def describe_rows(trainable, n_layers: int | None = None) -> list[tuple[str, ...]]:
    """Rows (module, kind, shape, '', '', '', params) of the describe table for prompts and gates."""
    rows = []
    for path, leaf in traverse_util.flatten_dict(trainable).items():
        if is_adapter_leaf(path):
            kind = "prompt" if path[-1] == PROMPT else "gate"
            where = ""
            if n_layers is not None:
                top = adapted_layers(trainable, n_layers)
                where = f" (layer {top[0]})" if len(top) == 1 else f" (layers {top[0]}-{top[-1]})"
            rows.append(
                (
                    ".".join(path) + where,
                    kind,
                    "x".join(map(str, leaf.shape)),
                    "",
                    "",
                    "",
                    f"{int(np.prod(leaf.shape)):,}",
                )
            )
    return rows


def intercept():
    """The interception context `jlora.peft.routing.apply` enters around `model.apply`."""
    return nn.intercept_methods(prompt_interceptor)
