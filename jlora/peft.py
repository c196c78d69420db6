"""HF PEFT LoRA adapters <-> jlora trainable trees, for a LlamaForCausalLM base.

`export_peft` writes `adapter_model.safetensors` + `adapter_config.json` the way `peft`'s
`save_pretrained` does (per-layer `lora_A` [r, in] / `lora_B` [out, r], DoRA magnitudes, embedding
`lora_embedding_A/B`, modules_to_save), so PEFT and vLLM load what jlora trains. `import_peft` reads
such a directory back into stacked (scanned) pairs, checking every key and shape against the base.
HF names come from `jlora.weights.RENAMES`. The `peft` package itself is not needed; no pickle.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jlora.llama import LlamaConfig, param_shapes
from jlora.lora import LoraConfig
from jlora.lora_apply import KernelLayout, LoraPair
from jlora.weights import RENAMES

PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> LlamaForCausalLM
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_SUFFIXES = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_magnitude_vector": "magnitude",
             "lora_magnitude_vector.weight": "magnitude", "lora_embedding_A": "a", "lora_embedding_B": "b"}
# PEFT 0.21's adapter_config.json fields beyond the ones jlora sets, with their defaults.
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_bias": False, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "qalora_group_size": 16, "revision": None, "target_parameters": None, "trainable_token_indices": None,
    "use_bdlora": None, "use_qalora": False, "velora_config": None,
}
# Config values jlora cannot represent: (key, value PEFT uses when the feature is off).
_UNSUPPORTED = (("bias", "none"), ("lora_bias", False), ("fan_in_fan_out", False), ("layer_replication", None),
                ("target_parameters", None), ("trainable_token_indices", None), ("alora_invocation_tokens", None))


class PeftError(ValueError):
    """A PEFT adapter that jlora cannot read or write for this base; the message is one line."""


class _Module:
    """One HF module of the base: its jlora param paths, layer index and kernel shape."""

    def __init__(self, name: str, layer: int | None):
        self.name, self.layer, self.params = name, layer, {}  # params: HF leaf ("weight") -> jlora path

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def base_modules(cfg: LlamaConfig) -> dict[str, _Module]:
    """Every HF module of a LlamaForCausalLM with this config, by HF name (without PEFT's prefix)."""
    modules = {}
    for path in traverse_util.flatten_dict(param_shapes(cfg)):
        pattern = RENAMES[path][0]
        for i in range(cfg.num_hidden_layers) if "{i}" in pattern else [None]:
            name, leaf = pattern.format(i=i).rsplit(".", 1)
            modules.setdefault(name, _Module(name, i)).params[leaf] = path
    return modules


def _lora_kernel(mod: _Module, shapes: dict) -> tuple[tuple, tuple[int, int], str] | None:
    """(jlora path, (n_in, n_out), kind) of a module LoRA can adapt (Linear or Embedding), else None."""
    path = mod.params.get("weight")
    if path is None or path[-1] not in ("kernel", "embedding"):
        return None
    shape = shapes[path].shape[-2:]
    return path, (int(shape[0]), int(shape[1])), "embed" if path[-1] == "embedding" else "dense"


def _nice(x: float):
    """An alpha recovered from a float32 scale, rounded back to the value a person wrote."""
    r = float(f"{x:.6g}")
    return int(r) if r.is_integer() else r


def _alpha(scale: float, rank: int, rslora: bool):
    return _nice(scale * (math.sqrt(rank) if rslora else rank))


# --------------------------------------------------------------------------- export


def export_peft(out_dir: str | pathlib.Path, trainable, lcfg: LoraConfig, cfg: LlamaConfig,
                base_name: str | None = None) -> None:
    """Write `trainable` as an HF PEFT LoRA adapter dir for `cfg`'s LlamaForCausalLM. Only active layers go out."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    modules = base_modules(cfg)
    by_path = {(p, m.layer): m for m in modules.values() for p in m.params.values()}
    tensors, adapted, extra_modules, dora = {}, [], {}, set()  # adapted: (module, rank, alpha)
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
    for path, leaf in flat.items():
        stacked = path[0] == "layers"
        if path not in RENAMES:
            raise PeftError(f"{'.'.join(path)} has no HF name; PEFT export supports LlamaForCausalLM params only")
        if not isinstance(leaf, LoraPair):
            arr = np.asarray(leaf)
            for i in range(arr.shape[0]) if stacked else [None]:
                mod = by_path[(path, i)]
                tensors[PREFIX + RENAMES[path][0].format(i=i)] = arr[i] if stacked else arr
                extra_modules.setdefault(mod.name, (mod, set()))[1].add(path)
            continue
        if leaf.layout.kind not in ("dense", "embed") or leaf.layout.stack != int(stacked):
            raise PeftError(f"{'.'.join(path)}: a {leaf.layout.kind} kernel with {leaf.layout.stack} stacked dims "
                            f"has no PEFT form")
        a, b = np.asarray(leaf.a), np.asarray(leaf.b)  # bf16 stays bf16 (ml_dtypes), as PEFT saves it
        mag = None if leaf.magnitude is None else np.asarray(leaf.magnitude)
        dora.add(mag is not None)
        scales = leaf.scale_array().reshape(-1)
        for j, s in enumerate(scales):
            if s == 0:
                continue
            i = j if stacked else None
            pick = (lambda x: x[j]) if stacked else (lambda x: x)  # noqa: E731
            mod = by_path[(path, i)]
            key = PREFIX + mod.name
            if leaf.layout.kind == "embed":  # PEFT: A [r, V] (looked up by column), B [D, r]
                tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = pick(a).T, pick(b).T
            else:
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = pick(a).T, pick(b).T
            if mag is not None:
                tensors[f"{key}.lora_magnitude_vector"] = pick(mag)
            adapted.append((mod, leaf.rank, _alpha(float(s), leaf.rank, lcfg.use_rslora)))
    if not adapted:
        raise PeftError("the trainable tree has no active LoRA pair; PEFT needs at least one adapted module")
    if len(dora) > 1:
        raise PeftError("some pairs are DoRA and some are not; PEFT's use_dora is one flag for the whole adapter")
    config = _export_config(adapted, extra_modules, modules, lcfg, cfg, base_name, dora.pop())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _names_for(chosen: set[str], candidates: list[str], match) -> list[str]:
    """Short names where a short name picks exactly `chosen` among `candidates`, full names elsewhere."""
    out, left = [], set(chosen)
    for short in sorted({c.rsplit(".", 1)[-1] for c in chosen}):
        hits = {c for c in candidates if match(short, c)}
        if hits and hits <= chosen and hits & left:
            out.append(short)
            left -= hits
    return out + sorted(left)


def _export_config(adapted, extra_modules, modules, lcfg: LoraConfig, cfg: LlamaConfig, base_name,
                   use_dora: bool) -> dict:
    names = [m.name for m, _, _ in adapted]
    lora_candidates = [n for n, m in modules.items() if "weight" in m.params and m.params["weight"][-1] != "weight"]
    # modules_to_save: PEFT wraps a whole module (all its params) matched by key.endswith(name).
    for name, (mod, paths) in extra_modules.items():
        if set(mod.params.values()) != paths:
            raise PeftError(f"train_extra trains part of {name} ({sorted('.'.join(p) for p in paths)}); PEFT's "
                            f"modules_to_save needs all of {sorted(mod.params)}")
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
    alpha = default([al for _, _, al in adapted], _nice(lcfg.alpha))

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
    config.update({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True, "bias": "none",
        "base_model_name_or_path": base_name if base_name is not None else cfg.name,
        "r": int(r), "lora_alpha": alpha, "lora_dropout": float(lcfg.dropout),
        "target_modules": targets, "layers_to_transform": to_transform, "modules_to_save": to_save,
        "rank_pattern": pattern({m.name: rk for m, rk, _ in adapted}, r),
        "alpha_pattern": pattern({m.name: al for m, _, al in adapted}, alpha),
        "use_rslora": bool(lcfg.use_rslora), "use_dora": use_dora,
    })
    return config


# --------------------------------------------------------------------------- import


def _peft_targets(config: dict, key: str) -> bool:
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


def _pattern_value(patterns: dict, key: str, default):
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
    for key, off in _UNSUPPORTED:
        if config.get(key, off) not in (off, [], {}):
            raise PeftError(f"{file}: {key}={config[key]!r} is not supported by jlora (needs {off!r})")
    if config.get("target_modules") == "all-linear":
        config["target_modules"] = r".*\.(self_attn|mlp)\.[a-z_]+_proj"  # PEFT: every Linear but the output head
    return config


def _load_tensors(directory: pathlib.Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    file = directory / WEIGHTS_FILE
    if not file.is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        raise PeftError(f"{file}: missing" + ("; adapter_model.bin would need pickle: resave it as safetensors"
                                              if pickled else ""))
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftError(f"{file}: truncated or corrupt safetensors ({' '.join(str(e).split())})") from None


def import_peft(directory: str | pathlib.Path, cfg: LlamaConfig, params=None) -> tuple[LoraConfig, dict]:
    """(LoraConfig, trainable tree) from an HF PEFT LoRA adapter dir, for the base `cfg`.

    Per-layer pairs are stacked on the layer axis; a module's layers share the largest rank (smaller
    ones are zero-padded, which changes nothing); layers the adapter lacks get zeros and scale 0.
    DoRA adapters that skip layers need the base `params` (the skipped layers' magnitude is |W|).
    The returned LoraConfig, given to `split`, builds a tree of the same shapes and scales.
    """
    directory = pathlib.Path(directory)
    config = read_peft_config(directory)
    tensors = _load_tensors(directory)
    modules, shapes = base_modules(cfg), traverse_util.flatten_dict(param_shapes(cfg))
    rslora, problems = bool(config.get("use_rslora")), []
    found = collections.defaultdict(dict)  # module name -> {"a"|"b"|"magnitude": array}
    extra = {}  # HF tensor name -> array (modules_to_save)
    to_save = [n for n in modules if any(n.endswith(m) for m in config.get("modules_to_save") or ())]
    for key, arr in tensors.items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in _SUFFIXES if name.endswith("." + s)), None)
        owner, _, leaf = name.rpartition(".")
        if not key.startswith(PREFIX):
            problems.append(f"unexpected key {key} (PEFT keys start with {PREFIX})")
        elif suffix and name[: -len(suffix) - 1] in modules and _lora_kernel(modules[name[: -len(suffix) - 1]], shapes):
            found[name[: -len(suffix) - 1]][_SUFFIXES[suffix]] = arr
        elif suffix and name.startswith("lm_head.") and cfg.tie_word_embeddings:
            problems.append(f"{key}: lm_head is tied to embed_tokens in this base, jlora cannot adapt it apart")
        elif owner in to_save and leaf in modules[owner].params:
            extra[name] = arr
        elif name.endswith(".base_layer.weight") and name.removesuffix(".base_layer.weight") in modules:
            mod = modules[name.removesuffix(".base_layer.weight")]  # PEFT saves embedding bases; must be unchanged
            if tuple(arr.shape) != _disk_shape(shapes[mod.params["weight"]], mod):
                problems.append(f"{key} has shape {tuple(arr.shape)}, the base has "
                                f"{_disk_shape(shapes[mod.params['weight']], mod)} (resized vocab?)")
        else:
            problems.append(f"unexpected key {key}")
    problems += [f"missing {PREFIX}{n}.{leaf} (in modules_to_save)" for n in to_save
                 for leaf in modules[n].params if f"{n}.{leaf}" not in extra]
    expected = {n for n, m in modules.items() if _lora_kernel(m, shapes) and _peft_targets(config, n)}
    if cfg.tie_word_embeddings and _peft_targets(config, "lm_head") and "lm_head" not in found:
        problems.append("target_modules selects lm_head, which is tied to embed_tokens in this base")
    problems += [f"missing {PREFIX}{n}.lora_A/lora_B (selected by target_modules)" for n in sorted(expected - set(found))]
    problems += [f"unexpected {PREFIX}{n}.* (not selected by target_modules)" for n in sorted(set(found) - expected)]
    per_module = {}
    for name in sorted(set(found) & expected):
        got = _check_pair(name, found[name], modules[name], shapes, config, problems)
        if got is not None:
            per_module[name] = got
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PeftError(f"{directory}: adapter does not fit base {cfg.name!r}: {'; '.join(problems[:3])}{more}")
    return _assemble(per_module, extra, modules, shapes, config, cfg, params, rslora)


def _disk_shape(spec, mod: _Module) -> tuple:
    shape = tuple(spec.shape[1:] if mod.layer is not None else spec.shape)
    return tuple(reversed(shape)) if mod.params["weight"][-1] == "kernel" else shape


def _check_pair(name: str, got: dict, mod: _Module, shapes, config: dict, problems: list):
    """(a [in, r], b [r, out], magnitude [out] | None, rank, alpha) in jlora's layout, or None after noting problems."""
    path, (n_in, n_out), kind = _lora_kernel(mod, shapes)
    if "a" not in got or "b" not in got:
        have, lack = ("A", "B") if "a" in got else ("B", "A")
        problems.append(f"{PREFIX}{name} has lora_{have} but not lora_{lack}")
        return None
    a, b = got["a"].T, got["b"].T  # PEFT A [r, in] / B [out, r] (embedding: A [r, V], B [D, r])
    r = a.shape[-1]
    want_r = int(_pattern_value(config.get("rank_pattern"), name, config.get("r", 8)))
    checks = [(a.shape, (n_in, r), "lora_A"), (b.shape, (r, n_out), "lora_B")]
    if "magnitude" in got:
        checks.append((got["magnitude"].shape, (n_out,), "lora_magnitude_vector"))
    for have, want, what in checks:
        if tuple(have) != want:
            problems.append(f"{PREFIX}{name}.{what} has shape {tuple(reversed(have)) if what != 'lora_magnitude_vector' else tuple(have)}, "
                            f"expected {tuple(reversed(want)) if what != 'lora_magnitude_vector' else want}")
            return None
    if r != want_r:
        problems.append(f"{PREFIX}{name} has rank {r}, adapter_config.json says {want_r}")
        return None
    if bool(config.get("use_dora")) != ("magnitude" in got):
        problems.append(f"{PREFIX}{name}: lora_magnitude_vector {'missing' if config.get('use_dora') else 'unexpected'}"
                        f" with use_dora={bool(config.get('use_dora'))}")
        return None
    alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
    return a, b, got.get("magnitude"), r, alpha


def _assemble(per_module: dict, extra: dict, modules: dict, shapes: dict, config: dict, cfg: LlamaConfig,
              params, rslora: bool) -> tuple[LoraConfig, dict]:
    """Stack per-layer pairs into jlora's scanned layout and describe the result as a LoraConfig."""
    groups, dims = collections.defaultdict(dict), {}  # jlora path -> {layer: (a, b, magnitude, r, alpha)}
    for name, pair in per_module.items():
        path, dims[path], _ = _lora_kernel(modules[name], shapes)
        groups[path][modules[name].layer] = pair
    flat_params = traverse_util.flatten_dict(params) if params is not None else None
    trainable, rank_pattern, alpha_pattern, layer_sets, dtypes = {}, [], [], set(), set()
    lcfg_alpha = float(config.get("lora_alpha", 8))
    for path in [p for p in shapes if p in groups]:  # tree order
        layers = groups[path]
        (n_in, n_out), kind = dims[path], "embed" if path[-1] == "embedding" else "dense"
        stacked, short = path[0] == "layers", path[-2]
        rank = max(v[3] for v in layers.values())
        dt = np.result_type(*[v[0].dtype for v in layers.values()])
        dt = np.float32 if dt not in (np.float32, jnp.bfloat16) else dt
        dtypes.add(np.dtype(dt).name)
        idx = list(range(cfg.num_hidden_layers)) if stacked else [None]
        a = np.zeros((len(idx), n_in, rank), dt)
        b = np.zeros((len(idx), rank, n_out), dt)
        dora = config.get("use_dora")
        mag = np.zeros((len(idx), n_out), dt) if dora else None
        scales = np.zeros(len(idx), np.float32)
        for j, i in enumerate(idx):
            if i in layers:
                la, lb, lm, r, alpha = layers[i]
                a[j, :, :r], b[j, :r, :], scales[j] = la, lb, alpha / (math.sqrt(r) if rslora else r)
                if dora:
                    mag[j] = lm
                continue
            if dora and kind == "dense":
                if flat_params is None:
                    raise PeftError(f"{config.get('base_model_name_or_path')}: this DoRA adapter skips layer {i} of "
                                    f"{short}; import_peft needs the base params to fill its magnitude (|W|)")
                mag[j] = np.linalg.norm(np.asarray(flat_params[path][i], np.float32), axis=0)
        if dora and kind != "dense":
            raise PeftError(f"DoRA on {'.'.join(path[:-1])} ({kind}) is not supported by jlora")
        squeeze = (lambda x: x) if stacked else (lambda x: x[0])  # noqa: E731
        scale = tuple(scales.tolist()) if stacked else float(scales[0])
        trainable[path] = LoraPair(jnp.asarray(squeeze(a)), jnp.asarray(squeeze(b)),
                                   None if mag is None else jnp.asarray(squeeze(mag)), scale,
                                   KernelLayout("embed" if kind == "embed" else "dense", stack=int(stacked)),
                                   float(config.get("lora_dropout") or 0.0))
        if rank != config.get("r", 8):
            rank_pattern.append((short, rank))
        eff, dflt = {i: _alpha(float(s), rank, rslora) for i, s in zip(idx, scales.tolist()) if s}, _nice(lcfg_alpha)
        if len(set(eff.values())) == 1 and dflt not in eff.values():
            alpha_pattern.append((short, next(iter(eff.values()))))
        elif len(set(eff.values())) > 1:
            alpha_pattern += [(f"layers.{i}.{'.'.join(path[1:-1])}", v) for i, v in eff.items() if v != dflt]
        if stacked:
            layer_sets.add(tuple(sorted(layers)))
    for path in [p for p in shapes if RENAMES[p][0].format(i=0) in extra or RENAMES[p][0] in extra]:
        names = [RENAMES[path][0].format(i=i) for i in range(cfg.num_hidden_layers)] if path[0] == "layers" \
            else [RENAMES[path][0]]
        missing = [n for n in names if n not in extra]
        if missing:
            raise PeftError(f"modules_to_save has {names[0]} but not {missing[0]}; jlora trains a layer param "
                            f"in full for all layers or none")
        arrs = [extra[n].T if path[-1] == "kernel" else extra[n] for n in names]
        trainable[path] = jnp.asarray(np.stack(arrs) if path[0] == "layers" else arrs[0])
    only = next(iter(layer_sets)) if len(layer_sets) == 1 else None
    extra_paths = [".".join(p) for p, v in trainable.items() if not isinstance(v, LoraPair)]
    lcfg = LoraConfig(
        rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=tuple(dict.fromkeys(p[-2] for p, v in trainable.items() if isinstance(v, LoraPair))),
        layers=only if only is not None and len(only) < cfg.num_hidden_layers else None,
        rank_pattern=tuple(rank_pattern), alpha_pattern=tuple(alpha_pattern), use_rslora=rslora,
        use_dora=bool(config.get("use_dora")),
        train_extra="^(" + "|".join(re.escape(p) for p in extra_paths) + ")$" if extra_paths else None,
        adapter_dtype="bfloat16" if "bfloat16" in dtypes else "float32")
    return lcfg, traverse_util.unflatten_dict(trainable)
