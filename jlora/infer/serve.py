"""`jlora-serve`: an OpenAI-compatible HTTP server for one base model and many LoRA adapters.

Starlette + uvicorn. `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (with
`stream` as server-sent events), and, with --allow-adapter-loading, `POST /v1/adapters` and
`DELETE /v1/adapters/{name}` for directories under --adapter-dir. Requests for any adapter share
decode steps through `jlora.infer.engine.Engine`; this module owns HTTP, validation, tokenization and
text. Every refusal is an OpenAI-style JSON error with its 4xx status; the queue is bounded (429).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
import uuid
from collections.abc import Sequence

from flax import traverse_util
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from jlora.checkpoint.adapter import load_adapter
from jlora.errors import JloraError
from jlora.formats.peft_adapter import import_peft
from jlora.formats.tokenizer import load_tokenizer
from jlora.formats.weights import load_pretrained, resolve_model_path
from jlora.infer.engine import Engine, Request
from jlora.infer.generate import Generator, eos_list
from jlora.infer.lora_stack import AdapterStack, name_ok
from jlora.models.family import build_model
from jlora.peft.routing import LoraPair


class ApiError(JloraError):
    """An OpenAI-style error: HTTP status, one-line message, type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
            status_code=self.status,
        )


def load_adapter_dir(path: str | pathlib.Path, cfg, params) -> dict:
    """A jlora adapter dir or an HF PEFT one (adapter_config.json) as a trainable tree for this base."""
    if (pathlib.Path(path) / "adapter_config.json").is_file():
        return import_peft(path, cfg, params)[1]
    return load_adapter(path, base=cfg, params=params)[1]


