"""The OpenAI request fields jlora-serve accepts, read strictly: what each field may hold, and a 400 naming
the field for anything else.

Implemented, on both /v1/completions and /v1/chat/completions: model, max_tokens, temperature, top_p, n, seed,
stop, presence_penalty, frequency_penalty, logit_bias, stream, stream_options (include_usage) and user (an
end-user id, only logged); completions add prompt, echo and logprobs (an int), chat adds messages,
max_completion_tokens, logprobs (a bool) and top_logprobs. Fields that would change the answer in a way
jlora-serve does not implement are accepted only at their no-op value (best_of 1, suffix "", tools [],
tool_choice "none", response_format {"type": "text"}, modalities ["text"], store false, service_tier "auto" or
"default"), as are parallel_tool_calls and metadata, which change nothing without tools and store. Any other
value of those, any other field and any misspelt one is a 400 with `param` the field, as vLLM answers. A
field set to null counts as not given, as OpenAI's clients send it.
Nothing here touches the model: `jlora.infer.serve` owns HTTP, the engine and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import difflib
import json

from starlette.responses import JSONResponse

from jlora.errors import JloraError
from jlora.infer.row_sampling import MAX_TOP_LOGPROBS


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


COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream",
    "stream_options",
    "user",
}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "logprobs"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# Fields accepted only at the values that change nothing here, with what to say otherwise.
NO_OP = {
    "completions": {
        "best_of": (lambda v: v == 1, "only best_of 1 is supported"),
        "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
    },
    "chat": {
        "tools": (lambda v: v == [], "tools are not supported"),
        "tool_choice": (lambda v: v == "none", 'tool_choice must be "none": tools are not supported'),
        "parallel_tool_calls": (lambda v: isinstance(v, bool), "parallel_tool_calls must be true or false"),
        "response_format": (lambda v: v == {"type": "text"}, 'only response_format {"type": "text"} is supported'),
        "modalities": (lambda v: v == ["text"], 'only modalities ["text"] are supported'),
        "store": (lambda v: v is False, "store is not supported"),
        "metadata": (lambda v: isinstance(v, dict), "metadata must be an object"),
        "service_tier": (lambda v: v in ("auto", "default"), 'service_tier must be "auto" or "default"'),
    },
}


def check_fields(body: dict, chat: bool) -> dict:
    """`body` without its null fields, after refusing unknown fields and unsupported values (400 naming the field)."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    no_op = NO_OP["chat" if chat else "completions"]
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    for key, value in body.items():
        if key in known:
            continue
        if key in no_op:
            ok, why = no_op[key]
            if value is not None and not ok(value):
                raise ApiError(400, f"{key}: {why}; got {json.dumps(value)[:80]}", param=key)
            continue
        near = difflib.get_close_matches(key, [*known, *no_op], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ApiError(400, f"unknown field {key!r} for {endpoint}{hint}", param=key)
    return {k: v for k, v in body.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Params:
    """What a completion request asks of generation, checked."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = dataclasses.field(default_factory=dict)  # token id -> bias
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives
    echo: bool = False
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise ApiError(400, f"{key} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", param=key)
    return float(v)


def _integer(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
        raise ApiError(400, f"{key} must be an integer in [{lo}, {hi}], got {v!r}", param=key)
    return v


def _flag(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if not isinstance(v, bool):
        raise ApiError(400, f"{key} must be true or false, got {v!r}", param=key)
    return v


def parse_params(body: dict, *, chat: bool, n_prompt: int, context: int, vocab: int, max_n: int) -> Params:
    """The generation fields of a checked body (`check_fields`) for a prompt of `n_prompt` tokens."""
    echo = False if chat else _flag(body, "echo")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(key, (context - n_prompt) if chat else 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < (0 if echo else 1):
        floor = "0 (with echo)" if echo else "1"
        raise ApiError(400, f"{key} must be an integer >= {floor}, got {max_tokens!r}", param=key)
    if n_prompt + max_tokens > context:
        raise ApiError(
            400,
            f"this model's context is {context} tokens, but the prompt has {n_prompt} and {key} is {max_tokens}",
            code="context_length_exceeded",
            param=key,
        )
    stop = body.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to 4 of them, got {stop!r}", param="stop")
    stream = _flag(body, "stream")
    options = body.get("stream_options", {})
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed with stream true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, f"stream_options may hold only include_usage, got {options!r}", param="stream_options")
    if not isinstance(body.get("user", ""), str):
        raise ApiError(400, "user must be a string", param="user")
    return Params(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        n=_integer(body, "n", 1, max_n) or 1,
        seed=_integer(body, "seed", 0, 2**32 - 1),
        stop=tuple(stop),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body.get("logit_bias", {}), vocab),
        logprobs=_logprobs(body, chat),
        echo=echo,
        stream=stream,
        include_usage=_flag(options, "include_usage"),
    )


def _logit_bias(value, vocab: int) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ApiError(400, "logit_bias must be an object of token id -> bias", param="logit_bias")
    out = {}
    for k, v in value.items():
        if not (k.isascii() and k.isdigit() and int(k) < vocab):
            raise ApiError(400, f"logit_bias key {k!r} is not a token id in [0, {vocab})", param="logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ApiError(400, f"logit_bias[{k!r}] must be a number in [-100, 100], got {v!r}", param="logit_bias")
        out[int(k)] = float(v)
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    """None, or how many alternatives each token's entry lists (completions: `logprobs`; chat: `top_logprobs`,
    which needs `logprobs` true)."""
    if not chat:
        return _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if not _flag(body, "logprobs"):
        if top is not None:
            raise ApiError(400, "top_logprobs needs logprobs true", param="top_logprobs")
        return None
    return top or 0


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "name", "tool_call_id"}
NULL_ONLY_KEYS = {"refusal", "audio", "tool_calls", "function_call"}  # assistant turns echoed back carry them


def chat_messages(body: dict) -> list[dict]:
    """The messages as {role, content[, name, tool_call_id]}: text content parts joined with newlines (as
    vLLM joins them); any other part, key or role is a 400 naming it."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with a role and content", param=where)
        for key, value in m.items():
            if key not in MESSAGE_KEYS and not (key in NULL_ONLY_KEYS and value is None):
                what = "is not supported" if key in NULL_ONLY_KEYS else "is not a message field"
                raise ApiError(400, f"{where}.{key} {what}", param=f"{where}.{key}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(
                400, f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", param=f"{where}.role"
            )
        msg = {"role": role, "content": _content(m.get("content"), where)}
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise ApiError(400, f"{where}.{key} must be a string", param=f"{where}.{key}")
                msg[key] = m[key]
        clean.append(msg)
    return clean


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ApiError(400, f"{at}: content part type {kind!r} is not supported (only text)", param=f"{at}.type")
        if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{at} must be {{'type': 'text', 'text': a string}}", param=at)
        texts.append(part["text"])
    return "\n".join(texts)


