"""jlora-train with a preference objective (issue 24): TRL's metric names in metrics.jsonl, the zero-init start
at ln 2, precomputed reference log-probs (equal losses, a cache reused on resume and refused for other data),
resume continuing the pair stream, the (2, 2, 2) mesh, --plan without the reference forward, one-line errors."""

import json
import math
import random

import jax
import numpy as np
import pytest
from test_preference import METRICS

from jlora.cli.train import main as train_main
from jlora.parallel import hlo_stats
from jlora.parallel.sharding import make_mesh
from jlora.train import config as C
from jlora.train import loop
from jlora.train.examples import DataError
from jlora.train.loop import train
from jlora.train.plan import compile_step
from jlora.train.step import Objective

TRL_NAMES = METRICS  # TRL's metric names
STEPS = 4


def _write_pairs(path, n: int, seed: int) -> None:
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(1, 50), r.randint(1, 50)
            wrong = a + b + r.randint(1, 9)
            f.write(json.dumps({"prompt": f"What is {a}+{b}? ", "chosen": f"{a + b}.", "rejected": f"{wrong}."}) + "\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    _write_pairs(d / "train.jsonl", 40, 0)
    _write_pairs(d / "val.jsonl", 6, 1)  # 6 pairs in batches of 4: the last one is half padding
    return d


def _run(files, out, *sets, resume=None, train_file=None):
    raw = {
        "model": {"path": "tiny"},
        "data": {"train": str(train_file or files / "train.jsonl"), "val": str(files / "val.jsonl"), "max_seq_len": 32},
        "objective": "dpo",
        "train": {
            "global_batch": 8,
            "micro_batch": 4,  # 2 micro-batches of 4 pairs (8 rows) per step
            "steps": STEPS,
            "log_interval": 1,
            "eval_interval": STEPS,
            "eval_batches": 0,
        },
        "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-4},
        "mesh": {"data": 1},
        "checkpoint": {"interval": 2},
        "output_dir": str(out),
    }
    with pytest.MonkeyPatch.context() as mp:  # the mesh's own devices, not all 8 of conftest's
        mp.setattr(loop, "make_mesh", lambda *sizes: make_mesh(*sizes, devices=jax.devices()[: math.prod(sizes)]))
        return train(C.from_dict(raw, sets), resume=resume, quiet=True)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """A 4-step DPO run on one device, the reference run in the step."""
    out = tmp_path_factory.mktemp("straight")
    summary = _run(files, out)
    return summary, _rows(out)


def test_dpo_run_logs_trl_metrics_from_ln2(straight):
    summary, rows = straight
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert all(set(TRL_NAMES) <= set(r) for r in train_rows)
    first = train_rows[0]  # zero-init B: the policy is the reference, so every reward is 0 and the loss ln 2
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert all(abs(first[k]) < 1e-6 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert train_rows[-1]["loss"] < math.log(2)  # it learns: lr 1e-2 on 40 pairs
    assert summary["reference"] == "in the step"
    (val,) = [r for r in rows if "val_loss" in r]
    assert val["val_pairs"] == 6  # the padding pairs of the last val batch count for nothing
    assert all(f"val_{k}" in val for k in TRL_NAMES) and 0 <= val["val_rewards/accuracies"] <= 1


def test_precomputed_reference_equals_in_step_is_cached_on_resume_and_refused_for_other_data(files, straight, tmp_path):
    """Stopped after 2 steps and resumed to 4, the precomputed run's losses equal the straight in-step run's:
    the same reference log-probs in the same pair order, and the resume continues the pair stream."""
    want = {r["step"]: r["loss"] for r in straight[1] if "loss" in r}
    data = tmp_path / "train.jsonl"
    data.write_bytes((files / "train.jsonl").read_bytes())
    out = tmp_path / "pre"
    pre = ("preference.precompute_reference=true", "train.eval_interval=0")
    first = _run(files, out, *pre, f"train.steps={STEPS // 2}", train_file=data)
    assert first["reference"] == "computed" and (out / "reference_logps.npy").is_file()
    again = _run(files, out, *pre, resume=True, train_file=data)
    assert again["reference"] == "cached" and again["start_step"] == STEPS // 2
    got = {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=0, atol=1e-6)

    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # the same pairs, in another order
    with pytest.raises(DataError) as e:
        _run(files, out, *pre, f"train.steps={STEPS + 2}", resume=True, train_file=data)
    msg = str(e.value)
    assert "\n" not in msg and "reference_logps.npy" in msg and "data.train" in msg and "--overwrite" in msg


def test_mesh_222_equals_one_device(files, straight, tmp_path):
    """Pairs sharded over data x fsdp = 4 devices (2 micro-batches of 4 pairs: one pair per device), the model over
    tensor; the reference log-probs precomputed on the mesh and fed as a batch key."""
    want = [r["loss"] for r in straight[1] if "loss" in r][:2]
    mesh = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    _run(files, tmp_path / "m", *mesh, "preference.precompute_reference=true", "train.steps=2", "train.eval_interval=0")
    got = [r["loss"] for r in _rows(tmp_path / "m") if "loss" in r]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_plan_counts_the_reference_forward():
    """--plan compiles the real step: the in-step reference is one more forward than a precomputed one."""
    raw = {
        "model": {"path": "tiny"},
        "data": {"train": "x.jsonl", "max_seq_len": 32},
        "objective": "dpo",
        "train": {"global_batch": 8, "micro_batch": 8},
        "mesh": {"data": 8},
    }
    flops = {}
    for pre in ("false", "true"):
        compiled = compile_step(C.from_dict(raw, [f"preference.precompute_reference={pre}"]))[0]
        flops[pre] = hlo_stats.analyze(compiled.as_text()).dot_flops
    # forward + backward is ~3 forwards; the reference adds a fourth
    assert 1.2 < flops["false"] / flops["true"] < 1.5


def test_the_reference_is_no_second_copy_of_the_base():
    """The compiled DPO step's argument bytes (memory_analysis, per device) are the SFT step's plus the rejected
    half of the batch and nothing else: the reference reads the same frozen tree, it brings no weights of its own.
    8 pairs on 8 devices: each device holds 1 more row of 32 positions in each of the 5 batch arrays (4 bytes)."""
    raw = {
        "model": {"path": "tiny"},
        "data": {"train": "x.jsonl", "max_seq_len": 32},
        "train": {"global_batch": 8, "micro_batch": 8},
        "mesh": {"data": 8},
    }
    sft = compile_step(C.from_dict(raw))[0].memory_analysis()
    dpo_run = C.from_dict({**raw, "objective": "dpo"})
    dpo = compile_step(dpo_run)[0].memory_analysis()
    keys = Objective.of_run(dpo_run).batch_keys
    assert len(keys) == 5 and keys == Objective.of_run(C.from_dict(raw)).batch_keys
    rejected_half = 1 * 32 * 4 * len(keys)
    assert dpo.argument_size_in_bytes - sft.argument_size_in_bytes == rejected_half
    assert sft.argument_size_in_bytes > 100 * rejected_half  # a copy of the tiny base would be far more
    # a run from a saved adapter brings one more argument, that adapter's copy, and the count sees exactly it
    compiled, state, _, optimizer = compile_step(C.from_dict({**raw, "objective": "dpo", "init_adapter": "sft"}))
    tsh = state.shardings(optimizer)[1]
    adapter = sum(
        math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
        for x, sh in zip(jax.tree.leaves(state.reference), jax.tree.leaves(tsh))
    )
    assert 0 < adapter and compiled.memory_analysis().argument_size_in_bytes - dpo.argument_size_in_bytes == adapter


@pytest.mark.parametrize(
    "sets, line",
    [
        (["objective=dpx"], "objective: must be one of 'sft' | 'dpo' | 'ipo' | 'orpo', got 'dpx'"),
        (["objective=dpo", "preference.beta=0"], "preference.beta: must be > 0, got 0.0"),
        (["objective=ipo", "preference.label_smoothing=0.1"], "preference.label_smoothing: is DPO's (cDPO)"),
        (["objective=dpo", "preference.label_smoothing=0.5"], "preference.label_smoothing: must be in [0, 0.5)"),
        (["objective=dpo", "preference.max_prompt_len=300"], "preference.max_prompt_len: must be in [1, data.max"),
        (["objective=dpo", "preference.max_prompt_len=0"], "preference.max_prompt_len: must be >= 1"),
        (["preference.beta=0.2"], "preference: is for objective: dpo | ipo | orpo, but this run has objective: sft"),
        (["objective=dpo", "preference.bta=1"], "unknown key 'preference.bta' (did you mean 'preference.beta'?)"),
        (["objective=dpo", "data.packing=true"], "data.packing: packs SFT examples"),
        (["objective=orpo", "preference.precompute_reference=true"], "preference.precompute_reference: ORPO has"),
        (["objective=dpo", "lora.train_extra=^norm\\."], "lora.train_extra: trains base parameters in full"),
    ],
)
def test_bad_preference_settings_are_one_line(sets, line, capsys):
    argv = [
        "--config",
        "configs/tiny-cpu.yaml",
        *[a for s in sets for a in ("--set", s)],
        "--set",
        "output_dir=/nonexistent/x",
    ]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err


@pytest.mark.parametrize(
    "sets",
    [
        ["method=llama_adapter", "adapter.layers=1", "adapter.len=4"],
        ["model.quantize=nf4"],
        ["lora.train_extra=^norm\\.", "preference.precompute_reference=true"],
    ],
    ids=["llama_adapter", "qlora_nf4", "train_extra_precomputed"],
)
def test_llama_adapter_and_qlora_runs_start_at_ln2_and_learn(files, sets, tmp_path):
    """The reference is the base with the adapter off: a zero gate (LLaMA-Adapter) or zero B over the packed
    blocks (QLoRA) makes the policy the reference at step 1; later steps move away from it. A parameter trained
    in full is the base's only before the first update: its reference is precomputed then."""
    summary = _run(files, tmp_path / "r", *sets, "train.steps=3", "train.eval_interval=0", "optim.lr=5e-2")
    assert abs(summary["losses"][0] - math.log(2)) < 1e-6
    rows = [r for r in _rows(tmp_path / "r") if "loss" in r]
    assert (
        rows[0]["grad_norm"] > 0 and rows[-1]["rewards/margins"] != 0 and summary["losses"][-1] != summary["losses"][0]
    )


def test_public_make_train_step_accumulates_whole_pairs_to_the_full_batch_mean():
    """jlora.make_train_step(objective="dpo") on plain batches: 2 micro-batches of 4 pairs give the loss, the
    metrics and (through SGD at lr 1) the gradients of preference_loss over all 8 pairs at once."""
    import jax.numpy as jnp
    import optax
    from lora_testing import randomize

    import jlora
    from jlora.models.llama import PRESETS

    cfg = PRESETS["tiny"]
    frozen, trainable = jlora.split(
        jlora.init_params(cfg, jax.random.key(0)), jlora.LoraConfig(rank=4, alpha=8.0), jax.random.key(1)
    )
    trainable = randomize(trainable, seed=3)  # B != 0: the policy is not the reference
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (16, 17)).astype(np.int32)
    mask = np.zeros((16, 16), np.float32)
    mask[:, 6:] = 1.0  # a 6-token prompt, then the response
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}
    model = jlora.Llama(cfg)
    fast = {"xla_backend_optimization_level": 0}  # LLVM -O0: the same numbers, half the compile time
    (want, want_m), grads = jax.jit(
        jax.value_and_grad(lambda t: jlora.preference_loss(model, frozen, t, batch, "dpo"), has_aux=True),
        compiler_options=fast,
    )(trainable)
    step = jlora.make_train_step(model, optax.sgd(1.0), compiler_options=fast, objective="dpo")
    micro = jax.tree.map(lambda x: x.reshape(2, 8, *x.shape[1:]), batch)  # rows 0-7 and 8-15: whole pairs
    before = jax.device_get(trainable)
    new, _, m = step(frozen, jax.tree.map(jnp.array, trainable), optax.sgd(1.0).init(trainable), micro)
    assert abs(float(m["loss"]) - float(want)) < 1e-6
    for k, v in want_m.items():
        assert abs(float(m[k]) - float(v)) < 1e-5, k
    got = jax.tree.map(lambda b, a: np.asarray(b) - np.asarray(a), before, jax.device_get(new))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-6, rtol=1e-4)


