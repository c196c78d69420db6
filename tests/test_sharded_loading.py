"""jlora.formats.weights_on_device: per-host sharded loading equals load_pretrained leaf for leaf, lands on param_specs'
shardings, keeps load_pretrained's one-line errors, and (2 processes x 4 CPU devices, jax.distributed) keeps
each process's peak RSS growth near its own share of a 0.5 GB checkpoint."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from test_trainer import run_two_processes

from jlora.formats.param_assembly import expected_tensors
from jlora.formats.weights import WeightsError, read_pretrained, save_pretrained
from jlora.formats.weights_on_device import load_pretrained_sharded
from jlora.models.family import init_params
from jlora.models.llama import PRESETS
from jlora.parallel.sharding import make_mesh, param_specs

ROOT = pathlib.Path(__file__).resolve().parents[1]
# tiny, with biases so the stacked 1-D leaves are covered too; hidden 64 splits 8 ways
CFG = PRESETS["tiny"].replace(attention_bias=True, mlp_bias=True)


def _split_in_two(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """Rewrite a single-file checkpoint as two shards plus model.safetensors.index.json."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for part, chunk in enumerate((names[::2], names[1::2])):
        shard = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("sharded_loading")
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(7)))
    save_pretrained(params, CFG, root / "single")
    return {"single": root / "single", "two-shards": _split_in_two(root / "single", root / "two")}


def _assert_loaded_like_whole(path: pathlib.Path, mesh, **dtypes) -> None:
    cfg_ref, ref = read_pretrained(path, **dtypes)
    cfg, got = load_pretrained_sharded(path, mesh, **dtypes)
    assert cfg == cfg_ref
    specs = traverse_util.flatten_dict(param_specs(got, mesh))
    flat_ref = traverse_util.flatten_dict(ref)
    assert flat_ref.keys() == traverse_util.flatten_dict(got).keys()
    for key, leaf in traverse_util.flatten_dict(got).items():
        assert isinstance(leaf, jax.Array) and leaf.sharding.mesh == mesh and leaf.sharding.spec == specs[key], key
        assert leaf.dtype == flat_ref[key].dtype and leaf.shape == flat_ref[key].shape, key
        np.testing.assert_array_equal(np.asarray(leaf), flat_ref[key], err_msg="/".join(key))
        for shard in leaf.addressable_shards:  # each device holds exactly its block
            np.testing.assert_array_equal(np.asarray(shard.data), flat_ref[key][shard.index])


@pytest.mark.parametrize("layout", ["single", "two-shards"])
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_sharded_load_equals_whole_load(checkpoints, layout, mesh_shape):
    _assert_loaded_like_whole(checkpoints[layout], make_mesh(*mesh_shape))


def test_sharded_load_converts_to_bf16(checkpoints):
    _assert_loaded_like_whole(checkpoints["two-shards"], make_mesh(1, 2, 4), param_dtype="bfloat16", dtype="bfloat16")


def test_specs_fn_picks_the_placement(checkpoints):
    mesh = make_mesh(1, 8, 1)
    _, got = load_pretrained_sharded(
        checkpoints["single"], mesh, specs_fn=lambda s: jax.tree.map(lambda _: jax.sharding.PartitionSpec(), s)
    )
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(got))


def _edited(src: pathlib.Path, dst: pathlib.Path, edit, config_edit=None) -> pathlib.Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config_edit(config) if config_edit else config))
    save_file(edit(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"))
    return dst


K = "model.layers.1.self_attn.k_proj.weight"
BROKEN = {  # checkpoint edits that both loaders must refuse with the same one-line error
    "wrong shape": lambda t: {**t, K: t[K][:, :32].copy()},
    "missing tensor": lambda t: {k: v for k, v in t.items() if k != "model.layers.0.mlp.up_proj.bias"},
    "unknown tensor": lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)},
}


@pytest.mark.parametrize("problem", sorted(BROKEN))
def test_sharded_load_gives_the_same_one_line_errors(checkpoints, tmp_path, problem):
    path = _edited(checkpoints["single"], tmp_path / "c", BROKEN[problem])
    with pytest.raises(WeightsError) as whole:
        read_pretrained(path)
    with pytest.raises(WeightsError) as sharded:
        load_pretrained_sharded(path, make_mesh(1, 8, 1))
    assert str(sharded.value) == str(whole.value) and "\n" not in str(whole.value)


