"""The train step and loop: sharding invariance, gradient accumulation, the frozen tree, memorisation,
packing, the non-finite guard, two real processes with jax.distributed, and the CLI end to end."""

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jlora.models.llama import PRESETS, Llama
from jlora.parallel.sharding import make_mesh
from jlora.peft.lora import LoraConfig
from jlora.peft.routing import LoraPair
from jlora.train import loss as L
from jlora.train import step as T
from jlora.train.batches import Batches
from jlora.train.config import OptimConfig
from jlora.train.examples import Example

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = PRESETS["tiny"]
LCFG = LoraConfig(rank=4, alpha=8.0, targets="all-linear", train_extra=r"^(norm|lm_head)\.")
B, SEQ = 8, 32
MESHES = [(2, 2, 2), (8, 1, 1), (1, 1, 1)]
# Compile with LLVM -O0: the tiny model's numbers don't change, its compile time halves.
FAST = {"xla_backend_optimization_level": 0}
FAST_XLA = "--xla_backend_optimization_level=0"  # the same, for subprocesses


def _optimizer():
    # eps 1e-4, not 1e-8: Adam's g/(|g|+eps) turns the fp32 reduction-order noise (which differs by
    # mesh) of a near-zero gradient entry into an O(lr) difference of the update
    return T.make_optimizer(OptimConfig(lr=1e-2, schedule="constant", grad_clip=1.0, eps=1e-4), total_steps=100)[0]


def _batch(seed: int = 0, rows: int = B) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, (rows, SEQ + 1)).astype(np.int32)
    mask = (rng.random((rows, SEQ)) > 0.25).astype(np.float32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": mask,
        "positions": np.tile(np.arange(SEQ, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, SEQ), np.int32),
    }


def _mesh(shape):
    return make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])


