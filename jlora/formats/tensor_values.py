"""Whether a tensor's values are plausible: finite, and for an adapter file without a checksum (a PEFT
adapter) within the range a LoRA factor can have. Loaders call these before anything is derived from a file.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# The largest |value| jlora accepts in an adapter file that carries no checksum (a PEFT adapter): LoRA factors,
# DoRA magnitudes, adaption prompts. Trained factors stay near their init (A ~ U(+-1/sqrt(in)), B from 0, so
# |x| < 1 in practice), magnitudes are column norms of the base weight (< 100 even for 8k-wide layers), and a
# factor of 1e4 would add a delta some 1e8 times a typical weight: no working adapter has one. Corruption that
# flips one of the top three exponent bits of an fp32 or bf16 value multiplies it by 2^32 or more, far past the
# bound; fp16's top exponent bit multiplies by 2^16, caught from |x| >= 0.15. A flipped low exponent or mantissa
# bit gives a value a real adapter could hold, which no range check can tell apart.
ADAPTER_VALUE_BOUND = 1e4
_CHUNK = 1 << 22  # elements per np.isfinite pass: at most a 4 MiB temporary, however large the tensor


def value_problem(x, bound: float | None = None) -> str | None:
    """What is wrong with array `x`'s values, or None: NaN or inf, or (with `bound`) some |value| > bound.

    np.isfinite in chunks: one pass at memory speed for every float dtype (fp16 min/max would be 7x slower),
    without a bool copy of the whole tensor (a GB for a large embedding)."""
    x = np.asarray(x)
    if x.size == 0 or x.dtype.kind in "biu":
        return None
    flat = x.reshape(-1)  # a view of a contiguous array
    if not all(np.isfinite(flat[i : i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK)):
        x = np.asarray(x, np.float32)  # counted only once the check has failed
        return f"non-finite values ({int(np.isnan(x).sum())} NaN, {int(np.isinf(x).sum())} inf of {x.size})"
    if bound is not None:
        lo, hi = float(x.min()), float(x.max())
        if max(-lo, hi) > bound:
            return f"a value of {lo if -lo > hi else hi:.4g}, beyond the |x| <= {bound:g} any adapter plausibly has"
    return None


def adapter_value_problem(tensors: dict[str, np.ndarray], bounded: Callable[[str], bool]) -> str | None:
    """ "tensor NAME has PROBLEM" for the first tensor (by name) of an adapter file that holds NaN or inf, or
    where `bounded(name)` (a LoRA factor, not a full weight) a value beyond ADAPTER_VALUE_BOUND; else None."""
    for name in sorted(tensors):
        problem = value_problem(tensors[name], ADAPTER_VALUE_BOUND if bounded(name) else None)
        if problem:
            return f"tensor {name} has {problem}"
    return None
