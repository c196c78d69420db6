"""LoRA as a transformation of parameter trees: `LoraConfig`, `split`, `merge`, `unmerge`, `describe`.

`split` turns a params tree into a frozen tree and a trainable tree. The trainable tree mirrors
only what is trained: a `LoraPair` (A [..., in, R], B [..., R, out], optional DoRA magnitude, and
its static scale) at the path of each targeted kernel, plus any parameter trained in full
(`train_extra`). It never needs the config again. Running a model with the two trees is
`jlora.peft.routing.apply`; this module knows nothing about flax modules or any model.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jlora.peft import llama_adapter
from jlora.peft.llama_adapter import AdapterConfig, is_adapter_leaf, is_adapter_tree
from jlora.peft.routing import KernelLayout, LoraError, LoraPair, dora_column_norm, infer_layouts, pair_delta
from jlora.quant.quantize import dense_value, is_quantized, requantize_like

INITS = ("lora", "gaussian", "b_random", "pissa")
ADAPTER_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how. Patterns are (regex, value) pairs, first match wins."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # module names, regexes, or "all-linear". Left unset (None), the base family's default (PEFT's: the
    # query and value projections), which `jlora.split` and a run fill in; a config file cannot write None.
    targets: tuple[str, ...] | str = None
    exclude: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None  # subset of scanned layer indices; None = all
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False
    init: str = "lora"
    use_dora: bool = False
    train_extra: str | None = None  # regex over dotted param paths trained in full, e.g. "norm"
    adapter_dtype: str = "float32"

    def __post_init__(self):
        fix = lambda name, conv: object.__setattr__(self, name, conv(getattr(self, name)))
        if isinstance(self.targets, list):
            fix("targets", tuple)
        if isinstance(self.targets, str) and self.targets != "all-linear":
            fix("targets", lambda t: (t,))
        fix("exclude", tuple)
        for name in ("rank_pattern", "alpha_pattern"):
            fix(name, lambda p: tuple(p.items()) if isinstance(p, dict) else tuple(tuple(kv) for kv in p))
        if self.layers is not None:
            fix("layers", lambda ls: tuple(int(i) for i in ls))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"LoRA rank must be a positive integer, got rank={self.rank!r}")
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be > 0, got alpha={self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        if self.init not in INITS:
            raise LoraError(f"unknown LoRA init {self.init!r}; expected one of {', '.join(INITS)}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise LoraError(f"adapter_dtype={self.adapter_dtype!r}: expected one of {sorted(ADAPTER_DTYPES)}")
        for key, value in self.rank_pattern:
            if int(value) <= 0:
                raise LoraError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern:
            if not float(value) > 0:
                raise LoraError(f"alpha_pattern[{key!r}] must be > 0, got {value!r}")
        if self.targets is not None and not self.targets and not self.train_extra:
            raise LoraError("LoraConfig trains nothing: give targets or train_extra")
        # every pattern compiles now, so a typo is one line naming its key rather than an re.error mid-split
        regexes = [("targets", t) for t in (() if self.targets in ("all-linear", None) else self.targets)]
        regexes += [("exclude", e) for e in self.exclude]
        regexes += [(name, k) for name in ("rank_pattern", "alpha_pattern") for k, _ in getattr(self, name)]
        regexes += [("train_extra", self.train_extra)] if self.train_extra else []
        for key, regex in regexes:
            try:
                re.compile(regex)
            except re.error as e:
                raise LoraError(
                    f"{key}: {regex!r} is not a valid regex ({e}); escape special characters with a backslash"
                ) from None

    def with_default_targets(self, targets: tuple[str, ...]) -> LoraConfig:
        """This config, with `targets` (a family's default) where it names none."""
        return self if self.targets is not None else dataclasses.replace(self, targets=tuple(targets))

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _first_match(patterns, name: str, default):
    for pattern, value in patterns:
        if _name_matches(pattern, name):
            return value
    return default


def _name_matches(pattern: str, dotted: str) -> bool:
    """PEFT's rule: the last component equals the pattern, the path ends with it, or a full regex match."""
    return dotted == pattern or dotted.endswith("." + pattern) or re.fullmatch(pattern, dotted) is not None


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def layer_names(module: str, stack: tuple[int, ...]) -> list[str]:
    """Per-layer names of a (possibly scanned) module: 'layers.self_attn.q_proj' -> 'layers.3.self_attn.q_proj'."""
    if not stack:
        return [module]
    head, _, rest = module.partition(".")
    return [f"{head}.{i}.{rest}" if rest else f"{head}.{i}" for i in range(int(np.prod(stack)))]


def select_targets(
    params, lcfg: LoraConfig, layouts: dict[tuple, KernelLayout] | None = None
) -> dict[tuple, KernelLayout]:
    """The kernels to adapt: {param path: layout}, in tree order; a target matching nothing is an error."""
    layouts = layouts if layouts is not None else infer_layouts(params)
    modules = {_dotted(path[:-1]): path for path in layouts}
    chosen = {}
    targets = lcfg.targets
    if targets == "all-linear":
        # every linear layer of the blocks: PEFT's all-linear leaves out the output head, which in a model with
        # a layer stack is the one kernel outside it
        linear = {p: lay for p, lay in layouts.items() if lay.kind != "embed"}
        stacked = any(lay.stack for lay in linear.values())
        chosen = {p: lay for p, lay in linear.items() if lay.stack or not stacked}
    else:
        for target in targets:
            hits = [path for name, path in modules.items() if _name_matches(target, name)]
            if not hits:
                close = difflib.get_close_matches(target, list(modules), n=3, cutoff=0.0)
                raise LoraError(f"LoRA target {target!r} matches no module; closest: {', '.join(close)}")
            chosen.update({p: layouts[p] for p in hits})
    chosen = {p: lay for p, lay in chosen.items() if not any(_name_matches(x, _dotted(p[:-1])) for x in lcfg.exclude)}
    order = list(layouts)
    return dict(sorted(chosen.items(), key=lambda kv: order.index(kv[0])))


def _init_pair(key, w: jax.Array, layout: KernelLayout, lcfg: LoraConfig, rank: int, scales: np.ndarray):
    """A, B (and W adjusted for PiSSA) for one kernel w [*stack, *in, *out]."""
    dt = ADAPTER_DTYPES[lcfg.adapter_dtype]
    stack, n_in, n_out = layout.stack_shape(w.shape), layout.n_in(w.shape), layout.n_out(w.shape)
    a_shape, b_shape = (*stack, n_in, rank), (*stack, rank, n_out)
    if lcfg.init == "pissa":
        if is_quantized(w):
            raise LoraError(
                f"init: pissa rewrites the base kernel as W - s*A@B; it needs a dense base, not a "
                f"{w.fmt} one: quantize after split, or use another init"
            )
        w32 = w.astype(jnp.float32).reshape(*stack, n_in, n_out)
        u, s, vh = jnp.linalg.svd(w32, full_matrices=False)  # [*S,in,k], [*S,k], [*S,k,out]
        s_r = s[..., :rank] / scales.reshape(*stack, 1)
        a = u[..., :, :rank] * jnp.sqrt(s_r)[..., None, :]
        b = jnp.sqrt(s_r)[..., :, None] * vh[..., :rank, :]
        w_res = w32 - scales.reshape(*stack, 1, 1) * (a @ b)
        return a.astype(dt), b.astype(dt), w_res.reshape(w.shape).astype(w.dtype)
    a, b = _random_pair(key, a_shape, b_shape, lcfg.adapter_dtype, layout.kind == "embed", lcfg.init)
    return a, b, w


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _random_pair(key, a_shape: tuple, b_shape: tuple, dtype: str, embed: bool, init: str):
    """A [*stack, in, R] and B [*stack, R, out] drawn in one jitted call (eager draws compile per op)."""
    dt = ADAPTER_DTYPES[dtype]
    ka, kb = jax.random.split(key)
    n_in, rank = a_shape[-2], a_shape[-1]
    if embed:  # PEFT: embedding A zero, B normal
        return jnp.zeros(a_shape, dt), jax.random.normal(kb, b_shape, dt)
    if init == "lora":  # kaiming-uniform(a=sqrt 5) on A [r, in] is U(+-1/sqrt(in))
        bound = 1.0 / math.sqrt(n_in)
        return jax.random.uniform(ka, a_shape, dt, -bound, bound), jnp.zeros(b_shape, dt)
    if init == "gaussian":
        return jax.random.normal(ka, a_shape, dt) / rank, jnp.zeros(b_shape, dt)
    bound = 1.0 / math.sqrt(rank)  # b_random
    return jnp.zeros(a_shape, dt), jax.random.uniform(kb, b_shape, dt, -bound, bound)


def _check_patterns_match(lcfg: LoraConfig, stacks: dict[tuple, tuple[int, ...]]) -> None:
    """A rank/alpha pattern key or a `layers` index that selects nothing is a typo, not a no-op: LoraError."""
    names = [n for path, stack in stacks.items() for n in layer_names(_dotted(path[:-1]), stack)]
    shorts = sorted({n.rpartition(".")[2] for n in names})
    for field in ("rank_pattern", "alpha_pattern"):
        for key, _ in getattr(lcfg, field):
            if not any(_name_matches(key, n) for n in names):
                close = difflib.get_close_matches(key, shorts + names, n=3, cutoff=0.0)
                raise LoraError(
                    f"{field} key {key!r} matches no target module; closest: {', '.join(close)} "
                    f"(keys match a target's name, its per-layer path, or a regex over it)"
                )
    if lcfg.layers is None:
        return
    counts = {int(np.prod(stack)) for stack in stacks.values() if stack}
    if not counts:
        raise LoraError(
            f"lora.layers={list(lcfg.layers)} selects layers, but no target is a stacked layer "
            f"({', '.join(_dotted(p[:-1]) for p in stacks) or 'none'}); drop layers or target a layer"
        )
    n = min(counts)
    bad = [i for i in lcfg.layers if not 0 <= i < n]
    if bad:
        raise LoraError(
            f"lora.layers={list(lcfg.layers)}: index {bad[0]} is out of range for the model's {n} "
            f"layers (valid: 0-{n - 1})"
        )


def split(params, lcfg: LoraConfig | AdapterConfig, key: jax.Array, *, layouts: dict | None = None):
    """params -> (frozen, trainable). `layouts` (from `trace_layouts`) is needed only for DenseGeneral/Einsum models.

    The method follows the config: an AdapterConfig splits off LLaMA-Adapter prompts and gates
    (jlora.peft.llama_adapter.split), leaving the params as they are."""
    if isinstance(lcfg, AdapterConfig):
        return llama_adapter.split(params, lcfg, key)
    flat = traverse_util.flatten_dict(params)
    if lcfg.targets is None:
        raise LoraError(
            "LoraConfig.targets is unset: name the modules to adapt, or call jlora.split, which "
            "takes the base family's default targets"
        )
    chosen = select_targets(params, lcfg, layouts) if lcfg.targets else {}
    _check_patterns_match(lcfg, {p: lay.stack_shape(flat[p].shape) for p, lay in chosen.items()})
    trainable, frozen = {}, dict(flat)
    for i, (path, layout) in enumerate(chosen.items()):
        w = flat[path]
        module = _dotted(path[:-1])
        stack = layout.stack_shape(w.shape)
        n_in, n_out = layout.n_in(w.shape), layout.n_out(w.shape)
        names = layer_names(module, stack)
        ranks = {_first_match(lcfg.rank_pattern, n, lcfg.rank) for n in names}
        if len(ranks) > 1:
            raise LoraError(f"rank_pattern gives {module} different ranks across its stacked layers {sorted(ranks)}")
        rank = int(ranks.pop())
        if rank > min(n_in, n_out):
            raise LoraError(f"LoRA rank {rank} exceeds min(in={n_in}, out={n_out}) of {module}")
        if lcfg.use_dora and layout.kind != "dense":
            raise LoraError(
                f"DoRA needs a plain [in, out] Dense kernel; {module} is a {layout.kind} kernel {tuple(w.shape)}"
            )
        active = [lcfg.layers is None or j in lcfg.layers for j in range(len(names))] if stack else [True]
        scales = np.array(
            [
                lcfg.scale(rank, float(_first_match(lcfg.alpha_pattern, n, lcfg.alpha))) if on else 0.0
                for n, on in zip(names, active)
            ],
            np.float32,
        )
        a, b, w_new = _init_pair(jax.random.fold_in(key, i), w, layout, lcfg, rank, scales)
        if not all(active):  # inactive layers keep zero A and B, and scale 0: exactly no gradient, no delta
            on = jnp.asarray(active).reshape(*stack, 1, 1)
            a, b = jnp.where(on, a, 0), jnp.where(on, b, 0)
            if not is_quantized(w):
                w_new = jnp.where(on.reshape(*stack, *[1] * (w.ndim - len(stack))), w_new, w)
        magnitude = None
        if lcfg.use_dora:
            # the forward's own formula, so a fresh DoRA pair rescales by exactly m/|W + sAB| = 1
            magnitude = dora_column_norm(dense_value(w_new), a, b, scales.reshape(stack)).astype(a.dtype)
        frozen[path] = w_new
        scale = tuple(scales.tolist()) if stack else float(scales[0])
        trainable[path] = LoraPair(a, b, magnitude, scale, layout, lcfg.dropout)
    if lcfg.train_extra:
        extra = [p for p in flat if re.search(lcfg.train_extra, _dotted(p)) and p not in chosen]
        if not extra:
            close = difflib.get_close_matches(lcfg.train_extra, [_dotted(p) for p in flat], n=3, cutoff=0.0)
            raise LoraError(f"train_extra {lcfg.train_extra!r} matches no parameter; closest: {', '.join(close)}")
        for path in extra:  # a copy: train steps donate the trainable tree, which must not free the caller's params
            leaf = frozen.pop(path)
            trainable[path] = leaf.copy() if isinstance(leaf, jax.Array) else leaf
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trainable)