@pytest.fixture(scope="module")
def init_trees():
    """The initial (frozen, trainable) as host numpy, in split's layout and init style (B = 0). Filled
    by numpy: jitting the random init would cost more compile time than the rest of a test
    (init_state itself runs in the CLI test)."""
    rng = np.random.default_rng(0)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['weight']"):  # RMSNorm scales
            return np.ones(x.shape, x.dtype)
        if name.endswith(".b"):
            return np.zeros(x.shape, x.dtype)
        return (rng.normal(size=x.shape) * (0.1 if name.endswith(".a") else 0.02)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(fill, _tree_shapes())


@pytest.fixture(scope="module")
def runs(init_trees):
    """3 steps on the same batch from the same init, on each mesh:
    {shape: (losses, trainable, state, step, (loss, grad_norm, trainable) after the first step)}."""
    out = {}
    opt = _optimizer()
    for shape in MESHES:
        mesh = _mesh(shape)
        state = T.place_state(*init_trees, mesh, opt)
        step = T.make_train_step(Llama(CFG), opt, state, FAST)
        batch, losses = T.put_batch(_batch(), mesh, 1), []
        for i in range(3):
            state.trainable, state.opt_state, m = step(
                state.frozen, state.trainable, state.opt_state, batch, jax.random.key(i)
            )
            losses.append(float(m["loss"]))
            if i == 0:
                first = (float(m["loss"]), float(m["grad_norm"]), jax.device_get(state.trainable))
        out[shape] = (losses, jax.device_get(state.trainable), state, step, first)
    return out


def test_sharding_does_not_change_the_numbers(runs):
    ref_losses, ref_tree = runs[(1, 1, 1)][:2]
    assert ref_losses[2] < ref_losses[0]
    for shape in MESHES[:2]:
        losses, tree = runs[shape][:2]
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    q = runs[(2, 2, 2)][2].trainable["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


def test_frozen_tree_is_unchanged_and_not_donated(runs, init_trees):
    for shape in MESHES:
        frozen = runs[shape][2].frozen
        for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(init_trees[0])):
            assert not a.is_deleted()
            np.testing.assert_array_equal(np.asarray(a), b)
    q = runs[(2, 2, 2)][2].frozen["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_gradient_accumulation_8x1_equals_1x8(init_trees, runs):
    """8 micro-batches of 1 row in one jitted step (lax.scan) == the fixture's first step on 1 batch of 8."""
    opt, mesh = _optimizer(), _mesh((1, 1, 1))
    state = T.place_state(*init_trees, mesh, opt)
    step = T.make_train_step(Llama(CFG), opt, state, FAST)
    trainable, _, m = step(
        state.frozen, state.trainable, state.opt_state, T.put_batch(_batch(), mesh, B), jax.random.key(0)
    )
    l1, g1, t1 = runs[(1, 1, 1)][4]
    assert abs(float(m["loss"]) - l1) < 1e-5 and abs(float(m["grad_norm"]) - g1) < 1e-5 * max(1.0, g1)
    for a, b in zip(jax.tree.leaves(jax.device_get(trainable)), jax.tree.leaves(t1)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_loss_falls_to_near_zero_on_a_memorisation_set(runs):
    state, step = runs[(1, 1, 1)][2:4]
    batch = T.put_batch(_batch(2), state.mesh, 1)  # 8 random rows: LoRA + the trained lm_head and norm
    for i in range(60):
        state.trainable, state.opt_state, m = step(
            state.frozen, state.trainable, state.opt_state, batch, jax.random.key(i)
        )
    assert float(m["loss"]) < 0.05, float(m["loss"])


def test_nonfinite_step_is_skipped_and_counted(runs):
    state, step = runs[(8, 1, 1)][2:4]
    before = jax.device_get(state.trainable)
    bad = _batch(3)
    bad["loss_mask"][0, 0] = np.nan
    state.trainable, state.opt_state, m = step(
        state.frozen, state.trainable, state.opt_state, T.put_batch(bad, state.mesh, 1), jax.random.key(0)
    )
    assert bool(m["skipped"]) and int(m["nonfinite_run"]) == 1 and int(m["nonfinite_total"]) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state.trainable)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(T.NonFiniteError, match="1 steps in a row had non-finite gradients"):
        T.check_nonfinite(m, max_nonfinite=1, step=4)
    T.check_nonfinite(m, max_nonfinite=2, step=4)
    state.trainable, state.opt_state, m = step(
        state.frozen, state.trainable, state.opt_state, T.put_batch(_batch(3), state.mesh, 1), jax.random.key(0)
    )
    assert not bool(m["skipped"]) and int(m["nonfinite_run"]) == 0 and int(m["nonfinite_total"]) == 1
    assert np.isfinite(float(m["loss"]))


def test_packed_and_unpacked_losses_are_equal(init_trees):
    rng = np.random.default_rng(4)
    examples = []
    for n in (5, 9, 12, 7, 10, 6):
        ids = rng.integers(3, CFG.vocab_size, n).astype(np.int32)
        examples.append(Example(ids, np.arange(n) >= n // 2))  # a "prompt" half that is not trained
    common = dict(seq_len=SEQ, shuffle=False)
    unpacked = next(Batches(examples, global_batch=len(examples), packing=False, **common))
    packer = Batches(examples, global_batch=1, packing=True, **common)
    n_rows = len(packer._layout(0))
    packed = next(Batches(examples, global_batch=n_rows, packing=True, **common))
    assert n_rows < len(examples) and packed["segment_ids"].max() > 1
    packed = {k: np.pad(v, ((0, len(examples) - n_rows), (0, 0))) for k, v in packed.items()}  # same shape: one compile
    state = T.place_state(*init_trees, _mesh((1, 1, 1)), _optimizer())
    eval_step = T.make_eval_step(Llama(CFG), state, FAST)
    (s_u, n_u), (s_p, n_p) = [
        eval_step(state.frozen, state.trainable, T.put_batch(b, state.mesh)) for b in (unpacked, packed)
    ]
    assert float(n_u) == float(n_p) > 0
    np.testing.assert_allclose(float(s_p) / float(n_p), float(s_u) / float(n_u), atol=1e-5, rtol=0)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_cross_entropy_matches_full_logits(softcap):
    """The chunked loss and its gradient equal CE over the full logits, soft-capped as Gemma 2's are."""
    rng, (b, t, d, v) = np.random.default_rng(5), (2, 16, 8, 40)
    h, w = rng.normal(size=(b, t, d)).astype(np.float32), rng.normal(size=(v, d)).astype(np.float32)
    targets, mask = rng.integers(0, v, (b, t)), (rng.random((b, t)) > 0.3).astype(np.float32)
    cap = (lambda x: x) if softcap is None else (lambda x: softcap * jax.numpy.tanh(x / softcap))

    @jax.jit
    def losses_and_grads(h):
        full = lambda h: L.masked_cross_entropy(cap(jax.numpy.einsum("btd,vd->btv", h, w)), targets, mask)[0]
        out = [jax.value_and_grad(full)(h)]
        for tied in (True, False):  # the head as [V, D] (tied embedding) and as [D, V] (lm_head kernel)
            chunked = lambda h: 2 * L.chunked_cross_entropy(h, w if tied else w.T, targets, mask, tied, 4, softcap)
            out.append(jax.value_and_grad(chunked)(h))
        return out

    (ref, g_ref), *rest = losses_and_grads(h)
    for value, grad in rest:
        np.testing.assert_allclose(value, 2 * ref, rtol=1e-6)
        np.testing.assert_allclose(grad, 2 * g_ref, atol=1e-5)
    assert L.ce_chunk_size(4, 256, 49152) == 64 and L.ce_chunk_size(8, 32, 512) == 32


def test_bf16_base_trains_fp32_adapters_through_the_chunked_loss(init_trees):
    """A frozen head (q, v adapted only) takes the chunked-CE path; a bf16 base computes in bf16 while
    the adapters and their gradients stay fp32, and the loss stays close to the fp32 one."""
    frozen = {k: v for k, v in init_trees[0].items()}
    frozen["norm"], frozen["lm_head"] = init_trees[1]["norm"], init_trees[1]["lm_head"]
    trainable = {"layers": {"self_attn": {m: init_trees[1]["layers"]["self_attn"][m] for m in ("q_proj", "v_proj")}}}
    batch = {k: jax.numpy.asarray(v) for k, v in _batch(6).items()}
    bf16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    frozen16 = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), frozen)

    @functools.partial(jax.jit, compiler_options=FAST)
    def both(t):
        def mean_loss(model, f, t):
            s, n = L.loss_terms(model, f, t, batch, ce_chunk=8)  # 4 chunks of the 32 positions
            return s / n

        return (
            jax.value_and_grad(lambda t: mean_loss(Llama(CFG), frozen, t))(t),
            jax.value_and_grad(lambda t: mean_loss(Llama(bf16), frozen16, t))(t),
        )

    (l32, g32), (l16, g16) = both(trainable)
    assert abs(float(l16) - float(l32)) < 0.05 * float(l32)
    for x in jax.tree.leaves(g16):
        assert x.dtype == np.float32 and np.isfinite(np.asarray(x)).all()


# bf16 keeps 8 significant bits (a relative rounding of up to 2^-9 per value), and every matmul input
# and activation of the tiny model's two layers is rounded. Measured: 0.7-1.6% of each leaf's norm
# (cosine > 0.9998). 3% leaves room for another XLA version's fusion order, and a wrong bf16 path
# (a scale dropped, a cast in the wrong place) misses by an order of magnitude or more.
BF16_GRAD_RTOL = 0.03


def test_bf16_adapter_gradients_match_fp32_within_tolerance(init_trees):
    """The adapters' gradients with a bf16 base and bf16 compute (model.dtype = param_dtype = bfloat16,
    as jlora.train.step trains it) against the same gradients in fp32: per leaf, the relative error in
    norm stays under BF16_GRAD_RTOL and the direction agrees (cosine > 0.999)."""
    frozen, trainable = init_trees
    rng = np.random.default_rng(3)
    is_pair = lambda x: isinstance(x, LoraPair)
    trainable = jax.tree.map(
        lambda x: x.replace(b=(rng.normal(size=x.b.shape) * 0.05).astype(np.float32)) if is_pair(x) else x,
        trainable,
        is_leaf=is_pair,
    )  # B = 0 would zero A's gradient
    batch = {k: jax.numpy.asarray(v) for k, v in _batch(7).items()}
    bf16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    frozen16 = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), frozen)

    @functools.partial(jax.jit, compiler_options=FAST)
    def grads(t):
        def mean_loss(model, f, t):
            s, n = L.loss_terms(model, f, t, batch)
            return s / n

        return jax.grad(lambda t: mean_loss(Llama(CFG), frozen, t))(t), jax.grad(
            lambda t: mean_loss(Llama(bf16), frozen16, t)
        )(t)

    g32, g16 = grads(trainable)
    flat32 = jax.tree_util.tree_flatten_with_path(g32)[0]
    flat16 = jax.tree.leaves(g16)
    assert len(flat32) == len(flat16) and any(".a" in jax.tree_util.keystr(p) for p, _ in flat32)
    for (path, a), b in zip(flat32, flat16):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        assert np.linalg.norm(a) > 0, jax.tree_util.keystr(path)
        rel = np.linalg.norm(b - a) / np.linalg.norm(a)
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert rel < BF16_GRAD_RTOL and cos > 0.999, (jax.tree_util.keystr(path), rel, cos)


WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
from jlora.train.loop import init_distributed
assert init_distributed(True) and jax.process_count() == 2 and jax.device_count() == 8
import numpy as np
sys.path.insert(0, sys.argv[2])
import test_trainer as tt
from jlora.train import step as T
from jlora.models.llama import Llama
trees = np.load(sys.argv[1])
leaves = [trees[f"a{i}"] for i in range(len(trees.files))]
frozen, trainable = jax.tree.unflatten(jax.tree.structure(tt._tree_shapes()), leaves)
opt, mesh = tt._optimizer(), tt._mesh((8, 1, 1))
state = T.place_state(frozen, trainable, mesh, opt)
step = T.make_train_step(Llama(tt.CFG), opt, state, tt.FAST)
p, local = jax.process_index(), tt.B // 2
batch = T.put_batch({k: v[p * local:(p + 1) * local] for k, v in tt._batch().items()}, mesh, 1)
losses = []
for i in range(3):
    state.trainable, state.opt_state, m = step(state.frozen, state.trainable, state.opt_state, batch, jax.random.key(i))
    losses.append(float(m["loss"]))
print("LOSSES " + json.dumps(losses), flush=True)
"""


def _tree_shapes():
    from jlora import split
    from jlora.models.family import param_shapes

    return jax.eval_shape(lambda p: split(p, LCFG, jax.random.key(1)), param_shapes(CFG))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA, PYTHONPATH=str(ROOT), **extra)
    return env


def run_two_processes(args: list[str]) -> list[str]:
    """`python *args` as processes 0 and 1 of a jax.distributed job on localhost; each one's output."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        finally:
            p.kill()
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def test_two_processes_give_the_same_loss_as_one(runs, init_trees, tmp_path):
    leaves = jax.tree.leaves(init_trees)
    np.savez(tmp_path / "trees.npz", **{f"a{i}": x for i, x in enumerate(leaves)})
    outs = [
        json.loads(out.split("LOSSES ")[1].splitlines()[0])
        for out in run_two_processes(["-c", WORKER, str(tmp_path / "trees.npz"), str(ROOT / "tests")])
    ]
    assert outs[0] == outs[1]
    np.testing.assert_allclose(outs[0], runs[(8, 1, 1)][0], atol=1e-5, rtol=0)


