"""`jlora-generate`: stream a completion of --prompt to stdout, with a base model and an optional adapter.

Argument parsing and printing only; loading is jlora.infer.generate.load_for_generation, and the prompt's ids
(plain, chat with --system, or a run config's chat / Alpaca prompt) are jlora.train.prompt's, the training data
pipeline's own.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jlora.cli.help_format import DefaultsHelpFormatter
from jlora.cli.run import UsageError, run_cli
from jlora.formats.tokenizer import unicode_error
from jlora.infer.generate import eos_list, load_for_generation
from jlora.train.config import load
from jlora.train.config_files import find_config, shipped_configs
from jlora.train.prompt import prompt_ids


def main(argv: Sequence[str] | None = None) -> int:
    """`jlora-generate`: stream a completion of --prompt to stdout."""
    ap = argparse.ArgumentParser(
        prog="jlora-generate",
        description="Generate text with a model (+ LoRA adapter).",
        formatter_class=DefaultsHelpFormatter,
    )
    ap.add_argument("--model", help='HF checkpoint dir, .gguf file, or "smollm2-135m" (default: the --config\'s)')
    ap.add_argument("--adapter", help="adapter dir: jlora's save_adapter or HF PEFT (adapter_config.json)")
    ap.add_argument("--merge", action="store_true", help="merge the adapter into the weights first")
    ap.add_argument(
        "--config",
        help="a run's YAML config, or a shipped config's name (" + ", ".join(shipped_configs()) + "): its model and "
        "its prompt format (chat, or the Alpaca prompt and template), so the prompt is built as its training data were",
    )
    ap.add_argument("--prompt", required=True, help="the question (a chat's user turn, an Alpaca record's input)")
    ap.add_argument("--system", help="a system prompt (a chat's system turn, an Alpaca record's instruction)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    ap.add_argument("--show-prompt-ids", action="store_true", help="print the ids fed to the model on stderr")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    ap.add_argument("--top-p", type=float, help="sample from the smallest set of tokens of this much probability")
    ap.add_argument("--seed", type=int, default=0, help="the sampling seed")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    args = ap.parse_args(argv)
    if args.model is None and args.config is None:
        ap.error("give --model, or --config with a run config that names one")
    if any(s == "" for s in args.stop):
        ap.error("--stop: an empty stop string matches at once; give the text to stop at")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        ap.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        ap.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    texts = (("--prompt", args.prompt), ("--system", args.system or ""), *(("--stop", s) for s in args.stop))
    for flag, text in texts:
        if (bad := unicode_error(text)) is not None:
            ap.error(f"{flag}: {bad}")

    def job() -> None:
        model, fmt, template = args.model, "chat" if args.chat else "text", "alpaca"
        if args.config is not None:  # checked before any weight is read
            run = load(find_config(args.config))
            model = model or run.model.path
            fmt, template = "chat" if args.chat else run.data.format, run.data.template
        if args.system is not None and fmt == "text":
            raise UsageError("--system needs --chat, or a --config whose data are chat or Alpaca records")
        gen, tok = load_for_generation(model, args.adapter, args.merge)
        ids = prompt_ids(tok, fmt, args.prompt, args.system, template=template)
        if args.show_prompt_ids:
            print(f"prompt ids: {ids}", file=sys.stderr, flush=True)
        eos = sorted({*eos_list(None, gen.cfg), *([tok.eos_id] if tok.eos_id is not None else [])})
        start, done, shown = time.perf_counter(), [], ""
        for new in gen.stream(
            [ids],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eos_id=eos,
            stop_strings=args.stop,
            tokenizer=tok,
            pad_id=tok.pad_id or 0,
        ):
            done += new[0]
            text = tok.decode(done, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(tok.decode(done, skip_special_tokens=True)[len(shown) :] + "\n")
        secs = time.perf_counter() - start
        print(f"[{len(done)} tokens in {secs:.1f}s, {len(done) / secs:.1f} tokens/s incl. compile]", file=sys.stderr)

    return run_cli("jlora-generate", job)


if __name__ == "__main__":
    sys.exit(main())