def _flat_trainable(trainable) -> dict:
    return traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))


@functools.partial(jax.jit, static_argnums=2)
def _merge(frozen, trainable, quantized: str = "dequantize"):
    flat = traverse_util.flatten_dict(frozen)
    for path, leaf in _flat_trainable(trainable).items():
        if isinstance(leaf, LoraPair):
            w = flat[path]
            merged = pair_delta(dense_value(w), leaf, add_base=True, dora=True).astype(w.dtype)
            flat[path] = requantize_like(w, merged) if is_quantized(w) and quantized == "requantize" else merged
        else:
            flat[path] = leaf
    if quantized == "dequantize":
        flat = {k: dense_value(v) for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat)


def _check_fits(frozen, trainable, merged: bool) -> None:
    if is_adapter_tree(trainable):
        raise LoraError(
            "cannot merge a LLaMA-Adapter tree: its prompts are extra keys every adapted layer attends "
            "to, which no weight matrix can hold; run it unmerged (jlora.apply, jlora-generate without "
            "--merge)"
        )
    flat = traverse_util.flatten_dict(frozen)
    for path, leaf in _flat_trainable(trainable).items():
        name = _dotted(path)
        if isinstance(leaf, LoraPair):
            if path not in flat:
                raise LoraError(f"the trainable tree adapts {name}, which the frozen tree does not have")
            if not leaf.fits(flat[path].shape):
                raise LoraError(
                    f"LoRA pair for {name} (A {tuple(leaf.a.shape)}, B {tuple(leaf.b.shape)}) "
                    f"does not fit kernel {tuple(flat[path].shape)}"
                )
        elif path in flat and not merged:
            raise LoraError(f"{name} is both frozen and trained in full")


