"""Sharding rules: every parameter of every preset (frozen and LoRA'd) is covered, specs divide shapes."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jlora import sharding as S
from jlora.llama import PRESETS, param_shapes
from jlora.lora import LoraConfig, LoraPair, split


def _axis(mesh, axes):
    if axes is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))


def _check_divides(tree, specs, mesh):
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(spec_leaves)
    for x, spec in zip(leaves, spec_leaves):
        assert len(spec) == len(x.shape)
        for dim, axes in zip(x.shape, spec):
            assert dim % _axis(mesh, axes) == 0, (x.shape, spec)


@pytest.fixture(scope="module")
def meshes():
    return [S.make_mesh(2, 2, 2), S.make_mesh(1, 8, 1), S.make_mesh(1, 1, 8)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_param_matches_a_rule_and_divides(name, meshes):
    shapes = param_shapes(PRESETS[name])
    lcfg = LoraConfig(rank=8, targets="all-linear", use_dora=True)
    frozen, trainable = jax.eval_shape(lambda p: split(p, lcfg, jax.random.key(0)), shapes)
    opt = optax.adamw(1e-3)
    opt_shapes = jax.eval_shape(opt.init, trainable)
    for mesh in meshes:
        _check_divides(shapes, S.param_specs(shapes, mesh), mesh)
        _check_divides(frozen, S.param_specs(frozen, mesh), mesh)
        t_specs = S.trainable_specs(trainable, mesh)
        _check_divides(trainable, t_specs, mesh)
        _check_divides(opt_shapes, S.opt_state_specs(opt, opt_shapes, t_specs), mesh)


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
    specs = S.trainable_specs(trainable, mesh)
    q, o = specs["layers"]["self_attn"]["q_proj"]["kernel"], specs["layers"]["self_attn"]["o_proj"]["kernel"]
    assert isinstance(q, LoraPair)
    assert (q.a, q.b) == (P(None, "fsdp", None), P(None, None, "tensor"))
    assert (o.a, o.b) == (P(None, "tensor", None), P(None, None, "fsdp"))


def test_indivisible_dim_falls_back_to_replication():
    mesh = S.make_mesh(1, 2, 4)
    cfg = PRESETS["tiny"].replace(vocab_size=259)  # the ByteTokenizer's vocab: odd
    specs = S.param_specs(param_shapes(cfg), mesh)
    assert specs["embed_tokens"]["embedding"] == P(None, "fsdp")
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
