"""LLaMA-Adapter (jlora.peft.llama_adapter): zero-gate start, logits equal to HF PEFT's AdaptionPrompt (tiny GQA and
MHA models, SmolLM2), gradients only to prompts and gates, KV-cached generation, PEFT files both ways, merge refusal."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import jlora
from jlora.formats.peft_adapter import PeftError, export_peft, import_peft
from jlora.formats.weights import read_pretrained
from jlora.infer.generate import generate
from jlora.peft.llama_adapter import GATE, PROMPT, AdapterConfig, AdapterConfigError

IDS = np.random.RandomState(0).randint(0, 128, (2, 11))


def _hf_base(path, kv_heads: int):
    """A random 3-layer HF LlamaForCausalLM (vocab 128, d=64, 4 query heads) saved at `path`."""
    torch.manual_seed(0)
    hc = HFConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(hc).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def base(request, tmp_path_factory):
    path = _hf_base(tmp_path_factory.mktemp(f"base{request.param}"), request.param)
    cfg, params = read_pretrained(path)
    return path, cfg, params


def _random(trainable, seed: int = 0, gate_std: float = 0.5):
    """Prompts and gates drawn at random (the gates nonzero), as after some training."""
    rng = np.random.default_rng(seed)
    attn = trainable["layers"]["self_attn"]
    return {
        "layers": {
            "self_attn": {
                PROMPT: jnp.asarray(rng.normal(0, 1, attn[PROMPT].shape), jnp.float32),
                GATE: jnp.asarray(rng.normal(0, gate_std, attn[GATE].shape), jnp.float32),
            }
        }
    }


def _peft_model(path, trainable, n_layers: int):
    """HF PEFT's AdaptionPrompt on the same base, holding `trainable`'s prompts and gates."""
    prompt, gate = (np.asarray(trainable["layers"]["self_attn"][k]) for k in (PROMPT, GATE))
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(path).eval(),
        AdaptionPromptConfig(adapter_len=prompt.shape[1], adapter_layers=prompt.shape[0], task_type="CAUSAL_LM"),
    )
    state = {}
    for j, layer in enumerate(range(n_layers - prompt.shape[0], n_layers)):
        state[f"base_model.model.model.layers.{layer}.self_attn.{PROMPT}"] = torch.tensor(prompt[j][None])
        state[f"base_model.model.model.layers.{layer}.self_attn.{GATE}"] = torch.tensor(gate[j])
    missing = model.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    return model


def _hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(ids)).logits.numpy()


def test_zero_gate_gives_the_base_logits(base):
    _, cfg, params = base
    model = jlora.Llama(cfg)
    frozen, trainable = jlora.split(params, AdapterConfig(len=5, layers=2), jax.random.key(0))
    assert frozen is params  # the frozen tree is the params, untouched
    assert np.all(np.asarray(trainable["layers"]["self_attn"][GATE]) == 0)
    ours = np.asarray(jlora.apply(model, frozen, trainable, jnp.asarray(IDS)))
    plain = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    # fp32 rounding only (XLA fuses the layer a little differently); an open gate moves them by ~0.1
    np.testing.assert_allclose(ours, plain, rtol=0, atol=2e-6)
    opened = jax.tree.map(lambda x: x + 0.5, trainable)
    assert np.abs(np.asarray(jlora.apply(model, frozen, opened, jnp.asarray(IDS))) - plain).max() > 1e-2


@pytest.mark.parametrize("layers", [2, 3])
def test_logits_equal_peft_adaption_prompt(base, layers):
    path, cfg, params = base
    frozen, trainable = jlora.split(params, AdapterConfig(len=5, layers=layers), jax.random.key(0))
    trainable = _random(trainable)
    ours = np.asarray(jlora.apply(jlora.Llama(cfg), frozen, trainable, jnp.asarray(IDS)))
    theirs = _hf_logits(_peft_model(path, trainable, cfg.num_hidden_layers))
    base_logits = _hf_logits(LlamaForCausalLM.from_pretrained(path))
    assert np.abs(theirs - base_logits).max() > 0.05  # the prompts matter
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_logits_equal_peft_on_smollm2(smollm2_gguf):
    """SmolLM2 (GQA: 9 query heads over 3 kv heads), lit-llama's layers (all but the first two)."""
    import pathlib

    cfg, params = read_pretrained(smollm2_gguf)
    frozen, trainable = jlora.split(params, AdapterConfig(len=10), jax.random.key(0))
    assert trainable["layers"]["self_attn"][PROMPT].shape == (cfg.num_hidden_layers - 2, 10, cfg.hidden_size)
    trainable = _random(trainable, gate_std=0.2)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 24))
    ours = np.asarray(
        jax.jit(lambda f, t, x: jlora.apply(jlora.Llama(cfg), f, t, x))(frozen, trainable, jnp.asarray(ids))
    )
    gguf = pathlib.Path(smollm2_gguf)
    hf = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    base_logits = _hf_logits(hf, ids)
    peft_model = get_peft_model(
        hf, AdaptionPromptConfig(adapter_len=10, adapter_layers=cfg.num_hidden_layers - 2, task_type="CAUSAL_LM")
    )
    state = {}
    prompt, gate = (np.asarray(trainable["layers"]["self_attn"][k]) for k in (PROMPT, GATE))
    for j in range(prompt.shape[0]):
        key = f"base_model.model.model.layers.{j + 2}.self_attn."
        state[key + PROMPT], state[key + GATE] = torch.tensor(prompt[j][None]), torch.tensor(gate[j])
    assert not peft_model.load_state_dict(state, strict=False).unexpected_keys
    theirs = _hf_logits(peft_model, ids)
    effect, err = np.abs(theirs - base_logits).max(), np.abs(ours - theirs).max()
    assert effect > 0.5  # the prompts matter
    # fp32 through 30 layers: the base alone agrees to ~1e-3 (test_llama); the prompts add a little
    assert err <= 5e-3 and err <= 0.01 * effect, (err, effect)
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_gradients_reach_only_prompts_and_gates(base):
    _, cfg, params = base
    model = jlora.Llama(cfg)
    frozen, trainable = jlora.split(params, AdapterConfig(len=5, layers=2), jax.random.key(0))
    ids = jnp.asarray(IDS)

    def loss(f, t):
        return jnp.mean(jlora.apply(model, f, t, ids) ** 2)

    g_frozen, g_train = jax.grad(loss, argnums=(0, 1))(frozen, trainable)
    attn = g_train["layers"]["self_attn"]
    assert jax.tree.structure(g_train) == jax.tree.structure(trainable)  # only the 2 adapted layers' prompts / gates
    assert attn[PROMPT].shape[0] == attn[GATE].shape[0] == 2
    assert np.all(np.asarray(attn[GATE]) != 0)  # a zero gate still learns
    assert np.all(np.asarray(attn[PROMPT]) == 0)  # ... and, while closed, lets nothing through to the prompts
    opened = _random(trainable)
    attn = jax.grad(loss, argnums=1)(frozen, opened)["layers"]["self_attn"]
    assert np.all(np.abs(np.asarray(attn[PROMPT])).sum(axis=(1, 2)) > 0)
    assert np.abs(np.asarray(g_frozen["layers"]["self_attn"]["k_proj"]["kernel"])).max() > 0  # frozen is an input
    # the layer below the adapted ones: its k/v carry no prompt, so only the base reaches them
    assert trainable["layers"]["self_attn"][PROMPT].shape == (2, 5, cfg.hidden_size)


