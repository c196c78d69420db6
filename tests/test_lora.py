"""LoRA as a params-tree transformation (jlora.peft.lora) on the LLaMA port: logits parity with HF PEFT (every linear +
lm_head + embeddings, rsLoRA, DoRA, rank/alpha patterns, PiSSA), zero init, merge/unmerge properties, an optimizer
step on a layer subset with train_extra, dropout, errors, describe/count. The model-agnostic routing and the
no-[in, out]-delta jaxpr check live in test_lora_apply.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import traverse_util
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_testing import is_pair, randomize

import jlora
from jlora import split
from jlora.formats.weights import read_pretrained
from jlora.models.family import param_shapes
from jlora.models.llama import PRESETS, Llama, LlamaConfig
from jlora.peft.lora import LoraConfig, LoraError, count_params, describe, merge, unmerge
from jlora.peft.routing import apply

HF_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = {name: "self_attn" if i < 4 else "mlp" for i, name in enumerate(LINEAR)}  # jlora's submodule of each
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 10)), jnp.int32)
TOL = dict(atol=1e-5, rtol=0)
# rbg keys: XLA:CPU takes seconds to compile each eager threefry kernel, once per new shape split() draws
KEY = functools.partial(jax.random.key, impl="rbg")


def pairs(trainable) -> dict:
    return {
        k: v for k, v in traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: is_pair(x)).items() if is_pair(v)
    }


@functools.cache
def forwards(cfg: LlamaConfig):
    """(base forward on plain params, LoRA forward on (frozen, trainable)), jitted once per config."""
    model = Llama(cfg)
    return (jax.jit(lambda p, ids: model.apply({"params": p}, ids)), jax.jit(lambda f, t, ids: apply(model, f, t, ids)))


# ---- a tiny untied HF LLaMA, and the same weights in jlora ----


def tiny_hf(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_TINY, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def torch_logits(model) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor(np.array(IDS), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, params, HF logits) of the tiny model; each test builds its own HF copy, since PEFT edits it."""
    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_hf()
    model.save_pretrained(path)
    cfg, params = read_pretrained(path)
    return cfg, jax.tree.map(jnp.asarray, params), torch_logits(model)


def peft_key(path: tuple, layer: int | None) -> str:
    """HF PEFT's module name for a jlora pair path (and layer of a stacked pair)."""
    module = list(path[:-1])
    if layer is not None:
        module.insert(1, str(layer))
    return "base_model.model." + ("" if module[0] == "lm_head" else "model.") + ".".join(module)


def randomize_peft(peft_model, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))


def copy_from_peft(peft_model, trainable):
    """trainable with A/B/magnitude set from PEFT: lora_A [r, in] is A.T, lora_B [out, r] is B.T, per layer."""
    sd = {k: v.detach().numpy() for k, v in peft_model.state_dict().items()}
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: is_pair(x))
    for path, pair in pairs(trainable).items():
        names = [peft_key(path, i) for i in range(pair.a.shape[0])] if pair.layout.stack else [peft_key(path, None)]
        embed = pair.layout.kind == "embed"

        def get(suffix, transpose=True):
            arrays = [sd[f"{n}.{suffix}"] for n in names]
            arrays = [x.T if transpose else x for x in arrays]
            return np.stack(arrays) if pair.layout.stack else arrays[0]

        a = get("lora_embedding_A.default" if embed else "lora_A.default.weight")
        b = get("lora_embedding_B.default" if embed else "lora_B.default.weight")
        assert a.shape == pair.a.shape and b.shape == pair.b.shape, (path, a.shape, pair.a.shape)
        m = get("lora_magnitude_vector.default.weight", False) if pair.magnitude is not None else None
        flat[path] = pair.replace(a=jnp.asarray(a), b=jnp.asarray(b), magnitude=None if m is None else jnp.asarray(m))
    return traverse_util.unflatten_dict(flat)


