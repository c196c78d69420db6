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