def test_kv_cached_generation_equals_full_forward(base):
    _, cfg, params = base
    model = jlora.Llama(cfg.replace(max_position_embeddings=64))
    frozen, trainable = jlora.split(params, AdapterConfig(len=5, layers=2), jax.random.key(0))
    trainable = _random(trainable, gate_std=2.0)
    forward = jax.jit(lambda x: jlora.apply(model, frozen, trainable, x))
    prompts = [[1, 17, 25, 3], [5, 9]]
    out = generate(model, frozen, trainable, prompts, max_new_tokens=12, eos_id=())
    for p, got in zip(prompts, out):
        ids = np.zeros((1, 32), np.int32)
        ids[0, : len(p)] = p
        for t in range(len(p), len(p) + 12):
            ids[0, t] = int(jnp.argmax(forward(jnp.asarray(ids))[0, t - 1]))
        assert got == ids[0, len(p) : len(p) + 12].tolist()
    assert out != generate(model, frozen, None, prompts, max_new_tokens=12, eos_id=())  # the prompts matter


def test_peft_export_loads_in_peft_and_imports_back(base, tmp_path):
    path, cfg, params = base
    frozen, trainable = jlora.split(params, AdapterConfig(len=5, layers=2), jax.random.key(0))
    trainable = _random(trainable)
    export_peft(tmp_path / "out", trainable, AdapterConfig(len=5, layers=2), cfg)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["adapter_len"], config["adapter_layers"]) == ("ADAPTION_PROMPT", 5, 2)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), tmp_path / "out")
    ours = np.asarray(jlora.apply(jlora.Llama(cfg), frozen, trainable, jnp.asarray(IDS)))
    np.testing.assert_allclose(_hf_logits(peft_model), ours, rtol=0, atol=1e-4)
    peft_model.save_pretrained(tmp_path / "peft")  # PEFT's own files, read by jlora
    acfg, back = import_peft(tmp_path / "peft", cfg)
    assert acfg == AdapterConfig(len=5, layers=2)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_peft_import_refuses_what_does_not_fit(base, tmp_path):
    _, cfg, params = base
    _, trainable = jlora.split(params, AdapterConfig(len=5, layers=2), jax.random.key(0))
    export_peft(tmp_path, trainable, AdapterConfig(len=5, layers=2), cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "adapter_layers": 3}))
    with pytest.raises(PeftError, match=r"missing base_model.model.model.layers.0.self_attn.adaption_gate") as e:
        import_peft(tmp_path, cfg)
    assert "\n" not in str(e.value)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "adapter_layers": 9}))
    with pytest.raises(PeftError, match=r"adapter.layers: 9 is beyond the model's 3 layers"):
        import_peft(tmp_path, cfg)


