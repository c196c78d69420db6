"""HF PEFT LoRA adapters <-> jlora trainable trees, for any family's base (AdaptionPrompt: formats.peft_adaption).

`export_peft` writes `adapter_model.safetensors` + `adapter_config.json` the way `peft`'s
`save_pretrained` does (per-layer `lora_A` [r, in] / `lora_B` [out, r], DoRA magnitudes, embedding
`lora_embedding_A/B`, modules_to_save), so PEFT and vLLM load what jlora trains. `import_peft` reads
such a directory back into stacked (scanned) pairs, checking every key and shape against the base, and
every value: no NaN or inf, and no LoRA factor beyond a bound no real adapter reaches (a damaged file).
HF names come from the family's weight table (jlora.models.family). The `peft` package itself is not needed; no pickle.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jlora.formats.peft_adaption import export_adaption_prompt, import_adaption_prompt, is_adaption_prompt_dir
from jlora.formats.peft_config import (
    CONFIG_FILE,
    HFModule,
    PeftError,
    base_modules,
    export_config,
    nice,
    pattern_value,
    peft_targets,
    read_peft_config,
)
from jlora.formats.tensor_values import adapter_value_problem
from jlora.formats.weights import save_safetensors
from jlora.models.config import ModelConfig
from jlora.models.family import family_of, param_shapes
from jlora.peft.llama_adapter import AdapterConfig
from jlora.peft.lora import LoraConfig
from jlora.peft.routing import KernelLayout, LoraPair
from jlora.quant.quantize import dense_value

PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> LlamaForCausalLM
WEIGHTS_FILE = "adapter_model.safetensors"
_SUFFIXES = {
    "lora_A.weight": "a",
    "lora_B.weight": "b",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
    "lora_embedding_A": "a",
    "lora_embedding_B": "b",
}

__all__ = ["PeftError", "export_peft", "import_peft", "read_peft_config", "PREFIX", "CONFIG_FILE", "WEIGHTS_FILE"]


def _lora_kernel(mod: HFModule, shapes: dict) -> tuple[tuple, tuple[int, int], str] | None:
    """(jlora path, (n_in, n_out), kind) of a module LoRA can adapt (Linear or Embedding), else None."""
    path = mod.params.get("weight")
    if path is None or path[-1] not in ("kernel", "embedding"):
        return None
    shape = shapes[path].shape[-2:]
    return path, (int(shape[0]), int(shape[1])), "embed" if path[-1] == "embedding" else "dense"


def _alpha(scale: float, rank: int, rslora: bool):
    return nice(scale * (math.sqrt(rank) if rslora else rank))


# --------------------------------------------------------------------------- export


def export_peft(
    out_dir: str | pathlib.Path, trainable, lcfg: LoraConfig, cfg: ModelConfig, base_name: str | None = None
) -> None:
    """Write `trainable` as an HF PEFT LoRA adapter dir for `cfg`'s model. Only active layers go out.
    With an AdapterConfig, a LLaMA-Adapter tree goes out as PEFT's ADAPTION_PROMPT (jlora.formats.peft_adaption)."""
    if isinstance(lcfg, AdapterConfig):
        return export_adaption_prompt(out_dir, trainable, lcfg, cfg, base_name)
    if lcfg.init == "pissa":  # the pairs are relative to W_res, which PEFT users do not have
        raise PeftError(
            "a PiSSA adapter as trained is relative to the residual base W - s*A0@B0, not the base on "
            "disk; convert it first: lcfg, trainable = jlora.pissa_to_lora(trainable, initial, lcfg)"
        )
    out = pathlib.Path(out_dir)
    renames = family_of(cfg).renames
    modules = base_modules(cfg)
    by_path = {(p, m.layer): m for m in modules.values() for p in m.params.values()}
    tensors, adapted, extra_modules, dora = {}, [], {}, set()  # adapted: (module, rank, alpha)
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
    for path, leaf in flat.items():
        stacked = path[0] == "layers"
        if path not in renames:
            raise PeftError(f"{'.'.join(path)} has no HF name; PEFT export supports the base model's params only")
        if not isinstance(leaf, LoraPair):
            arr = np.asarray(leaf)
            for i in range(arr.shape[0]) if stacked else [None]:
                mod = by_path[(path, i)]
                tensors[PREFIX + renames[path][0].format(i=i)] = arr[i] if stacked else arr
                extra_modules.setdefault(mod.name, (mod, set()))[1].add(path)
            continue
        if leaf.layout.kind not in ("dense", "embed") or leaf.layout.stack != int(stacked):
            raise PeftError(
                f"{'.'.join(path)}: a {leaf.layout.kind} kernel with {leaf.layout.stack} stacked dims has no PEFT form"
            )
        a, b = np.asarray(leaf.a), np.asarray(leaf.b)  # bf16 stays bf16 (ml_dtypes), as PEFT saves it
        mag = None if leaf.magnitude is None else np.asarray(leaf.magnitude)
        dora.add(mag is not None)
        scales = leaf.scale_array().reshape(-1)
        for j, s in enumerate(scales):
            if s == 0:
                continue
            i = j if stacked else None
            pick = (lambda x: x[j]) if stacked else (lambda x: x)
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
    config = export_config(adapted, extra_modules, modules, lcfg, cfg, base_name, dora.pop())
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if jax.process_index() == 0:
        for line in vllm_warnings(config):
            print(f"warning: PEFT export: {line}", file=sys.stderr, flush=True)


