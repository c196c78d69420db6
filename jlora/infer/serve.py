"""`jlora-serve`: an OpenAI-compatible HTTP server for one base model and many LoRA adapters.

Starlette + uvicorn. `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (with `stream` as
server-sent events), and, with --allow-adapter-loading, the adapter routes of `jlora.infer.adapter_routes`.
Requests for any adapter share decode steps through `jlora.infer.engine.Engine`; a request's n choices are n
engine requests. This module owns HTTP: reading bodies (413, 400 for bytes that are not UTF-8 JSON, 499 for a
client gone mid-upload), tokenization, the flow of a request and its stream, and one log line per request.
The fields a request may hold are `jlora.infer.openai_api`'s, the answer's objects `jlora.infer.choices`'.
Every refusal is an OpenAI-style JSON error with its 4xx status; the queue is bounded (429).
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import time
import uuid
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from jlora.checkpoint.adapter import load_any_adapter
from jlora.errors import JloraError
from jlora.formats.tokenizer import load_tokenizer
from jlora.formats.weights import resolve_model_path
from jlora.formats.weights_on_device import load_pretrained
from jlora.infer.adapter_routes import AdapterRoutes, max_rank_of
from jlora.infer.choices import Answer, Choice, choice_seeds, prompt_entries
from jlora.infer.engine import Engine, Request
from jlora.infer.generate import Generator, eos_list
from jlora.infer.lora_stack import AdapterStack, AdapterStackError
from jlora.infer.openai_api import (
    ApiError,
    chat_messages,
    check_fields,
    check_unicode,
    parse_params,
    template_problem,
)
from jlora.models.family import build_model

log = logging.getLogger(__name__)


class ServeError(JloraError, ValueError):
    """A server that cannot be built as asked (adapter names); one line."""


class Server:
    """The state behind the routes: engine, tokenizer, names and limits."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        base_name: str,
        *,
        cfg,
        params,
        max_body: int,
        timeout: float,
        adapter_dir: pathlib.Path | None,
    ):
        self.engine, self.tok, self.base_name, self.cfg, self.params = engine, tokenizer, base_name, cfg, params
        self.max_body, self.timeout = max_body, timeout
        self.adapters = AdapterRoutes(engine, base_name, cfg, params, adapter_dir, self.body)
        self.created = int(time.time())

    # ---- request reading

    async def body(self, request: HttpRequest) -> dict:
        """The JSON object of the request's body: 413 over the limit; 400 for bytes that are not UTF-8 JSON, for
        a lone surrogate in a string, or for anything but an object; 499 when the client leaves mid-upload."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {self.max_body}")
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > self.max_body:
                    raise ApiError(413, f"request body is over the limit of {self.max_body} bytes")
        except ClientDisconnect:
            raise ApiError(499, f"the client went away after {len(data)} bytes of the body") from None
        try:
            body = json.loads(bytes(data).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the body is not valid UTF-8 (byte {e.start}: {e.reason})") from None
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        check_unicode(body)
        return body

    def adapter_of(self, body: dict) -> str | None:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required: the base model or an adapter name", param="model")
        if model == self.base_name:
            return None
        if model not in self.engine.stack:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; serving: {', '.join(self.names())}",
                code="model_not_found",
                param="model",
            )
        return model

    def names(self) -> list[str]:
        return [self.base_name, *self.engine.stack.loaded()]

    def encode_prompt(self, body: dict) -> tuple[list[int], str]:
        """(token ids, text) of a completions prompt: a string, or one list of token ids."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < self.cfg.vocab_size for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {self.cfg.vocab_size})", param="prompt")
            return prompt, self.tok.decode(prompt, skip_special_tokens=True)
        if isinstance(prompt, str) and prompt:
            return self.tok.encode(prompt), prompt
        raise ApiError(400, "prompt must be a non-empty string (or one list of token ids)", param="prompt")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.tok.chat_template is None:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        render = lambda ms: self.tok.apply_chat_template(ms, add_generation_prompt=True)
        problem = template_problem(render, messages)
        if problem is not None:
            raise problem
        return self.tok.encode(render(messages), add_bos=False)  # the template writes its own special tokens

    # ---- generation

    async def run(self, request: HttpRequest, chat: bool):
        body = check_fields(await self.body(request), chat)
        adapter = self.adapter_of(body)
        request.scope["jlora"].update(adapter=adapter or "-")
        if chat:
            ids, prompt_text = self.encode_chat(chat_messages(body)), ""
        else:
            ids, prompt_text = self.encode_prompt(body)
        request.scope["jlora"].update(prompt_tokens=len(ids))
        p = parse_params(
            body,
            chat=chat,
            n_prompt=len(ids),
            context=self.engine.max_len,
            vocab=self.cfg.vocab_size,
            max_n=max(1, min(128, self.engine.max_queue)),
        )
        echo = None
        if p.echo:
            echo = (prompt_text, [])
            if p.logprobs is not None:
                scores = await self.engine_call(lambda: self.engine.score_prompt(ids, adapter, p.logprobs))
                echo = (prompt_text, prompt_entries(self.tok, ids, scores)[1])
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        deadline = time.monotonic() + self.timeout
        reqs = [
            Request(
                ids,
                adapter,
                p.max_tokens,
                lambda new, fin, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, new, fin)),
                temperature=p.temperature,
                top_p=p.top_p,
                seed=seed,
                stop=p.stop,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                logit_bias=p.logit_bias,
                logprobs=p.logprobs,
                deadline=deadline,
            )
            for i, seed in enumerate(choice_seeds(p.seed, p.n))
        ]
        choices = [Choice(i, r, self.tok, p.stop, p.logprobs) for i, r in enumerate(reqs)]
        if p.max_tokens == 0:  # echo alone: the prompt scored, nothing generated
            reqs = []
            for c in choices:
                c.req, c.finish = None, "length"
        elif not self.engine.submit_all(reqs):
            raise ApiError(
                429,
                f"the server is busy: {self.engine.max_queue} requests are already waiting; retry later",
                type_="rate_limit_error",
                code="rate_limit_exceeded",
            )
        answer = Answer(
            f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            body["model"],
            chat,
            p.logprobs is not None,
            echo,
        )
        log = request.scope["jlora"]
        if p.stream:
            stream = self.sse(reqs, choices, events, answer, len(ids), p.include_usage, log)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            while not all(c.done for c in choices):
                i, new, fin = await events.get()
                choices[i].out += new
                choices[i].finish = fin
        finally:
            self.release(reqs)
        for c in choices:
            self.check_finish(c.finish)
        objs = [answer.choice(c, *c.advance(), whole=True) for c in choices]
        out_tokens = sum(len(c.out) for c in choices)
        log.update(new_tokens=out_tokens)
        usage = {"prompt_tokens": len(ids), "completion_tokens": out_tokens, "total_tokens": len(ids) + out_tokens}
        return JSONResponse({**answer.head(chunk=False), "choices": objs, "usage": usage})

    async def engine_call(self, fn):
        """fn's result, run on the engine thread; an adapter removed meanwhile is a 404."""
        try:
            return await asyncio.wrap_future(self.engine.call(fn))
        except AdapterStackError as e:
            raise ApiError(404, str(e), code="model_not_found", param="model") from None

    def release(self, reqs: list[Request]) -> None:
        for r in reqs:
            r.cancelled = True  # a client gone mid-wait frees its row at the next step
        self.engine.wake()

    def check_finish(self, fin: str | None) -> None:
        if fin == "timeout":
            raise ApiError(
                408,
                f"the request took longer than the server's timeout of {self.timeout:g} s",
                type_="timeout",
                code="timeout",
            )
        if fin is not None and fin.startswith("error"):
            raise ApiError(400, fin.removeprefix("error: "))
        if fin is not None and fin.startswith("failed"):  # the model, not the request: NaN logits
            raise ApiError(500, fin.removeprefix("failed: "), type_="server_error", code="nonfinite_logits")

    async def sse(self, reqs, choices: list[Choice], events, answer: Answer, n_prompt: int, usage: bool, log: dict):
        """The answer as server-sent events: each choice's opening chunk, its deltas, its finish; the usage
        (with stream_options.include_usage) and [DONE]."""

        def event(choice_objs: list[dict], **extra) -> str:
            return f"data: {json.dumps({**answer.head(chunk=True), 'choices': choice_objs, **extra})}\n\n"

        try:
            for c in choices:
                if answer.chat or answer.echo is not None:
                    yield event([answer.choice(c, "", [], whole=False, first=True)])
            for c in [c for c in choices if c.req is None]:  # echo alone: done already
                yield event([answer.choice(c, "", [], whole=False)])
            running = {c.index for c in choices if c.req is not None}
            while running:
                i, new, fin = await events.get()
                c = choices[i]
                if i not in running:  # ended by a stop string already: the engine's own end follows
                    continue
                c.out += new
                c.finish = fin
                if fin == "timeout" or (fin or "").startswith(("error", "failed")):
                    try:
                        self.check_finish(fin)
                    except ApiError as e:
                        error = {"message": e.message, "type": e.type, "code": e.code}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        return
                text, entries = c.advance()
                if text or entries or c.done:
                    yield event([answer.choice(c, text, entries, whole=False)])
                if c.done:
                    running.discard(i)
            n_out = sum(len(c.out) for c in choices)
            log.update(new_tokens=n_out)
            if usage:
                counts = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
                yield event([], usage=counts)
            yield "data: [DONE]\n\n"
        finally:
            self.release(reqs)  # finished, stopped by a stop string, or the client went away

    # ---- routes

    async def models(self, request: HttpRequest):
        data = [
            {
                "id": n,
                "object": "model",
                "created": self.created,
                "owned_by": "jlora",
                **({"parent": self.base_name} if n != self.base_name else {}),
            }
            for n in self.names()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: HttpRequest):
        return await self.run(request, chat=False)

    async def chat(self, request: HttpRequest):
        return await self.run(request, chat=True)


