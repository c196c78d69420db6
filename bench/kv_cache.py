"""KV-cache bytes of jlora's decoder at a long context, with and without the ring buffer for local layers.

Why: Gemma 3's local (sliding-window) layers only ever attend to their last `sliding_window` tokens, so
generation keeps a ring of that many slots for them (jlora.infer.decode.init_decode_cache(..., ring=True))
instead of one slot per context token; this records what that saves, beside a model with no local layers
(SmolLM2, where both layouts are the same). The cache is built with jax.eval_shape from the preset configs
(jlora.presets()), so no weights are read and nothing is allocated: the figures are the shapes' bytes, keys
and values plus the per-slot segment ids and fill index the cache keeps. Batch 1, the model's compute dtype.
Writes docs/results/kv_cache.json (--out) with the commit, date, machine and load average, which
bench/report.py renders.
Usage: python bench/kv_cache.py [--context 4096] [--batch 1] [--models smollm2-135m,gemma3-270m] [--out FILE]
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

import jax

import jlora
from jlora.infer.decode import cache_bytes, init_decode_cache
from jlora.models.decoder import cache_slots
from jlora.train.provenance import provenance, write_result

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results"
TITLES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}


def cache_figures(cfg, batch: int, context: int) -> dict:
    """One model's cache at `context` tokens, linear and ring: bytes in all, of keys + values, and slots per layer."""
    out = {}
    for layout, ring in (("linear", False), ("ring", True)):
        shapes = jax.eval_shape(lambda ring=ring: init_decode_cache(cfg, batch, context, ring=ring))
        kv = sum(cache_bytes([layer["self_attn"]["k"], layer["self_attn"]["v"]]) for layer in shapes.values())
        out[layout] = {
            "bytes": cache_bytes(shapes),
            "kv_bytes": kv,
            "slots_per_layer": list(cache_slots(cfg, context, ring)),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096, help="tokens the cache holds (prompt + new)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma-separated jlora.presets() names")
    p.add_argument("--out", default=str(RESULTS / "kv_cache.json"), help="the result file")
    a = p.parse_args()
    started = provenance()
    presets = jlora.presets()
    models, rows = {}, []
    for name in a.models.split(","):
        cfg = presets[name]
        fig = cache_figures(cfg, a.batch, a.context)
        windows = cfg.layer_windows
        models[name] = {
            "title": TITLES.get(name, name),
            "dtype": cfg.dtype,
            "layers": cfg.num_hidden_layers,
            "local_layers": sum(w is not None for w in windows),
            "sliding_window": cfg.sliding_window,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            **fig,
        }
        label = f"{TITLES.get(name, name)}: KV cache at {a.context} tokens"
        rows += [
            {
                "metric": f"{label}, every layer {a.context} slots",
                "unit": "bytes",
                "jlora": fig["linear"]["bytes"],
                "peer": None,
                "peer_value": None,
                "better": "lower",
            },
            {
                "metric": f"{label}, ring buffer for local layers",
                "unit": "bytes",
                "jlora": fig["ring"]["bytes"],
                "peer": "every layer linear",
                "peer_value": fig["linear"]["bytes"],
                "better": "lower",
            },
        ]
        print(
            f"{label}: linear {fig['linear']['bytes'] / 2**20:,.1f} MiB, ring {fig['ring']['bytes'] / 2**20:,.1f} MiB "
            f"({fig['ring']['bytes'] / fig['linear']['bytes']:.3f}x; {models[name]['local_layers']} of "
            f"{cfg.num_hidden_layers} layers local, window {cfg.sliding_window})"
        )
    config = {
        "context": a.context,
        "batch": a.batch,
        "dtype": "each model's compute dtype",
        "how": "jax.eval_shape(init_decode_cache(cfg, batch, context, ring)), preset configs, no weights",
    }
    command = shlex.join(["python", "bench/kv_cache.py", *sys.argv[1:]])
    out = write_result(
        a.out, started, {"bench": "kv_cache", "command": command, "config": config, "models": models, "rows": rows}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
