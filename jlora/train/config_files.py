"""Where a run config comes from, and where the paths written in it point.

`find_config(name)` is the one lookup rule of every `--config`: NAME when it is a file; else the name of a
config shipped inside the package (`tiny-cpu`, `tiny-cpu.yaml`, `smollm2-135m-demo`; jlora/configs/, which
the repository's configs/ links to); else one line naming NAME and listing the shipped names.

Paths in a config file that the run reads (model.path unless it is `tiny` or an installable name such as
`smollm2-135m`, tokenizer, data.train, data.val) are relative to the config file's directory, so a config
and its data move together and work from any working directory. output_dir, where the run writes, is relative
to the working directory, so a shipped config never writes inside the installed package. A `--set` value
is relative to the working directory: the user typed it there. `check_inputs` says, in one line, which input
is missing before anything is downloaded, loaded or compiled. The schema itself is jlora.train.config's.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import yaml

from jlora.errors import JloraError
from jlora.formats.model_aliases import model_alias

# The keys whose values are files or directories the run reads: (section, key), section None at the top.
INPUT_KEYS = (("model", "path"), (None, "tokenizer"), ("data", "train"), ("data", "val"))


class ConfigFileError(JloraError, ValueError):
    """A --config that names no file and no shipped config, or an input a config names that is not there."""


def shipped_configs_dir() -> pathlib.Path:
    """jlora/configs/ of the installed package (in a clone, the repository's configs/ links to it)."""
    return pathlib.Path(str(resources.files("jlora") / "configs"))


def shipped_configs() -> list[str]:
    """The names of the shipped configs, without .yaml, sorted."""
    return sorted(p.stem for p in shipped_configs_dir().glob("*.yaml"))


def find_config(name: str) -> str:
    """The config file `--config name` means: `name` when it is a file, else the shipped config of that name
    (with or without .yaml); else ConfigFileError naming `name` and listing the shipped ones."""
    if os.path.isfile(name):
        return name
    stem = name.removesuffix(".yaml")
    if os.sep not in name and stem in shipped_configs():
        return str(shipped_configs_dir() / f"{stem}.yaml")
    why = "no such file" if not os.path.exists(name) else "not a file"
    raise ConfigFileError(
        f"{name}: {why}, and not the name of a shipped config (shipped: {', '.join(shipped_configs())})"
    )


def _names_a_file(key: tuple[str | None, str], value: str) -> bool:
    """Whether a model.path / tokenizer value is a path, not `tiny` or an installable model's name."""
    if key in (("model", "path"), (None, "tokenizer")):
        return value != "tiny" and model_alias(value) is None
    return True


def _input_items(raw: Any) -> Iterator[tuple[str, str]]:
    """(dotted key, value) of each input path in a config: a file's mapping, or a RunConfig."""
    get = (lambda node, k: node.get(k) if isinstance(node, Mapping) else None) if isinstance(raw, Mapping) else getattr
    for section, key in INPUT_KEYS:
        node = get(raw, section) if section else raw
        value = get(node, key)
        if isinstance(value, str) and value and _names_a_file((section, key), value):
            yield (f"{section}.{key}" if section else key), value


def resolve_inputs(raw: dict, config_dir: str) -> dict:
    """`raw` (a config file's mapping) with each relative input path made relative to `config_dir` instead
    (kept relative when `config_dir` is; `..` folded away, so configs/../data/x reads data/x)."""
    for dotted, value in list(_input_items(raw)):
        if not os.path.isabs(value):
            *section, key = dotted.split(".")
            node = raw[section[0]] if section else raw
            node[key] = os.path.normpath(os.path.join(config_dir, value))
    return raw


def check_inputs(
    run: Any,
    config: str | None = None,
    overrides: Sequence[str] = (),
    *,
    can_write: Callable[[str], bool] | None = None,
) -> None:
    """ConfigFileError, one line, naming the first input `run` (a RunConfig) reads that is not there: its key,
    its path and, when `config` wrote it relative and it exists relative to the working directory instead (the
    rule before configs resolved their paths), that too. A value given with --set (`overrides`) is the user's
    own, relative to the working directory. `can_write(path)`: a missing file that the caller will write
    (the demo's data, by the make.py beside it) is no error."""
    written = {o.partition("=")[0].strip() for o in overrides}
    for key, path in _input_items(run):
        if os.path.exists(path) or (can_write is not None and can_write(path)):
            continue
        where = f"{config}: " if config else ""
        line = f"{where}{key}: {path}: no such file or directory"
        raw = dict(_input_items(_read_raw(config))).get(key) if config and key not in written else None
        if raw and not os.path.isabs(raw) and os.path.exists(raw):
            line += (
                f" (paths in a config are relative to the config's directory; {raw} exists relative to the "
                f"working directory: write {os.path.abspath(raw)} in the config, or pass --set {key}={raw})"
            )
        raise ConfigFileError(line)
    init = getattr(run, "init_adapter", None)  # another run's output: relative to the working directory
    if init and not os.path.isdir(init):
        where = f"{config}: " if config else ""
        raise ConfigFileError(
            f"{where}init_adapter: {init}: no such adapter directory (relative to the working directory, "
            "like output_dir)"
        )


def _read_raw(config: str) -> Mapping:
    """The config file's own mapping, as written (its input paths before they were resolved)."""
    try:
        with open(config, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, Mapping) else {}


def checkpoint_over_preset(run: Any) -> Any:
    """`run` (a RunConfig) with model.preset dropped when model.path is a checkpoint on this machine.

    A preset beside a path names the checkpoint's shape, so `--plan` works before the download; once the
    checkpoint is here it is what trains and what `--plan` reads. With model.path `tiny`, a preset is the
    shape of the random model (kept)."""
    import dataclasses

    m = run.model
    if not m.preset or not _names_a_file(("model", "path"), m.path) or not os.path.exists(m.path):
        return run
    return dataclasses.replace(run, model=dataclasses.replace(m, preset=None))