def max_rank_of(trainable: dict) -> int:
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
    return max((x.rank for x in flat.values() if isinstance(x, LoraPair)), default=1)


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
        self.max_body, self.timeout, self.adapter_dir = max_body, timeout, adapter_dir
        self.created = int(time.time())

    # ---- request reading and validation

    async def body(self, request: HttpRequest) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {self.max_body}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body:
                raise ApiError(413, f"request body is over the limit of {self.max_body} bytes")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
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

    def sampling(self, body: dict, n_prompt: int, default_max: int | None) -> dict:
        def number(key, default, lo, hi, lo_open=False):
            v = body.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
                raise ApiError(
                    400, f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", param=key
                )
            return float(v)

        context = self.engine.max_len
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else context - n_prompt
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", param="max_tokens")
        if n_prompt + max_tokens > context:
            raise ApiError(
                400,
                f"this model's context is {context} tokens, but the prompt has {n_prompt} and "
                f"max_tokens is {max_tokens}",
                code="context_length_exceeded",
                param="max_tokens",
            )
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, f"n must be 1, got {n!r}", param="n")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
            raise ApiError(400, f"seed must be an integer in [0, 2^32), got {seed!r}", param="seed")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
        return {
            "max_tokens": max_tokens,
            "temperature": number("temperature", 1.0, 0.0, 2.0),
            "top_p": number("top_p", 1.0, 0.0, 1.0, lo_open=True),
            "seed": seed or 0,
            "stop": tuple(stop),
        }

    def encode_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        elif isinstance(prompt, str) and prompt:
            ids = self.tok.encode(prompt)
        else:
            raise ApiError(400, "prompt must be a non-empty string (or one list of token ids)", param="prompt")
        if not all(0 <= t < self.cfg.vocab_size for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {self.cfg.vocab_size})", param="prompt")
        return ids

    def encode_chat(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must be an object with a string role and content", param="messages")
            clean.append({"role": m["role"], "content": content})
        if self.tok.chat_template is None:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        try:
            text = self.tok.apply_chat_template(clean, add_generation_prompt=True)
        except Exception as e:
            raise ApiError(
                400, f"the chat template refused the messages: {' '.join(str(e).split())}", param="messages"
            ) from None
        return self.tok.encode(text, add_bos=False)  # the template writes its own special tokens

    # ---- generation

    async def run(self, request: HttpRequest, chat: bool):
        body = await self.body(request)
        adapter = self.adapter_of(body)
        ids = self.encode_chat(body) if chat else self.encode_prompt(body)
        opts = self.sampling(body, len(ids), None if chat else 16)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req = Request(
            ids,
            adapter,
            opts["max_tokens"],
            lambda new, fin: loop.call_soon_threadsafe(events.put_nowait, (new, fin)),
            temperature=opts["temperature"],
            top_p=opts["top_p"],
            seed=opts["seed"],
            stop=opts["stop"],
            deadline=time.monotonic() + self.timeout,
        )
        if not self.engine.submit(req):
            raise ApiError(
                429,
                f"the server is busy: {self.engine.max_queue} requests are already waiting; retry later",
                type_="rate_limit_error",
                code="rate_limit_exceeded",
            )
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": body["model"],
            "n_prompt": len(ids),
            "chat": chat,
            "stop": opts["stop"],
        }
        if stream:
            return StreamingResponse(self.sse(req, events, meta), media_type="text/event-stream")
        out: list[int] = []
        try:
            while True:
                new, fin = await events.get()
                out += new
                if fin:
                    break
        finally:
            req.cancelled = True  # a client gone mid-wait frees its row at the next step
            self.engine.wake()
        self.check_finish(fin)
        text, trimmed = self.visible(out, meta["stop"], final=True)
        finish = "stop" if trimmed else fin
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        )
        return JSONResponse(
            {
                "id": meta["id"],
                "object": "chat.completion" if chat else "text_completion",
                "created": meta["created"],
                "model": meta["model"],
                "choices": [choice],
                "usage": usage,
            }
        )

    def check_finish(self, fin: str) -> None:
        if fin == "timeout":
            raise ApiError(
                408,
                f"the request took longer than the server's timeout of {self.timeout:g} s",
                type_="timeout",
                code="timeout",
            )
        if fin.startswith("error"):
            raise ApiError(400, fin.removeprefix("error: "))

    def visible(self, out: list[int], stop: tuple[str, ...], final: bool) -> tuple[str, bool]:
        """The text of `out` up to the first stop string (not included), and whether one was found. While
        running, a possible start of a stop string and a half-decoded character are held back."""
        text = self.tok.decode(out, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            return text[: min(cuts)], True
        if not final:
            hold = max((len(s) - 1 for s in stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        return text, False

    async def sse(self, req: Request, events: asyncio.Queue, meta: dict):
        chat, out, sent = meta["chat"], [], ""

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            obj = {
                "id": meta["id"],
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": meta["created"],
                "model": meta["model"],
                "choices": [choice],
            }
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                new, fin = await events.get()
                out += new
                text, trimmed = self.visible(out, meta["stop"], final=fin is not None)
                if text[len(sent) :]:
                    yield chunk(text[len(sent) :], None)
                    sent = text
                if trimmed or fin:
                    break
            if fin and (fin == "timeout" or fin.startswith("error")):
                try:
                    self.check_finish(fin)
                except ApiError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
                    return
            yield chunk(None, "stop" if trimmed or fin == "stop" else "length")
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled = True  # finished, stopped by a stop string, or the client went away
            self.engine.wake()

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

    async def add_adapter(self, request: HttpRequest):
        self.loading_allowed()
        body = await self.body(request)
        name, rel = body.get("name"), body.get("path")
        if not isinstance(name, str) or not name_ok(name) or name == self.base_name:
            raise ApiError(
                400,
                f"name must be 1-64 letters, digits, '.', '_', '-' or ':', and not the base model's name, got {name!r}",
                param="name",
            )
        if not isinstance(rel, str) or not rel:
            raise ApiError(400, "path must be a directory under the server's --adapter-dir", param="path")
        path = (self.adapter_dir / rel).resolve()
        if not path.is_relative_to(self.adapter_dir):
            raise ApiError(
                403, f"path {rel!r} is outside the adapter directory", type_="permission_error", param="path"
            )
        if not path.is_dir():
            raise ApiError(404, f"no adapter directory {rel!r} under the adapter directory", param="path")
        if name in self.engine.stack and self.engine.in_use(name):
            raise ApiError(409, f"adapter {name!r} is serving requests; retry when they are done", param="name")
        try:
            trainable = await asyncio.to_thread(load_adapter_dir, path, self.cfg, self.params)
            await asyncio.wrap_future(self.engine.call(lambda: self.engine.stack.add(name, trainable)))
        except (ValueError, FileNotFoundError) as e:
            raise ApiError(400, f"{rel}: {' '.join(str(e).split())}", param="path") from None
        return JSONResponse(
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "jlora", "parent": self.base_name}
        )

    async def remove_adapter(self, request: HttpRequest):
        self.loading_allowed()
        name = request.path_params["name"]
        if name not in self.engine.stack:
            raise ApiError(404, f"no adapter named {name!r}", code="model_not_found")
        if self.engine.in_use(name):
            raise ApiError(409, f"adapter {name!r} is serving requests; retry when they are done")
        await asyncio.wrap_future(self.engine.call(lambda: self.engine.stack.remove(name)))
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    def loading_allowed(self) -> None:
        if self.adapter_dir is None:
            raise ApiError(
                403,
                "adapter loading is off: start jlora-serve with --allow-adapter-loading --adapter-dir DIR",
                type_="permission_error",
            )


def build_app(server: Server) -> Starlette:
    """The Starlette app: routes, and errors as OpenAI JSON (no tracebacks)."""

    async def api_error(request, e: ApiError):
        return e.response()

    async def http_error(request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    async def internal(request, e: Exception):
        return ApiError(500, f"internal error ({type(e).__name__})", type_="server_error").response()

    routes = [
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/adapters", server.add_adapter, methods=["POST"]),
        Route("/v1/adapters/{name}", server.remove_adapter, methods=["DELETE"]),
    ]
    return Starlette(
        routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal}
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
    path = resolve_model_path(model)
    cfg, params = load_pretrained(path)
    tok = load_tokenizer(path)
    loaded = {n: load_adapter_dir(d, cfg, params) for n, d in adapters}
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
    base_name = name or pathlib.Path(str(model).rstrip("/")).name
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