def test_dpo_from_a_trained_adapter_has_it_as_reference(files, straight, tmp_path):
    """init_adapter: the run starts from the straight run's adapter (B != 0) and that adapter is the reference,
    so step 1 is at ln 2 with zero rewards again, while its log-probs are the adapter's, not the base's. The
    precomputed reference (cached with the adapter's hash) gives the same losses as the in-step one."""
    adapter = straight[0]["adapter_dir"]
    base_first = [r for r in straight[1] if "loss" in r][0]
    losses = {}
    for pre in ("false", "true"):
        out = tmp_path / pre
        sets = (f"init_adapter={adapter}", f"preference.precompute_reference={pre}", "train.steps=2")
        summary = _run(files, out, *sets, "train.eval_interval=2")
        first = [r for r in _rows(out) if "loss" in r][0]
        assert abs(first["loss"] - math.log(2)) < 1e-6
        assert all(abs(first[k]) < 1e-6 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
        assert abs(first["logps/chosen"] - base_first["logps/chosen"]) > 1e-3  # the policy is not the base
        losses[pre] = summary["losses"]
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=0, atol=1e-6)
    assert losses["false"][1] != losses["false"][0]
    key = json.loads((tmp_path / "true" / "reference_logps.json").read_text())
    assert key["init_adapter"] and len(key["init_adapter"]) == 64