def check_unicode(body, where: str = "") -> None:
    """A 400 naming the first string in `body` that is not valid Unicode (a lone surrogate, which JSON's
    \\ud800 escapes can carry and no tokenizer can encode)."""
    if isinstance(body, str):
        try:
            body.encode("utf-8")
        except UnicodeEncodeError:
            msg = f"{where or 'the body'} is not valid Unicode (a lone surrogate)"
            raise ApiError(400, msg, param=where or None) from None
    elif isinstance(body, dict):
        for k, v in body.items():
            check_unicode(k, where or "a field name")
            check_unicode(v, f"{where}.{k}" if where else k)
    elif isinstance(body, list):
        for i, v in enumerate(body):
            check_unicode(v, f"{where}[{i}]")


def template_problem(render, messages: list[dict]) -> ApiError | None:
    """Why the chat template cannot take `messages`, naming the message and its role, or None.

    `render(messages)` renders them (raising on the template's refusal). A role counts as known when the
    template renders that message's content: each content is swapped for a marker and every marker must
    appear, so a template that raises for a role or silently drops it is refused (400)."""
    probe = [{**m, "content": f"jloraprobe{i}q"} for i, m in enumerate(messages)]
    try:
        text = render(probe)
    except Exception as e:  # the template's raise_exception(): find the first message it refuses
        k = next((k for k in range(len(probe) - 1) if _refuses(render, probe[: k + 1])), len(probe) - 1)
        role, reason = messages[k]["role"], " ".join(str(e).split())
        return ApiError(
            400, f"the chat template refused messages[{k}] (role {role!r}): {reason}", param=f"messages[{k}].role"
        )
    k = next((k for k in range(len(probe)) if f"jloraprobe{k}q" not in text), None)
    if k is None:
        return None
    return ApiError(
        400,
        f"messages[{k}]: this model's chat template does not know the role {messages[k]['role']!r}",
        param=f"messages[{k}].role",
    )


def _refuses(render, messages: list[dict]) -> bool:
    try:
        render(messages)
    except Exception:
        return True
    return False
