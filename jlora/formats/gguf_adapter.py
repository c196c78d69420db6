"""jlora LoRA adapters -> llama.cpp's GGUF LoRA adapter file (what its convert_lora_to_gguf.py writes).

The file carries the base's `general.architecture` as llama.cpp names it (llama.cpp refuses an adapter of
another arch; its converter writes Mistral as `llama`), `general.type = adapter`, `adapter.type = lora` and
`adapter.lora.alpha`, and for each adapted base tensor `<gguf name>.lora_a` [R, in] and `.lora_b`
[out, R] (numpy order; ggml's ne is the reverse), in float32. llama.cpp adds `alpha/R * B(A x)`, with
one alpha per file and R read off each lora_b, so every jlora scale (rsLoRA, alpha or rank patterns,
per-layer alphas) folds into B exactly. attn_q / attn_k rows of B are permuted where convert_hf_to_gguf
permutes the base's q/k weights (LLaMA, Mistral; not Qwen or Gemma: the family's `gguf_rope_heads`);
token_embd's A is [V, R], looked up by rows (llm_build_inp_embd). Every family's llama.cpp graph has a
LoRA slot (build_lora_mm) for q/k/v/o, gate/up/down, the untied head and the embedding lookup.
Layers an adapter leaves out (scale 0) are not written, which llama.cpp accepts. What llama.cpp cannot
run is refused in one line: DoRA, parameters trained in full (train_extra), an unconverted PiSSA tree,
and an adapter of the embedding on a tied base; so is a pair that does not fit the base's kernel, or a tensor
holding NaN or inf, before anything is written. Loading GGUF models is jlora.formats.weights' job, PEFT
is jlora.formats.peft_adapter's (which refuses a damaged PEFT file: see its import_peft).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from flax import traverse_util

from jlora.errors import JloraError
from jlora.formats.tensor_values import value_problem
from jlora.models.config import ModelConfig
from jlora.models.family import family_of, param_shapes
from jlora.models.layers import permute_rope_rows
from jlora.peft.lora import LoraConfig
from jlora.peft.routing import LoraPair


class GGUFAdapterError(JloraError, ValueError):
    """An adapter llama.cpp cannot take, or a bad --out; the message is one line."""


# families llama.cpp's convert_hf_to_gguf.py writes under another arch (MistralForCausalLM is its LlamaModel)
LLAMA_CPP_ARCH = {"mistral": "llama"}


def llama_cpp_arch(cfg: ModelConfig) -> str:
    """The `general.architecture` of the base's llama.cpp GGUF, which the adapter must repeat."""
    from gguf import MODEL_ARCH_NAMES

    fam = family_of(cfg)
    arch = LLAMA_CPP_ARCH.get(fam.name) or next(iter(fam.gguf_architectures), None)
    if arch not in MODEL_ARCH_NAMES.values():
        raise GGUFAdapterError(f"family {fam.name}: llama.cpp has no GGUF architecture for it (got {arch!r})")
    return arch