def test_cli_runs_end_to_end(tmp_path):
    exe = pathlib.Path(sys.executable).with_name("jlora-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, str(ROOT / "train" / "finetune.py")]
    out_dir = tmp_path / "run"
    sets = [
        f"output_dir={out_dir}",
        "train.steps=2",
        "train.eval_interval=2",
        "train.log_interval=1",
        "checkpoint.interval=0",
        "data.max_seq_len=192",
        "train.global_batch=8",
        "train.micro_batch=4",
    ]
    proc = subprocess.run(
        [*cmd, "--config", "configs/tiny-cpu.yaml", *[x for s in sets for x in ("--set", s)]],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params" in proc.stdout and "tokens/step: 1,536" in proc.stdout
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "skipped"} <= set(train_rows[-1])
    assert any("val_loss" in r for r in rows)
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (out_dir / "adapter" / "metadata").is_dir()


def test_cli_bad_override_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "finetune.py"),
            "--config",
            "configs/tiny-cpu.yaml",
            "--set",
            "optim.lr=-1",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["jlora-train: error: configs/tiny-cpu.yaml: optim.lr: must be > 0"]


def test_ce_chunks_are_sized_from_the_rows_one_device_holds():
    """8 rows over fsdp=8 is one row per device: chunks of 128 positions of a 128256 vocab stay under
    CE_CHUNK_ELEMENTS per device; sized from all 8 rows they would be 8x shorter."""
    from jlora.parallel.sharding import activation_sharding

    assert L.device_ce_chunk(8, 2048, 128256) == 16  # no mesh: the whole batch on one device
    with activation_sharding(make_mesh(1, 8, 1)):
        assert L.device_ce_chunk(8, 2048, 128256) == 128
    with activation_sharding(make_mesh(1, 4, 2)):  # 2 rows each, the vocab split over tensor=2
        assert L.device_ce_chunk(8, 2048, 128256) == 128