PEFT_CASES = {  # name: (PEFT LoraConfig kwargs, jlora LoraConfig kwargs)
    "linear_lm_head_embed": (
        dict(target_modules=[*LINEAR, "lm_head", "embed_tokens"]),
        dict(targets=(*LINEAR, "lm_head", "embed_tokens")),
    ),
    "rslora": (
        dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
        dict(targets=("q_proj", "v_proj", "down_proj"), use_rslora=True),
    ),
    "dora": (
        dict(target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], use_dora=True),
        dict(targets=("q_proj", "v_proj", "down_proj", "lm_head"), use_dora=True),
    ),
    "patterns": (
        dict(
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 2, "up_proj": 8},
            alpha_pattern={"model.layers.1.self_attn.q_proj": 32, "up_proj": 4},
        ),
        dict(
            targets=("q_proj", "v_proj", "up_proj"),
            rank_pattern={"v_proj": 2, "up_proj": 8},
            alpha_pattern={"layers.1.self_attn.q_proj": 32.0, "up_proj": 4.0},
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_logits_match_peft(case, tiny):
    cfg, params, _ = tiny
    peft_kwargs, ours = PEFT_CASES[case]
    pm = peft.get_peft_model(tiny_hf(), peft.LoraConfig(r=4, lora_alpha=8, **peft_kwargs)).eval()
    randomize_peft(pm)
    frozen, trainable = split(params, LoraConfig(rank=4, alpha=8, **ours), KEY(0))
    trainable = copy_from_peft(pm, trainable)
    for path, pair in pairs(trainable).items():  # every pair carries PEFT's scale, layer by layer
        peft_scales = [
            pm.get_submodule(peft_key(path, i if pair.layout.stack else None)).scaling["default"]
            for i in range(pair.a.shape[0] if pair.layout.stack else 1)
        ]
        np.testing.assert_allclose(np.atleast_1d(pair.scale), peft_scales, rtol=1e-6)
    base_fwd, lora_fwd = forwards(cfg)
    ours_logits = np.asarray(lora_fwd(frozen, trainable, IDS))
    np.testing.assert_allclose(ours_logits, torch_logits(pm), **TOL)
    np.testing.assert_allclose(np.asarray(base_fwd(merge(frozen, trainable), IDS)), ours_logits, **TOL)


def test_pissa_preserves_the_initial_output_like_peft(tiny):
    cfg, params, base = tiny
    targets = ("q_proj", "v_proj", "o_proj")
    pm = peft.get_peft_model(
        tiny_hf(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights="pissa")
    ).eval()
    frozen, trainable = split(params, LoraConfig(rank=4, alpha=8, targets=targets, init="pissa"), KEY(0))
    ours = np.asarray(forwards(cfg)[1](frozen, trainable, IDS))
    np.testing.assert_allclose(ours, base, **TOL)
    np.testing.assert_allclose(torch_logits(pm), base, **TOL)
    for name in targets:  # the residual W - s*A@B is sign-free, so it must equal PEFT's exactly
        module = BLOCK[name]
        w_res = frozen["layers"][module][name]["kernel"]
        peft_res = np.stack(
            [
                pm.get_submodule(f"base_model.model.model.layers.{i}.{module}.{name}")
                .base_layer.weight.detach()
                .numpy()
                .T
                for i in range(cfg.num_hidden_layers)
            ]
        )
        np.testing.assert_allclose(np.asarray(w_res), peft_res, **TOL)
        assert np.abs(np.asarray(w_res) - params["layers"][module][name]["kernel"]).max() > 1e-2  # W really moved


# ---- zero init, merge, gradients, optimizer step ----


def test_zero_b_init_is_the_base_model_and_nonzero_ab_equals_merged(tiny):
    cfg, params, _ = tiny
    base_fwd, lora_fwd = forwards(cfg)
    frozen, trainable = split(params, LoraConfig(rank=4, alpha=8, targets="all-linear"), KEY(1))
    assert {p[-2] for p in pairs(trainable)} == set(LINEAR)  # all-linear: not lm_head, not the embedding
    # B = 0 adds exact zeros; the two compiled programs may still round differently (fused differently)
    np.testing.assert_allclose(np.asarray(lora_fwd(frozen, trainable, IDS)), np.asarray(base_fwd(params, IDS)), **TOL)
    trainable = randomize(trainable)
    ours = np.asarray(lora_fwd(frozen, trainable, IDS))
    assert np.abs(ours - np.asarray(base_fwd(params, IDS))).max() > 1e-2
    np.testing.assert_allclose(np.asarray(base_fwd(merge(frozen, trainable), IDS)), ours, **TOL)


def xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def test_train_step_moves_only_the_trainable_leaves_of_the_chosen_layers(tiny):
    cfg, params, _ = tiny
    model, opt = Llama(cfg), optax.adamw(1e-2)
    lcfg = LoraConfig(
        rank=4,
        alpha=8,
        targets=("q_proj", "v_proj", "down_proj"),
        layers=(1,),
        train_extra=r"^norm\.|post_attention_layernorm",
    )
    frozen, trainable = split(params, lcfg, KEY(0))
    trainable = randomize(trainable)
    assert count_params(trainable) == (64 * 4 + 4 * 64) + (64 * 4 + 4 * 32) + (128 * 4 + 4 * 64) + 64 + 2 * 64

    @functools.partial(jax.jit, donate_argnums=(1, 2))  # never the frozen tree
    def step(frozen, trainable, opt_state):
        grads = jax.grad(lambda t: xent(apply(model, frozen, t, IDS), IDS))(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, grads

    frozen_before, trainable_before = jax.tree.map(np.array, frozen), jax.tree.map(np.array, trainable)
    new, _, grads = step(frozen, trainable, opt.init(trainable))
    assert jax.tree.structure(grads) == jax.tree.structure(trainable_before)
    for path, g in pairs(grads).items():  # layer 0 is not adapted: exactly no gradient, no update
        assert g.a.shape[0] == 2 and np.asarray(g.a[1]).any() and np.asarray(g.b[1]).any(), path
        assert not np.asarray(g.a[0]).any() and not np.asarray(g.b[0]).any(), path
    for path, p in pairs(new).items():
        old = pairs(trainable_before)[path]
        np.testing.assert_array_equal(np.asarray(p.a[0]), 0)
        assert not np.array_equal(np.asarray(p.a[1]), old.a[1]) and not np.array_equal(np.asarray(p.b[1]), old.b[1])
    extras = [k for k in traverse_util.flatten_dict(grads, is_leaf=lambda _, x: is_pair(x)) if k[-1] == "weight"]
    assert len(extras) == 2
    for k in extras:  # the norms named by train_extra are trained in full
        assert np.asarray(traverse_util.flatten_dict(grads)[k]).all()
        assert not np.array_equal(traverse_util.flatten_dict(new)[k], traverse_util.flatten_dict(trainable_before)[k])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), frozen_before, frozen)
    merged, original = merge(frozen, new)["layers"], params["layers"]
    for module, name in [("self_attn", "q_proj"), ("mlp", "down_proj")]:
        w, w0 = np.asarray(merged[module][name]["kernel"]), np.asarray(original[module][name]["kernel"])
        np.testing.assert_array_equal(w[0], w0[0])
        assert np.abs(w[1] - w0[1]).max() > 1e-3


