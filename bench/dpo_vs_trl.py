"""DPO train-step throughput and memory, jlora vs TRL's DPOTrainer with a PEFT LoRA, on SmolLM2-135M (fp32, CPU).

The workload, the same on both sides: --batch 4 preference pairs per step, each a prompt of --seq/2 random
token ids and two different responses (chosen, rejected) of --seq/2 ids, the last one EOS, so that every
sequence, prompt + response, is --seq (256) tokens: 2 x 4 x 256 = 2,048 tokens per step, which tokens/s
counts (every token runs through the policy's forward and backward and the reference's forward; the loss
scores the 128 response tokens of each sequence, on both sides). DPO's sigmoid loss with beta 0.1; LoRA r=8 alpha=16 on
q_proj and v_proj, no dropout; AdamW (lr 1e-4 constant, weight decay 0.01) after global-norm clipping at 1.0,
as bench/train_vs_peft.py, whose functions this reuses. The sides:
  jlora  jlora-train's step (jlora.train.step.make_train_step(..., objective="dpo") on a one-device
         TrainState, --remat): the batch from jlora.train.preference_data.collate_pairs, rows 2i chosen and
         2i+1 rejected, [2 x 4, 256] positions (each sequence's 255 next-token predictions, one padding);
         the reference is the frozen base with the adapter off, run in the same jitted step.
  trl    TRL's DPOTrainer given a peft_config (so its reference is the policy with the adapters disabled, TRL's
         forward over the same rows without gradient), trained by trainer.train(): the same pairs as text of a
         word-level tokenizer whose words are SmolLM2's token ids, tokenized by TRL itself (which appends the
         EOS) and checked to give exactly jlora's ids; per_device_train_batch_size = --batch, no gradient
         accumulation, precompute_ref_log_probs=False, bf16 off, activation checkpointing off (TRL's default
         is on: --trl-checkpointing), TRL's default optimizer (torch's fused AdamW). A step is timed from the
         Trainer's on_step_begin to its on_step_end callback: forward and backward of the policy over the
         chosen and rejected rows, the reference forward, clipping, the optimizer and scheduler step and
         zero_grad, with what TRL's fused LM head computes for its logged metrics (entropy, mean logits,
         top-1 accuracy): the trainer as a user runs it. Fetching and collating the batch, and logging, fall
         outside.
Each side runs in its own subprocess, with the default threads, so its peak RSS (getrusage ru_maxrss) is its
alone: loading, compiling and training included. The sides run --rounds times each, interleaved; two warm-up
steps are left out of each run, whose step time is the median of its --steps timed steps; each side's figure
is its best run (its fastest median; peak RSS: its largest run; first step: jlora's includes its compile, TRL
has none). Prints a table and writes every figure, each run's too, with the commit, date, machine and the load
average after each run, to docs/results/dpo_vs_trl.json (--out), which bench/report.py renders.
Usage: python bench/dpo_vs_trl.py [--steps 6] [--rounds 3] [--batch 4] [--seq 256] [--hf-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import statistics
import sys
import tempfile
import time

import train_vs_peft as base  # bench/ is on sys.path when this runs as a script

from jlora.train.provenance import load_average, provenance, write_result

BETA = 0.1
SIDES = {"jlora": "jlora-train DPO step", "trl": "TRL DPOTrainer + PEFT"}
EOS = 2  # SmolLM2's EOS id; the random ids are drawn from 3 up, so none is EOS


def pair_ids(pairs: int, seq: int, vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids of each pair: random ids, each response ending with EOS, prompt + response
    `seq` tokens, chosen and rejected different."""
    import numpy as np

    rng = np.random.default_rng(0)
    n_prompt = seq // 2
    n_response = seq - n_prompt
    out = []
    for _ in range(pairs):
        prompt, chosen, rejected = (
            rng.integers(3, vocab, n).tolist() for n in (n_prompt, n_response - 1, n_response - 1)
        )
        out.append((prompt, chosen + [EOS], rejected + [EOS]))
    return out


