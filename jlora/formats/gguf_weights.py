"""GGUF files -> (config, params): the family read from the header, every tensor dequantized with the `gguf`
package (or, with quantize="gguf", the block-quantized ones kept as their own blocks, jlora.quant.gguf_blocks),
llama.cpp's q/k rope row permutation undone, then assembled like any checkpoint (jlora.formats.param_assembly).
Reached through jlora.formats.weights.read_pretrained; the file itself is parsed by jlora.formats.gguf_file.
"""

from __future__ import annotations

import pathlib

import numpy as np

from jlora.formats.gguf_file import GGUFFileError, GGUFTensor, read_gguf
from jlora.formats.param_assembly import OnDense, Place, WeightsError, assemble, check_finite, refuse_extra
from jlora.models.config import ModelConfig, ModelConfigError
from jlora.models.family import family_of, family_of_gguf
from jlora.models.layers import unpermute_rope_rows
from jlora.quant import gguf_blocks
from jlora.quant.packing import Packing
from jlora.quant.quantize import QuantizedKernel, QuantizeError


def _rope_heads(path: pathlib.Path, cfg: ModelConfig, name: str, rows: int) -> int | None:
    """The head count whose llama.cpp rope permutation tensor `name` (with `rows` rows) carries, or None."""
    heads = family_of(cfg).gguf_rope_heads(cfg, name)
    if heads is not None and rows != heads * cfg.head_dim:
        raise WeightsError(path, f"tensor {name} has {rows} rows, expected {heads * cfg.head_dim}")
    return heads


def _gguf_blocks(path: pathlib.Path, cfg: ModelConfig, name: str, t: GGUFTensor) -> QuantizedKernel:
    """GGUF tensor `t` (2-D, block-quantized) as a QuantizedKernel of its own blocks, rows un-permuted."""
    kind = t.tensor_type.name
    if not gguf_blocks.supports(kind):
        raise WeightsError(
            path,
            f"tensor {name} has GGML type {kind}, which quantize='gguf' cannot keep "
            f"(supported: {', '.join(gguf_blocks.LAYOUTS)}); load it with quantize='none', "
            f"'int8' or 'nf4'",
        )
    raw = np.asarray(t.data)  # [rows, bytes]
    heads = _rope_heads(path, cfg, name, raw.shape[0])
    try:
        return gguf_blocks.gguf_kernel(
            raw,
            kind,
            embedding=name == "token_embd.weight",
            dense_dtype=cfg.param_dtype,
            rows=None if heads is None else (lambda f: unpermute_rope_rows(f, heads)),
        )
    except QuantizeError as e:
        raise WeightsError(path, f"tensor {name}: {e}") from None


def load_gguf(
    path: pathlib.Path,
    overrides: dict,
    keep_blocks: bool = False,
    packing: Packing | None = None,
    on_dense: OnDense | None = None,
    place: Place | None = None,
) -> tuple[ModelConfig, dict]:
    """(config, params) of a GGUF file: every tensor dequantized, or with `keep_blocks` the block-quantized
    2-D ones kept as QuantizedKernels (see `_gguf_blocks`), or with `packing` packed as they are dequantized."""
    from gguf.quants import dequantize

    try:
        gf = read_gguf(path)
    except GGUFFileError as e:
        raise WeightsError(path, f"not a readable GGUF file, truncated or corrupt ({e.problem})") from None
    except OSError as e:
        raise WeightsError(path, f"not a readable GGUF file ({e})") from None
    tensors = {t.name: t for t in gf.tensors}
    meta = gf.metadata
    try:
        cfg = family_of_gguf(meta).config.from_gguf_metadata(meta, frozenset(tensors), **overrides)
    except ValueError as e:
        raise WeightsError(path, e) from None
    except KeyError as e:
        raise WeightsError(path, f"GGUF header lacks the key {e}") from None

    def fetch(name: str) -> np.ndarray | QuantizedKernel:
        t = tensors[name]
        if keep_blocks and len(t.shape) == 2 and t.tensor_type.name not in ("F32", "F16"):
            kernel = _gguf_blocks(path, cfg, name, t)
            check_finite(path, name, kernel)
            return kernel
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise WeightsError(
                path, f"tensor {name} has GGML type {t.tensor_type.name}, which gguf.quants cannot dequantize"
            ) from None
        except ValueError as e:
            raise WeightsError(path, f"cannot dequantize tensor {name} ({e})") from None
        w = np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF dims are reversed
        check_finite(path, name, w)
        w = family_of(cfg).gguf_tensor_fix(cfg, name, w)
        heads = _rope_heads(path, cfg, name, w.shape[0])
        return w if heads is None else unpermute_rope_rows(w, heads)

    try:
        cfg, names = family_of(cfg).gguf_fixups(cfg, fetch, set(tensors))
    except ModelConfigError as e:
        raise WeightsError(path, e) from None
    params, extra = assemble(cfg, path, names, fetch, 1, packing, on_dense, place)
    refuse_extra(path, extra)
    return cfg, params
