"""What a checkpoint or adapter says about itself: its method and config, its base model, its trees.

`make_metadata` writes it; `check_base` and `check_lora_config` refuse one made for another base, method or
config. `seal` adds a checksum of every part of it, which `check_seal` verifies, and `check_pairs` refuses a
pair whose scale or rank its own LoRA config does not give: the metadata says how the arrays act, so an edit
to it is as damaging as one to the arrays. Also the errors of this package and `guarded`, which turns an
orbax read failure into one line. Training checkpoints are jlora.checkpoint.train_state, final adapters
jlora.checkpoint.adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json

import jax
import numpy as np
from flax import traverse_util

from jlora.checkpoint.fingerprint import fingerprint, mismatch
from jlora.errors import JloraError
from jlora.models.config import ModelConfig
from jlora.models.family import config_from_hf, family_of, param_shapes
from jlora.peft.llama_adapter import AdapterConfig
from jlora.peft.lora import LoraConfig, split
from jlora.peft.routing import LoraPair

SEAL = "metadata_sha256"  # the key of the checksums `seal` adds
_SEAL_DEPTH = 3  # parts are summed this deep (base/config/hidden_size), so a mismatch names what changed

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
    if base is not None and saved.get("fingerprint"):
        _check_fingerprint_names(saved["fingerprint"], base, where)
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


def _check_fingerprint_names(saved: dict, base: ModelConfig, where: str) -> None:
    """A saved fingerprint names only tensors of its base, and (version 2) samples every tensor it gives a
    shape: `mismatch` compares the tensors both sides have, so a renamed or dropped entry would go unchecked."""
    names = {".".join(k) for k in traverse_util.flatten_dict(param_shapes(base))}
    for field in ("shapes", "samples", "sha256"):  # sha256: version 1's samples
        for name in sorted(set(saved.get(field) or ()) - names)[:1]:
            raise AdapterError(
                f"{where}: metadata base/fingerprint/{field} names {name}, which is no tensor of a {base.name} "
                f"model: edited or corrupt metadata"
            )
    if "samples" in saved:
        for name in sorted(set(saved["samples"]) ^ set(saved.get("shapes") or ()))[:1]:
            raise AdapterError(
                f"{where}: metadata base/fingerprint gives {name} a shape or a sample but not both: edited or "
                f"corrupt metadata"
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


def _parts(meta: dict, depth: int = _SEAL_DEPTH, prefix: str = "") -> dict[str, object]:
    """The metadata as {"base/config/hidden_size": value, ...}: dicts opened `depth` levels deep, the seal left out."""
    out = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if name == SEAL:
            continue
        if isinstance(value, dict) and value and depth > 1:
            out.update(_parts(value, depth - 1, f"{name}/"))
        else:
            out[name] = value
    return out


def _digest(value) -> str:
    """The first 16 hex digits of the sha256 of a JSON value's canonical text. 64 bits: a checksum against
    corruption and careless edits, which one who rewrites the file could recompute at any length anyway."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seal(meta: dict) -> dict:
    """`meta` as JSON reads it back, with SEAL: the checksum of each of its parts (see `_parts`)."""
    meta = json.loads(json.dumps(meta))  # tuples -> lists: what a reader will see
    return {**meta, SEAL: {name: _digest(v) for name, v in _parts(meta).items()}}


def check_seal(meta: dict, *, where: str) -> None:
    """Raise AdapterError, naming the part, unless every part of `meta` matches the checksum `seal` gave it.

    Metadata saved before jlora sealed it has no SEAL and is accepted: its pairs' scales are still checked
    against its config (`check_pairs`), and removing SEAL is an edit no corruption makes."""
    sums = meta.get(SEAL)
    if sums is None:
        return
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise AdapterError(f"{where}: metadata key {SEAL} is not a table of checksums: edited or corrupt metadata")
    mine = _parts(meta)
    for name in sorted(sums.keys() | mine.keys()):
        if name not in mine:
            raise AdapterError(f"{where}: metadata key {name} is missing: edited or corrupt metadata")
        if name not in sums:
            raise AdapterError(f"{where}: metadata key {name} was added after it was saved: edited metadata")
        if _digest(mine[name]) != sums[name]:
            raise AdapterError(
                f"{where}: metadata key {name} does not match its saved checksum: edited or corrupt metadata"
            )


def check_pairs(meta: dict, base: ModelConfig | None = None, *, where: str) -> None:
    """Raise AdapterError unless each LoRA pair's rank, DoRA flag and scales in `meta` are what its own
    lora_config gives on its base: `split` is run for shapes only (jax.eval_shape), the one place that
    turns rank, alpha, rsLoRA, patterns and layers into scales. A layer whose saved scale is 0 while the
    config gives one is accepted: import_peft leaves out a layer that only some modules skip that way."""
    pairs = (meta.get("trainable") or {}).get("pairs") or {}
    if meta.get("method") == "llama_adapter" or not pairs:
        return
    try:
        lcfg = method_config_from_meta(meta)
        cfg = base or config_from_hf((meta.get("base") or {}).get("config") or {})
        lcfg = lcfg.with_default_targets(family_of(cfg).default_targets)
        derived = jax.eval_shape(lambda p: split(p, lcfg, jax.random.key(0))[1], param_shapes(cfg))
    except (JloraError, TypeError, ValueError, KeyError) as e:
        raise AdapterError(
            f"{where}: metadata lora_config does not describe a LoRA of its base ({one_line(e)})"
        ) from None
    want = describe_tree(derived)["pairs"]
    config = f"lora_config (rank={lcfg.rank}, alpha={lcfg.alpha:g}, use_rslora={lcfg.use_rslora}, and its patterns)"
    for name in sorted(pairs.keys() | want.keys()):
        if name not in want:
            raise AdapterError(f"{where}: metadata trainable/pairs has {name}, which its {config} does not adapt")
        if name not in pairs:
            raise AdapterError(f"{where}: metadata trainable/pairs lacks {name}, which its {config} adapts")
        have, give = pairs[name], want[name]
        for key in ("rank", "dora"):
            if have.get(key) != give[key]:
                raise AdapterError(
                    f"{where}: metadata trainable/pairs/{name}/{key} is {have.get(key)!r}, but its {config} "
                    f"gives {give[key]!r}"
                )
        try:
            saved = np.asarray(have.get("scale"), np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise AdapterError(
                f"{where}: metadata trainable/pairs/{name}/scale is {have.get('scale')!r}, not a number or a list"
            ) from None
        given = np.asarray(give["scale"], np.float64).reshape(-1)
        if saved.shape != given.shape:
            raise AdapterError(
                f"{where}: metadata trainable/pairs/{name}/scale has {saved.size} layers, its base {given.size}"
            )
        # float32 scales (alpha / sqrt(r)) round-trip through JSON as float64: compare to fp32 precision
        bad = [j for j, (x, y) in enumerate(zip(saved, given)) if x != 0 and not np.isclose(x, y, rtol=1e-6, atol=0)]
        if bad:
            j = bad[0]
            layer = f" of layer {j}" if isinstance(give["scale"], list) else ""
            raise AdapterError(
                f"{where}: metadata trainable/pairs/{name}/scale{layer} is {saved[j]:g}, but its {config} "
                f"gives {given[j]:g}"
            )


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def guarded(fn, error: type, message: str):
    """fn(), with any orbax/tensorstore failure (they raise many types) turned into one clear line."""
    try:
        return fn()
    except Exception as e:
        raise error(f"{message} ({one_line(e)})") from None