def vllm_warnings(config: dict) -> list[str]:
    """What in an adapter_config.json PEFT loads but vLLM refuses, one line each."""
    out = []
    if config.get("use_dora"):
        out.append(
            "use_dora: true (DoRA) loads in PEFT, but vLLM refuses DoRA adapters; merge it "
            "(jlora-merge) to serve it there"
        )
    if config.get("modules_to_save"):
        out.append(
            f"modules_to_save {config['modules_to_save']} (train_extra) loads in PEFT, but vLLM refuses "
            f"adapters with modules_to_save; merge it (jlora-merge) to serve it there"
        )
    return out


# --------------------------------------------------------------------------- import


def _load_tensors(directory: pathlib.Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    file = directory / WEIGHTS_FILE
    if not file.is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        raise PeftError(
            f"{file}: missing" + ("; adapter_model.bin would need pickle: resave it as safetensors" if pickled else "")
        )
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftError(f"{file}: truncated or corrupt safetensors ({' '.join(str(e).split())})") from None


def import_peft(directory: str | pathlib.Path, cfg: ModelConfig, params=None) -> tuple[LoraConfig, dict]:
    """(LoraConfig, trainable tree) from an HF PEFT LoRA adapter dir, for the base `cfg`.

    Refuses (PeftError, one line naming the file and tensor) an adapter that does not fit the base, and one
    holding NaN or inf or a LoRA factor beyond jlora.formats.tensor_values.ADAPTER_VALUE_BOUND (a damaged file).
    Per-layer pairs are stacked on the layer axis; a module's layers share the largest rank (smaller
    ones are zero-padded, which changes nothing); layers the adapter lacks get zeros and scale 0.
    DoRA adapters that skip layers need the base `params` (the skipped layers' magnitude is |W|, of the
    dequantized kernel where the base is packed).
    The returned LoraConfig, given to `split`, builds a tree of the same shapes and scales. An
    ADAPTION_PROMPT adapter comes back as (AdapterConfig, LLaMA-Adapter tree) (jlora.formats.peft_adaption).
    """
    directory = pathlib.Path(directory)
    if is_adaption_prompt_dir(directory):
        return import_adaption_prompt(directory, cfg)
    config = read_peft_config(directory)
    tensors = _load_tensors(directory)
    modules, shapes = base_modules(cfg), traverse_util.flatten_dict(param_shapes(cfg))
    fam = family_of(cfg)
    head, embed = (fam.renames[p][0].removesuffix(".weight") for p in (fam.head, fam.embed))
    lora = {n for n, m in modules.items() if _lora_kernel(m, shapes)}
    to_save = [n for n in modules if any(n.endswith(m) for m in config.get("modules_to_save") or ())]
    found = collections.defaultdict(dict)  # module name -> {"a"|"b"|"magnitude": array}
    extra = collections.defaultdict(dict)  # jlora path -> {layer: array}, from modules_to_save
    problems = []
    for key, arr in tensors.items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in _SUFFIXES if name.endswith("." + s)), "")
        owner, leaf = name[: -len(suffix) - 1], name.rpartition(".")[2]
        if not key.startswith(PREFIX):
            problems.append(f"unexpected key {key} (PEFT keys start with {PREFIX})")
        elif suffix and owner in lora:
            found[owner][_SUFFIXES[suffix]] = arr
        elif suffix and owner == head and cfg.tie_word_embeddings:
            problems.append(f"{key}: {head} is tied to {embed} in this base, jlora cannot adapt it apart")
        elif name.rpartition(".")[0] in to_save and leaf in modules[name.rpartition(".")[0]].params:
            mod = modules[name.rpartition(".")[0]]
            extra[mod.params[leaf]][mod.layer] = arr.T if mod.params[leaf][-1] == "kernel" else arr
        elif name.endswith(".base_layer.weight") and name.removesuffix(".base_layer.weight") in lora:
            # PEFT saves the base weights of adapted embeddings; jlora keeps its base, which must fit them.
            want = _disk_shape(modules[name.removesuffix(".base_layer.weight")], shapes)
            if tuple(arr.shape) != want:
                problems.append(f"{key} has shape {tuple(arr.shape)}, the base has {want} (resized vocab?)")
        else:
            problems.append(f"unexpected key {key}")
    problems += [
        f"missing {PREFIX}{n}.{leaf} (in modules_to_save)"
        for n in to_save
        for leaf, path in modules[n].params.items()
        if modules[n].layer not in extra.get(path, {})
    ]
    expected = {n for n in lora if peft_targets(config, n)}
    if cfg.tie_word_embeddings and peft_targets(config, head) and head not in found:
        problems.append(f"target_modules selects {head}, which is tied to {embed} in this base")
    problems += [
        f"missing {PREFIX}{n}.lora_A/lora_B (selected by target_modules)" for n in sorted(expected - set(found))
    ]
    problems += [f"unexpected {PREFIX}{n}.* (not selected by target_modules)" for n in sorted(set(found) - expected)]
    pairs = {n: _check_pair(n, found[n], modules[n], shapes, config, problems) for n in sorted(set(found) & expected)}
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PeftError(f"{directory}: adapter does not fit base {cfg.name!r}: {'; '.join(problems[:3])}{more}")
    # no checksum guards a PEFT file: refuse NaN, inf, and LoRA factors beyond what a flipped exponent bit makes
    bad = adapter_value_problem(tensors, bounded=lambda key: any(key.endswith("." + s) for s in _SUFFIXES))
    if bad:
        raise PeftError(f"{directory / WEIGHTS_FILE}: {bad}: a damaged adapter file")
    return _assemble(pairs, extra, modules, shapes, config, cfg, params, directory)