def test_tied_checkpoint_with_a_stored_head(checkpoints, tmp_path):
    """A stored copy of the embedding is accepted, a different head refused (three rows are compared)."""

    def tie(config):
        return {**config, "tie_word_embeddings": True}

    def with_head(change_row):
        def edit(t):
            head = t["model.embed_tokens.weight"].copy()  # [V, D], in place of the untied head
            if change_row is not None:
                head[change_row] += 1.0
            return {**t, "lm_head.weight": head}

        return edit

    mesh = make_mesh(1, 8, 1)
    cfg, got = load_pretrained_sharded(_edited(checkpoints["single"], tmp_path / "same", with_head(None), tie), mesh)
    assert cfg.tie_word_embeddings and "lm_head" not in got
    path = _edited(checkpoints["single"], tmp_path / "other", with_head(CFG.vocab_size // 2), tie)
    with pytest.raises(WeightsError, match="lm_head.weight differs from the embedding"):
        load_pretrained_sharded(path, mesh)


@pytest.mark.slow
def test_gguf_falls_back_to_a_whole_load(smollm2_gguf):
    _assert_loaded_like_whole(pathlib.Path(smollm2_gguf), make_mesh(2, 4, 1))


# ---- two processes, 0.5 GB checkpoint: each reads only its share ----

BIG = PRESETS["tiny"].replace(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
)

WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from jlora.train.loop import init_distributed
assert init_distributed(True) and jax.process_count() == 2 and jax.device_count() == 8
import numpy as np
from flax import traverse_util
from jlora.models.llama import LlamaConfig
from jlora.models.family import param_shapes
from jlora.parallel.sharding import make_mesh, param_specs
from jlora.formats.weights import read_pretrained
from jlora.formats.weights_on_device import load_pretrained_sharded

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

mesh = make_mesh(1, 8, 1)
jax.block_until_ready(jax.device_put(np.ones(8), jax.local_devices()[0]))  # the runtime's first-use allocations
cold = status("VmRSS")
# Tracing the model for its shapes (jax.eval_shape) keeps ~45 MB of caches whatever the checkpoint's size:
# done first, so the growth measured is what the load costs per byte of checkpoint.
param_shapes(LlamaConfig.from_hf_config(json.loads(open(sys.argv[1] + "/config.json").read())))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS, so the peak below is this load's own
before = status("VmRSS")
cfg, params = load_pretrained_sharded(sys.argv[1], mesh)
jax.block_until_ready(params)
growth, cold_growth = status("VmHWM") - before, status("VmHWM") - cold
flat = traverse_util.flatten_dict(params)
held = sum(s.data.nbytes for leaf in flat.values() for s in leaf.addressable_shards)
ref = traverse_util.flatten_dict(read_pretrained(sys.argv[1])[1])  # the single-process load, after the measurement
specs = traverse_util.flatten_dict(param_specs(params, mesh))
same = all(leaf.sharding.spec == specs[k] and all(np.array_equal(np.asarray(s.data), ref[k][s.index])
                                                  for s in leaf.addressable_shards) for k, leaf in flat.items())
print("RESULT " + json.dumps({"growth": growth, "cold_growth": cold_growth, "held": held, "same": same}), flush=True)
"""


def _write_big_checkpoint(path: pathlib.Path) -> int:
    """BIG as an fp32 HF checkpoint in two shards (random values, written shard by shard); returns its bytes."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(BIG.to_hf_config()))
    rng = np.random.default_rng(0)
    disk = [(n, want) for _, _, names, want in expected_tensors(BIG, 0) for n in names]
    weight_map = {}
    for part in range(2):
        shard = f"model-{part + 1:05d}-of-00002.safetensors"
        tensors = {n: rng.standard_normal(want, dtype=np.float32) for n, want in disk[part::2]}
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.slow
def test_two_processes_each_read_only_their_share(tmp_path):
    try:
        _run_two_loaders(tmp_path / "big")
    finally:
        shutil.rmtree(tmp_path / "big", ignore_errors=True)  # 0.55 GB: not left for pytest's kept tmp dirs


def _run_two_loaders(path: pathlib.Path) -> None:
    size = _write_big_checkpoint(path)
    assert size >= 0.5e9
    results = [
        json.loads(out.split("RESULT ")[1].splitlines()[0]) for out in run_two_processes(["-c", WORKER, str(path)])
    ]
    print(
        f"checkpoint {size / 2**20:.0f} MiB; per process:",
        [{k: round(v / size, 3) if k != "same" else v for k, v in r.items()} for r in results],
    )
    for r in results:
        assert r["same"]
        assert 0.49 * size <= r["held"] <= 0.51 * size  # fsdp=8 over 2 hosts: each holds half
        assert r["growth"] <= 0.6 * size, f"peak RSS grew {r['growth'] / size:.2f}x the checkpoint"
