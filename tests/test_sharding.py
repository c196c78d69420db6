"""Sharding rules: every parameter of every preset (frozen and LoRA'd) is covered, specs divide shapes."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import split
from jlora.models.family import param_shapes
from jlora.models.llama import PRESETS
from jlora.parallel import sharding as S
from jlora.peft.lora import LoraConfig, LoraPair
from jlora.peft.placement import trainable_specs


def _per_device_bytes(tree, specs, mesh) -> tuple[int, int]:
    """(bytes on one device, bytes in all) of `tree` placed by `specs`; shard_shape raises if a spec does not divide."""
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(spec_leaves)
    local = total = 0
    for x, spec in zip(leaves, spec_leaves):
        item = np.dtype(x.dtype).itemsize
        local += int(np.prod(NamedSharding(mesh, spec).shard_shape(x.shape))) * item
        total += int(np.prod(x.shape)) * item
    return local, total


@pytest.fixture(scope="module")
def meshes():
    return [S.make_mesh(2, 2, 2), S.make_mesh(1, 8, 1), S.make_mesh(1, 1, 8), S.make_mesh(1, 4, 2)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_split_over_fsdp_and_tensor(name, meshes):
    """On power-of-two meshes each device holds 1/(fsdp*tensor) of the frozen weights, up to the tiny
    replicated norms, and the adapters and optimizer state are placed without error."""
    shapes = param_shapes(PRESETS[name])
    lcfg = LoraConfig(rank=8, targets="all-linear", use_dora=True)
    frozen, trainable = jax.eval_shape(lambda p: split(p, lcfg, jax.random.key(0)), shapes)
    opt = optax.adamw(1e-3)
    opt_shapes = jax.eval_shape(opt.init, trainable)
    for mesh in meshes:
        split_over = mesh.shape["fsdp"] * mesh.shape["tensor"]
        local, total = _per_device_bytes(frozen, S.param_specs(frozen, mesh), mesh)
        norms = sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
            for path, x in jax.tree_util.tree_flatten_with_path(frozen)[0]
            if "norm" in jax.tree_util.keystr(path)
        )
        assert local <= total / split_over + norms, (name, dict(mesh.shape), local, total)
        t_specs = trainable_specs(trainable, mesh)
        _per_device_bytes(trainable, t_specs, mesh)
        _per_device_bytes(opt_shapes, S.opt_state_specs(opt, opt_shapes, t_specs), mesh)


def test_big_leaf_that_cannot_be_split_is_an_error_naming_it_and_the_fix(capsys):
    mesh = S.make_mesh(1, 6, 1, devices=jax.devices()[:6])  # 4096 and 14336 are no multiples of 6
    shapes = param_shapes(PRESETS["llama3-8b"])
    with pytest.raises(S.ReplicationError) as err:
        S.param_specs(shapes, mesh)
    msg = str(err.value)
    assert "layers.mlp" in msg and "(32, 4096, 14336)" in msg and "fsdp=6" in msg
    assert "mesh.allow_replication: true" in msg and "\n" not in msg
    # allowed: one warning line, and the dims that 6 divides are still split (vocab 128256 = 6 * 21376)
    specs = S.param_specs(shapes, mesh, allow_replication=True)
    assert capsys.readouterr().err.count("warning:") == 1
    assert specs["embed_tokens"]["embedding"] == P(("tensor", "fsdp"), None)
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == P(None, None, "tensor")


def test_an_axis_that_does_not_divide_its_dim_moves_to_one_that_does():
    mesh = S.make_mesh(1, 7, 1, devices=jax.devices()[:7])
    # gate [D=4096, F=14336]: 7 divides F only, so fsdp moves from D to F instead of replicating 112 MiB
    assert S.fit_spec(P("fsdp", "tensor"), (4096, 14336), mesh, movable=2) == P(None, ("tensor", "fsdp"))
    # never onto the stacked layer dim the scan slices (movable=2 of 3 dims), nor anywhere with movable=0
    assert S.fit_spec(P(None, "fsdp", None), (7, 4096, 4096), mesh, movable=2) == P(None, None, None)
    assert S.fit_spec(P("fsdp", None), (4096, 14336), mesh) == P(None, None)


def test_frozen_kernel_specs_follow_the_table():
    mesh = S.make_mesh(2, 2, 2)
    specs = S.param_specs(param_shapes(PRESETS["tiny"]), mesh)
    layers = specs["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert layers["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert layers["input_layernorm"]["weight"] == P(None, None)
    assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")


def test_lora_pairs_take_their_kernel_dims_and_replicate_rank():
    mesh = S.make_mesh(2, 2, 2)
    shapes = param_shapes(PRESETS["llama3.2-1b"])
    _, trainable = jax.eval_shape(lambda p: split(p, LoraConfig(targets="all-linear"), jax.random.key(0)), shapes)
    specs = trainable_specs(trainable, mesh)
    q, o = specs["layers"]["self_attn"]["q_proj"]["kernel"], specs["layers"]["self_attn"]["o_proj"]["kernel"]
    assert isinstance(q, LoraPair)
    assert (q.a, q.b) == (P(None, "fsdp", None), P(None, None, "tensor"))
    assert (o.a, o.b) == (P(None, "tensor", None), P(None, None, "fsdp"))


def test_indivisible_vocab_moves_tensor_onto_the_hidden_dim():
    mesh = S.make_mesh(1, 2, 4)
    cfg = PRESETS["tiny"].replace(vocab_size=259)  # the ByteTokenizer's vocab: odd
    specs = S.param_specs(param_shapes(cfg), mesh)
    assert specs["embed_tokens"]["embedding"] == P(None, ("fsdp", "tensor"))  # D=64 divides by 2*4
    # k_proj out = 2 kv heads * 16 = 32 divides by 4; gate out 128 too; D=64 by fsdp=2
    assert specs["layers"]["self_attn"]["k_proj"]["kernel"] == P(None, "fsdp", "tensor")


def test_unmatched_param_is_an_error():
    mesh = S.make_mesh(8, 1, 1)
    with pytest.raises(S.ShardingError, match="no sharding rule matches parameter 'layers.mystery.kernel'"):
        S.param_specs({"layers": {"mystery": {"kernel": np.zeros((2, 4, 4))}}}, mesh)


def test_make_mesh_fills_and_rejects():
    assert dict(S.make_mesh(-1, 2, 1).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(S.make_mesh(1, -1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert S.make_mesh(1, 1, 1, devices=jax.devices()[:1]).devices.size == 1
    with pytest.raises(S.ShardingError, match="does not fit 8 devices"):
        S.make_mesh(3, -1, 1)
    with pytest.raises(S.ShardingError, match="at most one -1"):
        S.make_mesh(-1, -1, 1)


def test_batch_spec_shards_rows_over_data_and_fsdp():
    assert S.batch_spec(2, 0) == P(("data", "fsdp"), None)
    assert S.batch_spec(3, 1) == P(None, ("data", "fsdp"), None)
