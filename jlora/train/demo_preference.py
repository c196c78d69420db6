"""`jlora-demo` with a preference objective (configs/smollm2-135m-demo-dpo.yaml): DPO on the demo task.

The run starts from the SFT demo's adapter (the config's init_adapter, written by a plain `jlora-demo`), or
from the base model when that adapter is not there. Chosen answers are the task's correct JSON, rejected
ones the SFT adapter's kind of mistake (data/demo/make.py). Before and after the run, on the held-out pairs: the
preference accuracy (how often the model gives the chosen answer a higher log-prob than the rejected one)
and the exact-match accuracy of greedy generations, i.e. the starting adapter (SFT only) against the DPO
one. Training, generation and scoring are the library's own functions (jlora.train.loop, jlora.train.demo's
`score`); this module strings them together and writes demo_results.json, which bench/report.py files as
docs/results/demo_dpo.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jlora.checkpoint.adapter import load_any_adapter
from jlora.formats.model_aliases import hub_name
from jlora.formats.peft_adapter import export_peft
from jlora.peft.lora import count_params
from jlora.peft.placement import shard_trainable
from jlora.train.builders import load_tok, method_config
from jlora.train.config import RunConfig
from jlora.train.config_files import check_inputs
from jlora.train.data import DataError
from jlora.train.demo import (
    EvalItem,
    answers_match,
    ensure_data,
    ensure_model,
    load_base_state,
    peak_rss_bytes,
    score,
)
from jlora.train.loop import train
from jlora.train.preemption import StopSignals
from jlora.train.preference import sequence_logps, token_logps
from jlora.train.preference_data import PreferencePair, check_pair, collate_pairs, encode_pair, read_items
from jlora.train.provenance import load_average, provenance


@dataclasses.dataclass
class HeldOutPair:
    """A held-out pair: the question as generation sees it (EvalItem, its reference the chosen answer), the
    rejected answer's text, and the tokenized pair scored for preference accuracy."""

    item: EvalItem
    rejected: str
    pair: PreferencePair


def _text(turns) -> str:
    """A response's text: a string, or the content of its one message (TRL's conversational form)."""
    return turns if isinstance(turns, str) else " ".join(m["content"] for m in turns)


def held_out_pairs(run: RunConfig, tok, limit: int | None) -> list[HeldOutPair]:
    """The first `limit` pairs of data.val, tokenized as training tokenizes them (jlora.train.preference_data)
    and untruncated: generation starts from the same prompt ids the run trains on."""
    if not run.data.val:
        raise DataError(f"{run.data.train}: the preference demo scores held-out pairs: set data.val")
    out = []
    for where, obj in read_items(run.data.val):
        if limit is not None and len(out) >= limit:
            break
        if isinstance(obj, Exception):
            raise DataError(f"{where}: invalid JSON: {obj}")
        rec = check_pair(where, obj)
        pair = encode_pair(rec, tok, where)
        prompt = rec["prompt"]
        question = _text(prompt[-1:] if isinstance(prompt, list) else prompt)
        item = EvalItem(question, list(pair.prompt), _text(rec["chosen"]).strip())
        out.append(HeldOutPair(item, _text(rec["rejected"]).strip(), pair))
    return out


def start_point(run: RunConfig, say=print) -> RunConfig:
    """`run`, starting from the base model (init_adapter dropped, said in one line) when its init_adapter, the
    SFT demo's adapter, is not there: the demo runs either way."""
    if not run.init_adapter or pathlib.Path(run.init_adapter).is_dir():
        return run
    say(
        f"{run.init_adapter} is not there (run `jlora-demo` first to start from its SFT adapter): "
        "starting from the base model"
    )
    return dataclasses.replace(run, init_adapter=None)


def preference_accuracy(model, frozen, trainable, pairs: list[HeldOutPair], batch: int = 8) -> float:
    """The share of `pairs` whose chosen response has the higher summed log-prob under frozen + trainable."""
    seq = max(len(p.pair.prompt) + max(len(p.pair.chosen), len(p.pair.rejected)) - 1 for p in pairs)
    fn = jax.jit(lambda f, t, b: sequence_logps(token_logps(model, f, t, b), b["loss_mask"]))
    wins = []
    for i in tqdm(range(0, len(pairs), batch), desc="preference accuracy", unit="batch", dynamic_ncols=True):
        chunk = [p.pair for p in pairs[i : i + batch]]
        rows = collate_pairs(chunk + [None] * (batch - len(chunk)), seq, 0)  # one compiled shape
        logps = np.asarray(fn(frozen, trainable or {}, rows)).reshape(-1, 2)[: len(chunk)]
        wins += list(logps[:, 0] > logps[:, 1])
    return float(np.mean(wins))


def run_preference_demo(
    run: RunConfig, *, eval_limit: int | None, show: int = 3, say=print, command: str = "jlora-demo"
) -> dict[str, Any]:
    """The DPO demo for `run` (objective dpo | ipo | orpo); returns and writes its results (demo_results.json).
    SIGTERM or SIGINT stop it as they stop jlora-train; running `command` again resumes."""
    with StopSignals("before training started: nothing to save yet") as stop:
        return _run(run, eval_limit=eval_limit, show=show, say=say, command=command, stop=stop)


