"""jlora.load_pretrained places the base where a jitted step reads it: on the default device (moved leaf by leaf,
so host memory never holds two copies of the model) or, given a mesh, sharded by param_specs. The loop a user
writes first (load_pretrained, split, jax.jit) then moves no weights into the step at any call."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jlora
from jlora.formats.weights import read_pretrained, save_pretrained
from jlora.models.family import init_params
from jlora.models.llama import PRESETS
from jlora.parallel.sharding import make_mesh, param_specs

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("load_on_device") / "tiny"
    cfg = PRESETS["tiny"]
    save_pretrained(jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3))), cfg, path)
    return path


def test_params_land_on_the_default_device_as_read(tiny_dir):
    cfg_ref, ref = read_pretrained(tiny_dir)
    cfg, params = jlora.load_pretrained(tiny_dir)
    assert cfg == cfg_ref
    flat_ref = traverse_util.flatten_dict(ref)
    for key, leaf in traverse_util.flatten_dict(params).items():
        assert isinstance(leaf, jax.Array) and leaf.devices() == {jax.devices()[0]}, key
        np.testing.assert_array_equal(np.asarray(leaf), flat_ref[key], err_msg="/".join(key))


def test_with_a_mesh_params_are_sharded_by_param_specs(tiny_dir):
    mesh = make_mesh(1, 8, 1)
    _, params = jlora.load_pretrained(tiny_dir, mesh=mesh)
    specs = traverse_util.flatten_dict(param_specs(params, mesh))
    for key, leaf in traverse_util.flatten_dict(params).items():
        assert leaf.sharding.mesh == mesh and leaf.sharding.spec == specs[key], key
    assert any(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(params))


def test_the_obvious_loop_moves_no_weights_into_its_step(tiny_dir):
    """load_pretrained -> split -> a jitted step: with host-to-device transfers disallowed, the step runs on the
    frozen tree as loaded (numpy leaves would be copied in at every call, and the guard would refuse them)."""
    cfg, params = jlora.load_pretrained(tiny_dir)
    model = jlora.build_model(cfg)
    frozen, trainable = jlora.split(params, jlora.LoraConfig(rank=4, alpha=8), jax.random.key(0))
    ids = jax.device_put(jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % cfg.vocab_size)
    batch = {"input_ids": ids, "targets": jnp.roll(ids, -1, axis=1)}
    step = jax.jit(jax.value_and_grad(lambda t, f, b: jlora.causal_lm_loss(model, f, t, b)))
    step(trainable, frozen, batch)  # compile outside the guard
    with jax.transfer_guard_host_to_device("disallow"):
        loss, _ = step(trainable, frozen, batch)
    assert np.isfinite(float(loss))


_PEAK = """
import json, pathlib, sys
import jax, numpy as np
import jlora
from jlora.formats.weights import read_pretrained

def kib(field):
    line = next(x for x in pathlib.Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])

jax.device_put(np.zeros(1)).block_until_ready()  # the runtime's own memory, on both sides
pathlib.Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
base = kib("VmRSS")
loader = jlora.load_pretrained if sys.argv[2] == "load" else read_pretrained
cfg, params = loader(sys.argv[1])
jax.block_until_ready(params)
print(json.dumps({"growth_mb": (kib("VmHWM") - base) / 1024}))
"""


def test_host_memory_never_holds_two_copies(tmp_path, tiny_dir):
    """A 112 MB model: loading it onto the (CPU) device grows the peak RSS by the model and a leaf or two, not by
    a second copy. The runtime's own first allocations are taken off: what loading the tiny model grows by."""
    cfg = PRESETS["tiny"].replace(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
    )
    cfg = cfg.replace(vocab_size=8192)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    model_mb = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    leaf_mb = max(x.nbytes for x in jax.tree.leaves(params)) / 2**20  # 24 MB: a stacked MLP kernel
    save_pretrained(params, cfg, tmp_path / "model")
    del params

    def growth(path: pathlib.Path) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, str(path), "load"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]

    load = growth(tmp_path / "model") - growth(tiny_dir)
    # a leaf being read and one being copied (device_put is asynchronous) beside the placed model: 160 MB; a
    # second copy of the model: 224 MB
    assert model_mb > 100 and 0.8 * model_mb < load < model_mb + 2 * leaf_mb, f"{model_mb:.0f} MB: RSS +{load:.0f} MB"
