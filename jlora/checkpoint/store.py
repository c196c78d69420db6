"""Orbax checkpoints of what training changes, and the adapter files a run leaves behind.

A training checkpoint (`open_manager` / `save_checkpoint` / `restore_latest`) holds only the
trainable tree, the optimizer state, the step, the data position and the rng, plus a metadata
JSON (LoraConfig, or the method and AdapterConfig of a LLaMA-Adapter; run config, jlora version, base
model identity, the data stream's identity) in the same atomic step dir; a resume onto another base,
method, LoRA / adapter config or data stream is refused.
`save_adapter` / `load_adapter` keep the final adapter the same way and refuse one made for
another base or rank, or one that is truncated. Trees are stored as nested dicts of arrays (a
`LoraPair` becomes {a, b, magnitude}); its static scale/layout live in the metadata. No pickle.
Does not own the train loop (jlora.train.step) or PEFT files (jlora.formats.peft_adapter).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import pathlib
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jlora.checkpoint.atomic_dir import replace_dir
from jlora.checkpoint.fingerprint import fingerprint, mismatch
from jlora.checkpoint.run_dir import allocated_bytes, disk_errors, ensure_free_space
from jlora.checkpoint.tree_storage import from_storage, restore_target, to_storage
from jlora.errors import JloraError
from jlora.models.config import ModelConfig
from jlora.peft.llama_adapter import AdapterConfig
from jlora.peft.lora import LoraConfig
from jlora.peft.routing import KernelLayout, LoraPair

STATE_KEYS = ("trainable", "opt_state", "step", "data", "rng")
# Fields of LoraConfig that decide the trainable tree's shapes and scales.
SHAPE_KEYS = (
    "rank",
    "rank_pattern",
    "alpha",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "targets",
    "exclude",
    "layers",
    "train_extra",
)


class CheckpointError(JloraError, ValueError):
    """A checkpoint that is missing, truncated, corrupt or made for something else; one-line message."""


class AdapterError(CheckpointError):
    """An adapter that does not fit: another base model, another rank, or a damaged directory."""


# --------------------------------------------------------------------------- metadata


def _version() -> str:
    try:
        return importlib.metadata.version("jlora")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _lora_config_dict(lcfg: LoraConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(lcfg)))  # tuples -> lists


def lora_config_from_dict(d: dict) -> LoraConfig:
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in d.items() if k in names})


def _method_meta(lcfg: LoraConfig | AdapterConfig) -> dict:
    """The method and its config, as metadata: {"lora_config": ...}, or for LLaMA-Adapter
    {"method": "llama_adapter", "adapter_config": ...} (an older reader then finds no LoRA config)."""
    if isinstance(lcfg, AdapterConfig):
        return {"method": "llama_adapter", "adapter_config": dataclasses.asdict(lcfg)}
    return {"lora_config": _lora_config_dict(lcfg)}


def method_config_from_meta(meta: dict) -> LoraConfig | AdapterConfig:
    """The LoraConfig or AdapterConfig a checkpoint or adapter was made with."""
    if meta.get("method") == "llama_adapter":
        return AdapterConfig(**meta["adapter_config"])
    return lora_config_from_dict(meta["lora_config"])


def _describe_tree(trainable) -> dict:
    """The static half of a trainable tree, which arrays alone cannot restore."""
    pairs, extra = {}, []
    for path, leaf in traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair)).items():
        name = ".".join(path)
        if isinstance(leaf, LoraPair):
            pairs[name] = {
                "scale": list(leaf.scale) if isinstance(leaf.scale, tuple) else leaf.scale,
                "layout": dataclasses.asdict(leaf.layout),
                "dropout": leaf.dropout,
                "dora": leaf.magnitude is not None,
                "rank": leaf.rank,
            }
        else:
            extra.append(name)
    return {"pairs": pairs, "extra": extra}


def make_metadata(
    lcfg: LoraConfig | AdapterConfig,
    base: ModelConfig,
    params=None,
    run_config: dict | None = None,
    data_stream: dict | None = None,
) -> dict:
    """The metadata JSON of a checkpoint or adapter: what it is and which base model it belongs to;
    for a training checkpoint also `data_stream` (the data's identity), which a resume must match."""
    meta = {
        "jlora_version": _version(),
        **_method_meta(lcfg),
        "run_config": json.loads(json.dumps(run_config, default=str)),  # tuples -> lists, odd types -> str
        "base": {
            "name": base.name,
            "config": base.to_hf_config(),
            "fingerprint": fingerprint(params) if params is not None else None,
        },
    }
    if data_stream is not None:
        meta["data_stream"] = json.loads(json.dumps(data_stream))
    return meta


def check_base(meta: dict, base: ModelConfig | None, params=None, *, where: str) -> None:
    """Raise AdapterError unless `meta` was made for this base config (and these weights, if given)."""
    saved = meta.get("base") or {}
    if base is not None:
        mine, theirs = base.to_hf_config(), saved.get("config") or {}
        # the family, then the fields that decide which base an adapter fits (ModelConfig.arch_keys)
        diff = [k for k in ("model_type", *base.arch_keys) if _norm(mine.get(k)) != _norm(theirs.get(k))]
        if diff:
            k = diff[0]
            raise AdapterError(
                f"{where}: made for another base model ({saved.get('name')!r}): {k}={theirs.get(k)!r} "
                f"there, {mine.get(k)!r} here ({len(diff)} config field(s) differ)"
            )
    bad = mismatch(saved["fingerprint"], params) if params is not None and saved.get("fingerprint") else []
    if bad:
        name, kind = bad[0]
        adapted = set((meta.get("trainable") or {}).get("pairs") or ())
        merged = kind == "sample" and {k for k, _ in bad} <= adapted
        why = (
            "only tensors this adapter adapts differ: is it (or another adapter) merged into these weights "
            "already? use the original base"
            if merged
            else "use the weights it was trained on"
        )
        raise AdapterError(
            f"{where}: made for another base model ({saved.get('name')!r}): weight {name} differs "
            f"({kind} fingerprint, {len(bad)} tensor(s)); {why}"
        )


def check_lora_config(meta: dict, expect: LoraConfig | AdapterConfig, *, where: str) -> None:
    """Raise AdapterError if the saved method differs from `expect`'s, or its LoraConfig in rank, targets or
    scale, or its AdapterConfig in len or layers."""
    method, saved_method = (
        ("llama_adapter" if isinstance(expect, AdapterConfig) else "lora"),
        meta.get("method", "lora"),
    )
    if method != saved_method:
        raise AdapterError(f"{where}: made with method {saved_method}, expected method {method}")
    if isinstance(expect, AdapterConfig):
        saved, mine = meta.get("adapter_config") or {}, dataclasses.asdict(expect)
        for k in mine:
            if saved.get(k) != mine[k]:
                raise AdapterError(
                    f"{where}: adapter has adapter.{k}={saved.get(k)!r}, expected adapter.{k}={mine[k]!r}"
                )
        return
    saved, mine = meta.get("lora_config") or {}, _lora_config_dict(expect)
    for k in SHAPE_KEYS:
        if _norm(saved.get(k)) != _norm(mine.get(k)):
            raise AdapterError(f"{where}: adapter has {k}={saved.get(k)!r}, expected {k}={mine.get(k)!r}")


def _norm(v):
    """A comparable form of a JSON-ish value: tuples as lists, 16 == 16.0."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return sorted((k, _norm(x)) for k, x in v.items())
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _check_shapes(saved_meta, target: dict, where: str) -> None:
    """Compare the stored tree (orbax item metadata) with the restore target before reading any data."""
    if saved_meta is None:
        raise CheckpointError(f"{where}: truncated or corrupt checkpoint (no array metadata)")
    saved = traverse_util.flatten_dict(getattr(saved_meta, "tree", saved_meta))
    want = traverse_util.flatten_dict(target)
    missing, extra = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    if missing or extra:
        what = f"lacks {'/'.join(missing[0])}" if missing else f"has unexpected {'/'.join(extra[0])}"
        raise CheckpointError(
            f"{where}: checkpoint does not match this run: it {what} ({len(missing)} missing, {len(extra)} unexpected)"
        )
    for k, t in want.items():
        if tuple(saved[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where}: {'/'.join(k)} has shape {tuple(saved[k].shape)} in the checkpoint, "
                f"{tuple(t.shape)} in this run"
            )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _guarded(fn, error: type, message: str):
    """fn(), with any orbax/tensorstore failure (they raise many types) turned into one clear line."""
    try:
        return fn()
    except Exception as e:
        raise error(f"{message} ({_one_line(e)})") from None


# --------------------------------------------------------------------------- training checkpoints


def open_manager(
    directory: str | pathlib.Path, keep: int = 3, interval: int = 500, *, create: bool = True
) -> ocp.CheckpointManager:
    """A CheckpointManager for training: saves every `interval` steps (0 = only forced saves), keeps the last `keep`.

    Saves are synchronous: adapter state is small, and a save that returned is a save on disk.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        enable_async_checkpointing=False,
        should_save_fn=lambda step, _last: interval > 0 and step % interval == 0,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_handlers=handlers)


