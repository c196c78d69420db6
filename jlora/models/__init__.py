"""Model families: the shared Decoder and layers, the family registry (jlora.models.family), one folder per family.

Importing this package registers the built-in families.
"""

from jlora.models import gemma, llama, mistral, qwen  # register the built-in families

__all__ = ["gemma", "llama", "mistral", "qwen"]
