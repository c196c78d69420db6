"""Model families: shared layers, the family registry (jlora.models.family), and one folder per family.

Importing this package registers the built-in families.
"""

from jlora.models import llama  # noqa: F401  (registers the LLaMA family)