def side_jlora(a: argparse.Namespace) -> dict:
    import jax

    from jlora.formats.weights import read_pretrained
    from jlora.train.preference_data import PreferencePair, collate_pairs
    from jlora.train.step import make_train_step, put_batch

    jax.config.update("jax_default_matmul_precision", "highest")  # true fp32 matmuls, like torch
    cfg, params = read_pretrained(a.hf_dir)
    cfg = cfg.replace(remat=a.remat)
    state, opt = base.jlora_state(cfg, params, a.steps)
    del params
    pairs = [PreferencePair(*map(tuple, ids)) for ids in pair_ids(a.batch, a.seq, cfg.vocab_size)]
    host = collate_pairs(pairs, a.seq, EOS)  # [2 x batch, seq]: each sequence's seq - 1 positions, one padding
    batch = put_batch(host, state.mesh, 1)
    f, t, o, ref = state.frozen, state.trainable, state.opt_state, state.reference_args()  # (): the adapter off
    t0 = time.perf_counter()
    step = make_train_step(base.build_model(cfg), opt, state, objective="dpo")
    step = step.lower(f, t, o, batch, jax.random.key(0), *ref).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(a.steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        t, o, m = step(f, t, o, batch, jax.random.key(i), *ref)
        losses.append(float(m["loss"]))  # blocks
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "first_step_s": compile_s + times[0],
        "step_s": times[2:],
        "losses": losses,
        "rss_mb": base.peak_rss_mb(),
        "rows": list(host["input_ids"].shape),
        "scored_tokens": int(host["loss_mask"].sum()),
    }


