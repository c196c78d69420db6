"""Adapters over HTTP: `POST /v1/adapters` loads one from a directory under the server's --adapter-dir (a
jlora adapter or an HF PEFT one), replacing one of that name only when asked ("replace": true), and
`DELETE /v1/adapters/{name}` unloads one; neither while requests use it (409). The stack change runs on the
engine thread between decode steps; an adapter is read by jlora.checkpoint.adapter.load_any_adapter.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Awaitable, Callable

from flax import traverse_util
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from jlora.checkpoint.adapter import load_any_adapter
from jlora.infer.engine import Engine
from jlora.infer.lora_stack import AdapterStackError, name_ok
from jlora.infer.openai_api import ApiError
from jlora.peft.routing import LoraPair


def max_rank_of(trainable: dict) -> int:
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
    return max((x.rank for x in flat.values() if isinstance(x, LoraPair)), default=1)


class AdapterRoutes:
    """The two routes, for `engine`'s stack; `read_body` is the server's body reader (limits, JSON, Unicode)."""

    def __init__(
        self,
        engine: Engine,
        base_name: str,
        cfg,
        params,
        adapter_dir: pathlib.Path | None,
        read_body: Callable[[HttpRequest], Awaitable[dict]],
    ):
        self.engine, self.base_name, self.cfg, self.params = engine, base_name, cfg, params
        self.adapter_dir, self.read_body = adapter_dir, read_body

    async def add(self, request: HttpRequest):
        """Load {name, path[, replace]}: an adapter already loaded under `name` is replaced only with "replace":
        true (else 409); the answer says whether it was."""
        self.loading_allowed()
        body = await self.read_body(request)
        unknown = sorted(set(body) - {"name", "path", "replace"})
        if unknown:
            raise ApiError(
                400, f"unknown field {unknown[0]!r} for /v1/adapters (name, path, replace)", param=unknown[0]
            )
        name, rel, replace = body.get("name"), body.get("path"), body.get("replace", False)
        request.scope["jlora"].update(adapter=name if isinstance(name, str) else "-")
        if not isinstance(replace, bool):
            raise ApiError(400, f"replace must be true or false, got {replace!r}", param="replace")
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
        self.check_replace(name, replace)
        try:
            trainable = (await asyncio.to_thread(load_any_adapter, path, self.cfg, self.params))[1]
        except (ValueError, FileNotFoundError) as e:
            raise ApiError(400, f"{rel}: {' '.join(str(e).split())}", param="path") from None

        def swap() -> bool:  # on the engine thread: nothing can join between the check and the add
            replaced = name in self.engine.stack
            self.check_replace(name, replace)
            self.engine.stack.add(name, trainable)
            return replaced

        try:
            replaced = await asyncio.wrap_future(self.engine.call(swap))
        except AdapterStackError as e:
            raise ApiError(400, f"{rel}: {' '.join(str(e).split())}", param="path") from None
        return JSONResponse(
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "jlora",
                "parent": self.base_name,
                "replaced": replaced,
            }
        )

    def check_replace(self, name: str, replace: bool) -> None:
        if name not in self.engine.stack:
            return
        if not replace:
            raise ApiError(409, f'adapter {name!r} is already loaded; send "replace": true to replace it', param="name")
        if self.engine.in_use(name):
            raise ApiError(409, f"adapter {name!r} is serving requests; retry when they are done", param="name")

    async def remove(self, request: HttpRequest):
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