def merge(frozen, trainable, *, quantized: str = "dequantize"):
    """A plain params tree for the unmodified model: W + s*A@B accumulated in fp32, cast to W's dtype.

    A quantized base (jlora.quant.quantize) is merged into its dequantized kernels; `quantized="dequantize"`
    (the default) returns every leaf dense, "requantize" quantizes each adapted kernel again in its own
    format (int8 / nf4; a GGUF block type cannot be re-encoded) and keeps the other leaves as they are."""
    if quantized not in ("dequantize", "requantize"):
        raise LoraError(f"merge quantized={quantized!r}: expected 'dequantize' or 'requantize'")
    _check_fits(frozen, trainable, merged=False)
    return _merge(frozen, trainable, quantized)


def merge_for_inference(params, trainable, *, tie_word_embeddings: bool = False):
    """Plain params for inference: the base `params` as loaded, with the adapter folded in and the
    parameters trained in full replacing the base's. The one merge path of jlora-merge and jlora-generate.

    A tied embedding is also the output head. Factored, an embed_tokens adapter changes only the lookup;
    merged into the shared table it would change the head too, a different model. That is refused
    (LoraError): run such an adapter unmerged.
    """
    flat = traverse_util.flatten_dict(params)
    for path, leaf in _flat_trainable(trainable).items():
        if not isinstance(leaf, LoraPair):
            flat.pop(path, None)
        elif tie_word_embeddings and leaf.layout.kind == "embed":
            raise LoraError(
                f"cannot merge an adapter of the embedding {_dotted(path[:-1])} into a model with tied "
                f"embeddings: the tied output head would change too, which the unmerged model does not "
                f"do; run it unmerged"
            )
    return merge(traverse_util.unflatten_dict(flat), trainable)


