"""Many adapters on one base: a fixed-shape stack of K LoRA adapters and per-row routing into it.

`AdapterStack` holds, for every module it may adapt, A [in, K, R], B [K, R, out] and scales [K], with R the
stack's max rank (A's slot axis is inner so that x @ A over all slots reads A as it lies). An adapter of lower
rank is zero-padded, and a module it does not target keeps zero A/B, so the padding adds exactly nothing.
Adding, replacing or removing an adapter writes one slot through a single jitted update, so the shapes (and
every compiled function that takes the stack) never change. `apply_rows` runs a model with each batch row
routed through its own adapter, gathered by index (the BGMV idea: x@A[idx_b] then @B[idx_b]); index -1 is the
base alone. Nothing is merged. This module owns the stack and its routing; `jlora.infer.generate` owns
decoding with it.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from jlora.errors import JloraError
from jlora.models.config import ModelConfig
from jlora.models.family import family_of
from jlora.peft.routing import LoraPair, route_parts
from jlora.quant.quantize import quantized_call


class AdapterStackError(JloraError, ValueError):
    """An adapter that does not fit the stack, or an unknown name; the message is one line."""


@struct.dataclass
class RowAdapters:
    """What one forward call needs: the stack's arrays and each row's adapter index [B] (-1 = base), or
    each token's [B,T] (prompts of different adapters packed into one row)."""

    arrays: dict  # {module path: {"a": [in,K,R], "b": [K,R,out], "scale": [K]}}
    rows: jax.Array  # [B] or [B,T] int32


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(arrays: dict, slot, new: dict) -> dict:
    """arrays with slot `slot` replaced by `new` (same modules, one adapter's a [in,R], b [R,out], scale [])."""
    return {
        m: {
            "a": full["a"].at[:, slot].set(new[m]["a"].astype(full["a"].dtype)),
            "b": full["b"].at[slot].set(new[m]["b"].astype(full["b"].dtype)),
            "scale": full["scale"].at[slot].set(new[m]["scale"].astype(full["scale"].dtype)),
        }
        for m, full in arrays.items()
    }


def _empty_slot(arrays: dict) -> dict:
    """Zeros of one slot's shapes, as numpy: a [in,R], b [R,out], scale [] per module."""
    return {
        m: {
            "a": np.zeros((full["a"].shape[0], full["a"].shape[2]), full["a"].dtype),
            "b": np.zeros(full["b"].shape[1:], full["b"].dtype),
            "scale": np.zeros((), full["scale"].dtype),
        }
        for m, full in arrays.items()
    }


class AdapterStack:
    """K adapter slots of max rank R over the linear modules `targets` (default: every one the family has) of
    every layer of `cfg`'s model. Module paths are those of the decode layout (("layer_3", *Linear.path)).
    """

    def __init__(
        self, cfg: ModelConfig, capacity: int, max_rank: int, targets: tuple[str, ...] | None = None, dtype=jnp.float32
    ):
        if capacity < 1 or max_rank < 1:
            raise AdapterStackError(
                f"an adapter stack needs capacity >= 1 and max_rank >= 1, got {capacity}, {max_rank}"
            )
        linear = family_of(cfg).linear  # the family's linear layers of a block, by name
        targets = tuple(linear) if targets is None else targets
        unknown = [t for t in targets if t not in linear]
        if unknown:
            raise AdapterStackError(f"stack targets {unknown} are not linear modules; choose from {list(linear)}")
        self.cfg, self.capacity, self.max_rank, self.targets = cfg, capacity, max_rank, tuple(targets)
        self.names: list[str | None] = [None] * capacity
        self.ranks: list[int] = [0] * capacity
        self.arrays = {}
        for i in range(cfg.num_hidden_layers):
            for t in self.targets:
                n_in, n_out = linear[t].shape(cfg)
                self.arrays[(f"layer_{i}", *linear[t].path)] = {
                    "a": jnp.zeros((n_in, capacity, max_rank), dtype),
                    "b": jnp.zeros((capacity, max_rank, n_out), dtype),
                    "scale": jnp.zeros((capacity,), jnp.float32),
                }

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def loaded(self) -> list[str]:
        return [n for n in self.names if n is not None]

    def index(self, name: str | None) -> int:
        """The slot of adapter `name`; None is the base alone (-1)."""
        if name is None:
            return -1
        if name not in self.names:
            raise AdapterStackError(
                f"no adapter named {name!r} in the stack (loaded: {', '.join(self.loaded()) or 'none'})"
            )
        return self.names.index(name)

    def rows(self, names) -> RowAdapters:
        """RowAdapters for a batch whose row b uses adapter names[b] (None = the base).

        It holds the stack's arrays as they are now: an add or remove donates them, so make it again after one."""
        return RowAdapters(self.arrays, jnp.asarray([self.index(n) for n in names], jnp.int32))

    def add(self, name: str, trainable: dict) -> int:
        """Load `trainable` (a split/load_adapter tree) as `name`, replacing one of that name; returns its slot."""
        per_module, rank = self._padded(name, trainable)
        if name in self.names:
            slot = self.names.index(name)
        elif None in self.names:
            slot = self.names.index(None)
        else:
            raise AdapterStackError(
                f"adapter {name!r}: the stack is full ({self.capacity} adapters: "
                f"{', '.join(self.loaded())}); remove one first"
            )
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), per_module)
        self.names[slot], self.ranks[slot] = name, rank
        return slot

    def remove(self, name: str) -> None:
        """Unload adapter `name`; its slot is zeroed and free for the next `add`."""
        slot = self.index(name)
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), _empty_slot(self.arrays))
        self.names[slot], self.ranks[slot] = None, 0

    def _padded(self, name: str, trainable: dict) -> tuple[dict, int]:
        """One adapter as numpy leaves of the stack's per-slot shapes (rank padded, untargeted modules zero),
        and its largest rank."""
        out, rank = _empty_slot(self.arrays), 0
        flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
        for path, pair in flat.items():
            where = ".".join(map(str, path))
            if not isinstance(pair, LoraPair):
                raise AdapterStackError(
                    f"adapter {name!r}: {where} is trained in full (train_extra); only LoRA "
                    f"pairs can share a base: merge this adapter instead"
                )
            module = path[-2]
            if pair.magnitude is not None:
                raise AdapterStackError(f"adapter {name!r}: {where} is DoRA, which a stack cannot hold; merge it")
            if path[0] != "layers" or module not in self.targets or pair.layout.kind != "dense":
                raise AdapterStackError(
                    f"adapter {name!r} adapts {where}, which this stack does not cover "
                    f"(stack targets: {', '.join(self.targets)})"
                )
            if pair.rank > self.max_rank:
                raise AdapterStackError(
                    f"adapter {name!r} has rank {pair.rank} at {where}, over the stack's max rank {self.max_rank}"
                )
            rank = max(rank, pair.rank)
            a, b = np.asarray(pair.a, np.float32), np.asarray(pair.b, np.float32)  # [L,in,r], [L,r,out]
            scales = np.broadcast_to(pair.scale_array(), a.shape[:1])
            for i in range(a.shape[0]):
                slot = out[(f"layer_{i}", path[1], module)]
                slot["a"][:, : pair.rank], slot["b"][: pair.rank] = a[i], b[i]
                slot["scale"][...] = scales[i]
        return out, rank


