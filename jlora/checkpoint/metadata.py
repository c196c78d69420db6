"""What a checkpoint or adapter says about itself: its method and config, its base model, its trees.

`make_metadata` writes it; `check_base` and `check_lora_config` refuse one made for another base, method or
config. Also the errors of this package and `guarded`, which turns an orbax read failure into one line.
Training checkpoints are jlora.checkpoint.train_state, final adapters jlora.checkpoint.adapter.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json

from flax import traverse_util

from jlora.checkpoint.fingerprint import fingerprint, mismatch
from jlora.errors import JloraError
from jlora.models.config import ModelConfig
from jlora.peft.llama_adapter import AdapterConfig
from jlora.peft.lora import LoraConfig
from jlora.peft.routing import LoraPair

SHAPE_KEYS = (
    "rank",
    "rank_pattern",
    "alpha",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "targets",
    "exclude",
    "layers",
    "train_extra",
)


class CheckpointError(JloraError, ValueError):
    """A checkpoint that is missing, truncated, corrupt or made for something else; one-line message."""


class AdapterError(CheckpointError):
    """An adapter that does not fit: another base model, another rank, or a damaged directory."""


def _version() -> str:
    try:
        return importlib.metadata.version("jlora")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _lora_config_dict(lcfg: LoraConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(lcfg)))  # tuples -> lists


def lora_config_from_dict(d: dict) -> LoraConfig:
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in d.items() if k in names})


def _method_meta(lcfg: LoraConfig | AdapterConfig) -> dict:
    """The method and its config, as metadata: {"lora_config": ...}, or for LLaMA-Adapter
    {"method": "llama_adapter", "adapter_config": ...} (an older reader then finds no LoRA config)."""
    if isinstance(lcfg, AdapterConfig):
        return {"method": "llama_adapter", "adapter_config": dataclasses.asdict(lcfg)}
    return {"lora_config": _lora_config_dict(lcfg)}


def method_config_from_meta(meta: dict) -> LoraConfig | AdapterConfig:
    """The LoraConfig or AdapterConfig a checkpoint or adapter was made with."""
    if meta.get("method") == "llama_adapter":
        return AdapterConfig(**meta["adapter_config"])
    return lora_config_from_dict(meta["lora_config"])


def describe_tree(trainable) -> dict:
    """The static half of a trainable tree, which arrays alone cannot restore."""
    pairs, extra = {}, []
    for path, leaf in traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair)).items():
        name = ".".join(path)
        if isinstance(leaf, LoraPair):
            pairs[name] = {
                "scale": list(leaf.scale) if isinstance(leaf.scale, tuple) else leaf.scale,
                "layout": dataclasses.asdict(leaf.layout),
                "dropout": leaf.dropout,
                "dora": leaf.magnitude is not None,
                "rank": leaf.rank,
            }
        else:
            extra.append(name)
    return {"pairs": pairs, "extra": extra}


def make_metadata(
    lcfg: LoraConfig | AdapterConfig,
    base: ModelConfig,
    params=None,
    run_config: dict | None = None,
    data_stream: dict | None = None,
) -> dict:
    """The metadata JSON of a checkpoint or adapter: what it is and which base model it belongs to;
    for a training checkpoint also `data_stream` (the data's identity), which a resume must match."""
    meta = {
        "jlora_version": _version(),
        **_method_meta(lcfg),
        "run_config": json.loads(json.dumps(run_config, default=str)),  # tuples -> lists, odd types -> str
        "base": {
            "name": base.name,
            "config": base.to_hf_config(),
            "fingerprint": fingerprint(params) if params is not None else None,
        },
    }
    if data_stream is not None:
        meta["data_stream"] = json.loads(json.dumps(data_stream))
    return meta


def check_base(meta: dict, base: ModelConfig | None, params=None, *, where: str) -> None:
    """Raise AdapterError unless `meta` was made for this base config (and these weights, if given)."""
    saved = meta.get("base") or {}
    if base is not None:
        mine, theirs = base.to_hf_config(), saved.get("config") or {}
        # the family, then the fields that decide which base an adapter fits (ModelConfig.arch_keys)
        diff = [k for k in ("model_type", *base.arch_keys) if _norm(mine.get(k)) != _norm(theirs.get(k))]
        if diff:
            k = diff[0]
            raise AdapterError(
                f"{where}: made for another base model ({saved.get('name')!r}): {k}={theirs.get(k)!r} "
                f"there, {mine.get(k)!r} here ({len(diff)} config field(s) differ)"
            )
    bad = mismatch(saved["fingerprint"], params) if params is not None and saved.get("fingerprint") else []
    if bad:
        name, kind = bad[0]
        adapted = set((meta.get("trainable") or {}).get("pairs") or ())
        merged = kind == "sample" and {k for k, _ in bad} <= adapted
        why = (
            "only tensors this adapter adapts differ: is it (or another adapter) merged into these weights "
            "already? use the original base"
            if merged
            else "use the weights it was trained on"
        )
        raise AdapterError(
            f"{where}: made for another base model ({saved.get('name')!r}): weight {name} differs "
            f"({kind} fingerprint, {len(bad)} tensor(s)); {why}"
        )


def check_lora_config(meta: dict, expect: LoraConfig | AdapterConfig, *, where: str) -> None:
    """Raise AdapterError if the saved method differs from `expect`'s, or its LoraConfig in rank, targets or
    scale, or its AdapterConfig in len or layers."""
    method, saved_method = (
        ("llama_adapter" if isinstance(expect, AdapterConfig) else "lora"),
        meta.get("method", "lora"),
    )
    if method != saved_method:
        raise AdapterError(f"{where}: made with method {saved_method}, expected method {method}")
    if isinstance(expect, AdapterConfig):
        saved, mine = meta.get("adapter_config") or {}, dataclasses.asdict(expect)
        for k in mine:
            if saved.get(k) != mine[k]:
                raise AdapterError(
                    f"{where}: adapter has adapter.{k}={saved.get(k)!r}, expected adapter.{k}={mine[k]!r}"
                )
        return
    saved, mine = meta.get("lora_config") or {}, _lora_config_dict(expect)
    for k in SHAPE_KEYS:
        if _norm(saved.get(k)) != _norm(mine.get(k)):
            raise AdapterError(f"{where}: adapter has {k}={saved.get(k)!r}, expected {k}={mine.get(k)!r}")


def _norm(v):
    """A comparable form of a JSON-ish value: tuples as lists, 16 == 16.0."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return sorted((k, _norm(x)) for k, x in v.items())
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def guarded(fn, error: type, message: str):
    """fn(), with any orbax/tensorstore failure (they raise many types) turned into one clear line."""
    try:
        return fn()
    except Exception as e:
        raise error(f"{message} ({one_line(e)})") from None