def pissa_to_lora(trainable, initial, lcfg: LoraConfig) -> tuple[LoraConfig, Any]:
    """A PiSSA-trained tree as the equivalent plain LoRA for the ORIGINAL base weights (PEFT's conversion).

    PiSSA trains on W_res = W - s*A0@B0, which no saved adapter carries. With A' = [A, A0] and
    B' = [B, -B0] (rank 2R, same scale), W + s*A'@B' = W_res + s*A@B, so the result loads onto, merges
    into and exports against the base as it is on disk. `initial` is the trainable tree `split` returned.
    """
    if lcfg.init != "pissa":
        raise LoraError(f"pissa_to_lora converts a PiSSA adapter; this LoraConfig has init={lcfg.init!r}")
    start = _flat_trainable(initial)
    out = {}
    for path, leaf in _flat_trainable(trainable).items():
        if isinstance(leaf, LoraPair):
            a0, b0 = start[path].a, start[path].b
            leaf = leaf.replace(
                a=jnp.concatenate([leaf.a, a0.astype(leaf.a.dtype)], axis=-1),  # [*S, in, 2R]
                b=jnp.concatenate([leaf.b, -b0.astype(leaf.b.dtype)], axis=-2),
            )  # [*S, 2R, out]
        out[path] = leaf
    grow = math.sqrt(2.0) if lcfg.use_rslora else 2.0  # alpha/r or alpha/sqrt(r) stays the same at rank 2r
    converted = dataclasses.replace(
        lcfg,
        init="lora",
        rank=2 * lcfg.rank,
        alpha=lcfg.alpha * grow,
        rank_pattern=tuple((k, 2 * int(v)) for k, v in lcfg.rank_pattern),
        alpha_pattern=tuple((k, float(v) * grow) for k, v in lcfg.alpha_pattern),
    )
    return converted, traverse_util.unflatten_dict(out)