def test_train_extra_moves_named_norms_into_the_trainable_tree(tiny):
    _, params, _ = tiny
    frozen, trainable = split(params, LoraConfig(targets=("q_proj",), train_extra=r"(^|\.)norm\.|layernorm"), KEY(0))
    extra = set(traverse_util.flatten_dict(trainable)) - {("layers", "self_attn", "q_proj", "kernel")}
    assert extra == {
        ("norm", "weight"),
        ("layers", "input_layernorm", "weight"),
        ("layers", "post_attention_layernorm", "weight"),
    }
    assert not extra & set(traverse_util.flatten_dict(frozen))
    assert count_params(trainable) == 2 * (64 * 8 + 8 * 64) + 64 + 2 * 2 * 64  # q_proj r=8, three norms
    merged = traverse_util.flatten_dict(merge(frozen, trainable))  # a plain tree again, norms back in place
    assert set(merged) == set(traverse_util.flatten_dict(params))
    only = split(params, LoraConfig(targets=(), train_extra="lm_head"), KEY(0))[1]  # no LoRA pairs at all
    assert count_params(only) == 64 * 256 and not pairs(only)


def test_dropout_needs_an_rng_and_is_deterministic_per_key(tiny):
    cfg, params, _ = tiny
    model = Llama(cfg)
    frozen, trainable = split(params, LoraConfig(rank=4, targets=("q_proj", "v_proj"), dropout=0.5), KEY(0))
    trainable = randomize(trainable)
    train = jax.jit(lambda t, key: apply(model, frozen, t, IDS, rngs={"dropout": key}))
    evaluate = np.asarray(forwards(cfg)[1](frozen, trainable, IDS))
    np.testing.assert_allclose(evaluate, np.asarray(forwards(cfg)[0](merge(frozen, trainable), IDS)), **TOL)
    one, again, two = (np.asarray(train(trainable, KEY(k))) for k in (1, 1, 2))
    np.testing.assert_array_equal(one, again)
    assert np.abs(one - evaluate).max() > 1e-3 and np.abs(one - two).max() > 1e-3
    # dropout touches only the LoRA input: with B = 0 the base output is untouched (dropout on the
    # base input would move it by O(1); two differently compiled programs may differ by rounding)
    zero_b = jax.tree.map(lambda p: p.replace(b=jnp.zeros_like(p.b)), trainable, is_leaf=is_pair)
    np.testing.assert_allclose(np.asarray(train(zero_b, KEY(1))), np.asarray(forwards(cfg)[0](params, IDS)), **TOL)


