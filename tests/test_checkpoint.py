"""Orbax training checkpoints and adapter files: exact restore, size, atomicity, and refusing the wrong adapter."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora.checkpoint import metadata, train_state
from jlora.checkpoint.adapter import load_adapter, read_adapter_metadata, save_adapter
from jlora.checkpoint.tree_storage import is_rng_key
from jlora.models.family import param_shapes
from jlora.models.llama import PRESETS

CFG = PRESETS["tiny"]


def random_adapter(params, lcfg, seed):
    """A trainable tree shaped by `jlora.split` (via eval_shape), filled with numpy random values."""
    shapes = jax.eval_shape(lambda p: jlora.split(p, lcfg, jax.random.key(0))[1], params)
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(rs.standard_normal(s.shape).astype(s.dtype)), shapes)


def _leaves_equal(a, b) -> bool:
    unkey = lambda x: jax.random.key_data(x) if is_rng_key(x) else x
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(unkey(x), unkey(y)) for x, y in zip(la, lb))


def _one_line_error(fn, cls, match: str) -> str:
    with pytest.raises(cls, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.fixture(scope="module")
def params():
    rs = np.random.RandomState(0)  # numpy, not init_params: no compiles
    return jax.tree.map(lambda s: jnp.asarray(0.02 * rs.standard_normal(s.shape).astype(s.dtype)), param_shapes(CFG))


LCFG = jlora.LoraConfig(
    rank=4, alpha=8, targets=("q_proj", "v_proj", "lm_head"), use_dora=True, layers=(1,), train_extra="^norm"
)


# --------------------------------------------------------------------------- final adapters


def test_adapter_round_trip(params, tmp_path):
    trainable = random_adapter(params, LCFG, 0)
    frozen = {k: v for k, v in params.items() if k != "norm"}  # the trainer fingerprints its frozen tree
    save_adapter(tmp_path / "a", trainable, LCFG, base=CFG, params=frozen, run_config={"lr": 1e-3})
    lcfg, back = load_adapter(tmp_path / "a", base=CFG, params=params, expect=LCFG)  # full params fit too
    assert lcfg == LCFG
    assert jax.tree.structure(back) == jax.tree.structure(trainable)  # scales, layouts, dropout included
    assert _leaves_equal(back, trainable)
    meta = read_adapter_metadata(tmp_path / "a")
    assert meta["run_config"] == {"lr": 1e-3} and meta["jlora_version"] and meta["base"]["config"]["hidden_size"] == 64
    assert set(meta["base"]["fingerprint"]["samples"]) == {".".join(k) for k in traverse_util.flatten_dict(frozen)}
    save_adapter(tmp_path / "a", trainable, LCFG, base=CFG)  # overwriting an adapter is fine
    load_adapter(tmp_path / "a", base=CFG)


def test_load_adapter_refuses(params, tmp_path):
    trainable = random_adapter(params, LCFG, 1)
    save_adapter(tmp_path / "a", trainable, LCFG, base=CFG, params=params)
    other = CFG.replace(num_hidden_layers=3)
    _one_line_error(
        lambda: load_adapter(tmp_path / "a", base=other),
        metadata.AdapterError,
        "made for another base model.*num_hidden_layers=2 there, 3 here",
    )
    retrained = jax.tree.map(lambda x: x, params)
    retrained["norm"]["weight"] = retrained["norm"]["weight"] * 1.5
    _one_line_error(
        lambda: load_adapter(tmp_path / "a", base=CFG, params=retrained),
        metadata.AdapterError,
        "made for another base model.*weight norm.weight differs",
    )
    _one_line_error(
        lambda: load_adapter(tmp_path / "a", base=CFG, expect=LCFG.__class__(rank=8, targets=LCFG.targets)),
        metadata.AdapterError,
        "adapter has rank=4, expected rank=8",
    )
    with pytest.raises(ValueError):  # AdapterError is a ValueError
        load_adapter(tmp_path / "nowhere", base=CFG)
    _one_line_error(
        lambda: save_adapter(tmp_path, trainable, LCFG, base=CFG),
        metadata.AdapterError,
        "refusing to overwrite",
    )


@pytest.mark.parametrize("damage", ["truncate", "delete", "metadata"])
def test_damaged_adapter(params, tmp_path, damage):
    trainable = random_adapter(params, LCFG, 2)
    save_adapter(tmp_path / "a", trainable, LCFG, base=CFG)
    files = _data_files(tmp_path / "a")
    assert files
    if damage == "truncate":
        for f in files:
            os.truncate(f, f.stat().st_size // 2)
    elif damage == "delete":
        for f in files:
            f.unlink()
    else:
        (tmp_path / "a" / "metadata" / "metadata").unlink()
    _one_line_error(lambda: load_adapter(tmp_path / "a", base=CFG), metadata.AdapterError, "truncated or corrupt")


# --------------------------------------------------------------------------- training checkpoints


def _train_state(params, seed=0):
    trainable = random_adapter(params, LCFG, seed)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 2, 10)))
    grads = random_adapter(params, LCFG, seed + 1)
    # one jitted update: non-trivial moments and count (eager optax compiles op by op, slowly)
    opt_state = jax.jit(lambda t, g: opt.update(g, opt.init(t), t)[1])(trainable, grads)
    return {
        "trainable": trainable,
        "opt_state": opt_state,
        "step": 0,
        "data": {"epoch": 1, "index": 17},
        "rng": jax.random.key(42),
    }


def test_checkpoint_cycle_and_exact_restore(params, tmp_path):
    state = _train_state(params)
    meta = metadata.make_metadata(LCFG, CFG, params, run_config={"output_dir": str(tmp_path)})
    manager = train_state.open_manager(tmp_path / "ckpt", keep=2, interval=2)
    saved = []
    for step in range(1, 6):
        state["step"] = step
        state["rng"] = jax.random.fold_in(state["rng"], step)
        if train_state.save_checkpoint(manager, step, state, meta, force=step == 5):
            saved.append(step)
    assert saved == [2, 4, 5] and manager.all_steps() == [4, 5]
    # A crash mid-save leaves only orbax's tmp dir, which is not a checkpoint.
    (tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1700000000").mkdir()
    (tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1700000000" / "junk").write_text("partial")
    manager = train_state.open_manager(tmp_path / "ckpt", keep=2, interval=2)
    assert manager.latest_step() == 5

    back = train_state.restore_latest(
        manager, state, base=CFG, params=params, lcfg=LCFG
    )  # the state itself as the target
    assert back["step"] == 5 and back["data"] == {"epoch": 1, "index": 17} and isinstance(back["step"], int)
    assert jax.tree.structure(back) == jax.tree.structure(state) and _leaves_equal(back, state)
    assert train_state.read_metadata(manager)["trainable"]["pairs"]["lm_head.kernel"]["rank"] == 4

    # Restore onto a mesh: an abstract state from eval_shape, with shardings.
    mesh = jax.make_mesh((8,), ("fsdp",))
    abstract = jax.eval_shape(lambda: state)

    def shard(s):  # the input dim of A (and other [.., 64, ..] dims) over the 8 devices, the rest replicated
        spec = [None] * s.ndim
        if s.ndim >= 2 and s.shape[-2] % 8 == 0:
            spec[-2] = "fsdp"
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P(*spec)))

    abstract = {
        **abstract,
        "trainable": jax.tree.map(shard, abstract["trainable"]),
        "opt_state": jax.tree.map(shard, abstract["opt_state"]),
    }
    back = train_state.restore_latest(manager, abstract)
    a = back["trainable"]["layers"]["self_attn"]["q_proj"]["kernel"].a  # [L, in, R]
    assert a.sharding == abstract["trainable"]["layers"]["self_attn"]["q_proj"]["kernel"].a.sharding
    assert _leaves_equal(back, state) and jax.random.key_impl(back["rng"]) == jax.random.key_impl(state["rng"])

    _one_line_error(
        lambda: train_state.restore_latest(manager, state, lcfg=LCFG.__class__(rank=2, targets=LCFG.targets)),
        metadata.CheckpointError,
        "adapter has rank=4, expected rank=2",
    )
    _one_line_error(
        lambda: train_state.save_checkpoint(manager, 6, {**state, "frozen": params}, meta),
        metadata.CheckpointError,
        "holds only",
    )


def test_damaged_or_mismatched_checkpoint(params, tmp_path):
    state = _train_state(params)
    manager = train_state.open_manager(tmp_path, keep=2, interval=1)
    train_state.save_checkpoint(manager, 1, state, metadata.make_metadata(LCFG, CFG))
    other = jax.tree.map(lambda x: x, state)
    other["trainable"]["lm_head"]["kernel"] = other["trainable"]["lm_head"]["kernel"].replace(
        a=jnp.zeros((64, 2)), b=jnp.zeros((2, 512))
    )
    _one_line_error(
        lambda: train_state.restore_latest(manager, other),
        metadata.CheckpointError,
        r"lm_head/kernel/a has shape \(64, 4\) in the checkpoint, \(64, 2\) in this run",
    )
    for f in _data_files(tmp_path / "1"):
        os.truncate(f, f.stat().st_size // 3)
    _one_line_error(
        lambda: train_state.restore_latest(manager, state),
        metadata.CheckpointError,
        "1: .*truncated or corrupt checkpoint",
    )


def test_checkpoint_holds_only_the_adapter(tmp_path):
    """On disk: about (LoRA params + Adam moments) x 4 bytes, a tiny fraction of the 135M-param base."""
    cfg = PRESETS["smollm2-135m"]
    base = param_shapes(cfg)
    lcfg = jlora.LoraConfig(rank=8, targets=("q_proj", "v_proj"))
    trainable = random_adapter(base, lcfg, 0)
    opt_state = optax.adam(1e-3).init(trainable)
    rs = np.random.RandomState(1)  # trained moments are not zeros; zeros would compress to nothing
    opt_state = jax.tree.map(
        lambda x: jnp.asarray(rs.standard_normal(x.shape).astype(x.dtype)) if x.ndim else x, opt_state
    )
    state = {"trainable": trainable, "opt_state": opt_state, "step": 10, "data": {"index": 3}, "rng": jax.random.key(0)}
    manager = train_state.open_manager(tmp_path, keep=1, interval=10)
    assert train_state.save_checkpoint(manager, 10, state, metadata.make_metadata(lcfg, cfg))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "10").rglob("*") if p.is_file())
    lora = jlora.count_params(trainable)
    expected = 3 * lora * 4  # params + Adam mu + nu, fp32
    base_bytes = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(base))
    assert lora == 30 * (576 * 8 + 8 * 576 + 576 * 8 + 8 * 192)
    assert 0.75 * expected < on_disk < 1.2 * expected + 200_000, (on_disk, expected)  # orbax zstd-compresses a little
    assert on_disk < base_bytes / 50