def save_checkpoint(
    manager: ocp.CheckpointManager, step: int, state: dict, metadata: dict, *, force: bool = False
) -> bool:
    """Save `state` ({trainable, opt_state, step, data, rng}) at `step` if the interval says so (or `force`).

    `metadata` comes from `make_metadata`; the trainable tree's static half is added here. Returns
    whether a checkpoint was written. Orbax writes into a tmp dir and renames it when complete.
    """
    unknown = sorted(set(state) - set(STATE_KEYS))
    if unknown or "trainable" not in state:
        raise CheckpointError(f"a checkpoint holds only {', '.join(STATE_KEYS)} (with trainable); got {sorted(state)}")
    if step in manager.all_steps() or not (force or manager.should_save(step)):
        return False  # a final forced save right after an interval save is the same checkpoint
    meta = {**metadata, "kind": "checkpoint", "step": int(step), "trainable": _describe_tree(state["trainable"])}
    stored = to_storage(state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(stored), metadata=ocp.args.JsonSave(meta))
    where = pathlib.Path(manager.directory) / str(step)
    ensure_free_space(manager.directory, _expected_size(manager, stored), where)
    with disk_errors(where):  # the last complete step stays as it was
        saved = manager.save(step, args=args, force=force)
        manager.wait_until_finished()
    return bool(saved)


