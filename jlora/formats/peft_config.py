"""HF PEFT's adapter_config.json: written as `peft` writes it, read and matched as `peft` reads it.

Owns PeftError, the base model's HF module inventory (`base_modules`), the config dict that
`export_peft` writes (target_modules / layers_to_transform / rank_pattern / alpha_pattern /
modules_to_save chosen so PEFT selects exactly the adapted modules), and PEFT's own rules for
which module a target or pattern key selects. Tensors and trees live in jlora.formats.peft_adapter.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re

from flax import traverse_util

from jlora.errors import JloraError
from jlora.models.config import ModelConfig
from jlora.models.family import family_of, param_shapes
from jlora.peft.lora import LoraConfig

CONFIG_FILE = "adapter_config.json"

# PEFT 0.21's adapter_config.json fields beyond the ones jlora sets, with their defaults.
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "qalora_group_size": 16,
    "revision": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# Config values jlora cannot represent: (key, value PEFT uses when the feature is off).
_UNSUPPORTED = (
    ("bias", "none"),
    ("lora_bias", False),
    ("fan_in_fan_out", False),
    ("layer_replication", None),
    ("target_parameters", None),
    ("trainable_token_indices", None),
    ("alora_invocation_tokens", None),
)


class PeftError(JloraError, ValueError):
    """A PEFT adapter that jlora cannot read or write for this base; the message is one line."""


class HFModule:
    """One HF module of the base: its jlora param paths, layer index and kernel shape."""

    def __init__(self, name: str, layer: int | None):
        self.name, self.layer, self.params = name, layer, {}  # params: HF leaf ("weight") -> jlora path

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def base_modules(cfg: ModelConfig) -> dict[str, HFModule]:
    """Every HF module of the model of this config, by HF name (without PEFT's prefix)."""
    modules = {}
    renames = family_of(cfg).renames
    for path in traverse_util.flatten_dict(param_shapes(cfg)):
        pattern = renames[path][0]
        for i in range(cfg.num_hidden_layers) if "{i}" in pattern else [None]:
            name, leaf = pattern.format(i=i).rsplit(".", 1)
            modules.setdefault(name, HFModule(name, i)).params[leaf] = path
    return modules


def nice(x: float):
    """An alpha recovered from a float32 scale, rounded back to the value a person wrote."""
    r = float(f"{x:.6g}")
    return int(r) if r.is_integer() else r


def _names_for(chosen: set[str], candidates: list[str], match) -> list[str]:
    """Short names where a short name picks exactly `chosen` among `candidates`, full names elsewhere."""
    out, left = [], set(chosen)
    for short in sorted({c.rsplit(".", 1)[-1] for c in chosen}):
        hits = {c for c in candidates if match(short, c)}
        if hits and hits <= chosen and hits & left:
            out.append(short)
            left -= hits
    return out + sorted(left)


def export_config(
    adapted: list,
    extra_modules: dict,
    modules: dict,
    lcfg: LoraConfig,
    cfg: ModelConfig,
    base_name: str | None,
    use_dora: bool,
) -> dict:
    """The adapter_config.json dict for `adapted` [(module, rank, alpha)] and `extra_modules` (trained in full).

    Chosen so that PEFT's own matching selects exactly the adapted modules, with their ranks and alphas.
    """
    names = [m.name for m, _, _ in adapted]
    lora_candidates = [n for n, m in modules.items() if "weight" in m.params and m.params["weight"][-1] != "weight"]
    # modules_to_save: PEFT wraps a whole module (all its params) matched by key.endswith(name).
    for name, (mod, paths) in extra_modules.items():
        if set(mod.params.values()) != paths:
            raise PeftError(
                f"train_extra trains part of {name} ({sorted('.'.join(p) for p in paths)}); PEFT's "
                f"modules_to_save needs all of {sorted(mod.params)}"
            )
        if name in names:
            raise PeftError(f"{name} is both LoRA-adapted and trained in full; PEFT cannot express that")
    to_save = _names_for(set(extra_modules), list(modules), lambda s, c: c.endswith(s)) if extra_modules else None

    # target_modules: short names (plus layers_to_transform for a common layer subset), else full names.
    layers = sorted({m.layer for m, _, _ in adapted if m.layer is not None})
    shorts = sorted({m.short for m, _, _ in adapted})
    full = {n for n in lora_candidates if n.rsplit(".", 1)[-1] in shorts}
    in_layers = {n for n in full if modules[n].layer is None or modules[n].layer in layers}
    to_transform = None
    if set(names) == full:
        targets = shorts
    elif set(names) == in_layers and all(m.layer is not None for m, _, _ in adapted):
        targets, to_transform = shorts, layers
    else:
        targets = sorted(names)

    def default(values, preferred):
        counts = collections.Counter(values)
        return preferred if preferred in counts else counts.most_common(1)[0][0]

    r = default([rk for _, rk, _ in adapted], lcfg.rank)
    alpha = default([al for _, _, al in adapted], nice(lcfg.alpha))

    def pattern(values: dict, dflt) -> dict:
        odd = {n: v for n, v in values.items() if v != dflt}
        out = {}
        for short in sorted({n.rsplit(".", 1)[-1] for n in odd}):
            group = {n: v for n, v in values.items() if n.rsplit(".", 1)[-1] == short}
            if set(group) <= set(odd) and len(set(group.values())) == 1:
                out[short] = next(iter(group.values()))  # PEFT matches keys as r"(.*\.)?(key)$"
            else:
                out.update({n: v for n, v in group.items() if n in odd})
        return out

    config = dict(_PEFT_DEFAULTS)
    config.update(
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "inference_mode": True,
            "bias": "none",
            "base_model_name_or_path": base_name if base_name is not None else cfg.name,
            "r": int(r),
            "lora_alpha": alpha,
            "lora_dropout": float(lcfg.dropout),
            "target_modules": targets,
            "layers_to_transform": to_transform,
            "modules_to_save": to_save,
            "rank_pattern": pattern({m.name: rk for m, rk, _ in adapted}, r),
            "alpha_pattern": pattern({m.name: al for m, _, al in adapted}, alpha),
            "use_rslora": bool(lcfg.use_rslora),
            "use_dora": use_dora,
        }
    )
    return config


