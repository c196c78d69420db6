"""jlora.infer.lora_stack: adapters of different ranks and targets, and base rows, in one generated batch
(each row equal to generating it alone with its own adapter), hot-loading with no recompile, and the
one-line refusals of an adapter over the stack's max rank or capacity."""

import jax
import numpy as np
import pytest
from lora_testing import randomize

import jlora
from jlora.infer.generate import GenerateError, Generator, generate
from jlora.infer.lora_stack import AdapterStack, AdapterStackError

CFG = jlora.PRESETS["tiny"].replace(max_position_embeddings=64)
PROMPTS = [[1, 17, 250], [1, 400, 22, 9, 13, 77, 5, 6, 301, 44], [7], [1, 5, 9, 200, 3], [1, 2, 3, 4]]
# three adapters: rank 4 on q/v, rank 8 on all linear modules (rsLoRA), rank 2 on o/down of layer 1 only
LCFGS = {
    "qv4": jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
    "all8": jlora.LoraConfig(rank=8, alpha=16, targets="all-linear", use_rslora=True),
    "od2": jlora.LoraConfig(rank=2, alpha=4, targets=("o_proj", "down_proj"), layers=(1,)),
}
ROWS = ["qv4", None, "all8", "od2", "qv4"]


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    draw = lambda path, s: (
        np.ones(s.shape, np.float32) if path[-1].key == "weight" else rng.normal(0.0, 0.08, s.shape).astype(np.float32)
    )
    params = jax.tree_util.tree_map_with_path(draw, jlora.models.family.param_shapes(CFG))
    adapters = {
        name: randomize(jlora.split(params, lcfg, jax.random.key(i))[1], seed=i, std=0.3)
        for i, (name, lcfg) in enumerate(LCFGS.items())
    }
    return jlora.Llama(CFG), params, adapters


@pytest.fixture(scope="module")
def alone(tiny):
    """alone[name][i]: prompt i generated with adapter `name` only (None: the base), by plain `generate`."""
    model, params, adapters = tiny
    return {
        name: [
            generate(model, params, adapters[name] if name else None, [p], max_new_tokens=12, eos_id=())[0]
            for p in PROMPTS
        ]
        for name in [None, *adapters]
    }  # one row per call, as test_serve's


class CompileCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile events) while active."""

    def __init__(self):
        self.count = 0

    def __call__(self, event: str, duration: float, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def expected(alone, rows) -> list[list[int]]:
    return [alone[name][i] for i, name in enumerate(rows)]


def test_mixed_adapters_in_one_batch_equal_each_row_alone(tiny, alone):
    model, params, adapters = tiny
    stack = AdapterStack(CFG, capacity=4, max_rank=8)
    for name, tree in adapters.items():
        stack.add(name, tree)
    mixed = Generator(model, params, stack=stack).generate(PROMPTS, max_new_tokens=12, eos_id=(), adapters=ROWS)
    assert mixed == expected(alone, ROWS)
    assert all(m != alone[None][i] for i, (m, name) in enumerate(zip(mixed, ROWS)) if name)  # each adapter matters


def test_hot_load_generate_unload_never_recompiles(tiny, alone):
    model, params, adapters = tiny
    stack = AdapterStack(CFG, capacity=2, max_rank=8)
    gen = Generator(model, params, stack=stack)
    run = lambda rows: gen.generate(PROMPTS, max_new_tokens=12, eos_id=(), adapters=rows)
    stack.add("qv4", adapters["qv4"])
    run(["qv4", None] * 2 + ["qv4"])  # compiles (once per process)
    stack.remove("qv4")  # warms the slot update too
    with CompileCounter() as compiles:
        stack.add("all8", adapters["all8"])
        stack.add("od2", adapters["od2"])
        rows1 = ["all8", "od2", None, "od2", "all8"]
        first = run(rows1)
        stack.remove("all8")
        stack.add("qv4", adapters["qv4"])  # into the freed slot
        rows2 = ["od2", "qv4", "qv4", None, "od2"]
        second = run(rows2)
        stack.add("od2", adapters["all8"])  # replace in place: the name now holds all8's weights
        third = run(["od2", None, "qv4", "od2", None])
    assert compiles.count == 0
    assert first == expected(alone, rows1)
    assert second == expected(alone, rows2)
    assert third == expected(alone, ["all8", None, "qv4", "all8", None])
    assert stack.loaded() == ["qv4", "od2"]


def test_over_rank_or_capacity_or_unknown_is_one_line(tiny):
    model, params, adapters = tiny
    stack = AdapterStack(CFG, capacity=2, max_rank=4, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    with pytest.raises(AdapterStackError, match=r"adapter 'all8' has rank 8 .* over the stack's max rank 4"):
        stack.add("all8", adapters["all8"])
    stack.add("qv4", adapters["qv4"])
    stack.add("od2", adapters["od2"])
    with pytest.raises(AdapterStackError, match=r"the stack is full \(2 adapters: qv4, od2\); remove one first"):
        stack.add("more", adapters["qv4"])
    narrow = AdapterStack(CFG, capacity=2, max_rank=8, targets=("q_proj",))
    with pytest.raises(AdapterStackError, match=r"adapts layers\.self_attn\.v_proj\.kernel, which this stack does not"):
        narrow.add("qv4", adapters["qv4"])
    with pytest.raises(GenerateError, match="no adapter named 'nope' in the stack"):
        Generator(model, params, stack=stack).generate([[1, 2]], max_new_tokens=2, adapters=["nope"])
    assert stack.loaded() == ["qv4", "od2"]  # a refused add changes nothing


@pytest.mark.slow
def test_mixed_adapters_on_smollm2_equal_each_row_alone(smollm2_gguf):
    cfg, params = jlora.load_pretrained(smollm2_gguf)
    model = jlora.Llama(cfg)
    lcfgs = {
        "a4": jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
        "b16": jlora.LoraConfig(rank=16, alpha=16, targets=("up_proj", "down_proj", "o_proj")),
        "c8": jlora.LoraConfig(rank=8, alpha=32, targets=("k_proj", "gate_proj"), use_rslora=True),
    }
    adapters = {
        n: randomize(jlora.split(params, lc, jax.random.key(i))[1], seed=i, std=0.05)
        for i, (n, lc) in enumerate(lcfgs.items())
    }
    stack = AdapterStack(cfg, capacity=3, max_rank=16)
    for name, tree in adapters.items():
        stack.add(name, tree)
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 20, 30], [1, 504, 2444], [1, 7]]
    rows = ["a4", None, "b16", "c8"]
    mixed = Generator(model, params, stack=stack).generate(prompts, max_new_tokens=6, eos_id=(), adapters=rows)
    singles = [
        generate(model, params, adapters[n] if n else None, [p], max_new_tokens=6, eos_id=())[0]
        for n, p in zip(rows, prompts)
    ]
    assert mixed == singles
    base = generate(model, params, None, prompts, max_new_tokens=6, eos_id=())
    assert sum(m != b for m, b in zip(mixed, base)) >= 2
