"""The adapter command lines: `jlora-export-peft` (jlora adapter -> HF PEFT dir), `jlora-merge`, and
`jlora-export-gguf` (an adapter -> one llama.cpp GGUF LoRA file, written beside --out and renamed in).

`jlora-merge` folds an adapter (a jlora adapter dir, or a PEFT dir, told apart by its
adapter_config.json) into the base weights and writes an HF safetensors checkpoint that
transformers loads, with the base's tokenizer beside it (an HF dir's files copied; a GGUF's vocabulary
written as tokenizer.json or tokenizer.model + tokenizer_config.json), so jlora-generate and
transformers can use the merged dir alone. Both refuse an --out that
is a file, that is or holds or lies inside --model or --adapter, or (without --force) an existing
non-empty dir; they build the output beside --out and swap it in whole (jlora.checkpoint.atomic_dir). Thin:
the work is in jlora.checkpoint.adapter, jlora.formats.peft_adapter, jlora.peft.lora and jlora.formats.weights.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import shutil
import sys

from jlora.checkpoint.adapter import load_adapter, load_any_adapter
from jlora.checkpoint.atomic_dir import replace_dir
from jlora.cli.help_format import DefaultsHelpFormatter
from jlora.cli.run import run_cli
from jlora.errors import JloraError
from jlora.formats.gguf_adapter import check_out_file, export_gguf_adapter
from jlora.formats.model_aliases import hub_name
from jlora.formats.peft_adapter import export_peft
from jlora.formats.tokenizer import load_tokenizer, save_hf_files
from jlora.formats.weights import read_pretrained, resolve_model_path, save_pretrained
from jlora.peft.lora import merge_for_inference

# What an HF model dir carries besides weights that a merged copy should keep.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class OutDirError(JloraError, ValueError):
    """An --out that would overwrite or destroy something; one-line message."""


def check_out_dir(out: str | pathlib.Path, *, force: bool, inputs: dict[str, str | pathlib.Path]) -> pathlib.Path:
    """`out` made absolute, or OutDirError if writing there could destroy a file the user has.

    `inputs` ({"--model": path, ...}) may neither be `out`, nor lie inside it, nor hold it; even
    --force does not allow that. An existing non-empty dir is replaced only with --force."""
    out = pathlib.Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out}: exists and is a file, not a directory; choose another --out")
    real = out.resolve()
    for flag, path in inputs.items():
        src = pathlib.Path(path).absolute().resolve()
        if real == src or src in real.parents or real in src.parents:
            how = "is" if real == src else "lies inside" if src in real.parents else "holds"
            raise OutDirError(
                f"--out {out}: {how} the {flag} {'dir' if src.is_dir() else 'file'} {src}; writing "
                f"there would destroy it: choose an --out outside it"
            )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutDirError(
            f"--out {out}: exists and is not empty; choose a new directory, or pass --force to replace it"
        )
    return out


class InputError(JloraError, ValueError):
    """An --adapter that is not there; one line."""


def check_inputs(model: str, adapter: str) -> str:
    """The --model's path (an installable name resolved, a path checked) once --adapter is known to be a
    directory: a missing input is one line before any weight is read."""
    if not pathlib.Path(adapter).is_dir():
        why = "not an adapter directory" if pathlib.Path(adapter).exists() else "no such adapter directory"
        raise InputError(f"--adapter {adapter}: {why}; pass a jlora adapter dir (<output_dir>/adapter) or a PEFT dir")
    return resolve_model_path(model)


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="base model: an HF dir or a .gguf file")
    p.add_argument("--adapter", required=True, help="adapter dir (jlora, or HF PEFT for jlora-merge)")
    p.add_argument("--out", required=True, help="output directory (new, or empty)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out directory")
    return p


def _run(parser: argparse.ArgumentParser, argv, body) -> int:
    args = parser.parse_args(argv)

    def job() -> None:
        check_inputs(args.model, args.adapter)
        out = check_out_dir(args.out, force=args.force, inputs={"--model": args.model, "--adapter": args.adapter})
        with _disk_errors(args.out), replace_dir(out) as partial:
            body(args, partial)

    return run_cli(parser.prog, job)


@contextlib.contextmanager
def _disk_errors(out: str):
    """A read-only or full disk as one line naming the path (--out where the OS names none)."""
    try:
        yield
    except OSError as e:
        raise OutDirError(f"{e.filename or out}: {e.strerror or e}") from None


def export_main(argv: list[str] | None = None) -> int:
    """jlora-export-peft --model PATH --adapter DIR --out DIR [--force] [--base-name NAME]"""
    parser = _parser("jlora-export-peft", "Write a jlora adapter as an HF PEFT LoRA adapter directory.")
    parser.add_argument(
        "--base-name",
        help="base_model_name_or_path to record (default: --model, or the HF hub id of an alias such as smollm2-135m)",
    )

    def body(args, partial: pathlib.Path):
        cfg, params = read_pretrained(args.model)
        lcfg, trainable = load_adapter(args.adapter, base=cfg, params=params)
        export_peft(partial, trainable, lcfg, cfg, base_name=args.base_name or hub_name(args.model))
        print(f"wrote {pathlib.Path(args.out) / 'adapter_model.safetensors'} and adapter_config.json", file=sys.stderr)

    return _run(parser, argv, body)


def merge_main(argv: list[str] | None = None) -> int:
    """jlora-merge --model PATH --adapter DIR --out DIR [--force]"""
    parser = _parser("jlora-merge", "Merge an adapter into its base model; write an HF safetensors checkpoint.")

    def body(args, partial: pathlib.Path):
        cfg, params = read_pretrained(args.model)
        _, trainable = load_any_adapter(args.adapter, cfg, params)
        merged = merge_for_inference(params, trainable, tie_word_embeddings=cfg.tie_word_embeddings)
        save_pretrained(merged, cfg, partial)
        model = pathlib.Path(resolve_model_path(args.model))
        if model.is_dir():
            for name in _TOKENIZER_FILES:
                if (model / name).is_file():
                    shutil.copy2(model / name, partial / name)
        else:  # a GGUF holds its tokenizer as metadata: write it out in HF's form
            save_hf_files(load_tokenizer(model), partial)
        print(f"wrote merged model to {args.out}", file=sys.stderr)

    return _run(parser, argv, body)


def gguf_main(argv: list[str] | None = None) -> int:
    """jlora-export-gguf --model PATH --adapter DIR --out FILE.gguf [--force]"""
    parser = argparse.ArgumentParser(
        prog="jlora-export-gguf",
        description="Write an adapter (jlora or HF PEFT) "
        "as a llama.cpp GGUF LoRA adapter file (llama-cli --lora FILE).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="base model: an HF dir or a .gguf file")
    parser.add_argument("--adapter", required=True, help="adapter dir (jlora, or HF PEFT)")
    parser.add_argument("--out", required=True, help="the .gguf adapter file to write (new)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)

    def job() -> None:
        model = check_inputs(args.model, args.adapter)  # an alias names the GGUF, which --out must not overwrite
        out = check_out_file(args.out, force=args.force, inputs={"--model": model, "--adapter": args.adapter})
        cfg, params = read_pretrained(args.model)
        lcfg, trainable = load_any_adapter(args.adapter, cfg, params)
        with _disk_errors(args.out):
            out.parent.mkdir(parents=True, exist_ok=True)
            export_gguf_adapter(out, trainable, lcfg, cfg, base_name=hub_name(args.model))
        print(f"wrote {args.out}", file=sys.stderr)

    return run_cli(parser.prog, job)
