"""Frozen-base bytes of Gemma 3 270M kept as its GGUF's own blocks (quantize="gguf": Q5_0 / Q4_K / Q6_K / Q8_0,
params that mix block types across layers included) against the same base dequantized to fp32.

Counts what jlora holds for the frozen tree: every leaf of `jlora.load_pretrained(gguf, quantize="gguf")` (packed
fields, and the F32 norms as they are) against `param_shapes(cfg)` at 4 bytes each, and how many params are
packed and how many of those mix block types. Writes docs/results/gguf_frozen_bytes.json (--out).
Usage: python bench/gguf_frozen_bytes.py [--out FILE]
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

import jax
import numpy as np
from flax import traverse_util

import jlora
from jlora.formats.weights import resolve_model_path
from jlora.models.family import param_shapes
from jlora.quant.quantize import is_quantized
from jlora.train.provenance import provenance, write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "gguf_frozen_bytes.json"))
    args = parser.parse_args()
    started = provenance()
    path = resolve_model_path("gemma3-270m")
    cfg, packed = jlora.load_pretrained(path, quantize="gguf")
    flat = traverse_util.flatten_dict(packed, is_leaf=lambda _, x: is_quantized(x))
    packed_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(packed))
    dense_bytes = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(param_shapes(cfg)))
    kinds = {"/".join(k): v.fmt for k, v in flat.items() if is_quantized(v)}
    result = {
        "bench": "gguf_frozen_bytes",
        "command": shlex.join(["python", "bench/gguf_frozen_bytes.py", *sys.argv[1:]]),
        "model": "gemma3-270m",
        "file": pathlib.Path(path).name,
        "packed_bytes": packed_bytes,
        "fp32_bytes": dense_bytes,
        "ratio": packed_bytes / dense_bytes,
        "packed_params": len(kinds),
        "mixed_params": sorted(k for k, f in kinds.items() if "|" in f),
        "formats": dict(sorted(kinds.items())),
    }
    out = write_result(args.out, started, result)
    print(
        f"Gemma 3 270M frozen base: {packed_bytes / 2**20:.1f} MiB as GGUF blocks vs {dense_bytes / 2**20:.1f} MiB "
        f"fp32 ({result['ratio']:.3f}x); {len(kinds)} packed params, mixed: {', '.join(result['mixed_params'])}; {out}"
    )


if __name__ == "__main__":
    main()
