"""`jlora-serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

Argument parsing, compiling the step shapes before the ready line (`Engine.warm_up`); the server is
jlora.infer.serve.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from collections.abc import Sequence

import uvicorn

from jlora.cli.help_format import DefaultsHelpFormatter
from jlora.cli.run import UsageError, run_cli
from jlora.infer.lora_stack import name_ok
from jlora.infer.serve import build_app, build_server, log


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before anything loads: a port in use is one line, not a late traceback."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host!r}: {e}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a socket in TIME_WAIT is no owner
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def check_adapters(adapters: list[tuple[str, str]]) -> None:
    """Each --adapter NAME once: a second silently replaced the first."""
    seen: dict[str, str] = {}
    for name, path in adapters:
        if name in seen:
            raise UsageError(f"--adapter {name} is given twice ({seen[name]} and {path}); give each name once")
        seen[name] = path


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name_ok(name) or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR with a plain name, got {text!r}")
    return name, path


def main(argv: Sequence[str] | None = None) -> int:
    """`jlora-serve`: load the base and adapters, then serve until interrupted."""
    ap = argparse.ArgumentParser(
        prog="jlora-serve",
        description="OpenAI-compatible server: one base, many adapters.",
        formatter_class=DefaultsHelpFormatter,
    )
    ap.add_argument("--model", required=True, help='HF checkpoint dir, .gguf file, or "smollm2-135m"')
    ap.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_adapter_arg,
        metavar="NAME=DIR",
        help="an adapter to serve as model NAME (jlora or HF PEFT dir; repeatable)",
    )
    ap.add_argument("--name", help="the base model's name in the API (default: the model path's name)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on")
    ap.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    ap.add_argument("--max-len", type=int, default=1024, help="context per row: prompt + max_tokens (KV cache slots)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; more get HTTP 429")
    ap.add_argument("--max-adapters", type=int, default=8, help="adapter slots (hot-loading fills free ones)")
    ap.add_argument("--max-rank", type=int, default=16, help="largest adapter rank the slots hold")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queue included")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; more get HTTP 413")
    ap.add_argument("--allow-adapter-loading", action="store_true", help="enable POST/DELETE /v1/adapters")
    ap.add_argument("--adapter-dir", help="the only directory adapters may be hot-loaded from")
    args = ap.parse_args(argv)

    def job() -> None:
        if args.allow_adapter_loading and not args.adapter_dir:
            raise UsageError("--allow-adapter-loading needs --adapter-dir DIR, the directory adapters may come from")
        for flag in ("max_batch", "max_len", "max_queue", "max_adapters", "max_rank"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
        check_adapters(args.adapter)
        sock = bind(args.host, args.port)
        server = build_server(
            args.model,
            args.adapter,
            name=args.name,
            max_batch=args.max_batch,
            max_len=args.max_len,
            max_queue=args.max_queue,
            max_adapters=args.max_adapters,
            max_rank=args.max_rank,
            timeout=args.timeout,
            max_body_bytes=args.max_body_bytes,
            adapter_dir=args.adapter_dir if args.allow_adapter_loading else None,
        )
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("jlora-serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        start = time.perf_counter()
        sizes = server.engine.warm_up()  # the first request runs compiled code, as every later one
        secs = time.perf_counter() - start
        sock.listen(2048)  # from here a client is queued, not refused, until uvicorn accepts (as uvicorn's backlog)
        print(
            f"jlora-serve: ready on http://{args.host}:{args.port}: serving {', '.join(server.names())} "
            f"(compiled {sizes} prompt sizes up to {server.engine.max_len} tokens in {secs:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(build_app(server), log_level="warning")
        uvicorn.Server(config).run(sockets=[sock])

    return run_cli("jlora-serve", job)


if __name__ == "__main__":
    sys.exit(main())
