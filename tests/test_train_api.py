"""The public training building blocks: `jlora.causal_lm_loss` in a user's own jax.value_and_grad + optax loop
(README's Python API) gives the loss and gradients of jlora-train's sharded step, and `jlora.make_train_step`
without a TrainState is that step for arrays wherever they are."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lora_testing import randomize

import jlora
from jlora.models.llama import PRESETS
from jlora.parallel.sharding import make_mesh
from jlora.peft.routing import LoraPair
from jlora.train import step as T

CFG = PRESETS["tiny"].replace(tie_word_embeddings=True)  # tied: the chunked loss reads the head from the embedding
B, SEQ = 8, 32
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def setup():
    params = jlora.init_params(CFG, jax.random.key(0))
    lcfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
    frozen, trainable = jlora.split(params, lcfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CFG.vocab_size, (B, SEQ + 1)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": (rng.random((B, SEQ)) > 0.25).astype(np.float32),
    }
    return frozen, randomize(trainable, seed=3), batch


def readme_loop_grads(frozen, trainable, batch):
    """The README's custom step, with the loss and gradients it computes."""
    model = jlora.Llama(CFG)
    loss, grads = jax.jit(jax.value_and_grad(lambda t: jlora.causal_lm_loss(model, frozen, t, batch)))(trainable)
    return float(loss), grads


def sgd():  # update = -gradient: the step's new trainable tree shows the gradients it used
    return optax.apply_if_finite(optax.sgd(1.0), 3)


def gradients_from_update(before, after):
    return jax.tree.map(lambda b, a: np.asarray(b) - np.asarray(a), before, after)


def assert_trees_close(x, y, atol):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-4)


def test_custom_loop_equals_the_sharded_trainer_step(setup):
    """8 devices (data 2 x fsdp 2 x tensor 2), 2 micro-batches: the trainer's loss and gradients equal one
    value_and_grad of causal_lm_loss over the whole batch on one device."""
    frozen, trainable, batch = setup
    loss, grads = readme_loop_grads(frozen, trainable, batch)
    mesh = make_mesh(2, 2, 2, devices=jax.devices()[:8])
    state = T.place_state(frozen, trainable, mesh, sgd())
    step = T.make_train_step(jlora.Llama(CFG), sgd(), state, FAST)
    host = T.full_batch({k: jnp.asarray(v) for k, v in batch.items()})
    new, _, metrics = step(
        state.frozen, state.trainable, state.opt_state, T.put_batch(jax.device_get(host), mesh, 2), jax.random.key(0)
    )
    assert abs(float(metrics["loss"]) - loss) < 1e-5
    assert_trees_close(gradients_from_update(trainable, jax.device_get(new)), grads, atol=2e-6)
    norm = float(optax.tree.norm(grads))
    assert norm > 1e-3 and abs(float(metrics["grad_norm"]) - norm) < 1e-5 * norm


def test_make_train_step_without_a_state_takes_plain_batches(setup):
    frozen, trainable, batch = setup
    loss, grads = readme_loop_grads(frozen, trainable, batch)
    step = jlora.make_train_step(jlora.Llama(CFG), optax.sgd(1.0))  # any optax optimizer
    opt_state = optax.sgd(1.0).init(trainable)
    before = jax.device_get(trainable)
    new, _, metrics = step(frozen, jax.tree.map(jnp.array, trainable), opt_state, batch)
    assert abs(float(metrics["loss"]) - loss) < 1e-5
    assert_trees_close(gradients_from_update(before, jax.device_get(new)), grads, atol=2e-6)


def test_causal_lm_loss_is_the_masked_mean_of_plain_cross_entropy(setup):
    frozen, trainable, batch = setup
    logits = jlora.apply(jlora.Llama(CFG), frozen, trainable, batch["input_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    expected = float(jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]))
    got = float(jlora.causal_lm_loss(jlora.Llama(CFG), frozen, trainable, batch))
    assert abs(got - expected) < 1e-5
    no_mask = {k: v for k, v in batch.items() if k != "loss_mask"}
    assert abs(float(jlora.causal_lm_loss(jlora.Llama(CFG), frozen, trainable, no_mask)) - float(jnp.mean(ce))) < 1e-5


def test_dropout_without_an_rng_and_a_batch_without_targets_are_one_line_errors(setup):
    frozen, trainable, batch = setup
    dropped = jax.tree.map(
        lambda x: x.replace(dropout=0.1) if isinstance(x, LoraPair) else x,
        trainable,
        is_leaf=lambda x: isinstance(x, LoraPair),
    )
    step = jlora.make_train_step(jlora.Llama(CFG), sgd())
    with pytest.raises(ValueError, match="rng=jax.random.key"):
        step(frozen, dropped, sgd().init(dropped), batch)
    with pytest.raises(ValueError, match="needs targets"):
        jlora.causal_lm_loss(jlora.Llama(CFG), frozen, trainable, {"input_ids": batch["input_ids"]})