# Up to this many slots per batch token, each module runs every slot densely and masks (see `_route`);
# past it, each row gathers its own A/B.
_DENSE_SLOTS_PER_TOKEN = 4


def _route(routed: RowAdapters):
    """A flax interceptor adding each row's own delta s[idx_b] * ((x_b @ A[idx_b]) @ B[idx_b]) to stacked modules.

    For a small stack (K <= 4 x the call's tokens, so every decode step of a serving batch) it runs all K
    slots as two plain matmuls, x [BT,in] @ A [in,K*R] then, with each row's other slots zeroed and its own
    scaled, @ B [K*R,out]: XLA:CPU gathers a [B,in,R] block per row element by element, which cost more than
    the whole base model at batch 16 (two gathers per module per layer, every token). A large stack gathers
    instead, reading only the rows' own slots. Per-token indices (a packed prefill) always take the dense way."""
    rows = routed.rows

    @route_parts  # a fused q/k/v or gate/up call: each part's delta goes to its slice of the output
    def route(next_fun, args, kwargs, context):
        module = context.module
        base = quantized_call(module, context.method_name, args, kwargs)  # None: the weight is not quantized
        y = next_fun(*args, **kwargs) if base is None else base
        entry = routed.arrays.get(tuple(module.path)) if context.method_name == "__call__" else None
        if entry is None:
            return y
        x = args[0].astype(y.dtype)  # [B,T,in]
        n_in, k_slots, r = entry["a"].shape
        if rows.ndim == 2 or k_slots <= _DENSE_SLOTS_PER_TOKEN * x.shape[0] * x.shape[1]:
            # row (or token) b keeps only slot rows[b], times its scale; a base row (-1) matches no slot
            idx = rows[:, None] if rows.ndim == 1 else rows  # [B,1] or [B,T]
            w = jnp.where(idx[..., None] == jnp.arange(k_slots), entry["scale"], 0.0)  # [B,1|T,K]
            xa = jnp.einsum("bti,ikr->btkr", x, entry["a"].astype(y.dtype))  # [B,T,K,R]
            xa = xa * w.astype(y.dtype)[..., None]
            return y + jnp.einsum("btkr,kro->bto", xa, entry["b"].astype(y.dtype))  # [B,T,out]
        pick = jnp.maximum(rows, 0)  # a base row gathers slot 0 and is scaled by 0
        a = jnp.take(entry["a"], pick, axis=1).astype(y.dtype)  # [in,B,R]
        b = jnp.take(entry["b"], pick, axis=0).astype(y.dtype)  # [B,R,out]
        scale = jnp.where(rows >= 0, jnp.take(entry["scale"], pick), 0.0).astype(y.dtype)  # [B]
        xa = jnp.einsum("bti,ibr->btr", x, a)  # [B,T,R]
        return y + jnp.einsum("btr,bro->bto", xa, b) * scale[:, None, None]  # [B,T,out]

    return route


def apply_rows(model: nn.Module, frozen: dict, routed: RowAdapters, *args, variables: dict | None = None, **kwargs):
    """`model.apply` with row b of the batch routed through adapter routed.rows[b] of the stack."""
    with nn.intercept_methods(_route(routed)):
        return model.apply({"params": frozen, **(variables or {})}, *args, **kwargs)


def name_ok(name: str) -> bool:
    """Adapter names are what an OpenAI `model` field can carry plainly: letters, digits, . _ - :"""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", name) is not None
