"""jlora-serve speaks OpenAI's API strictly (issue 25, items 11-14), on a live server: the tiny model with
adapter qv4, and a chat template that knows system, user and assistant only (it raises for developer and
drops tool). Each field the server implements is checked against an offline computation: logprobs against
a forward pass of the model, penalties and logit_bias against a numpy greedy loop over the model's logits,
seeded sampling against `jlora.generate`, echo and stop against the plain answer. Every field it does not
implement, a misspelt one, an image part and a role the template does not know is a 400 naming it; a body
that is not Unicode is a 400; a client gone mid-upload is one log line; replacing an adapter needs
"replace": true; a port in use and a repeated --adapter end the CLI in one line before it serves."""

import concurrent.futures
import json
import queue
import re
import socket
import time
import urllib.request

import jax
import numpy as np
import pytest
from test_adapter_stack import CFG, tiny  # noqa: F401 - the shared fixture
from test_serve import BASE, _free_port, _raw, live_server

import jlora
from jlora.cli.serve import main as serve_main
from jlora.infer.engine import Engine, Request
from jlora.infer.generate import Generator
from jlora.infer.lora_stack import AdapterStack

TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'developer' %}{{ raise_exception('this template has no developer role') }}{% endif %}"
    "{% if m.role in ('system', 'user', 'assistant') %}<s> {{ m.role }} {{ m.content }} </s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}w9{% endif %}"
)
PROMPT = "w5 w17 w40"
EOS = 2
CONTEXT = 64


class Live:
    """The live server and what the offline references need."""

    def __init__(self, url, port, log, work, tiny):  # noqa: F811
        self.url, self.port, self.log, self.work = url, port, log, work
        self.model, self.params, self.adapters = tiny
        self.tok = jlora.load_tokenizer(work / "base")
        self.forward = jax.jit(lambda frozen, tree, ids: jlora.apply(self.model, frozen, tree, ids))

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return _raw(f"{self.url}{path}", json.dumps(body).encode())

    def complete(self, **body) -> dict:
        status, out = self.post("/completions", {"model": BASE, "prompt": PROMPT, "temperature": 0, **body})
        assert status == 200, out
        return out

    def logits(self, adapter: str | None, ids: list[int]) -> np.ndarray:
        """[T,V] raw logits of a forward pass of the model (with `adapter`) over `ids`, padded to one shape."""
        padded = np.zeros((1, CONTEXT), np.int32)
        padded[0, : len(ids)] = ids
        tree = self.adapters[adapter] if adapter else {}
        return np.asarray(self.forward(self.params, tree, padded), np.float64)[0, : len(ids)]

    def logp(self, adapter: str | None, ids: list[int]) -> np.ndarray:
        """[T,V] log_softmax of `logits`."""
        x = self.logits(adapter, ids)
        top = x.max(-1, keepdims=True)
        return x - (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))

    def greedy(self, prompt: list[int], n: int, adapter=None, presence=0.0, frequency=0.0, bias=None) -> list[int]:
        """OpenAI's sampling semantics, greedy, in numpy: logits + bias - presence * (count > 0) - frequency *
        count, counts over the generated tokens; stops at EOS."""
        ids, counts, bias_v = list(prompt), np.zeros(self.vocab), np.zeros(self.vocab)
        for t, v in (bias or {}).items():
            bias_v[t] = v
        for _ in range(n):
            x = self.logits(adapter, ids)[-1] + bias_v - presence * (counts > 0) - frequency * counts
            t = int(np.argmax(x))
            if t == EOS:
                break
            ids.append(t)
            counts[t] += 1
        return ids[len(prompt) :]

    @property
    def vocab(self) -> int:
        return self.model.cfg.vocab_size

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("strict")
    args = ["--max-batch", 4, "--max-queue", 8, "--max-len", CONTEXT, "--max-adapters", 3, "--max-rank", 8]
    adapters = {"qv4": tiny[2]["qv4"]}
    with live_server(
        work, tiny[1], adapters, *args, "--allow-adapter-loading", "--adapter-dir", work / "adapters", template=TEMPLATE
    ) as (url, port, log):
        yield Live(url, port, log, work, tiny)