def _expected_size(manager: ocp.CheckpointManager, stored: dict) -> int:
    """Bytes the next checkpoint will take: about what the last one took (same shapes), or for the
    first one twice its arrays, plus a margin for the small files orbax writes."""
    last = manager.latest_step()
    if last is not None:
        need = allocated_bytes(pathlib.Path(manager.directory) / str(last))
    else:
        need = 2 * sum(x.nbytes for x in jax.tree.leaves(stored))
    return int(1.1 * need) + (64 << 10)


def read_metadata(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The metadata JSON of `step` (default: the latest), or None when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
    return _guarded(
        lambda: manager.restore(step, args=args)["metadata"],
        CheckpointError,
        f"{manager.directory}/{step}: truncated or corrupt checkpoint: metadata unreadable",
    )


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: dict,
    *,
    base: ModelConfig | None = None,
    params=None,
    lcfg: LoraConfig | None = None,
    check: Callable[[dict, str], None] | None = None,
) -> dict | None:
    """The latest checkpoint restored into `abstract_state`'s structure, shardings and dtypes, or None.

    `abstract_state` is the state as `save_checkpoint` got it, or `jax.eval_shape` of it (with
    shardings, to restore onto a mesh). With base/params/lcfg, a checkpoint made for another base model or
    LoRA config is refused; `check(metadata, where)` may refuse it for other reasons (a changed data stream,
    jlora.train.data_stream.check_resume) before anything is read. Values come back bit-identical.
    """
    step = manager.latest_step()
    if step is None:
        return None
    where = f"{manager.directory}/{step}"
    meta = read_metadata(manager, step)
    check_base(meta, base, params, where=where)
    if lcfg is not None:
        check_lora_config(meta, lcfg, where=where)
    if check is not None:
        check(meta, where)
    target = restore_target(abstract_state)
    item_meta = _guarded(
        lambda: manager.item_metadata(step)["state"], CheckpointError, f"{where}: truncated or corrupt checkpoint"
    )
    _check_shapes(item_meta, target, where)
    stored = _guarded(
        lambda: manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))),
        CheckpointError,
        f"{where}: cannot restore: truncated or corrupt checkpoint, or shardings that do not fit",
    )["state"]
    return from_storage(stored, abstract_state)


# --------------------------------------------------------------------------- final adapters


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
    meta = {
        **make_metadata(lcfg, base, params, run_config),
        "kind": "adapter",
        "trainable": _describe_tree(trainable),
        "content_sha256": _content_hash(stored),
    }
    args = ocp.args.Composite(adapter=ocp.args.StandardSave(stored), metadata=ocp.args.JsonSave(meta))
    with disk_errors(out), replace_dir(out, primary=jax.process_index() == 0, sync=barrier) as partial:
        _adapter_checkpointer().save(partial, args=args)


def barrier(name: str) -> None:
    """Wait for every process to get here (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_adapter_metadata(directory: str | pathlib.Path) -> dict:
    """The metadata JSON of a jlora adapter dir; AdapterError if it is missing or unreadable."""
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
        raise AdapterError(f"{where}/metadata/metadata: truncated or corrupt ({_one_line(e)})") from None
    if meta.get("kind") != "adapter" or "trainable" not in meta:
        raise AdapterError(f"{where}: metadata does not describe a jlora adapter (kind={meta.get('kind')!r})")
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
    given, one whose LoraConfig differs from `expect` in rank, targets or scale, and a damaged one.
    """
    where = pathlib.Path(directory).absolute()
    meta = read_adapter_metadata(where)
    check_base(meta, base, params, where=str(where))
    if expect is not None:
        check_lora_config(meta, expect, where=str(where))
    ckpt = _adapter_checkpointer()
    tree_meta = _guarded(
        lambda: ckpt.metadata(where).item_metadata["adapter"], AdapterError, f"{where}: truncated or corrupt adapter"
    )
    if tree_meta is None:
        raise AdapterError(f"{where}: truncated or corrupt adapter (adapter/_METADATA is missing)")
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), dict(tree_meta.tree)
    )
    _check_described(meta["trainable"], traverse_util.flatten_dict(target), str(where))
    stored = _guarded(
        lambda: ckpt.restore(where, args=ocp.args.Composite(adapter=ocp.args.StandardRestore(target))),
        AdapterError,
        f"{where}: truncated or corrupt adapter",
    )["adapter"]
    if meta.get("content_sha256") and _content_hash(stored) != meta["content_sha256"]:
        raise AdapterError(f"{where}: corrupt adapter: array contents do not match the saved checksum")
    return method_config_from_meta(meta), _rebuild(stored, meta["trainable"])


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
