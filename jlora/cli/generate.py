"""`jlora-generate`: stream a completion of --prompt to stdout, with a base model and an optional adapter.

Argument parsing and printing only; loading is jlora.infer.generate.load_for_generation.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jlora.cli.run import run_cli
from jlora.formats.tokenizer import unicode_error
from jlora.infer.generate import eos_list, load_for_generation


def main(argv: Sequence[str] | None = None) -> int:
    """`jlora-generate`: stream a completion of --prompt to stdout."""
    ap = argparse.ArgumentParser(prog="jlora-generate", description="Generate text with a model (+ LoRA adapter).")
    ap.add_argument("--model", required=True, help='HF checkpoint dir, .gguf file, or "smollm2-135m"')
    ap.add_argument("--adapter", help="adapter dir: jlora's save_adapter or HF PEFT (adapter_config.json)")
    ap.add_argument("--merge", action="store_true", help="merge the adapter into the weights first")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    args = ap.parse_args(argv)
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
    for flag, text in (("--prompt", args.prompt), *(("--stop", s) for s in args.stop)):
        if (bad := unicode_error(text)) is not None:
            ap.error(f"{flag}: {bad}")

    def job() -> None:
        gen, tok = load_for_generation(args.model, args.adapter, args.merge)
        if args.chat:
            text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
            ids = tok.encode(text, add_bos=False)  # the template writes its own special tokens
        else:
            ids = tok.encode(args.prompt)
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
