"""Helpers shared by the LoRA tests."""

import jax
import jax.numpy as jnp
import numpy as np

from jlora import LoraPair


def is_pair(x) -> bool:
    return isinstance(x, LoraPair)


def randomize(trainable, seed: int = 0, std: float = 0.1):
    """Nonzero A and B (DoRA magnitudes scaled off their init), keeping left-out (scale 0) layers at zero."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not is_pair(x):
            return x
        on = (x.scale_array() != 0)[..., None, None]
        a, b = (jnp.asarray(rng.normal(0, std, s) * on, jnp.float32) for s in (x.a.shape, x.b.shape))
        m = x.magnitude
        if m is not None:
            m = m * jnp.asarray(1 + 0.2 * on[..., 0] * rng.normal(size=m.shape), m.dtype)
        return x.replace(a=a, b=b, magnitude=m)

    return jax.tree.map(one, trainable, is_leaf=is_pair)


def save_tiny_hf_llama(path):
    """A random 2-layer HF LlamaForCausalLM (vocab 128, d=64, GQA 4/2, untied head) saved at `path`."""
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hc = HFConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(hc).save_pretrained(path)
    return path
