"""jlora-serve against the official `openai` client: a live server on localhost with the tiny model and
the three adapters of test_adapter_stack. Models list, completions and chat for base and adapters,
streaming, 16 concurrent requests over 3 adapters (each equal to offline `jlora.infer.generate`), every bad
request with its status, hot-loading over HTTP, and 429 under a flood with the server serving after."""

import concurrent.futures
import contextlib
import json
import os
import pathlib
import queue
import socket
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest
from cli_testing import script
from test_adapter_stack import CFG, LCFGS, tiny  # noqa: F401 - the shared fixture
from tokenizers import Tokenizer, models, pre_tokenizers

import jlora
from jlora.infer.engine import Engine, Request
from jlora.infer.generate import Generator, generate
from jlora.infer.lora_stack import AdapterStack

BASE = "tiny-base"
TEMPLATE = (
    "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}"
    "{% if add_generation_prompt %}w9{% endif %}"
)


def _model_dir(path: pathlib.Path, params, template: str = TEMPLATE) -> pathlib.Path:
    """The tiny model as an HF dir with a word-level tokenizer over all 512 ids and a chat template."""
    jlora.save_pretrained(params, CFG, path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, CFG.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template})
    )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(work: pathlib.Path, params, adapters: dict, *args, template: str = TEMPLATE):
    """A jlora-serve subprocess on a free port for the tiny model (saved under work/base with `template`), with
    `adapters` {name: tree} saved under work/adapters and loaded, and `args` added. Yields (url, port, log path);
    on exit it stops the server and checks that its log holds no traceback."""
    base = _model_dir(work / "base", params, template)
    for name, tree in adapters.items():
        jlora.save_adapter(work / "adapters" / name, tree, LCFGS[name], base=CFG)
    port = _free_port()
    cmd = [script("jlora-serve"), "--model", base, "--name", BASE, "--port", port, *args]
    for name in adapters:
        cmd += ["--adapter", f"{name}={work / 'adapters' / name}"]
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(
        [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, (work / "server.log").read_text()
            time.sleep(0.2)
    try:
        yield url, port, work / "server.log"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    text = (work / "server.log").read_text()
    assert "Traceback" not in text, text


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):  # noqa: F811
    """(client, base url, offline reference function, server log path) for a live jlora-serve with adapters
    qv4, all8 and od2 loaded at start (one slot free) and all three in its adapter dir."""
    model, params, adapters = tiny
    work = tmp_path_factory.mktemp("serve")
    limits = ["--max-batch", 16, "--max-queue", 16, "--max-len", 64, "--max-adapters", 4, "--max-rank", 8]
    with live_server(
        work,
        params,
        adapters,
        *limits,
        "--max-body-bytes",
        20000,
        "--allow-adapter-loading",
        "--adapter-dir",
        work / "adapters",
    ) as (url, _, log):
        tok = jlora.load_tokenizer(work / "base")

        def offline(name, prompt, max_tokens=8, chat=False):  # one row per call: one compiled size per adapter
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tok.encode(text, add_bos=False) if chat else tok.encode(prompt)
            tree = adapters[name] if name else None
            out = generate(model, params, tree, [ids], max_new_tokens=max_tokens, eos_id=[2])
            return tok.decode(out[0], skip_special_tokens=True)

        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120), url, offline, log


PROMPTS = ["w5 w17 w40", "w400 w22 w9 w13 w77 w5 w6 w301", "w7", "w11 w12 w13 w14 w15", "w300 w200"]


def test_models_list(served):
    client, *_ = served
    assert [m.id for m in client.models.list().data] == [BASE, "qv4", "all8", "od2"]