def _run(run: RunConfig, *, eval_limit, show, say, command, stop) -> dict[str, Any]:
    t_start = time.perf_counter()
    started = provenance()
    ensure_data(run, say)
    run = start_point(run, say)
    check_inputs(run)
    ensure_model(run, say)
    tok = load_tok(run)
    pairs = held_out_pairs(run, tok, eval_limit)
    items = [p.item for p in pairs]
    start_name = "SFT adapter" if run.init_adapter else "base model"

    say(f"Evaluating the starting point ({start_name}) on {len(pairs)} held-out pairs ...")
    t0 = time.perf_counter()
    cfg, model, base = load_base_state(run, tok)
    start_adapter = None
    if run.init_adapter:  # placed as training places it, beside the base on the run's mesh
        start_adapter = shard_trainable(load_any_adapter(run.init_adapter, cfg, base.frozen)[1], base.mesh)
    before = {"model": start_name, "adapter": run.init_adapter}
    before["preference_accuracy"] = preference_accuracy(model, base.frozen, start_adapter, pairs)
    before["accuracy"], before_out = score(model, base.frozen, start_adapter, items, tok)
    before["eval_s"] = time.perf_counter() - t0
    del base, start_adapter
    say(_line(before, len(pairs)))

    say(f"Preference tuning ({run.objective}, {run.output_dir}) ...")
    t_train = time.perf_counter()
    stop.check()
    summary = train(run)
    stop.what = f"after training: the adapter is saved in {summary['adapter_dir']}"
    train_s = time.perf_counter() - t_train
    state = summary["state"]
    t0 = time.perf_counter()
    after = {"model": f"{start_name} + {run.objective.upper()}", "adapter": summary["adapter_dir"]}
    after["preference_accuracy"] = preference_accuracy(model, state.frozen, state.trainable, pairs)
    after["accuracy"], after_out = score(model, state.frozen, state.trainable, items, tok)
    after["eval_s"] = time.perf_counter() - t0
    say(_line(after, len(pairs)))

    out_dir = pathlib.Path(run.output_dir)
    peft_dir = out_dir / "peft"
    export_peft(
        peft_dir, jax.device_get(state.trainable), method_config(run, cfg), cfg, base_name=hub_name(run.model.path)
    )
    logged = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = next((r for r in reversed(logged) if "loss" in r), {})
    result = {
        "bench": "demo",
        "command": command,
        **started,
        "model": run.model.path,
        "objective": run.objective,
        "beta": run.preference.beta,
        "method": run.method,
        "trainable_params": count_params(state.trainable),
        "peak_rss_bytes": peak_rss_bytes(),
        "n_eval": len(pairs),
        "before": before,
        "after": after,
        "train_s": train_s,
        "train_steps": summary["steps"] - summary["start_step"],
        "train_pairs": summary["steps"] * run.train.global_batch,
        "tokens_per_s": summary.get("tokens_per_s"),
        "last_logged_step": {k: v for k, v in last.items() if k in ("step", "loss") or "/" in k},
        "peft_dir": str(peft_dir),
        "adapter_dir": summary["adapter_dir"],
        "examples": [
            {"question": p.item.question, "chosen": p.item.reference, "rejected": p.rejected, "before": b, "after": a}
            for p, b, a in list(zip(pairs, before_out, after_out))[:show]
        ],
        "wall_s": time.perf_counter() - t_start,
        "load_average_after": load_average(),
    }
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out_dir / "eval_generations.jsonl", "w", encoding="utf-8") as fh:
        for p, b, a in zip(pairs, before_out, after_out):
            row = {"question": p.item.question, "chosen": p.item.reference, "rejected": p.rejected}
            row |= {"before": b, "after": a, "before_ok": answers_match(b, p.item.reference)}
            fh.write(json.dumps(row | {"after_ok": answers_match(a, p.item.reference)}) + "\n")
    say(report(result))
    say(
        f"PEFT adapter: {peft_dir}   jlora adapter: {summary['adapter_dir']}   results: {out_dir / 'demo_results.json'}"
    )
    return result


def _line(r: dict, n: int) -> str:
    return (
        f"{r['model']}, on the {n} held-out pairs: preference accuracy {100 * r['preference_accuracy']:.1f}%, "
        f"exact match {100 * r['accuracy']:.1f}% ({r['eval_s']:.0f} s)"
    )


def report(result: dict[str, Any]) -> str:
    """The before / after table, as text."""
    b, a = result["before"], result["after"]
    pct = lambda x: f"{100 * x:.1f}%"
    lines = [""]
    for k, ex in enumerate(result["examples"], 1):
        mark = lambda s: "ok " if answers_match(s, ex["chosen"]) else "BAD"
        lines += [
            f"--- example {k} " + "-" * 50,
            f"input    : {ex['question']}",
            f"chosen   : {ex['chosen']}",
            f"rejected : {ex['rejected']}",
            f"before   : [{mark(ex['before'])}] {ex['before']}",
            f"after    : [{mark(ex['after'])}] {ex['after']}",
        ]
    head = f"held-out pairs ({result['n_eval']})"
    lines += [
        "",
        f"{head:36}{b['model']:>16}{a['model']:>22}",
        f"{'  preference accuracy':36}{pct(b['preference_accuracy']):>16}{pct(a['preference_accuracy']):>22}",
        f"{'  exact match (greedy)':36}{pct(b['accuracy']):>16}{pct(a['accuracy']):>22}",
        f"training: {result['train_steps']} steps in {result['train_s']:.0f} s; "
        f"demo wall time {result['wall_s']:.0f} s",
    ]
    return "\n".join(lines)