def ids_of(live: Live, text: str) -> list[int]:
    return live.tok.encode(text)


def test_completion_logprobs_with_echo_equal_a_forward_pass(live):
    got = live.complete(model="qv4", max_tokens=6, logprobs=3, echo=True)["choices"][0]
    text, lp = got["text"], got["logprobs"]
    prompt = ids_of(live, PROMPT)
    new = live.greedy(prompt, 6, adapter="qv4")
    assert text == PROMPT + live.text(new)  # echo: the prompt, then the completion
    ids = prompt + new
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == len(ids)
    assert [text[o : o + len(t)] for t, o in zip(lp["tokens"], lp["text_offset"])] == lp["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first token has no context
    logp = live.logp("qv4", ids)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(logp[i - 1, ids[i]], abs=2e-3)
        want = {int(t): logp[i - 1, t] for t in np.argsort(-logp[i - 1])[:3]} | {ids[i]: logp[i - 1, ids[i]]}
        top = {int(k.strip()[1:]): v for k, v in lp["top_logprobs"][i].items()}  # "w17" / " w17" -> 17
        assert top.keys() == want.keys()
        assert list(top.values()) == pytest.approx([want[k] for k in top], abs=2e-3)


def test_chat_logprobs_equal_a_forward_pass(live):
    messages = [{"role": "system", "content": "w30"}, {"role": "user", "content": "w11 w12"}]
    body = {"model": BASE, "messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    status, out = live.post("/chat/completions", body)
    assert status == 200, out
    choice = out["choices"][0]
    prompt = live.tok.encode(live.tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)
    new = live.greedy(prompt, 4)
    assert choice["message"]["content"] == live.text(new)
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == live.text(new)
    logp = live.logp(None, prompt + new)
    for j, e in enumerate(content):
        row = logp[len(prompt) + j - 1]
        assert e["logprob"] == pytest.approx(row[new[j]], abs=2e-3) and e["bytes"] == list(e["token"].encode())
        assert [int(a["token"].strip()[1:]) for a in e["top_logprobs"]] == [int(t) for t in np.argsort(-row)[:2]]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(np.sort(row)[::-1][:2], abs=2e-3)


def test_logit_bias_and_penalties_equal_a_numpy_greedy_loop(live):
    prompt = ids_of(live, PROMPT)
    plain = live.greedy(prompt, 8)
    bias = {plain[0]: -100.0, 300: 3.0}  # ban the greedy first token, favour another
    cases = [
        ({"logit_bias": {str(k): v for k, v in bias.items()}}, live.greedy(prompt, 8, bias=bias)),
        ({"presence_penalty": 1.5, "frequency_penalty": 0.7}, live.greedy(prompt, 8, presence=1.5, frequency=0.7)),
        ({"frequency_penalty": -2.0}, live.greedy(prompt, 8, frequency=-2.0)),
        ({}, plain),
    ]
    assert all(want != plain for _, want in cases[:3])  # each field changes the answer
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # sharing decode steps: no row's state leaks
        got = list(pool.map(lambda c: live.complete(max_tokens=8, **c[0])["choices"][0]["text"], cases))
    assert got == [live.text(want) for _, want in cases]

    forced = live.complete(max_tokens=4, logit_bias={"77": 100}, logprobs=0)["choices"][0]
    assert forced["text"] == "w77 w77 w77 w77"
    raw = live.logp(None, prompt)[-1, 77]  # logprobs are the model's own, before the bias (as vLLM's default)
    assert raw < -1 and forced["logprobs"]["token_logprobs"][0] == pytest.approx(raw, abs=2e-3)
    assert live.complete(max_tokens=8)["choices"][0]["text"] == live.text(plain)  # the same row, its bias gone


def test_n_choices_and_seed_reproduce(live):
    first = live.complete(max_tokens=6, temperature=0.9, n=2, seed=11)["choices"]
    assert [c["index"] for c in first] == [0, 1] and first[0]["text"] != first[1]["text"]
    assert live.complete(max_tokens=6, temperature=0.9, n=2, seed=11)["choices"] == first
    other = live.complete(max_tokens=6, temperature=0.9, n=2, seed=12)["choices"]
    assert [c["text"] for c in other] != [c["text"] for c in first]
    prompt = [ids_of(live, PROMPT)]
    alone = jlora.generate(
        live.model, live.params, None, prompt, max_new_tokens=6, temperature=0.9, seed=11, eos_id=[EOS]
    )[0]
    assert first[0]["text"] == live.text(alone)  # choice 0 draws as offline generate with the same seed

    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.9, "n": 2, "seed": 11, "stream": True}
    texts = {0: "", 1: ""}
    for chunk in _events(live, "/completions", body):
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
    assert [texts[0], texts[1]] == [c["text"] for c in first]


def _events(live: Live, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{live.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [line.decode().strip() for line in r]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_echo_and_stop(live):
    plain = live.complete(max_tokens=8)["choices"][0]["text"]
    assert live.complete(max_tokens=8, echo=True)["choices"][0]["text"] == PROMPT + plain
    scored = live.complete(max_tokens=0, echo=True, logprobs=1)  # scoring a prompt, as lm-eval-harness does
    assert scored["choices"][0]["text"] == PROMPT and scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["logprobs"]["tokens"] == ["w5", " w17", " w40"]

    words = plain.split()
    stop = " " + next(w for w in words[1:] if w != words[0])
    got = live.complete(max_tokens=8, stop=[stop, "w999"], logprobs=1)["choices"][0]
    assert got["text"] == plain[: plain.index(stop)] and got["finish_reason"] == "stop"
    assert "".join(got["logprobs"]["tokens"]) == got["text"]  # the stop string's tokens are left out with it
    status, out = live.post("/completions", {"model": BASE, "prompt": PROMPT, "stop": ""})
    assert status == 400 and out["error"]["param"] == "stop"


def test_unknown_and_unsupported_fields_are_a_400_naming_them(live):
    chat = {"model": BASE, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 1}
    comp = {"model": BASE, "prompt": PROMPT, "max_tokens": 1}
    refused = [
        ("/completions", comp | {"max_tokns": 3}, "max_tokns", "did you mean 'max_tokens'"),
        ("/chat/completions", chat | {"temprature": 0.5}, "temprature", "did you mean 'temperature'"),
        ("/completions", comp | {"best_of": 3}, "best_of", "best_of"),
        ("/completions", comp | {"suffix": "w7"}, "suffix", "suffix"),
        ("/chat/completions", chat | {"echo": True}, "echo", "unknown field"),
        ("/chat/completions", chat | {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
        ("/chat/completions", chat | {"response_format": {"type": "json_object"}}, "response_format", "text"),
        ("/chat/completions", chat | {"top_logprobs": 2}, "top_logprobs", "logprobs true"),
        ("/chat/completions", chat | {"logprobs": 3}, "logprobs", "true or false"),
        ("/completions", comp | {"logprobs": 21}, "logprobs", "[0, 20]"),
        ("/completions", comp | {"n": 0}, "n", "n must be"),
        ("/completions", comp | {"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
        ("/completions", comp | {"logit_bias": {"w5": 1}}, "logit_bias", "'w5'"),
        ("/completions", comp | {"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ("/completions", comp | {"stream_options": {"include_usage": True}}, "stream_options", "stream true"),
        ("/completions", comp | {"seed": -1}, "seed", "seed"),
    ]
    for path, body, param, needle in refused:
        status, out = live.post(path, body)
        assert (status, out["error"]["param"]) == (400, param), (body, out)
        assert needle in out["error"]["message"], out
    harmless = [  # documented no-op values and fields that change nothing here are accepted
        ("/completions", comp | {"user": "u1", "best_of": 1, "suffix": None, "echo": False}),
        (
            "/chat/completions",
            chat | {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False},
        ),
    ]
    for path, body in harmless:
        status, out = live.post(path, body)
        assert status == 200, out


def test_content_parts_and_roles_the_template_does_not_know(live):
    def chat(messages) -> tuple[int, dict]:
        return live.post("/chat/completions", {"model": BASE, "messages": messages, "max_tokens": 3, "temperature": 0})

    parts = [{"type": "text", "text": "w5"}, {"type": "text", "text": "w6"}]
    status, joined = chat([{"role": "user", "content": parts}])
    assert status == 200 and joined["choices"] == chat([{"role": "user", "content": "w5\nw6"}])[1]["choices"]
    image = {"type": "image_url", "image_url": {"url": "x"}}
    cases = [
        ([{"role": "user", "content": [parts[0], image]}], "messages[0].content[1].type"),
        (
            [{"role": "user", "content": "w5"}, {"role": "tool", "content": "w6", "tool_call_id": "c1"}],
            "messages[1].role",
        ),
        ([{"role": "developer", "content": "w5"}, {"role": "user", "content": "w6"}], "messages[0].role"),
        ([{"role": "robot", "content": "w5"}], "messages[0].role"),
        ([{"role": "user", "content": "w5", "tool_calls": [{"id": "c1"}]}], "messages[0].tool_calls"),
    ]
    for messages, param in cases:
        status, out = chat(messages)
        assert status == 400 and out["error"]["param"] == param, out
    assert "does not know the role 'tool'" in chat(cases[1][0])[1]["error"]["message"]  # the template drops it
    assert "this template has no developer role" in chat(cases[2][0])[1]["error"]["message"]
    assert chat([{"role": "system", "content": "w5"}, {"role": "user", "content": "w6"}])[0] == 200


def test_bodies_that_are_not_unicode_are_a_400(live):
    url = f"{live.url}/completions"
    status, out = _raw(url, b'{"model": "tiny-base", "prompt": "w5 \xff\xfe"}')
    assert status == 400 and "not valid UTF-8" in out["error"]["message"]
    status, out = _raw(url, b'{"model": "tiny-base", "prompt": "w5 \\ud800"}')
    assert status == 400 and out["error"]["param"] == "prompt" and "lone surrogate" in out["error"]["message"]
    body = b'{"model": "tiny-base", "messages": [{"role": "user", "content": "\\udfff"}]}'
    status, out = _raw(f"{live.url}/chat/completions", body)
    assert status == 400 and out["error"]["param"] == "messages[0].content"
    assert _raw(url, b"\x00{")[0] == 400
    assert "Traceback" not in live.log.read_text()


def test_a_client_gone_mid_upload_is_one_log_line(live):
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        )
        s.sendall(head.encode() + b'{"model": "tiny-base", "prompt": "w5')
    for _ in range(1200):  # until the server has noticed the closed connection and answered (at most ~60 s)
        text = live.log.read_text()
        if "POST /v1/completions 499" in text or "Traceback" in text:
            break
        time.sleep(0.05)
    said = [line for line in text.splitlines() if "went away" in line]
    assert len(said) == 1 and "POST /v1/completions 499" in said[0], text
    assert "Traceback" not in text and "ClientDisconnect" not in text


def test_replacing_an_adapter_needs_the_flag(live):
    status, out = live.post("/adapters", {"name": "qv4", "path": "qv4"})
    assert status == 409 and out["error"]["param"] == "name" and '"replace": true' in out["error"]["message"]
    before = live.complete(model="qv4", max_tokens=4)["choices"][0]["text"]
    status, out = live.post("/adapters", {"name": "qv4", "path": "qv4", "replace": True})
    assert (status, out["replaced"]) == (200, True)
    assert live.complete(model="qv4", max_tokens=4)["choices"][0]["text"] == before
    status, out = live.post("/adapters", {"name": "qv4-b", "path": "qv4"})
    assert (status, out["replaced"]) == (200, False)
    assert _raw(f"{live.url}/adapters/qv4-b", b"", method="DELETE")[0] == 200
    assert live.post("/adapters", {"name": "x", "path": "qv4", "force": True})[1]["error"]["param"] == "force"


def test_each_request_is_one_log_line(live):
    """The server writes the line once the response is sent, so the client may read the log before it lands."""
    live.complete(model="qv4", max_tokens=3)
    n_prompt = len(ids_of(live, PROMPT))
    line = re.compile(
        rf"jlora-serve: POST /v1/completions 200 adapter=qv4 prompt_tokens={n_prompt} new_tokens=3 \d+ ms"
    )
    deadline = time.monotonic() + 30
    while not any(line.fullmatch(x) for x in live.log.read_text().splitlines()):
        assert time.monotonic() < deadline, live.log.read_text()[-2000:]
        time.sleep(0.05)


def test_a_port_in_use_or_a_repeated_adapter_fails_in_one_line_before_serving(live, capsys):
    """Both are refused before the model loads: the model path given does not exist."""
    nowhere = str(live.work / "nowhere")
    assert serve_main(["--model", nowhere, "--port", str(live.port)]) == 2  # the live server holds the port
    err = capsys.readouterr().err
    assert err == f"jlora-serve: error: cannot listen on 127.0.0.1:{live.port}: Address already in use\n"
    adapter = str(live.work / "adapters" / "qv4")
    args = ["--model", nowhere, "--port", str(_free_port()), "--adapter", f"a={adapter}", "--adapter", "a=other"]
    assert serve_main(args) == 2
    err = capsys.readouterr().err
    assert err == f"jlora-serve: error: --adapter a is given twice ({adapter} and other); give each name once\n"


def test_a_row_keeps_no_bias_from_its_last_request(tiny):  # noqa: F811
    """The engine's per-row state: a request with a logit bias leaves its row; a plain request that takes that
    row while another row's penalties make the batch adjust its logits gets none of the old bias."""
    model, params, _ = tiny
    engine = Engine(
        Generator(model, params, stack=AdapterStack(CFG, 1, 2)), max_batch=2, max_len=16, max_queue=4, eos=[]
    )
    prompt = [5, 17, 40]

    def run(*reqs) -> list[list[int]]:
        ends = queue.Queue()
        for r in reqs:
            r.emit = lambda new, fin, ends=ends: fin and ends.put(fin)
        assert engine.submit_all(list(reqs))
        for _ in reqs:
            ends.get(timeout=120)
        return [r.out for r in reqs]

    [plain] = run(Request(prompt, None, 6, print))  # row 0, clean
    assert run(Request(prompt, None, 6, print, logit_bias={77: 100.0})) == [[77] * 6]  # row 0 holds the bias
    got = run(Request(prompt, None, 6, print), Request(prompt, None, 6, print, presence_penalty=1.0))
    assert got[0] == plain  # row 0 again, in a batch that adjusts (row 1's penalty)


def test_a_row_whose_logits_turn_nan_ends_with_an_error_and_the_others_go_on(tiny):  # noqa: F811
    """Weights can be finite and still give NaN logits (a NaN reached mid-generation, here a poisoned embedding
    row of the first new token): that row ends with "failed: ..." (the server's 500) instead of emitting tokens
    drawn from NaN, and a row sharing its steps still equals offline generation."""
    model, params, _ = tiny
    prompt, other = [1, 20, 30], [5, 6, 7, 8]
    (first,) = Generator(model, params).generate([prompt], max_new_tokens=1, eos_id=())[0]
    embedding = np.asarray(params["embed_tokens"]["embedding"]).copy()
    embedding[first] = np.nan
    poisoned = {**params, "embed_tokens": {"embedding": embedding}}
    want = Generator(model, poisoned).generate([other], max_new_tokens=6, eos_id=())[0]
    assert first not in want, "the other row must not meet the poisoned token"
    engine = Engine(
        Generator(model, poisoned, stack=AdapterStack(CFG, 1, 2)), max_batch=2, max_len=32, max_queue=4, eos=[]
    )
    got = {0: ([], queue.Queue()), 1: ([], queue.Queue())}
    for i, ids in enumerate((prompt, other)):
        out, ends = got[i]
        engine.submit_all(
            [Request(ids, None, 6, lambda new, fin, out=out, ends=ends: (out.extend(new), fin and ends.put(fin)))]
        )
    bad = got[0][1].get(timeout=60)
    assert bad.startswith("failed: the model gave NaN or inf logits for new token 2"), bad
    assert got[0][0] == [first]
    assert got[1][1].get(timeout=60) == "length" and got[1][0] == want