def test_start_from_adapter_places_two_copies_and_refuses_another_rank(straight, tmp_path):
    """The loaded adapter replaces the fresh tree leaf for leaf (shardings and dtypes kept), and the reference
    is its own copy: donating the trainable tree (as the step does) leaves it intact. An adapter of another
    rank is refused in one line that names it."""
    from jlora.checkpoint.adapter import AdapterError, load_adapter, read_adapter_metadata
    from jlora.models.family import config_from_hf, init_params
    from jlora.peft.lora import LoraConfig
    from jlora.train.builders import start_from_adapter
    from jlora.train.step import split_for_training

    adapter = straight[0]["adapter_dir"]
    lcfg, saved = load_adapter(adapter)
    cfg = config_from_hf(read_adapter_metadata(adapter)["base"]["config"])
    params = init_params(cfg, jax.random.key(0))
    fresh = split_for_training(params, jax.random.key(1), lcfg)[1]
    trainable, reference = start_from_adapter(adapter, fresh, cfg, lcfg, None)
    for got, want in zip(jax.tree.leaves(trainable), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(trainable)
    for got, want in zip(jax.tree.leaves(reference), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    other = LoraConfig(rank=lcfg.rank * 2, alpha=lcfg.alpha, targets=lcfg.targets)
    with pytest.raises(AdapterError) as e:
        start_from_adapter(adapter, split_for_training(params, jax.random.key(1), other)[1], cfg, other, None)
    assert "\n" not in str(e.value) and str(adapter) in str(e.value) and "rank" in str(e.value)


def _as_peft(adapter, out):
    """The jlora adapter in `adapter` exported as an HF PEFT adapter dir `out`; (cfg, lcfg) of it."""
    from jlora.checkpoint.adapter import load_adapter, read_adapter_metadata
    from jlora.formats.peft_adapter import export_peft
    from jlora.models.family import config_from_hf

    lcfg, saved = load_adapter(adapter)
    cfg = config_from_hf(read_adapter_metadata(adapter)["base"]["config"])
    export_peft(out, saved, lcfg, cfg)
    return cfg, lcfg


def test_dpo_from_a_peft_adapter_equals_dpo_from_the_jlora_adapter_it_was_exported_from(files, straight, tmp_path):
    """init_adapter takes an HF PEFT dir as well (an SFT adapter trained with PEFT): the straight run's adapter
    exported to PEFT gives the same DPO losses as the jlora adapter itself, and its reference cache key is
    the PEFT files' hash."""
    adapter = straight[0]["adapter_dir"]
    _as_peft(adapter, tmp_path / "peft")
    losses = {}
    for name, start in (("jlora", adapter), ("peft", tmp_path / "peft")):
        sets = (f"init_adapter={start}", "preference.precompute_reference=true", "train.steps=2")
        losses[name] = _run(files, tmp_path / name, *sets, "train.eval_interval=0")["losses"]
    np.testing.assert_allclose(losses["peft"], losses["jlora"], rtol=0, atol=1e-6)
    keys = [json.loads((tmp_path / n / "reference_logps.json").read_text())["init_adapter"] for n in losses]
    assert len(keys[1]) == 64 and keys[1] != keys[0]


def test_a_peft_init_adapter_must_adapt_what_the_run_adapts_with_its_scales(straight, tmp_path):
    """A PEFT adapter has no jlora metadata to compare: its imported tree is compared with the run's. One with
    another lora_alpha (so another scale) is refused in one line naming the module and the scales, and so is
    one that does not adapt a module the run adapts; any change to its files changes its content hash."""
    import dataclasses

    from jlora.checkpoint.adapter import AdapterError, adapter_content_sha256
    from jlora.models.family import init_params
    from jlora.train.builders import start_from_adapter
    from jlora.train.step import split_for_training

    peft = tmp_path / "peft"
    cfg, lcfg = _as_peft(straight[0]["adapter_dir"], peft)
    params = init_params(cfg, jax.random.key(0))
    fresh = split_for_training(params, jax.random.key(1), lcfg)[1]
    start_from_adapter(str(peft), fresh, cfg, lcfg, None)  # accepted as exported
    config_file, sha = peft / "adapter_config.json", adapter_content_sha256(peft)
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    assert adapter_content_sha256(peft) != sha  # what a resume compares
    with pytest.raises(AdapterError) as e:
        start_from_adapter(str(peft), fresh, cfg, lcfg, None)
    scale = lcfg.alpha / lcfg.rank
    assert str(e.value) == (
        f"{peft}: layers/self_attn/{lcfg.targets[0]}/kernel has scale {2 * scale:g}, this run's is {scale:g} "
        "(lora.alpha / alpha_pattern / use_rslora)"
    )
    config_file.write_text(json.dumps(config))
    more = dataclasses.replace(lcfg, targets=(*lcfg.targets, "o_proj"))
    with pytest.raises(AdapterError) as e:
        start_from_adapter(str(peft), split_for_training(params, jax.random.key(1), more)[1], cfg, more, None)
    assert str(e.value) == f"{peft}: it does not adapt layers/self_attn/o_proj/kernel, which this run adapts " + (
        "(lora.targets / layers)"
    )


def test_a_missing_init_adapter_is_one_line_before_anything_loads(capsys, tmp_path):
    argv = ["--config", "configs/tiny-cpu.yaml", "--set", f"init_adapter={tmp_path}/nope"]
    assert train_main(argv + ["--set", f"output_dir={tmp_path}/out"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"init_adapter: {tmp_path}/nope: no such adapter directory" in line


def test_a_resume_refuses_a_changed_reference_adapter(files, straight, tmp_path):
    """A DPO run from an adapter, stopped after 1 step, resumes while that adapter is unchanged and is refused
    in one line once another adapter lies at its path (the reference the checkpoint was trained against)."""
    import shutil

    from jlora.checkpoint.metadata import CheckpointError

    start = tmp_path / "start"
    shutil.copytree(straight[0]["adapter_dir"], start)
    out = tmp_path / "run"
    sets = (f"init_adapter={start}", "train.eval_interval=0", "checkpoint.interval=1")
    first = _run(files, out, *sets, "train.steps=1")
    assert _run(files, out, *sets, "train.steps=2", resume=True)["start_step"] == 1
    shutil.rmtree(start)
    shutil.copytree(first["adapter_dir"], start)  # another adapter at the same path
    with pytest.raises(CheckpointError) as e:
        _run(files, out, *sets, "train.steps=3", resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "reference adapter (init_adapter) changed" in msg and str(start) in msg