# ---- properties over random MLP-like trees ----


@st.composite
def mlp_trees(draw):
    """(params, LoraConfig): a Dense chain, maybe a scanned [L, d, d] stack, random targets, ranks and init."""
    dims = draw(st.lists(st.sampled_from([2, 3, 5]), min_size=2, max_size=4))  # few distinct shapes: fewer compiles
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    params = {
        f"fc{i}": {"kernel": rng.normal(size=(i_, o_)).astype(np.float32), "bias": np.zeros(o_, np.float32)}
        for i, (i_, o_) in enumerate(zip(dims, dims[1:]))
    }
    if draw(st.booleans()):
        d = dims[-1]
        params["blocks"] = {
            "proj": {"kernel": rng.normal(size=(3, d, d)).astype(np.float32)},
            "norm": {"scale": np.ones((3, d), np.float32)},
        }
    names = sorted(m for m in params if m != "blocks") + (["proj"] if "blocks" in params else [])
    targets = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    flat = traverse_util.flatten_dict(params)
    smallest = min(min(w.shape[-2:]) for p, w in flat.items() if p[-1] == "kernel" and p[-2] in targets)
    lcfg = LoraConfig(
        rank=draw(st.integers(1, smallest)),
        alpha=draw(st.floats(0.5, 32.0)),
        targets=tuple(targets),
        init=draw(st.sampled_from(["lora", "gaussian", "b_random", "pissa"])),
        use_rslora=draw(st.booleans()),
        train_extra=draw(st.sampled_from([None, "bias"] + (["norm"] if "blocks" in params else []))),
        layers=draw(st.sampled_from([None, (0, 2)])) if "proj" in targets else None,
    )  # of 3 blocks
    return jax.tree.map(jnp.asarray, params), lcfg


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


