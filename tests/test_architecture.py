"""The package's structure: one seam for model families, and dependencies that run one way.

The decoder's parameter names (HF's module names, which every built-in family shares) appear only in the
module that owns them (jlora/models/decoder.py), the tables built from them (jlora/models/tables.py) and
the family folders; no module outside jlora/models/llama/ imports LlamaConfig. The rest of jlora asks the
family record (jlora.models.family). The public namespace (jlora/__init__.py) re-exports each family's
names and is the one exception. Import direction is checked by import-linter (pyproject.toml, `lint-imports`).
"""

import ast
import pathlib
import re

import pytest

import jlora
from jlora.models.family import families
from jlora.models.llama import FAMILY as LLAMA

ROOT = pathlib.Path(jlora.__file__).parent
FAMILY_DIR = ROOT / "models" / "llama"
# where parameter names may be spelled out: the module, its tables, and every family folder
OWNERS = {ROOT / "models" / "decoder.py", ROOT / "models" / "tables.py"}
FAMILY_DIRS = {ROOT / "models" / name for name in ("llama", "mistral", "qwen", "gemma")}


def _llama_names() -> set[str]:
    """LLaMA's module names, read from its own weight table: embed_tokens, q_proj, input_layernorm, lm_head, ..."""
    names = {part for path, _, _ in LLAMA.weights for part in path.split("/")[:-1]}
    # the layer stack, HF's submodule names every family shares, and "norm", a word as much as a name
    return names - {"layers", "self_attn", "mlp", "norm"}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of `tree` (alive while `tree` is): docstrings may mention a family as an
    example; code and other strings may not."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _check(source: str) -> list[str]:
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found, names = [], _llama_names()
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            hit = pattern.search(node.value)
            if hit:
                found.append(f"{node.lineno}: {hit.group(1)!r} in a string")
        elif isinstance(node, ast.Name) and pattern.fullmatch(node.id):
            found.append(f"{node.lineno}: name {node.id}")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "LlamaConfig" for a in node.names):
            found.append(f"{node.lineno}: imports LlamaConfig")
    return found


def _modules_outside_the_family():
    for path in sorted(ROOT.rglob("*.py")):
        if path in OWNERS or FAMILY_DIRS & set(path.parents) or path == ROOT / "__init__.py":
            continue
        yield path


def test_no_module_outside_the_models_names_a_decoder_parameter():
    bad = {str(p.relative_to(ROOT.parent)): v for p in _modules_outside_the_family() if (v := _check(p.read_text()))}
    assert not bad, f"decoder parameter names outside their owners (ask the family record instead): {bad}"


@pytest.mark.parametrize(
    "line",
    [
        'HEAD = ("lm_head", "kernel")',
        "from jlora.models.llama import LlamaConfig",
        'if path[-2] in ("q_proj", "k_proj"):\n    pass',
        "x = embed_tokens",
    ],
)
def test_the_check_catches_a_llama_name_put_back(line):
    assert _check(line), line


def test_llama_is_registered_and_its_record_covers_its_params():
    from flax import traverse_util

    assert families()["llama"] is LLAMA
    cfg = jlora.PRESETS["tiny"]
    paths = set(traverse_util.flatten_dict(jlora.param_shapes(cfg)))
    assert paths <= set(LLAMA.renames)
    assert LLAMA.head in paths and LLAMA.embed in paths
    for name, lin in LLAMA.linear.items():
        kernel = jlora.param_shapes(cfg)["layers"]
        for key in lin.path:
            kernel = kernel[key]
        assert tuple(kernel["kernel"].shape[1:]) == lin.shape(cfg), name
    assert isinstance(jlora.build_model(cfg), jlora.Llama)


def _private_imports(source: str) -> list[str]:
    """Private names (a leading underscore) imported from another jlora module, or read off one."""
    tree, found, modules = ast.parse(source), [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jlora"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("jlora")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"{node.lineno}: {base.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    bad = {
        str(p.relative_to(ROOT.parent)): v for p in sorted(ROOT.rglob("*.py")) if (v := _private_imports(p.read_text()))
    }
    assert not bad, f"private names used outside their module (make them public, or move the code): {bad}"


def test_the_private_check_catches_one():
    assert _private_imports("from jlora.infer.generate import _sample")
    assert _private_imports("from jlora.checkpoint import store as ckpt\nckpt._guarded(1)")
