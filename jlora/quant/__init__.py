"""Packed frozen kernels for QLoRA (int8, nf4, GGUF blocks) and the matmuls that read them."""