def test_merge_is_refused_in_one_line(base):
    _, _, params = base
    frozen, trainable = jlora.split(params, AdapterConfig(len=5, layers=2), jax.random.key(0))
    for fn in (lambda: jlora.merge(frozen, trainable), lambda: jlora.merge_for_inference(params, trainable)):
        with pytest.raises(jlora.LoraError, match="cannot merge a LLaMA-Adapter tree") as e:
            fn()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"len": 0}, "len: must be a positive integer, got 0"),
        ({"len": -3}, "len: must be a positive integer, got -3"),
        ({"layers": 0}, "layers: must be a positive integer, got 0"),
    ],
)
def test_bad_adapter_config_is_one_line(kwargs, message):
    with pytest.raises(AdapterConfigError, match=message):
        AdapterConfig(**kwargs)


def test_layers_beyond_the_model_is_one_line(base):
    _, _, params = base
    with pytest.raises(AdapterConfigError, match=r"adapter.layers: 4 is beyond the model's 3 layers"):
        jlora.split(params, AdapterConfig(layers=4), jax.random.key(0))


def test_describe_lists_prompts_and_gates(base):
    _, cfg, params = base
    frozen, trainable = jlora.split(params, AdapterConfig(len=5, layers=2), jax.random.key(0))
    table = jlora.describe(trainable, frozen)
    assert "layers.self_attn.adaption_prompt (layers 1-2)  prompt  2x5x64" in table
    assert "layers.self_attn.adaption_gate (layers 1-2)" in table
    n = 2 * 5 * 64 + 2
    assert table.splitlines()[-1].startswith(f"trainable params: {n:,} of {jlora.count_params(params):,}")
    flat = traverse_util.flatten_dict(trainable)
    assert sum(int(np.prod(x.shape)) for x in flat.values()) == jlora.count_params(trainable) == n
