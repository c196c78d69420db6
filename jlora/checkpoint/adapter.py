"""The adapter a run leaves behind: `save_adapter` / `load_adapter`, orbax, only the trainable tree.

Its metadata (jlora.checkpoint.metadata) names the method, its config and the base model; a load refuses an
adapter made for another base or rank, one that is truncated (a content hash over the arrays), one whose
metadata was edited or damaged (a checksum of each of its parts, and each pair's scales derived again from
its config), and one holding NaN or inf. A `LoraPair` is stored as {a, b, magnitude}; its static scale and
layout live in the metadata. No pickle. `load_any_adapter` reads either this or an HF PEFT adapter dir.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jlora.checkpoint.atomic_dir import replace_dir
from jlora.checkpoint.fingerprint import is_fingerprint
from jlora.checkpoint.metadata import (
    AdapterError,
    check_base,
    check_lora_config,
    check_pairs,
    check_seal,
    describe_tree,
    guarded,
    make_metadata,
    method_config_from_meta,
    one_line,
    seal,
)
from jlora.checkpoint.run_dir import disk_errors
from jlora.checkpoint.tree_storage import to_storage
from jlora.formats.peft_adapter import WEIGHTS_FILE, import_peft
from jlora.formats.peft_config import CONFIG_FILE
from jlora.formats.tensor_values import value_problem
from jlora.models.config import ModelConfig
from jlora.peft.llama_adapter import AdapterConfig
from jlora.peft.lora import LoraConfig
from jlora.peft.routing import KernelLayout, LoraPair


def _content_hash(stored: dict) -> str | None:
    """sha256 over names, dtypes, shapes and bytes: catches corruption that still decodes. None if not addressable."""
    h = hashlib.sha256()
    for path, x in sorted(traverse_util.flatten_dict(stored).items()):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        x = np.asarray(x)
        h.update(f"{'/'.join(path)}:{x.dtype}:{x.shape};".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _adapter_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(adapter=ocp.StandardCheckpointHandler(), metadata=ocp.JsonCheckpointHandler())
    )


def is_adapter_dir(directory: str | pathlib.Path) -> bool:
    return (pathlib.Path(directory) / "metadata" / "metadata").is_file()


def save_adapter(
    out_dir: str | pathlib.Path,
    trainable,
    lcfg: LoraConfig | AdapterConfig,
    base: ModelConfig,
    params=None,
    run_config: dict | None = None,
) -> None:
    """Write the trainable tree + metadata to `out_dir` (orbax). Pass the base params to fingerprint them.

    Atomic: the adapter is written beside `out_dir` and swapped into place when complete, so a crash
    at any moment leaves the previous adapter (or the new one) whole at `out_dir`."""
    out = pathlib.Path(out_dir).absolute()
    if (
        getattr(lcfg, "init", None) == "pissa"
    ):  # its pairs are relative to W_res = W - s*A0@B0, which no adapter file carries
        raise AdapterError(
            f"{out}: a PiSSA adapter as trained fits only the residual base W - s*A0@B0; save its "
            f"plain-LoRA equivalent: lcfg, trainable = jlora.pissa_to_lora(trainable, initial, lcfg)"
        )
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not is_adapter_dir(out)):
        raise AdapterError(f"{out}: exists and is not a jlora adapter; refusing to overwrite it")
    stored = to_storage(trainable)
    meta = seal(
        {
            **make_metadata(lcfg, base, params, run_config),
            "kind": "adapter",
            "trainable": describe_tree(trainable),
            "content_sha256": _content_hash(stored),
        }
    )
    args = ocp.args.Composite(adapter=ocp.args.StandardSave(stored), metadata=ocp.args.JsonSave(meta))
    with disk_errors(out), replace_dir(out, primary=jax.process_index() == 0, sync=barrier) as partial:
        _adapter_checkpointer().save(partial, args=args)


def barrier(name: str) -> None:
    """Wait for every process to get here (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_adapter_metadata(directory: str | pathlib.Path) -> dict:
    """The metadata JSON of a jlora adapter dir; AdapterError if it is missing, unreadable, or does not match
    the checksums it was saved with."""
    where = pathlib.Path(directory)
    if not is_adapter_dir(where):
        peft = (where / "adapter_config.json").is_file()
        raise AdapterError(
            f"{where}: no such adapter directory"
            if not where.is_dir()
            else f"{where}: an HF PEFT adapter, not a jlora one: use jlora.formats.peft_adapter.import_peft"
            if peft
            else f"{where}: not a jlora adapter, or truncated or corrupt (metadata/metadata is missing)"
        )
    try:
        meta = json.loads((where / "metadata" / "metadata").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{where}/metadata/metadata: truncated or corrupt ({one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("kind") != "adapter" or "trainable" not in meta:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise AdapterError(f"{where}: metadata does not describe a jlora adapter (kind={kind!r})")
    check_seal(meta, where=f"{where}/metadata/metadata")
    return meta


def load_adapter(
    directory: str | pathlib.Path,
    base: ModelConfig | None = None,
    params=None,
    expect: LoraConfig | AdapterConfig | None = None,
) -> tuple[LoraConfig | AdapterConfig, dict]:
    """(LoraConfig, trainable tree) from `save_adapter`'s dir, on the default device (an AdapterConfig
    and prompts / gates for a LLaMA-Adapter).

    Refuses (AdapterError) an adapter for another base config, or other weights when `params` is
    given, one whose LoraConfig differs from `expect` in rank, targets or scale, and a damaged one:
    truncated, its arrays or metadata changed since it was saved, a pair's scale that its own config
    does not give, or an array holding NaN or inf.
    """
    where = pathlib.Path(directory).absolute()
    meta = read_adapter_metadata(where)
    check_base(meta, base, params, where=str(where))
    check_pairs(meta, base, where=f"{where}/metadata/metadata")
    if expect is not None:
        check_lora_config(meta, expect, where=str(where))
    ckpt = _adapter_checkpointer()
    tree_meta = guarded(
        lambda: ckpt.metadata(where).item_metadata["adapter"], AdapterError, f"{where}: truncated or corrupt adapter"
    )
    if tree_meta is None:
        raise AdapterError(f"{where}: truncated or corrupt adapter (adapter/_METADATA is missing)")
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), dict(tree_meta.tree)
    )
    _check_described(meta["trainable"], traverse_util.flatten_dict(target), str(where))
    stored = guarded(
        lambda: ckpt.restore(where, args=ocp.args.Composite(adapter=ocp.args.StandardRestore(target))),
        AdapterError,
        f"{where}: truncated or corrupt adapter",
    )["adapter"]
    if meta.get("content_sha256") and _content_hash(stored) != meta["content_sha256"]:
        raise AdapterError(f"{where}: corrupt adapter: array contents do not match the saved checksum")
    for path, x in sorted(traverse_util.flatten_dict(stored).items()):  # restored whole, on one device
        problem = value_problem(x)
        if problem:
            raise AdapterError(f"{where}: tensor {'/'.join(path)} has {problem}: a damaged or diverged adapter")
    return method_config_from_meta(meta), _rebuild(stored, meta["trainable"])


def is_peft_dir(directory: str | pathlib.Path) -> bool:
    """Whether `directory` holds an HF PEFT adapter (its adapter_config.json)."""
    return (pathlib.Path(directory) / CONFIG_FILE).is_file()


def load_any_adapter(
    directory: str | pathlib.Path,
    base: ModelConfig,
    params=None,
    expect: LoraConfig | AdapterConfig | None = None,
) -> tuple[LoraConfig | AdapterConfig, dict]:
    """`load_adapter` for a jlora adapter dir, or jlora.formats.peft_adapter.import_peft for an HF PEFT one.

    A PEFT adapter carries no fingerprint of its base: it is checked against `base`'s shapes, and `params`
    (the base's arrays) only fill a DoRA adapter's skipped layers. `expect` is checked on jlora adapters;
    a caller that needs a PEFT one to match its own method compares the trees (as jlora.train.builders'
    `start_from_adapter` does)."""
    if is_peft_dir(directory):
        return import_peft(directory, base, None if is_fingerprint(params) else params)
    return load_adapter(directory, base=base, params=params, expect=expect)


def adapter_content_sha256(directory: str | pathlib.Path) -> str:
    """What identifies an adapter's contents: a jlora adapter's saved content hash, or a PEFT adapter's
    config and weights files hashed together (a resume checks that its starting adapter is unchanged)."""
    where = pathlib.Path(directory)
    if not is_peft_dir(where):
        return read_adapter_metadata(where).get("content_sha256") or ""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            digest.update((where / name).read_bytes())
        except OSError as e:
            raise AdapterError(f"{where / name}: cannot read ({one_line(e)})") from None
    return digest.hexdigest()


def _check_described(desc: dict, flat: dict, where: str) -> None:
    """The stored arrays must be exactly what the metadata describes, with the recorded ranks."""
    want = {tuple(p.split(".")) for p in desc["extra"]}
    for name, info in desc["pairs"].items():
        path = tuple(name.split("."))
        want |= {path + ("a",), path + ("b",)} | ({path + ("magnitude",)} if info["dora"] else set())
        if path + ("a",) in flat and flat[path + ("a",)].shape[-1] != info["rank"]:
            raise AdapterError(
                f"{where}: {name} has rank {flat[path + ('a',)].shape[-1]} on disk but {info['rank']} in its metadata"
            )
    for odd in sorted(want ^ set(flat))[:1]:
        raise AdapterError(
            f"{where}: truncated or corrupt adapter: {'/'.join(odd)} is {'missing' if odd in want else 'unexpected'}"
        )


def _rebuild(stored: dict, desc: dict) -> dict:
    flat = traverse_util.flatten_dict(stored)
    out = {tuple(p.split(".")): flat[tuple(p.split("."))] for p in desc["extra"]}
    for name, info in desc["pairs"].items():
        path = tuple(name.split("."))
        scale = tuple(info["scale"]) if isinstance(info["scale"], list) else info["scale"]
        out[path] = LoraPair(
            flat[path + ("a",)],
            flat[path + ("b",)],
            flat.get(path + ("magnitude",)),
            scale,
            KernelLayout(**info["layout"]),
            info["dropout"],
        )
    return traverse_util.unflatten_dict(out)