# --------------------------------------------------------------------------- reading, as peft reads


def peft_targets(config: dict, key: str) -> bool:
    """PEFT's `check_target_module_exists` for one module key (exclude, modules_to_save, layers_to_transform)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, key):
        return False
    if isinstance(exclude, list) and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or ()):
        return False
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    pats = config.get("layers_pattern")
    pats = [pats] if isinstance(pats, str) else (pats or [])
    match = None
    for p in pats or [None]:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\." if p is None else rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
        if match:
            break
    return match is not None and int(match.group("idx")) in layers


def pattern_value(patterns: dict, key: str, default):
    """PEFT's `get_pattern_key`: the first pattern key k with key matching r"(.*\\.)?(k)$"."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", key):
            return v
    return default


def read_peft_config(directory: str | pathlib.Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter, checked for features jlora cannot represent."""
    file = pathlib.Path(directory) / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise PeftError(f"{file}: missing; not a PEFT adapter directory") from None
    except (OSError, ValueError) as e:
        raise PeftError(f"{file}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise PeftError(f"{file}: peft_type is {got!r}; jlora reads only LORA adapters")
    _check_types(config, file)
    for key, off in _UNSUPPORTED:
        if config.get(key, off) not in (off, [], {}):
            raise PeftError(f"{file}: {key}={config[key]!r} is not supported by jlora (needs {off!r})")
    if isinstance(config.get("target_modules"), str) and config["target_modules"].lower() == "all-linear":
        config["target_modules"] = r".*\.(self_attn|mlp)\.[a-z_]+_proj"  # PEFT: every Linear but the output head
    return config


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# adapter_config.json keys jlora reads, with what each must be (PEFT writes them so; a hand edit may not).
_TYPES = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "lora_alpha": (lambda v: _number(v) and v > 0, "a positive number"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (
        lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "a regex or a list of module names",
    ),
    "rank_pattern": (
        lambda v: (
            isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v.values())
        ),
        "a mapping of module patterns to positive integers",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(_number(x) and x > 0 for x in v.values()),
        "a mapping of module patterns to positive numbers",
    ),
}


def _check_types(config: dict, file: pathlib.Path) -> None:
    """PeftError naming the file and key of a value of the wrong type or out of range."""
    for key, (ok, expected) in _TYPES.items():
        if key in config and not ok(config[key]):
            raise PeftError(f"{file}: {key}={config[key]!r}: expected {expected}")
