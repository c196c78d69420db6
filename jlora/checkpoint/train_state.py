"""Orbax checkpoints of what training changes: the trainable tree, the optimizer state, the step, the data
position and the rng, with the metadata JSON (jlora.checkpoint.metadata) in the same atomic step dir.

A resume onto another base, method, LoRA / adapter config or (through `check`) data stream is refused, and
values come back bit-identical. Trees are stored as nested dicts of arrays; no pickle.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from jlora.checkpoint.metadata import CheckpointError, check_base, check_lora_config, describe_tree, guarded
from jlora.checkpoint.run_dir import allocated_bytes, disk_errors, ensure_free_space
from jlora.checkpoint.tree_storage import from_storage, restore_target, to_storage
from jlora.models.config import ModelConfig
from jlora.peft.lora import LoraConfig

STATE_KEYS = ("trainable", "opt_state", "step", "data", "rng")


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
    meta = {**metadata, "kind": "checkpoint", "step": int(step), "trainable": describe_tree(state["trainable"])}
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
    return guarded(
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
    item_meta = guarded(
        lambda: manager.item_metadata(step)["state"], CheckpointError, f"{where}: truncated or corrupt checkpoint"
    )
    _check_shapes(item_meta, target, where)
    stored = guarded(
        lambda: manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))),
        CheckpointError,
        f"{where}: cannot restore: truncated or corrupt checkpoint, or shardings that do not fit",
    )["state"]
    return from_storage(stored, abstract_state)