class RequestLog:
    """ASGI middleware: one line per request on the `jlora.infer.serve` logger, e.g.
    `POST /v1/completions 200 adapter=qv4 prompt_tokens=12 new_tokens=8 41 ms` (status, adapter, prompt and
    generated tokens, latency), with the error's message for a refusal."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, info = time.perf_counter(), scope.setdefault("jlora", {})
        status = [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            ms = (time.perf_counter() - start) * 1000
            extra = "".join(f" {k}={info[k]}" for k in ("adapter", "prompt_tokens", "new_tokens") if k in info)
            error = f" ({info['error']})" if "error" in info else ""
            log.info(f"{scope['method']} {scope['path']} {status[0]}{extra} {ms:.0f} ms{error}")


def build_app(server: Server) -> Starlette:
    """The Starlette app: routes, errors as OpenAI JSON (no tracebacks), and a log line per request."""

    async def api_error(request, e: ApiError):
        request.scope.setdefault("jlora", {})["error"] = e.message
        return e.response()

    async def http_error(request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    async def internal(request, e: Exception):
        return ApiError(500, f"internal error ({type(e).__name__})", type_="server_error").response()

    routes = [
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/adapters", server.adapters.add, methods=["POST"]),
        Route("/v1/adapters/{name}", server.adapters.remove, methods=["DELETE"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal},
        middleware=[Middleware(RequestLog)],
    )


def build_server(
    model: str,
    adapters: Sequence[tuple[str, str]] = (),
    *,
    name: str | None = None,
    max_batch: int = 16,
    max_len: int = 1024,
    max_queue: int = 64,
    max_adapters: int = 8,
    max_rank: int = 16,
    timeout: float = 600.0,
    max_body_bytes: int = 1 << 20,
    adapter_dir: str | None = None,
) -> Server:
    """A `Server` for base `model` (a path or an alias) with `adapters` [(NAME, DIR)] loaded; with `adapter_dir`,
    adapters may also be hot-loaded from that directory (and only from it)."""
    base_name = name or pathlib.Path(str(model).rstrip("/")).name
    names = [n for n, _ in adapters]
    twice = next((n for i, n in enumerate(names) if n in names[:i] or n == base_name), None)
    if twice is not None:
        what = "is the base model's name" if twice == base_name else "is given twice"
        raise ServeError(f"adapter name {twice!r} {what}")
    path = resolve_model_path(model)
    cfg, params = load_pretrained(path)
    tok = load_tokenizer(path)
    loaded = {n: load_any_adapter(d, cfg, params)[1] for n, d in adapters}
    rank = max([max_rank, *(max_rank_of(t) for t in loaded.values())])
    stack = AdapterStack(cfg, max(max_adapters, len(loaded)), rank)
    for n, tree in loaded.items():
        stack.add(n, tree)
    eos = sorted({*eos_list(None, cfg), *([tok.eos_id] if tok.eos_id is not None else [])})
    engine = Engine(
        Generator(build_model(cfg), params, stack=stack),
        max_batch=max_batch,
        max_len=min(max_len, cfg.max_position_embeddings),
        max_queue=max_queue,
        eos=eos,
        tokenizer=tok,
    )
    return Server(
        engine,
        tok,
        base_name,
        cfg=cfg,
        params=params,
        max_body=max_body_bytes,
        timeout=timeout,
        adapter_dir=pathlib.Path(adapter_dir).resolve() if adapter_dir else None,
    )
