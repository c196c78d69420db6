"""Preference objectives (DPO, IPO, ORPO) and their data, with TRL as the oracle on a tiny random LLaMA.

The same weights, pairs and LoRA (random B, so the policy differs from its reference) go to jlora and to
TRL's DPOTrainer / ORPOTrainer with a PEFT model; TRL's own compute_loss / get_batch_loss_metrics give
the loss, torch autograd the LoRA gradients, and torch's AdamW the steps optax's adamw must track.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from datasets import Dataset
from lora_testing import randomize, save_tiny_hf_llama
from peft import LoraConfig as PeftLoraConfig
from peft import set_peft_model_state_dict
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

import jlora
from jlora.parallel.sharding import activation_sharding, batch_spec, make_mesh, shard_params
from jlora.peft.placement import shard_trainable
from jlora.train.examples import DataError
from jlora.train.preference import PreferenceError, compute_reference_logps, preference_loss, token_logps
from jlora.train.preference_data import collate_pairs, load_pairs, preference_warning

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "what color is the sky? the sky is blue. it is green. where is the sun? in the sky. in the sea.",
    "alice lives in paris and is 31 years old. bob lived in rome, he is 45. the answer is 7.",
    "question: what is two plus two? answer: four. five. the capital of france is paris, not rome.",
]
TEXT_PAIRS = [
    {"prompt": "what color is the sky?", "chosen": " the sky is blue.", "rejected": " it is green."},
    {"prompt": "where is the sun?", "chosen": " in the sky.", "rejected": " in the sea, far away."},
    {"prompt": "what is two plus two? answer:", "chosen": " four.", "rejected": " five."},
    {"prompt": "alice lives in", "chosen": " paris and is 31 years old.", "rejected": " rome."},
]
BETA = 0.1
TRL_ARGS = {"report_to": [], "bf16": False, "use_cpu": True, "gradient_checkpointing": False}


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def save_tiny_tokenizer(path):
    """A BPE tokenizer.json of < 128 ids (the tiny model's vocab) with BOS added, ChatML, pad/eos/unk."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(set("".join(CORPUS) + "\n?:,."))
    tk.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=110, special_tokens=specials, initial_alphabet=alphabet)
    )
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    assert len(fast) <= 128
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_tokenizer(save_tiny_hf_llama(tmp_path_factory.mktemp("tiny")))
    cfg, params = jlora.load_pretrained(path)
    return path, cfg, params, jlora.build_model(cfg), jlora.load_tokenizer(path), AutoTokenizer.from_pretrained(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- data: jlora's tokenization against TRL's ------------------------------------------------------------


def trl_tokenized(hf_tok, records, tmp_path, args=None):
    """TRL's DPOTrainer tokenization of `records` (prompt_ids, chosen_ids, rejected_ids per record)."""
    trainer = DPOTrainer(
        model=LlamaForCausalLM.from_pretrained(hf_tok.name_or_path),
        args=args or DPOConfig(output_dir=str(tmp_path / "trl"), max_length=None, **TRL_ARGS),
        train_dataset=Dataset.from_list(records),
        processing_class=hf_tok,
    )
    return trainer, [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]


CHAT_PAIRS = [
    {"prompt": user("what color is the sky?"), "chosen": assistant("blue."), "rejected": assistant("green.")},
    {
        "prompt": [*user("where is the sun?"), *assistant("in the sky."), *user("and the sea?")],
        "chosen": assistant("in the sea, far away."),
        "rejected": assistant("in the sky."),
    },
]
MERGING_PAIRS = [  # the prompt ends inside a word: its last tokens merge with the response's, differently in each
    {"prompt": "the sky is bl", "chosen": "ue.", "rejected": "ack."},
    {"prompt": "alice lives in pa", "chosen": "ris.", "rejected": "ra."},
]
IMPLICIT_PAIRS = [
    {"chosen": user("two plus two?") + assistant("four."), "rejected": user("two plus two?") + assistant("five.")},
    {"chosen": "the sky is blue.", "rejected": "the sky is green."},
]


@pytest.mark.parametrize("records", [TEXT_PAIRS, MERGING_PAIRS, CHAT_PAIRS, IMPLICIT_PAIRS[:1], IMPLICIT_PAIRS[1:]])
def test_tokenization_matches_trl(tiny, tmp_path, records):
    path, cfg, params, model, tok, hf_tok = tiny
    pairs, stats = load_pairs(write_jsonl(tmp_path / "p.jsonl", records), tok, max_seq_len=256)
    _, ref = trl_tokenized(hf_tok, records, tmp_path)
    assert [(list(p.prompt), list(p.chosen), list(p.rejected)) for p in pairs] == ref
    assert stats.records == len(records) and stats.truncated == 0


def test_truncation_matches_trl(tiny, tmp_path):
    """Prompts keep their end (max_prompt_len), each prompt + response its start (max_seq_len + 1 tokens):
    TRL's collator with max_length = max_seq_len + 1 on the prompt-truncated pairs gives the same ids and masks."""
    path, cfg, params, model, tok, hf_tok = tiny
    max_seq_len, max_prompt_len = 9, 4
    file = write_jsonl(tmp_path / "p.jsonl", TEXT_PAIRS)
    pairs, stats = load_pairs(file, tok, max_seq_len, max_prompt_len)
    full, _ = load_pairs(file, tok, max_seq_len=64)
    trainer, ref = trl_tokenized(hf_tok, TEXT_PAIRS, tmp_path)
    assert stats.truncated == sum(len(p) > max_prompt_len or len(p) + max(len(c), len(r)) > 10 for p, c, r in ref) > 0
    warning = preference_warning(stats, max_seq_len, max_prompt_len)
    assert "\n" not in warning and f"{stats.truncated} of 4 preference pairs truncated" in warning
    for p in pairs:
        assert len(p.prompt) <= max_prompt_len and len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= 10
    collate = trainer.data_collator.__class__(pad_token_id=hf_tok.pad_token_id, max_length=max_seq_len + 1)
    trl = collate([{"prompt_ids": p[-max_prompt_len:], "chosen_ids": c, "rejected_ids": r} for p, c, r in ref])
    ours = collate_pairs(pairs, max_seq_len, hf_tok.pad_token_id)
    n = len(pairs)
    for row in range(2 * n):  # ours: pair rows interleaved; TRL: all chosen rows, then all rejected
        trl_row = row // 2 + (row % 2) * n
        length = int(trl["attention_mask"][trl_row].sum())
        seq, completion = trl["input_ids"][trl_row, :length].numpy(), trl["completion_mask"][trl_row, :length].numpy()
        assert int(ours["segment_ids"][row].sum()) == length - 1
        np.testing.assert_array_equal(ours["input_ids"][row, : length - 1], seq[:-1])
        np.testing.assert_array_equal(ours["targets"][row, : length - 1], seq[1:])
        np.testing.assert_array_equal(ours["loss_mask"][row, : length - 1], completion[1:])
    assert full != pairs


BAD = [
    ({"prompt": "a", "chosen": " b"}, "preference record has no 'rejected'"),
    ({"prompt": "a", "chosen": " same", "rejected": " same"}, "'chosen' equals 'rejected'"),
    ({"prompt": "a", "chosen": " ", "rejected": " b"}, "'chosen' response is empty"),
    ({"prompt": user("a"), "chosen": assistant(""), "rejected": assistant("b")}, "'chosen' response is empty"),
    ({"prompt": user("a"), "chosen": " b", "rejected": assistant("c")}, "must all be text or all message lists"),
    ({"prompt": "a", "chosen": 3, "rejected": " b"}, "'chosen' must be a string or a list of messages"),
    ({"chosen": user("a") + assistant("b"), "rejected": user("a") + assistant("b")}, "'chosen' equals 'rejected'"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_pairs_are_one_line_naming_file_and_line(tiny, tmp_path, bad, message):
    tok = tiny[4]
    file = write_jsonl(tmp_path / "bad.jsonl", [TEXT_PAIRS[0], TEXT_PAIRS[1], bad])
    with pytest.raises(DataError) as e:
        load_pairs(file, tok, max_seq_len=64)
    assert str(e.value).startswith(f"{file}:3: ") and message in str(e.value) and "\n" not in str(e.value)
    pairs, stats = load_pairs(file, tok, max_seq_len=64, on_bad_record="skip")
    assert len(pairs) == 2 and stats.skipped_bad == 1


# ---- the loss against TRL --------------------------------------------------------------------------------

LCFG = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """(frozen, trainable with random A and B, a PEFT dir of that adapter), and the pairs' batch."""
    path, cfg, params, model, tok, hf_tok = tiny
    frozen, trainable = jlora.split(params, LCFG, jax.random.key(0))
    trainable = randomize(trainable, seed=1, std=0.3)
    peft_dir = tmp_path_factory.mktemp("peft")
    jlora.export_peft(peft_dir, trainable, LCFG, cfg)
    file = write_jsonl(tmp_path_factory.mktemp("data") / "p.jsonl", TEXT_PAIRS)
    pairs, _ = load_pairs(file, tok, max_seq_len=32)
    return frozen, trainable, str(peft_dir), pairs, collate_pairs(pairs, 32, tok.pad_id)


def trl_trainer(objective, path, peft_dir, hf_tok, tmp_path, loss_type=None, label_smoothing=0.0):
    """TRL's trainer making a new PEFT adapter (so its reference is the base with adapters disabled; handed an
    existing PeftModel, TRL would copy the adapter as the reference), then given jlora's adapter weights."""
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = PeftLoraConfig(r=LCFG.rank, lora_alpha=LCFG.alpha, target_modules=list(LCFG.targets), task_type="CAUSAL_LM")
    records = Dataset.from_list(TEXT_PAIRS)
    if objective == "orpo":
        args = ORPOConfig(output_dir=str(tmp_path / "orpo"), beta=BETA, max_length=64, **TRL_ARGS)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=records, processing_class=hf_tok, peft_config=peft)
    else:
        loss_type = loss_type or {"dpo": "sigmoid", "ipo": "ipo"}[objective]
        args = DPOConfig(
            output_dir=str(tmp_path / "dpo"),
            beta=BETA,
            loss_type=[loss_type],
            label_smoothing=label_smoothing,
            max_length=64,
            **TRL_ARGS,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=records, processing_class=hf_tok, peft_config=peft)
    result = set_peft_model_state_dict(trainer.model, load_torch_file(f"{peft_dir}/adapter_model.safetensors"))
    assert not result.unexpected_keys
    return trainer


def trl_batch(trainer, objective, pairs):
    """The pairs (jlora's ids) as TRL's own collator lays them out for its loss."""
    if objective != "orpo":
        return trainer.data_collator(
            [
                {"prompt_ids": list(p.prompt), "chosen_ids": list(p.chosen), "rejected_ids": list(p.rejected)}
                for p in pairs
            ]
        )
    features = []
    for p in pairs:
        row = {"prompt_input_ids": list(p.prompt), "prompt_attention_mask": [1] * len(p.prompt)}
        for name, response in (("chosen", p.chosen), ("rejected", p.rejected)):
            ids = list(p.prompt + response)
            row |= {f"{name}_input_ids": ids, f"{name}_attention_mask": [1] * len(ids)}
            row[f"{name}_labels"] = [-100] * len(p.prompt) + list(response)
        features.append(row)
    return trainer.data_collator(features)


def trl_loss(trainer, objective, batch):
    if objective == "orpo":
        return trainer.get_batch_loss_metrics(trainer.model, batch)
    loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def as_peft_tensors(tree, cfg, tmp_path) -> dict[str, np.ndarray]:
    """A LoRA-shaped tree (an adapter or its gradient) under PEFT's tensor names, by jlora's own exporter."""
    jlora.export_peft(tmp_path, tree, LCFG, cfg)
    return load_file(str(tmp_path / "adapter_model.safetensors"))


def peft_name(name: str) -> str:
    """A PEFT model's parameter name as its adapter file spells it (no adapter name)."""
    return name.replace(".default", "")


METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo"])
def test_loss_gradients_and_adamw_match_trl(tiny, lora, tmp_path, objective):
    path, cfg, params, model, tok, hf_tok = tiny
    frozen, trainable, peft_dir, pairs, batch = lora
    trainer = trl_trainer(objective, path, peft_dir, hf_tok, tmp_path)
    tbatch = trl_batch(trainer, objective, pairs)
    loss_fn = jax.jit(
        jax.value_and_grad(lambda t: preference_loss(model, frozen, t, batch, objective, BETA), has_aux=True)
    )

    (loss, metrics), grads = loss_fn(trainable)
    ref_loss, ref_metrics = trl_loss(trainer, objective, tbatch)
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-5)
    extra = ("nll_loss", "log_odds_ratio", "log_odds_chosen") if objective == "orpo" else ()
    for name in METRICS + extra:
        np.testing.assert_allclose(float(metrics[name]), float(ref_metrics[name]), rtol=1e-5, atol=1e-5, err_msg=name)
    ours = as_peft_tensors(grads, cfg, tmp_path / "grads")
    theirs = {peft_name(n): p.grad.numpy() for n, p in lora_params(trainer.model).items()}
    assert sorted(ours) == sorted(theirs) and len(ours) == 8
    scale = max(np.abs(g).max() for g in theirs.values())
    for name, g in theirs.items():
        np.testing.assert_allclose(ours[name], g, rtol=1e-5, atol=1e-5 * scale, err_msg=name)

    # three AdamW steps: optax's adamw on jlora's gradients tracks torch's AdamW on TRL's
    opt = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    torch_opt = torch.optim.AdamW(
        lora_params(trainer.model).values(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    state, t = opt.init(trainable), trainable
    for step in range(3):
        (loss, _), grads = loss_fn(t)
        updates, state = opt.update(grads, state, t)
        t = optax.apply_updates(t, updates)
        torch_opt.zero_grad()
        ref_loss, _ = trl_loss(trainer, objective, tbatch)
        ref_loss.backward()
        torch_opt.step()
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
    after = as_peft_tensors(t, cfg, tmp_path / "after")
    for name, p in lora_params(trainer.model).items():
        np.testing.assert_allclose(after[peft_name(name)], p.detach().numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_cdpo_label_smoothing_matches_trl(tiny, lora, tmp_path):
    """TRL 1.16's sigmoid loss ignores label_smoothing; its `aot` loss on a one-pair batch (the sort is then the
    identity) is exactly cDPO, -(1 - e) log s(b D) - e log s(-b D), so it is the oracle here."""
    path, cfg, params, model, tok, hf_tok = tiny
    frozen, trainable, peft_dir, pairs, batch = lora
    trainer = trl_trainer("dpo", path, peft_dir, hf_tok, tmp_path, loss_type="aot", label_smoothing=0.2)
    one = {k: v[:2] for k, v in batch.items()}
    loss_fn = lambda t: preference_loss(model, frozen, t, one, "dpo", BETA, label_smoothing=0.2)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable)
    ref_loss, _ = trl_loss(trainer, "dpo", trl_batch(trainer, "dpo", pairs[:1]))
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - float(preference_loss(model, frozen, trainable, one, "dpo", BETA)[0])) > 1e-4
    ours = as_peft_tensors(grads, cfg, tmp_path / "grads")
    for name, p in lora_params(trainer.model).items():
        g = p.grad.numpy()
        np.testing.assert_allclose(ours[peft_name(name)], g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=name)


# ---- the reference is the base, for free ------------------------------------------------------------------


def test_zero_init_dpo_starts_at_ln2_with_zero_rewards(tiny, lora):
    path, cfg, params, model, tok, hf_tok = tiny
    batch = lora[4]
    frozen, trainable = jlora.split(params, LCFG, jax.random.key(0))  # B = 0: the policy is the base
    loss, metrics = jax.jit(lambda t: preference_loss(model, frozen, t, batch, "dpo", BETA))(trainable)
    assert abs(float(loss) - math.log(2)) < 1e-6
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):  # 0 up to fp32 rounding of the sums
        assert abs(float(metrics[name])) < 1e-6, name


def base_row_logps(model, params, batch):
    """Response log-probs per row from the plain base model's logits (no adapter machinery at all)."""
    logits = model.apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"])
    logps = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1)[..., 0]
    return np.asarray(jnp.sum(logps * batch["loss_mask"], -1))


