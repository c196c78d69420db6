"""Methods as parameter-tree transformations: LoRA, its routing into Dense calls, LLaMA-Adapter.

A method knows no model family: what it needs of one, its caller passes (jlora.api, jlora.train).
"""