def id_tokenizer(vocab: int):
    """A word-level tokenizer whose words are token ids ("t17" is id 17, EOS is "</s>"): what lets TRL tokenize
    text into exactly the bench's ids. No BOS, nothing added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {("</s>" if i == EOS else f"t{i}"): i for i in range(vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="</s>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>")


def side_trl(a: argparse.Namespace) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    class StepTimes(transformers.TrainerCallback):
        """Seconds from each optimizer step's on_step_begin to its on_step_end, and each step's logged loss."""

        def __init__(self):
            self.times, self.losses, self.t0 = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    model = transformers.AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    ids = pair_ids(a.batch, a.seq, vocab)
    text = lambda xs: " ".join(f"t{x}" for x in xs)
    records = [  # TRL appends the EOS to each response itself
        {"prompt": text(p), "chosen": " " + text(c[:-1]), "rejected": " " + text(r[:-1])} for p, c, r in ids
    ]
    lora = peft.LoraConfig(
        r=base.RANK, lora_alpha=base.ALPHA, target_modules=list(base.TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    timer = StepTimes()
    with tempfile.TemporaryDirectory(prefix="jlora-dpo-trl-") as out_dir:
        args = DPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=1,
            max_steps=a.steps + 2,  # two warm-up steps
            learning_rate=base.LR,
            lr_scheduler_type="constant",
            weight_decay=base.WD,
            max_grad_norm=base.CLIP,
            beta=BETA,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
            max_length=a.seq,
            bf16=False,
            use_cpu=True,
            activation_checkpointing=a.trl_checkpointing,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(records),
            processing_class=id_tokenizer(vocab),
            peft_config=lora,
            callbacks=[timer],
        )
        del model
        if "ref" in trainer.model.peft_config:  # given a PeftModel TRL copies its adapter as the reference
            raise SystemExit("dpo_vs_trl: TRL's reference must be the policy with its adapters disabled")
        got_records = list(trainer.train_dataset)
        got = sorted((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in got_records)
        if got != sorted(ids):
            raise SystemExit("dpo_vs_trl: TRL's tokenization does not give the bench's ids")
        trainer.train()
        optimizer = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__  # accelerate wraps it
    if len(timer.times) != a.steps + 2:
        raise SystemExit(f"dpo_vs_trl: TRL ran {len(timer.times)} steps, not {a.steps + 2}")
    return {
        "first_step_s": timer.times[0],
        "step_s": timer.times[2:],
        "losses": timer.losses,
        "rss_mb": base.peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
        "optimizer": f"{getattr(args.optim, 'value', args.optim)} ({optimizer})",
        "rows": [2 * a.batch, a.seq],
        "scored_tokens": sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in got_records),
        "activation_checkpointing": a.trl_checkpointing,
    }


def rows_of(tps: dict, rss: dict, runs: dict) -> list[dict]:
    """The result rows: jlora's figures against TRL's (compile: jlora's alone)."""
    label, peer = SIDES["jlora"], SIDES["trl"]
    first = {s: min(r["first_step_s"] for r in runs[s]) for s in SIDES}
    compile_s = min(r["compile_s"] for r in runs["jlora"])
    row = lambda metric, unit, figures, better, vs=peer: {
        "metric": f"{label}: {metric}",
        "unit": unit,
        "jlora": figures["jlora"],
        "peer": vs,
        "peer_value": figures.get("trl"),
        "better": better,
    }
    return [
        row("train tokens/s", "tokens/s", tps, "higher"),
        row("peak RSS", "MB", rss, "lower"),
        row("first step incl. compile", "s", first, "lower"),
        row("compile", "s", {"jlora": compile_s}, "lower", vs=None),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help="the SmolLM2-135M HF checkpoint (default: a temporary dir, made from the GGUF)")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step (2 x this many sequences)")
    p.add_argument("--seq", type=int, default=256, help="tokens of each sequence, prompt (half) + response")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run, after 2 warm-up steps")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved; each figure is the best run")
    p.add_argument("--remat", default="dots_saveable", choices=["none", "full", "dots_saveable"], help="jlora's")
    p.add_argument("--trl-checkpointing", action="store_true", help="TRL with its default activation checkpointing")
    p.add_argument("--out", help="the result file (default: docs/results/dpo_vs_trl.json)")
    a = p.parse_args()
    if a.side:
        out = side_jlora(a) if a.side == "jlora" else side_trl(a)
        print("SIDE: " + json.dumps(out), flush=True)
        return
    if a.rounds < 1 or a.steps < 1 or a.batch < 1 or a.seq < 4:
        p.error("--rounds, --steps and --batch must be >= 1, --seq >= 4")
    a.out = a.out or str(base.RESULTS / "dpo_vs_trl.json")
    started = provenance()
    tmp = base.ensure_hf_dir(a)  # the GGUF dequantized, saved as an HF checkpoint, unless --hf-dir has one
    extra = ("--trl-checkpointing",) if a.trl_checkpointing else ()
    runs = {s: [] for s in SIDES}
    for r in range(a.rounds):  # interleaved: each side once per round
        for s in SIDES:
            print(f"[dpo_vs_trl] round {r + 1}/{a.rounds}: {s}", file=sys.stderr, flush=True)
            run = base.run_side(s, a, script=__file__, extra=extra)
            run["median_step_s"] = statistics.median(run["step_s"])
            run["load_average_after"] = load_average()
            runs[s].append(run)
    tokens = 2 * a.batch * a.seq
    best = {s: min(rs, key=lambda run: run["median_step_s"]) for s, rs in runs.items()}
    tps = {s: tokens / r["median_step_s"] for s, r in best.items()}
    rss = {s: max(run["rss_mb"] for run in rs) for s, rs in runs.items()}
    ratio = {"tokens_per_s": tps["jlora"] / tps["trl"], "peak_rss": rss["jlora"] / rss["trl"]}
    print(
        f"SmolLM2-135M fp32 DPO step (sigmoid, beta {BETA:g}; LoRA r={base.RANK}, alpha={base.ALPHA:g}, "
        f"{','.join(base.TARGETS)}; AdamW), {a.batch} pairs x {a.seq} tokens = {tokens:,} tokens/step, CPU, default "
        f"threads; jlora remat={a.remat}, TRL activation checkpointing {'on' if a.trl_checkpointing else 'off'}; "
        f"best of {a.rounds} interleaved runs per side"
    )
    print(f"{'side':24s} {'tokens/s':>9s} {'median step':>12s} {'peak RSS':>10s} {'first step':>11s}  losses")
    for s, r in best.items():
        medians = ", ".join(f"{run['median_step_s']:.2f}" for run in runs[s])
        print(
            f"{SIDES[s]:24s} {tps[s]:9,.0f} {r['median_step_s']:10.2f} s {rss[s]:7,.0f} MB {r['first_step_s']:9.1f} s"
            f"  {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}  (each run's median: {medians})"
        )
    print(f"jlora / TRL: tokens/s {ratio['tokens_per_s']:.2f}x, peak RSS {ratio['peak_rss']:.2f}x")
    config = {
        "model": "SmolLM2-135M (GGUF, dequantized)",
        "dtype": "float32",
        "pairs": a.batch,
        "seq": a.seq,
        "tokens_per_step": tokens,
        "objective": f"dpo sigmoid beta={BETA:g}",
        "lora": f"r={base.RANK} alpha={base.ALPHA:g} {','.join(base.TARGETS)}",
        "optimizer": f"AdamW lr={base.LR:g} constant, weight_decay={base.WD:g}, clip={base.CLIP:g}",
        "remat": a.remat,
        "trl_activation_checkpointing": a.trl_checkpointing,
        "trl": importlib.metadata.version("trl"),  # the provenance's libraries leave TRL out
        "threads": "default",
        "timed_steps": a.steps,
        "best_of": a.rounds,
    }
    out = write_result(
        a.out,
        started,
        {
            "bench": "dpo_vs_trl",
            "command": shlex.join(["python", "bench/dpo_vs_trl.py", *sys.argv[1:]]),
            "config": config,
            "rows": rows_of(tps, rss, runs),
            "summary": {"tokens_per_s": tps, "peak_rss_mb": rss, "jlora_over_trl": ratio},
            "runs": runs,
        },
    )
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