def test_reference_is_the_base_for_lora_dora_rslora_and_llama_adapter(tiny, lora):
    path, cfg, params, model, tok, hf_tok = tiny
    frozen, trainable, _, _, batch = lora
    base = base_row_logps(model, params, batch)
    policy_of = jax.jit(lambda f, t: jnp.sum(token_logps(model, f, t, batch) * batch["loss_mask"], -1))
    reference_of = jax.jit(lambda f, t: compute_reference_logps(model, f, t, batch))
    a_frozen, a_trainable = jlora.split(params, jlora.AdapterConfig(len=3, layers=1), jax.random.key(1))
    a_trainable["layers"]["self_attn"]["adaption_gate"] = jnp.full((1, 1), 0.5)  # an adapter that acts
    trees = [(frozen, trainable), (a_frozen, a_trainable)]
    for variant in ({"use_dora": True}, {"use_rslora": True}):
        v_frozen, v_trainable = jlora.split(params, dataclasses.replace(LCFG, **variant), jax.random.key(2))
        trees.append((v_frozen, randomize(v_trainable, seed=3, std=0.3)))
    for f, t in trees:
        assert np.abs(np.asarray(policy_of(f, t)) - base).max() > 1e-3  # the adapter does change the policy
        np.testing.assert_allclose(np.asarray(reference_of(f, t)), base, rtol=1e-6, atol=1e-5)