def test_completions_and_chat_for_base_and_adapters_equal_offline(served):
    client, _, offline, _ = served
    for name in (None, "qv4", "all8"):
        got = [
            client.completions.create(model=name or BASE, prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in PROMPTS[:2]
        ]
        assert got == [offline(name, p) for p in PROMPTS[:2]]
        chat = client.chat.completions.create(
            model=name or BASE, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=8, temperature=0
        )
        assert chat.choices[0].message.content == offline(name, PROMPTS[3], chat=True)
    assert len(set(offline(n, PROMPTS[0]) for n in (None, "qv4", "all8"))) == 3  # the adapters matter


def test_streaming_equals_the_whole_answer(served):
    client, _, offline, _ = served
    parts = [
        c.choices[0].text
        for c in client.completions.create(model="all8", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    ]
    assert len([p for p in parts if p]) > 1 and "".join(parts) == offline("all8", PROMPTS[1])
    chunks = list(
        client.chat.completions.create(
            model="qv4", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline("qv4", PROMPTS[0], chat=True)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_16_concurrent_requests_over_3_adapters_equal_offline(served):
    client, url, offline, _ = served
    names = ["qv4", "all8", "od2", "qv4", "all8", "od2", None]  # 3 adapters and the base
    jobs = [(names[i % 7], PROMPTS[i % 5] + f" w{100 + i}", 4 + i % 9) for i in range(16)]

    def ask(job):
        name, prompt, n = job
        return client.completions.create(model=name or BASE, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [offline(name, p, max_tokens=n) for name, p, n in jobs]


def _raw(url: str, data: bytes, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_their_4xx_as_openai_errors(served):
    client, url, *_ = served
    cases = [
        (openai.NotFoundError, dict(model="nope", prompt="w5"), "does not exist"),
        (openai.BadRequestError, dict(model=BASE, prompt="w5 " * 60, max_tokens=8), "context is 64 tokens"),
        (openai.BadRequestError, dict(model=BASE, prompt="w5", temperature=5), "temperature"),
        (openai.BadRequestError, dict(model=BASE, prompt="w5", top_p=0), "top_p"),
        (openai.BadRequestError, dict(model="qv4", prompt="w5", max_tokens=0), "max_tokens"),
    ]
    for error, kwargs, needle in cases:
        with pytest.raises(error, match=needle) as e:
            client.completions.create(**kwargs)
        assert e.value.body["message"] and "Traceback" not in str(e.value.body)
    assert _raw(f"{url}/completions", b'{"model": "tiny-base", "prompt": ')[0] == 400  # malformed JSON
    status, body = _raw(f"{url}/completions", json.dumps({"model": BASE, "prompt": "w5 " * 9000}).encode())
    assert status == 413 and "limit" in body["error"]["message"]
    assert _raw(f"{url}/adapters", json.dumps({"name": "x", "path": "../../etc"}).encode())[0] == 403
    assert _raw(f"{url}/adapters/nope", b"", method="DELETE")[0] == 404


def test_hot_load_generate_unload_over_http(served):
    client, url, offline, _ = served
    status, body = _raw(f"{url}/adapters", json.dumps({"name": "od2-copy", "path": "od2"}).encode())
    assert status == 200, body
    assert [m.id for m in client.models.list().data] == [BASE, "qv4", "all8", "od2", "od2-copy"]
    got = client.completions.create(model="od2-copy", prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
    assert got == offline("od2", PROMPTS[2])
    status, body = _raw(f"{url}/adapters", json.dumps({"name": "more", "path": "qv4"}).encode())
    assert status == 400 and "the stack is full" in body["error"]["message"]
    assert _raw(f"{url}/adapters/od2-copy", b"", method="DELETE")[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="od2-copy", prompt="w5", max_tokens=2)


def test_a_flood_gets_429_and_the_server_keeps_serving(served):
    client, _, offline, _ = served

    def ask(i):
        try:
            client.completions.create(model="qv4", prompt=f"w{10 + i}", max_tokens=60, temperature=0)
            return 200
        except openai.RateLimitError:
            return 429

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(ask, range(64)))
    assert codes.count(429) > 0 and set(codes) == {200, 429}
    got = client.completions.create(model="all8", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert got == offline("all8", PROMPTS[0])


def test_a_request_past_its_deadline_ends_with_timeout(tiny):  # noqa: F811
    """The engine behind the server's 408: a request whose deadline passed, waiting or running, ends."""
    model, params, _ = tiny
    engine = Engine(
        Generator(model, params, stack=AdapterStack(CFG, 1, 2)), max_batch=1, max_len=32, max_queue=2, eos=[]
    )
    ends = queue.Queue()
    engine.submit(Request([1, 2, 3], None, 20, lambda new, fin: fin and ends.put(fin), deadline=time.monotonic() - 1))
    assert ends.get(timeout=60) == "timeout"
    full = Engine(Generator(model, params, stack=AdapterStack(CFG, 1, 2)), max_batch=1, max_len=32, max_queue=0, eos=[])
    assert not full.submit(Request([1], None, 1, print))  # a full queue refuses: the server's 429


def test_rows_join_and_leave_mid_flight_equal_offline(tiny):  # noqa: F811
    """The engine's pipelined steps: 7 requests over 3 rows, some ending by EOS and some by length while
    others run, later ones joining freed rows (the host reads each step while the next one runs). Every
    answer equals offline `generate` with the same EOS."""
    model, params, adapters = tiny
    stack = AdapterStack(CFG, 3, 8)
    for name, tree in adapters.items():
        stack.add(name, tree)
    jobs = [([1, 5 + 3 * i, 40 + i], [None, "qv4", "all8", "od2"][i % 4], 4 + 2 * i) for i in range(7)]
    alone = lambda p, name, n, eos: generate(
        model, params, adapters[name] if name else None, [p], max_new_tokens=n, eos_id=eos
    )[0]
    eos = alone(*jobs[6], ())[5]  # a token the longest answer makes mid-way
    want = [alone(p, name, n, [eos]) for p, name, n in jobs]
    assert any(len(w) < n for w, (_, _, n) in zip(want, jobs)) and any(len(w) == n for w, (_, _, n) in zip(want, jobs))
    engine = Engine(Generator(model, params, stack=stack), max_batch=3, max_len=48, max_queue=8, eos=[eos])
    got, ends = [[] for _ in jobs], queue.Queue()
    for i, (p, name, n) in enumerate(jobs):
        engine.submit(Request(p, name, n, lambda new, fin, i=i: (got[i].extend(new), fin and ends.put(fin))))
        if i == 1:  # the rest arrive once the first two are decoding
            while not got[0]:
                time.sleep(0.01)
    assert sorted(ends.get(timeout=120) for _ in jobs) == sorted(
        "stop" if len(w) < n else "length" for w, (_, _, n) in zip(want, jobs)
    )
    assert got == want


def test_warm_up_compiles_every_prompt_size_before_the_first_request(tiny):  # noqa: F811
    """After `Engine.warm_up`, requests of any prompt length up to the context (one at a time, greedy or
    sampled, with an adapter) compile no new prefill, cache insert or sampling program."""
    from jlora.infer import engine as engine_module
    from jlora.infer import row_sampling

    model, params, adapters = tiny
    cfg = CFG.replace(max_position_embeddings=96)  # a model no other test compiles for
    stack = AdapterStack(cfg, 1, 8)
    stack.add("qv4", adapters["qv4"])
    engine = Engine(Generator(jlora.Llama(cfg), params, stack=stack), max_batch=4, max_len=96, max_queue=8, eos=[])
    assert engine.warm_up() == len([16, 32, 64, 128])  # 94 tokens, the longest prompt warmed, pack into 128
    jitted = (engine_module._prefill_packed, engine_module._insert, row_sampling.sample_rows)
    programs = lambda: [f._cache_size() for f in jitted]
    compiled = programs()
    ends = queue.Queue()
    for n, temperature in ((3, 0.0), (20, 1.0), (45, 0.0), (70, 0.7), (90, 0.0)):
        engine.submit(Request([5] * n, "qv4", 4, lambda new, fin: fin and ends.put(fin), temperature=temperature))
        assert ends.get(timeout=120) == "length"
    assert programs() == compiled


def test_a_request_to_an_idle_engine_moves_no_cache_slots(tiny, monkeypatch):  # noqa: F811
    """With no row live, a joining prompt needs no room made before the fill index: the engine moves the index,
    not every row of the cache (a full copy, ~0.8 s at SmolLM2's 16 rows x 1024 slots). The answers still
    equal offline generation."""
    from jlora.infer import engine as engine_module

    model, params, _ = tiny
    shifts = []
    shift = engine_module._shift
    monkeypatch.setattr(engine_module, "_shift", lambda *a: shifts.append(a[1]) or shift(*a))
    engine = Engine(
        Generator(model, params, stack=AdapterStack(CFG, 1, 2)), max_batch=2, max_len=48, max_queue=4, eos=[]
    )
    for prompt in ([1, 5, 9], [1, 400, 22, 9, 13, 77, 5]):  # the second is longer than the fill index the first left
        got, ends = [], queue.Queue()
        engine.submit(Request(prompt, None, 4, lambda new, fin, got=got: (got.extend(new), fin and ends.put(fin))))
        assert ends.get(timeout=120) == "length"
        assert got == generate(model, params, None, [prompt], max_new_tokens=4, eos_id=())[0]
    assert shifts == []
