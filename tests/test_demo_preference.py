"""The DPO demo (`jlora-demo --config smollm2-135m-demo-dpo`) end to end on a tiny random model and the shipped
demo pairs: an SFT run's adapter as the starting point, preference accuracy and exact match before / after,
the result file. Preference accuracy is checked against log-probs summed from plain `jlora.apply` logits."""

import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np

import jlora
from jlora.checkpoint.adapter import load_adapter
from jlora.peft.placement import shard_trainable
from jlora.train import demo
from jlora.train.builders import load_tok
from jlora.train.config import load
from jlora.train.demo_preference import held_out_pairs, preference_accuracy, run_preference_demo, start_point
from jlora.train.loop import train
from jlora.train.preference_data import collate_pairs

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "demo"
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")


def _sets(data, out, *more):
    return [
        f"data.val={data / 'val.jsonl'}",
        "data.val_fraction=0",
        "data.format=chat",
        "data.max_seq_len=256",
        "train.global_batch=8",
        "train.micro_batch=8",
        "train.steps=2",
        "train.eval_interval=0",
        "train.log_interval=1",
        f"output_dir={out}",
        *more,
    ]


def test_shipped_pairs_are_what_the_script_writes_and_each_prefers_the_answer(tmp_path):
    shutil.copy(DEMO_DATA / "make.py", tmp_path / "make.py")
    demo.ensure_data(load(TINY, [f"data.train={tmp_path / 'train_pairs.jsonl'}"]), say=lambda *a: None)
    for name in ("train_pairs.jsonl", "val_pairs.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO_DATA / name).read_bytes()
    chats = [json.loads(ln) for ln in (DEMO_DATA / "val.jsonl").read_text().splitlines()]
    pairs = [json.loads(ln) for ln in (DEMO_DATA / "val_pairs.jsonl").read_text().splitlines()]
    make = demo_make_module()
    kinds = set()
    for chat, pair in zip(chats, pairs, strict=True):
        assert pair["prompt"] == chat["messages"][:2] and pair["chosen"] == chat["messages"][2:]
        good, bad = json.loads(pair["chosen"][0]["content"]), json.loads(pair["rejected"][0]["content"])
        (wrong,) = [k for k in good if good[k] != bad[k]]  # exactly one mistake per rejected answer
        kinds.add(wrong)
        sentence = chat["messages"][1]["content"]
        if wrong == "city":  # the home town the sentence also names
            assert bad["city"] in sentence
        else:  # the job guessed from the work described
            assert bad["job"] == make.JOB_GUESSES[good["job"]]
    assert kinds == {"city", "job"}


def demo_make_module():
    spec = importlib.util.spec_from_file_location("demo_make", DEMO_DATA / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dpo_demo_end_to_end_on_tiny_model(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DEMO_DATA / "make.py", data / "make.py")  # the demo writes missing data with it
    sft = load(TINY, _sets(data, tmp_path / "sft", f"data.train={data / 'train.jsonl'}"))
    demo.ensure_data(sft, say=lambda *a: None)
    adapter = train(sft, quiet=True)["adapter_dir"]

    dpo_sets = _sets(
        data,
        tmp_path / "dpo",
        f"data.train={data / 'train_pairs.jsonl'}",
        f"data.val={data / 'val_pairs.jsonl'}",
        "data.packing=false",
        "objective=dpo",
        f"init_adapter={adapter}",
    )
    run = load(TINY, dpo_sets)
    tok = load_tok(run)
    pairs = held_out_pairs(run, tok, 4)
    # generation starts where the SFT run's evaluation does, up to the BOS that SFT's chat encoding adds when a
    # template writes none (the tiny tokenizer's; SmolLM2's and Gemma's write their own) and TRL's DPO does not
    sft_prompts = [it.prompt_ids for it in demo.eval_items(sft, tok, 4)]
    assert [[tok.bos_id, *p.item.prompt_ids] for p in pairs] == sft_prompts
    lines = []
    result = run_preference_demo(run, eval_limit=4, say=lambda *a: lines.append(" ".join(map(str, a))))

    assert result["before"]["model"] == "SFT adapter" and result["before"]["adapter"] == adapter
    for side in ("before", "after"):
        assert 0.0 <= result[side]["accuracy"] <= 1.0 and 0.0 <= result[side]["preference_accuracy"] <= 1.0
    assert result["n_eval"] == 4 and result["objective"] == "dpo" and result["train_steps"] == 2
    assert {"rewards/margins", "logps/chosen"} <= set(result["last_logged_step"])
    saved = json.loads((tmp_path / "dpo" / "demo_results.json").read_text())
    assert saved["after"] == result["after"] and all(saved[k] for k in ("commit", "date", "machine"))
    assert (tmp_path / "dpo" / "peft" / "adapter_model.safetensors").is_file()
    assert "preference accuracy" in "\n".join(lines)

    # preference accuracy, against log-probs summed from plain logits, for the adapter the demo trained
    cfg, model, base = demo.load_base_state(run, tok)
    tuned = shard_trainable(load_adapter(result["adapter_dir"], base=cfg)[1], base.mesh)
    seq = max(len(p.pair.prompt) + max(len(p.pair.chosen), len(p.pair.rejected)) - 1 for p in pairs)
    rows = collate_pairs([p.pair for p in pairs], seq, 0)
    logits = jlora.apply(model, base.frozen, tuned, rows["input_ids"], rows["positions"], rows["segment_ids"])
    logps = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    per_row = (np.take_along_axis(logps, rows["targets"][..., None], -1)[..., 0] * rows["loss_mask"]).sum(-1)
    want = float(np.mean(per_row[0::2] > per_row[1::2]))
    assert (
        preference_accuracy(model, base.frozen, tuned, pairs, batch=3) == want == result["after"]["preference_accuracy"]
    )


def test_without_the_sft_adapter_the_demo_starts_from_the_base(tmp_path):
    lines = []
    run = start_point(load(TINY, [f"init_adapter={tmp_path / 'none'}"]), say=lines.append)
    assert run.init_adapter is None and "starting from the base model" in lines[0]