@settings(max_examples=8, deadline=None)
@given(mlp_trees(), st.integers(0, 3))
def test_merge_of_a_fresh_split_is_the_original_tree(case, seed):
    params, lcfg = case
    merged = merge(*split(params, lcfg, KEY(seed)))
    if lcfg.init == "pissa":  # W is split into residual + top-r SVD factors: equal up to rounding
        assert_trees_close(merged, params, atol=1e-5, rtol=1e-5)
    else:  # B = 0 (or A = 0): W + s*A@B is W bit for bit
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), merged, params)


@settings(max_examples=8, deadline=None)
@given(mlp_trees(), st.integers(0, 3))
def test_unmerge_undoes_merge(case, seed):
    params, lcfg = case
    frozen, trainable = split(params, lcfg, KEY(seed))
    trainable = randomize(trainable, seed, std=0.5)
    merged = merge(frozen, trainable)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert_trees_close(unmerge(merged, trainable), frozen, atol=1e-5, rtol=1e-5)


def test_adapters_stay_fp32_on_a_bf16_base_and_merge_accumulates_in_fp32():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.bfloat16)
    frozen, trainable = split({"fc": {"kernel": w}}, LoraConfig(rank=2, alpha=4, targets=("fc",)), KEY(0))
    pair = trainable["fc"]["kernel"]
    assert pair.a.dtype == pair.b.dtype == jnp.float32 and frozen["fc"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merge(frozen, trainable)["fc"]["kernel"]), np.asarray(w))
    pair = randomize(trainable)["fc"]["kernel"]
    merged = merge(frozen, {"fc": {"kernel": pair}})["fc"]["kernel"]
    expected = (w.astype(jnp.float32) + 2.0 * np.asarray(pair.a) @ np.asarray(pair.b)).astype(jnp.bfloat16)
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(merged, np.float32), np.asarray(expected, np.float32), rtol=2**-8, atol=0)


# ---- bad input: one clear line ----


def one_line_error(fn, *match: str) -> str:
    with pytest.raises(LoraError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    for text in match:
        assert text in message, (text, message)
    return message


def test_bad_input_gets_one_clear_line(tiny):
    cfg, params, _ = tiny
    key = KEY(0)
    one_line_error(lambda: split(params, LoraConfig(targets=("q_prj",)), key), "'q_prj'", "layers.self_attn.q_proj")
    one_line_error(lambda: LoraConfig(rank=0), "rank=0")
    one_line_error(lambda: LoraConfig(rank=-2), "rank=-2")
    one_line_error(
        lambda: split(params, LoraConfig(rank=33, targets=("v_proj",)), key),
        "rank 33",
        "min(in=64, out=32)",
        "layers.self_attn.v_proj",
    )
    one_line_error(lambda: split(params, LoraConfig(targets=("q_proj",), rank_pattern={"q_proj": 65}), key), "rank 65")
    one_line_error(lambda: LoraConfig(alpha=0), "alpha=0")
    one_line_error(lambda: LoraConfig(alpha=-1.0), "alpha=-1.0")
    one_line_error(lambda: LoraConfig(alpha_pattern={"q_proj": 0}), "alpha_pattern['q_proj']")
    one_line_error(lambda: LoraConfig(init="kaiming"), "'kaiming'", "pissa")
    one_line_error(
        lambda: split(params, LoraConfig(targets=("embed_tokens",), use_dora=True), key),
        "DoRA",
        "embed_tokens",
        "embed",
    )
    one_line_error(lambda: split(params, LoraConfig(targets=(), train_extra="nothing_here"), key), "'nothing_here'")
    # merging a trainable tree into a frozen tree of another model
    _, trainable = split(params, LoraConfig(targets=("q_proj",)), key)
    other = jax.eval_shape(lambda: jlora.init_params(cfg.replace(hidden_size=32, num_attention_heads=2), key))
    other = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), other)
    one_line_error(lambda: merge(other, trainable), "layers.self_attn.q_proj.kernel", "does not fit kernel (2, 32, 32)")
    del other["layers"]["self_attn"]["q_proj"]
    one_line_error(lambda: merge(other, trainable), "does not have")


