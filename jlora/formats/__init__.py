"""Files jlora reads and writes: HF safetensors and GGUF weights, tokenizers, PEFT and llama.cpp adapters.

Every name on disk maps through the model family's weight table (jlora.models.family).
"""