def unadapted(frozen, trainable):
    """The frozen leaves no LoRA pair adapts: after a PiSSA split, the ones still as the base on disk."""
    adapted = {p for p, x in _flat_trainable(trainable).items() if isinstance(x, LoraPair)}
    return traverse_util.unflatten_dict(
        {p: x for p, x in traverse_util.flatten_dict(frozen).items() if p not in adapted}
    )


def unmerge(merged, trainable):
    """Undo `merge`: frozen = merged - s*A@B (DoRA cannot be undone without the weight norms)."""
    flat = traverse_util.flatten_dict(merged)
    _check_fits(merged, trainable, merged=True)
    for path, leaf in _flat_trainable(trainable).items():
        if isinstance(leaf, LoraPair):
            if leaf.magnitude is not None:
                raise LoraError(f"cannot unmerge the DoRA adapter of {_dotted(path)}: the weight norm is lost")
            w = flat[path]
            flat[path] = (w.astype(jnp.float32) - pair_delta(w, leaf, add_base=False)).astype(w.dtype)
        else:
            del flat[path]
    return traverse_util.unflatten_dict(flat)


def count_params(tree) -> int:
    """Number of scalars in a tree; a LoRA pair counts only its active (scale != 0) layers."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, LoraPair) or is_quantized(x)):
        if isinstance(leaf, LoraPair):
            scales = np.atleast_1d(np.asarray(leaf.scale))
            size = leaf.a.size + leaf.b.size + (leaf.magnitude.size if leaf.magnitude is not None else 0)
            total += int(size * np.count_nonzero(scales) // scales.size)
        else:
            total += int(np.prod(leaf.shape))
    return total


def describe(trainable, frozen: Any = None) -> str:
    """A table of what is trained: module, shapes, rank, scale, parameter count (and % of the base)."""
    rows = [("module", "kind", "A", "B", "rank", "scale", "params")]
    for path, leaf in _flat_trainable(trainable).items():
        name = _dotted(path[:-1] if isinstance(leaf, LoraPair) else path)
        if is_adapter_leaf(path):
            continue  # LLaMA-Adapter rows come below, from llama_adapter.describe_rows
        if isinstance(leaf, LoraPair):
            scales = sorted({round(s, 6) for s in np.atleast_1d(leaf.scale) if s})
            kind = "dora" if leaf.magnitude is not None else "lora"
            rows.append(
                (
                    name,
                    kind,
                    "x".join(map(str, leaf.a.shape)),
                    "x".join(map(str, leaf.b.shape)),
                    str(leaf.a.shape[-1]),
                    "/".join(f"{s:g}" for s in scales),
                    f"{count_params(leaf):,}",
                )
            )
        else:
            rows.append((name, "full", "x".join(map(str, leaf.shape)), "", "", "", f"{int(np.prod(leaf.shape)):,}"))
    n_layers = llama_adapter.model_layers(frozen) if frozen is not None and is_adapter_tree(trainable) else None
    rows += llama_adapter.describe_rows(trainable, n_layers)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    total = count_params(trainable)
    tail = f"trainable params: {total:,}"
    if frozen is not None:
        base = count_params(frozen) + sum(
            int(np.prod(x.shape))
            for p, x in _flat_trainable(trainable).items()
            if not isinstance(x, LoraPair) and not is_adapter_leaf(p)
        )
        tail += f" of {base:,} ({100.0 * total / max(base, 1):.3f}%)"
    return "\n".join([*lines, tail])


__all__ = [
    "LoraConfig",
    "LoraError",
    "LoraPair",
    "split",
    "merge",
    "merge_for_inference",
    "pissa_to_lora",
    "unmerge",
    "count_params",
    "describe",
    "select_targets",
]