# ---- describe and count ----


def test_describe_lists_modules_ranks_scales_and_the_count(tiny):
    _, params, _ = tiny
    lcfg = LoraConfig(
        rank=4,
        alpha=8,
        targets=("q_proj", "v_proj", "lm_head"),
        rank_pattern={"v_proj": 2},
        use_dora=False,
        train_extra=r"^norm\.",
    )
    frozen, trainable = split(params, lcfg, KEY(0))
    text = describe(trainable, frozen)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:-1]}
    assert set(rows) == {"layers.self_attn.q_proj", "layers.self_attn.v_proj", "lm_head", "norm.weight"}
    assert rows["layers.self_attn.q_proj"][4:7] == ["4", "2", f"{2 * (64 * 4 + 4 * 64):,}"]
    assert rows["layers.self_attn.v_proj"][4:7] == ["2", "4", f"{2 * (64 * 2 + 2 * 32):,}"]
    assert rows["lm_head"][4:7] == ["4", "2", f"{64 * 4 + 4 * 256:,}"]
    total = count_params(trainable)
    assert total == 2 * (64 * 4 + 4 * 64) + 2 * (64 * 2 + 2 * 32) + (64 * 4 + 4 * 256) + 64
    assert text.splitlines()[-1].startswith(f"trainable params: {total:,} of ")


def test_smollm2_135m_q_v_rank_8_trains_460800_params():
    shapes = param_shapes(PRESETS["smollm2-135m"])
    trainable = jax.eval_shape(lambda p: split(p, LoraConfig(rank=8, targets=("q_proj", "v_proj")), KEY(0))[1], shapes)
    assert count_params(trainable) == 460_800


# ---- patterns and layers that match nothing (issue 13, item 7) ----


def test_patterns_and_layers_that_match_nothing_are_errors(tiny):
    _, params, _ = tiny
    key = KEY(0)
    one_line_error(
        lambda: split(params, LoraConfig(targets=("q_proj", "v_proj"), rank_pattern={"qproj": 2}), key),
        "rank_pattern",
        "'qproj'",
        "q_proj",
    )
    one_line_error(
        lambda: split(params, LoraConfig(targets=("q_proj", "v_proj"), alpha_pattern={"vproj": 2.0}), key),
        "alpha_pattern",
        "'vproj'",
        "v_proj",
    )
    # a module of the model that is not a target is a typo too: the pattern would change nothing
    one_line_error(
        lambda: split(params, LoraConfig(targets=("q_proj",), rank_pattern={"k_proj": 2}), key),
        "rank_pattern",
        "'k_proj'",
        "q_proj",
    )
    one_line_error(
        lambda: split(params, LoraConfig(targets=("q_proj",), layers=(0, 5)), key), "layers", "5", "2 layers", "0-1"
    )
    # patterns that do match, per layer or by short name, still work
    _, trainable = split(
        params,
        LoraConfig(
            targets=("q_proj", "v_proj"),
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 4.0},
            layers=(1,),
        ),
        key,
    )
    assert trainable["layers"]["self_attn"]["v_proj"]["kernel"].rank == 2


@pytest.mark.parametrize(
    "setting, words",
    [
        ("lora.layers=[0, 5]", ["lora.layers", "5", "0-1"]),
        ("lora.rank_pattern={qproj: 2}", ["rank_pattern", "'qproj'", "q_proj"]),
    ],
)
def test_cli_refuses_patterns_and_layers_that_match_nothing(setting, words):
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    cli = [sys.executable, "-c", "import sys; from jlora.cli.train import main; sys.exit(main())"]  # jlora-train
    run = subprocess.run(
        [*cli, "--config", str(root / "configs/tiny-cpu.yaml"), "--plan", "--devices", "1", "--set", setting],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    err = run.stderr.strip()
    assert run.returncode != 0 and len(err.splitlines()) == 1, err[-2000:]
    assert all(w in err for w in words), err
