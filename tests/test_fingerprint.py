"""Base fingerprints (issue 13 item 10): an adapter is refused by a base it is already merged into.

The fingerprint samples every tensor, so a merged base differs from its original in each adapted
tensor; it is the same for host arrays and for arrays sharded over a mesh, its gather compiles to a
few KiB on any size of tensor, and adapters saved with the version-1 fingerprint still load."""

import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_testing import script
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tokenizers import Tokenizer, models, pre_tokenizers

import jlora
from jlora.checkpoint import fingerprint as fp
from jlora.checkpoint import metadata
from jlora.checkpoint.adapter import load_adapter, save_adapter
from jlora.formats.weights import save_pretrained
from jlora.models.family import param_shapes
from jlora.models.llama import PRESETS

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}

CFG = PRESETS["tiny"].replace(vocab_size=128, bos_token_id=1, eos_token_id=2)


def _random_params(cfg=CFG, seed=0):
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda s: np.asarray(0.02 * rs.standard_normal(s.shape), s.dtype), param_shapes(cfg))


def _model_dir(path: pathlib.Path, params) -> pathlib.Path:
    """An HF dir: config.json + model.safetensors + a word-level tokenizer.json (3 specials + 100 words)."""
    save_pretrained(params, CFG, path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return path


def _cli(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script(name), *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )


def test_an_adapter_is_refused_by_the_base_it_is_merged_into(tmp_path):
    base = _model_dir(tmp_path / "base", _random_params())
    sets = [
        "train.steps=2",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        f"model.path={base}",
        f"output_dir={tmp_path / 'run'}",
    ]
    run = _cli("jlora-train", "--config", "configs/tiny-cpu.yaml", *[a for s in sets for a in ("--set", s)])
    assert run.returncode == 0, run.stderr[-3000:]
    adapter, merged = tmp_path / "run" / "adapter", tmp_path / "merged"
    run = _cli("jlora-merge", "--model", base, "--adapter", adapter, "--out", merged)
    assert run.returncode == 0, run.stderr[-3000:]

    again = _cli("jlora-generate", "--model", merged, "--adapter", adapter, "--prompt", "w1 w2", "--max-new-tokens", 2)
    err = again.stderr.strip()
    assert again.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith("jlora-generate: error:") and str(adapter) in err and "merged" in err, err
    fine = _cli("jlora-generate", "--model", base, "--adapter", adapter, "--prompt", "w1 w2", "--max-new-tokens", 2)
    assert fine.returncode == 0, fine.stderr[-3000:]


def test_sharded_and_host_arrays_give_one_fingerprint():
    params = _random_params()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    placed = jax.tree.map(
        lambda x: jax.device_put(
            x,
            NamedSharding(mesh, P(*("fsdp", "tensor")[: x.ndim]))
            if x.ndim and x.shape[0] % 4 == 0
            else NamedSharding(mesh, P()),
        ),
        params,
    )
    as_bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)  # one checkpoint loaded as bf16
    host = fp.fingerprint(params)
    assert host == fp.fingerprint(placed) == fp.fingerprint(as_bf16)
    assert set(host["samples"]) == set(host["shapes"])  # every tensor is sampled
    nudged = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 1.01}}
    assert fp.mismatch(host, nudged) == [("lm_head.kernel", "sample")]


def test_the_sample_gather_stays_small_on_a_sharded_tensor():
    """A 256 MiB tensor over 8 devices: the compiled gather moves and keeps only its few KiB of sample."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    big = {
        "w": jax.ShapeDtypeStruct(
            (4, 4096, 8192), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp", "tensor"))
        )
    }
    mem = fp.sampler(big).lower(big).compile().memory_analysis()
    assert mem.output_size_in_bytes <= 2 * fp.SAMPLE and mem.temp_size_in_bytes < 1 << 20


def test_a_version_1_adapter_still_loads_onto_its_base(tmp_path):
    """Adapters saved before the sampled fingerprint keep working: the norms and embedding rows they
    hashed are still checked (so a merged base is not caught for them)."""
    params = _random_params()
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj",))
    _, trainable = jlora.split(params, lcfg, jax.random.key(0))
    save_adapter(tmp_path / "a", trainable, lcfg, base=CFG, params=params)
    meta_file = tmp_path / "a" / "metadata" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["base"]["fingerprint"] = fp._fingerprint_v1(params)  # what the previous jlora wrote
    meta.pop("metadata_sha256", None)  # ... before metadata was sealed by checksums
    meta_file.write_text(json.dumps(meta))
    load_adapter(tmp_path / "a", base=CFG, params=params)
    other = {**params, "norm": {"weight": params["norm"]["weight"] * 1.5}}
    with pytest.raises(metadata.AdapterError, match="weight norm.weight differs"):
        load_adapter(tmp_path / "a", base=CFG, params=other)