def _disk_shape(mod: HFModule, shapes: dict) -> tuple:
    """The PEFT/HF on-disk shape of a module's weight: [out, in] for Linear, [V, D] for Embedding."""
    path = mod.params["weight"]
    shape = tuple(shapes[path].shape[1:] if mod.layer is not None else shapes[path].shape)
    return tuple(reversed(shape)) if path[-1] == "kernel" else shape


def _check_pair(name: str, got: dict, mod: HFModule, shapes, config: dict, problems: list):
    """(a [in, r], b [r, out], magnitude [out] | None, rank, alpha) in jlora's layout; None after noting a problem."""
    _, (n_in, n_out), _ = _lora_kernel(mod, shapes)
    if "a" not in got or "b" not in got:
        have, lack = ("A", "B") if "a" in got else ("B", "A")
        problems.append(f"{PREFIX}{name} has lora_{have} but not lora_{lack}")
        return None
    r = got["a"].shape[0]  # PEFT: A [r, in], B [out, r]; embeddings A [r, V], B [D, r]
    want = {"a": (r, n_in), "b": (n_out, r), "magnitude": (n_out,)}
    for part, arr in got.items():
        if tuple(arr.shape) != want[part]:
            what = {"a": "lora_A", "b": "lora_B", "magnitude": "lora_magnitude_vector"}[part]
            problems.append(f"{PREFIX}{name}.{what} has shape {tuple(arr.shape)}, expected {want[part]}")
            return None
    want_r = int(pattern_value(config.get("rank_pattern"), name, config.get("r", 8)))
    if r != want_r:
        problems.append(f"{PREFIX}{name} has rank {r}, adapter_config.json says {want_r}")
        return None
    if bool(config.get("use_dora")) != ("magnitude" in got):
        problems.append(
            f"{PREFIX}{name}: lora_magnitude_vector {'missing' if config.get('use_dora') else 'unexpected'}"
            f" with use_dora={bool(config.get('use_dora'))}"
        )
        return None
    alpha = float(pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
    return got["a"].T, got["b"].T, got.get("magnitude"), r, alpha


def _assemble(
    pairs: dict, extra: dict, modules: dict, shapes: dict, config: dict, cfg: ModelConfig, params, directory
) -> tuple[LoraConfig, dict]:
    """Stack per-layer pairs into jlora's scanned layout and describe the result as a LoraConfig."""
    groups = collections.defaultdict(dict)  # jlora path -> {layer: (a, b, magnitude, r, alpha)}
    for name, pair in pairs.items():
        groups[modules[name].params["weight"]][modules[name].layer] = pair
    rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    dropout = float(config.get("lora_dropout") or 0.0)
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    trainable, rank_pattern, alpha_pattern, layer_sets, dtypes = {}, [], [], set(), set()
    for path in [p for p in shapes if p in groups]:  # tree order
        layers, stacked, short = groups[path], path[0] == "layers", path[-2]
        n_in, n_out = shapes[path].shape[-2:]
        rank = max(v[3] for v in layers.values())
        dt = np.result_type(*[v[0].dtype for v in layers.values()])
        dt = dt if dt in (np.float32, jnp.bfloat16) else np.float32
        dtypes.add(np.dtype(dt).name)
        idx = list(range(cfg.num_hidden_layers)) if stacked else [None]
        a, b = np.zeros((len(idx), n_in, rank), dt), np.zeros((len(idx), rank, n_out), dt)
        mag, scales = np.zeros((len(idx), n_out), dt) if dora else None, np.zeros(len(idx), np.float32)
        if dora and path[-1] != "kernel":
            raise PeftError(f"{directory}: DoRA on {'.'.join(path[:-1])} (an embedding) is not supported by jlora")
        base = None
        for j, i in enumerate(idx):
            if i in layers:
                la, lb, lm, r, alpha = layers[i]
                a[j, :, :r], b[j, :r], scales[j] = la, lb, alpha / (math.sqrt(r) if rslora else r)
            elif dora and params is None:
                raise PeftError(
                    f"{directory}: this DoRA adapter skips layer {i} of {short}; import_peft needs "
                    f"the base params to fill that layer's magnitude (|W|)"
                )
            elif dora:
                if base is None:  # the base kernel dense once (a QLoRA base's is packed), not per skipped layer
                    base = np.asarray(dense_value(traverse_util.flatten_dict(params)[path], jnp.float32))
                lm = np.linalg.norm(base[i], axis=0)
            if dora:
                mag[j] = lm
        one = (lambda x: x) if stacked else (lambda x: x[0])
        layout = KernelLayout("dense" if path[-1] == "kernel" else "embed", stack=int(stacked))
        mag = None if mag is None else jnp.asarray(one(mag))
        trainable[path] = LoraPair(
            jnp.asarray(one(a)),
            jnp.asarray(one(b)),
            mag,
            tuple(scales.tolist()) if stacked else float(scales[0]),
            layout,
            dropout,
        )
        if rank != r0:
            rank_pattern.append((short, rank))
        eff = {i: _alpha(float(s), rank, rslora) for i, s in zip(idx, scales.tolist()) if s}
        if len(set(eff.values())) == 1 and nice(alpha0) not in eff.values():
            alpha_pattern.append((short, next(iter(eff.values()))))
        elif len(set(eff.values())) > 1:
            alpha_pattern += [(f"layers.{i}.{'.'.join(path[1:-1])}", v) for i, v in eff.items() if v != nice(alpha0)]
        if stacked:
            layer_sets.add(tuple(sorted(layers)))
    for path, by_layer in extra.items():  # modules_to_save: complete, checked above
        trainable[path] = jnp.asarray(
            np.stack([by_layer[i] for i in range(cfg.num_hidden_layers)]) if path[0] == "layers" else by_layer[None]
        )
    only = next(iter(layer_sets)) if len(layer_sets) == 1 else None
    extra_paths = [".".join(p) for p in extra]
    lcfg = LoraConfig(
        rank=r0,
        alpha=alpha0,
        dropout=dropout,
        targets=tuple(p[-2] for p in trainable if p not in extra),
        layers=only if only is not None and len(only) < cfg.num_hidden_layers else None,
        rank_pattern=tuple(rank_pattern),
        alpha_pattern=tuple(alpha_pattern),
        use_rslora=rslora,
        use_dora=dora,
        train_extra="^(" + "|".join(re.escape(p) for p in extra_paths) + ")$" if extra_paths else None,
        adapter_dtype="bfloat16" if "bfloat16" in dtypes else "float32",
    )
    return lcfg, traverse_util.unflatten_dict(trainable)