def test_precomputed_reference_skips_the_reference_forward(tiny, lora):
    path, cfg, params, model, tok, hf_tok = tiny
    frozen, trainable, _, _, batch = lora
    ref = compute_reference_logps(model, frozen, trainable, batch)
    inline = preference_loss(model, frozen, trainable, batch, "dpo", BETA)
    given = jax.jit(lambda t, r: preference_loss(model, frozen, t, batch, "dpo", BETA, reference_logps=r))
    np.testing.assert_allclose(float(given(trainable, ref)[0]), float(inline[0]), rtol=1e-6)
    hlo = lambda f, *a: f.lower(*a).as_text()
    dots = lambda text: text.count("dot_general")
    with_ref = dots(hlo(jax.jit(lambda t: preference_loss(model, frozen, t, batch, "dpo", BETA)), trainable))
    assert dots(hlo(given, trainable, ref)) < with_ref


def test_full_trained_leaves_need_a_precomputed_reference(tiny, lora):
    path, cfg, params, model, tok, hf_tok = tiny
    batch = lora[4]
    frozen, trainable = jlora.split(
        params, jlora.LoraConfig(rank=2, targets=("q_proj",), train_extra="norm"), jax.random.key(0)
    )
    with pytest.raises(PreferenceError, match="precompute the reference"):
        preference_loss(model, frozen, trainable, batch, "dpo", BETA)
    ref = jnp.zeros(batch["input_ids"].shape[0])
    assert np.isfinite(float(preference_loss(model, frozen, trainable, batch, "dpo", BETA, reference_logps=ref)[0]))