def gguf_lora_tensors(trainable, lcfg: LoraConfig, cfg: ModelConfig) -> tuple[float, dict[str, np.ndarray]]:
    """(alpha, {gguf tensor name: float32 array}) of `trainable` as llama.cpp applies it: for each pair
    and active layer, `name.lora_a` and `name.lora_b` with B scaled so that alpha/R * B'A = s * (AB)^T."""
    if not isinstance(lcfg, LoraConfig):
        raise GGUFAdapterError(
            "a LLaMA-Adapter (adaption prompts) has no llama.cpp adapter form: llama.cpp GGUF "
            "adapters hold LoRA pairs only; export it to PEFT (jlora-export-peft) instead"
        )
    if lcfg.init == "pissa":  # the pairs are relative to W_res, which llama.cpp's base does not have
        raise GGUFAdapterError(
            "a PiSSA adapter as trained is relative to the residual base W - s*A0@B0, not the "
            "base on disk; convert it first: lcfg, trainable = jlora.pissa_to_lora(...)"
        )
    alpha = float(lcfg.alpha)
    arch = llama_cpp_arch(cfg)
    fam = family_of(cfg)
    embed, renames = fam.embed, fam.renames
    kernels = traverse_util.flatten_dict(param_shapes(cfg))
    tensors = {}
    flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, LoraPair))
    for path, leaf in flat.items():
        where = ".".join(path)
        if not isinstance(leaf, LoraPair):
            raise GGUFAdapterError(
                f"{where} is trained in full (train_extra); a llama.cpp LoRA adapter holds only "
                f"lora_a/lora_b pairs: merge it (jlora-merge) and convert the merged model"
            )
        if leaf.magnitude is not None:
            raise GGUFAdapterError(
                f"{where} is a DoRA pair; llama.cpp has no DoRA: merge it (jlora-merge) and "
                f"convert the merged model with convert_hf_to_gguf.py"
            )
        stacked = path[0] == "layers"
        if (
            path not in renames
            or path[-1] not in ("kernel", "embedding")
            or leaf.layout.kind not in ("dense", "embed")
            or leaf.layout.stack != int(stacked)
        ):
            raise GGUFAdapterError(f"{where}: llama.cpp's {arch} graph has no LoRA slot for this tensor")
        if path == embed and cfg.tie_word_embeddings:
            raise GGUFAdapterError(
                f"{where}: this base ties its output head to the token embedding, and llama.cpp "
                "finds adapters by tensor name, so it applies this adapter to the head too (and aborts: "
                "GGML_ASSERT ggml_can_mul_mat); jlora applies it to the lookup only: merge it or "
                f"leave {path[-2]} out"
            )
        if not leaf.fits(kernels[path].shape):
            raise GGUFAdapterError(
                f"{where}: LoRA pair (A {tuple(leaf.a.shape)}, B {tuple(leaf.b.shape)}) does not fit the base's "
                f"kernel {tuple(kernels[path].shape)}"
            )
        a, b = np.asarray(leaf.a, np.float32), np.asarray(leaf.b, np.float32)  # [*S, in, R], [*S, R, out]
        rank = leaf.rank
        for j, s in enumerate(leaf.scale_array().reshape(-1)):
            if s == 0:  # a layer left out: no tensor, llama.cpp then runs the base weight alone
                continue
            layer = j if stacked else None
            la, lb = (a[j], b[j]) if stacked else (a, b)  # [in, R], [R, out]
            fold = float(s) * rank / alpha
            lb = lb.T * np.float32(fold) if abs(fold - 1.0) > 1e-7 else lb.T  # [out, R]; exact when s == alpha/R
            name = renames[path][1].format(i=layer)
            heads = fam.gguf_rope_heads(cfg, name)  # llama.cpp's rope permutation of q/k rows (None: HF order)
            if heads is not None:
                lb = permute_rope_rows(lb, heads)
            # llama.cpp: y += s * B(Ax) with A [R, in]; token_embd's A is looked up by row instead: [V, R]
            tensors[name + ".lora_a"] = np.ascontiguousarray(la if path == embed else la.T)
            tensors[name + ".lora_b"] = np.ascontiguousarray(lb)
    if not tensors:
        raise GGUFAdapterError("the trainable tree has no active LoRA pair; a llama.cpp adapter needs at least one")
    for name, x in tensors.items():  # loading refused NaN/inf already; this also covers trees made in memory
        problem = value_problem(x)
        if problem:
            raise GGUFAdapterError(f"tensor {name} has {problem}; refusing to write an adapter that breaks the model")
    return alpha, tensors


def export_gguf_adapter(
    path: str | pathlib.Path, trainable, lcfg: LoraConfig, cfg: ModelConfig, base_name: str | None = None
) -> None:
    """Write `trainable` as a llama.cpp GGUF LoRA adapter file at `path` (built beside it, then renamed in).

    Load it with `llama-cli -m base.gguf --lora path` or `llama_cpp.Llama(model_path=..., lora_path=path)`."""
    from gguf import GGUFType, GGUFWriter, Keys

    alpha, tensors = gguf_lora_tensors(trainable, lcfg, cfg)
    path = pathlib.Path(path).absolute()
    partial = path.with_name(f".{path.name}.partial")
    try:
        writer = GGUFWriter(str(partial), llama_cpp_arch(cfg))  # llama.cpp refuses another arch than its base's
        writer.add_type(GGUFType.ADAPTER)
        writer.add_name(base_name or cfg.name)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        for name, arr in tensors.items():
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def check_out_file(out: str | pathlib.Path, *, force: bool, inputs: dict[str, str | pathlib.Path]) -> pathlib.Path:
    """`out` made absolute, or GGUFAdapterError where writing it could destroy something: a directory, one
    of `inputs` ({"--model": path, ...}) or a file inside one, or (without --force) an existing file."""
    out = pathlib.Path(out).absolute()
    if out.is_dir():
        raise GGUFAdapterError(f"--out {out}: is a directory; give the .gguf file to write")
    real = out.resolve()
    for flag, src in inputs.items():
        src = pathlib.Path(src).absolute().resolve()
        if real == src or src in real.parents:
            how = "is" if real == src else "lies inside"
            raise GGUFAdapterError(
                f"--out {out}: {how} the {flag} {src}; writing there would destroy it: choose an --out outside it"
            )
    if out.exists() and not force:
        raise GGUFAdapterError(f"--out {out}: exists; choose a new file, or pass --force to replace it")
    return out


__all__ = ["GGUFAdapterError", "export_gguf_adapter", "gguf_lora_tensors", "llama_cpp_arch", "check_out_file"]
