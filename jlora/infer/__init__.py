"""Inference: sampling and KV-cached decoding, the decode layout, the per-row LoRA stack, the engine, the server.

Decoding runs the family's own module; infer/decode.py only re-lays its params and cache.
"""