def test_sharded_loss_equals_unsharded(tiny, lora):
    """On a (data, fsdp, tensor) = (2, 2, 2) mesh, weights placed by the rules and pair rows over data x fsdp,
    the loss and gradients are the unsharded ones."""
    path, cfg, params, model, tok, hf_tok = tiny
    frozen, trainable, _, _, batch = lora
    fn = lambda f, t, b: jax.value_and_grad(lambda t: preference_loss(model, f, t, b, "dpo", BETA), has_aux=True)(t)
    (loss, _), grads = jax.jit(fn)(frozen, trainable, batch)
    mesh = make_mesh(2, 2, 2, devices=jax.devices()[:8])
    rows = jax.sharding.NamedSharding(mesh, batch_spec(2, 0))
    placed = (shard_params(frozen, mesh), shard_trainable(trainable, mesh))
    sharded_batch = {k: jax.device_put(v, rows) for k, v in batch.items()}
    (s_loss, _), s_grads = jax.jit(activation_sharding(mesh)(fn))(*placed, sharded_batch)
    np.testing.assert_allclose(float(s_loss), float(loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bad_settings_are_one_line(tiny, lora):
    path, cfg, params, model, tok, hf_tok = tiny
    frozen, trainable, _, _, batch = lora
    for kwargs, message in (
        ({"objective": "kto"}, "unknown preference objective"),
        ({"beta": 0.0}, "preference.beta"),
        ({"objective": "ipo", "label_smoothing": 0.1}, "has none"),
    ):
        with pytest.raises(PreferenceError, match=message):
            preference_loss(model, frozen, trainable, batch, **kwargs)
