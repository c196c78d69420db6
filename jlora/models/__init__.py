"""Model families: shared layers, the family registry (jlora.models.family), and one folder per family.

Importing this package registers the built-in families.
"""

from jlora.models import llama  # registers the LLaMA family

__all__ = ["llama"]
