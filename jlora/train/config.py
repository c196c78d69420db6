"""The run config: frozen, typed dataclasses, and `load(path, overrides)` from YAML.

Owns the schema of a training run (model, tokenizer, method, objective, preference, lora | adapter, data, optim,
train, mesh, checkpoint, output_dir), its defaults and validation; `jlora.train.typed_yaml` converts YAML values
and `--set a.b=value` strings to each field's declared type. It does not build models, meshes or datasets: other
modules read these objects.
A bad key, type or value raises `ConfigError`, a one-line message naming the dotted
key and, when loading, the file (or the `--set` argument).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from jlora.peft.llama_adapter import AdapterConfig
from jlora.peft.lora import LoraConfig
from jlora.train.config_files import ConfigFileError, find_config, resolve_inputs
from jlora.train.typed_yaml import ConfigError, Loader, build, coerce, set_override, to_dict

Dtype = Literal["float32", "bfloat16"]


class _Section:
    """Base of every config section: __post_init__ converts each field to its hint, then validates."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            # frozen dataclass: normalise in place (lists -> tuples, ints -> floats) before validating
            object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        self._validate()

    def _validate(self) -> None:
        pass


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(msg, key)


def _at_least(obj: Any, lo: float, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        _check(v is None or v >= lo, name, f"must be >= {lo}, got {v}")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The frozen base model. path: an HF dir (config.json + *.safetensors), a .gguf file (relative to the
    config file's directory), a name the weights loader resolves (e.g. "smollm2-135m"), or "tiny": a random
    model built in-process from the "tiny" preset with `seed` (its vocab_size follows the tokenizer unless
    overridden)."""

    path: str
    # a jlora.PRESETS name: with path "tiny", a random model of that shape; beside a checkpoint's path, that
    # checkpoint's shape, so --plan works before the download (training reads the checkpoint; config_files)
    preset: str | None = None
    overrides: tuple[tuple[str, bool | int | float | str], ...] = ()  # model config fields, YAML {k: v}
    seed: int = 0  # init of a random model
    dtype: Dtype = "float32"  # compute
    param_dtype: Dtype = "float32"  # storage of the frozen weights
    # QLoRA: the frozen kernels in int8 (per-channel absmax) or nf4 (NormalFloat-4, blocks of 64; the
    # embedding / output head stay int8), or as a GGUF file's own blocks (gguf); dequantized at each matmul
    quantize: Literal["none", "int8", "nf4", "gguf"] = "none"
    double_quant: bool = False  # nf4: the block scales in 8 bits too

    def _validate(self) -> None:
        _check(bool(self.path), "path", "must not be empty")
        if self.quantize == "gguf":
            gguf_file = self.path.endswith(".gguf") or (
                self.path not in ("tiny",) and not self.preset and "/" not in self.path and "." not in self.path
            )
            _check(
                gguf_file and not self.preset,
                "quantize",
                f"gguf keeps a GGUF file's own blocks, but model.path {self.path!r} is not a .gguf file; "
                f"use int8 or nf4 for other checkpoints",
            )
        _check(
            not self.double_quant or self.quantize == "nf4",
            "double_quant",
            f"quantizes nf4 block scales; it needs quantize: nf4, not {self.quantize}",
        )


@dataclass(frozen=True)
class DataConfig(_Section):
    """Training data; jlora/train/data.py documents the record formats.

    mask_prompt: when true (the default) the loss covers only the response: the Alpaca
    output + EOS, or a chat's assistant turns; instructions, inputs, system and user turns
    are context only. When false every token is trained. Plain text is always all trained.
    """

    train: str  # a .json / .jsonl / text file; relative to the config file's directory, as val is
    format: Literal["alpaca", "chat", "text"] = "alpaca"
    val: str | None = None  # a validation file, or else:
    val_fraction: float = 0.0  # the last fraction of the training examples (deterministic)
    template: str = "alpaca"  # the Alpaca prompt template; chat uses the tokenizer's own
    mask_prompt: bool = True
    max_seq_len: int = 512  # tokens per row
    packing: bool = False  # several examples per row, kept apart by segment ids
    shuffle: bool = True
    truncation: Literal["truncate", "drop"] = "truncate"  # what happens to a too-long example
    on_bad_record: Literal["error", "skip"] = "error"  # "skip" counts them in the stats

    def _validate(self) -> None:
        _check(bool(self.train), "train", "must not be empty")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check(not (self.val and self.val_fraction), "val_fraction", "set data.val or data.val_fraction, not both")
        _check(self.max_seq_len >= 2, "max_seq_len", f"must be >= 2, got {self.max_seq_len}")


@dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW after global-norm clipping; lr warms up linearly for `warmup_steps`, then `schedule`
    (linear and cosine decay to 0 at the last step). grad_clip: None or 0 disables clipping."""

    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0

    def _validate(self) -> None:
        _check(self.lr > 0 and self.eps > 0, "lr" if self.lr <= 0 else "eps", "must be > 0")
        _at_least(self, 0, "warmup_steps", "weight_decay", "grad_clip")
        for name in ("b1", "b2"):
            _check(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The loop. Both batch sizes count rows over all hosts and devices; a micro-batch is
    sharded over the (data, fsdp) mesh axes, so it must divide by their size. With a preference objective
    they count (chosen, rejected) pairs, as TRL's batch sizes do: a pair is two rows, kept on one device."""

    global_batch: int = 8  # rows per optimizer step
    micro_batch: int = 8  # rows per forward/backward; grad_accum = global_batch // micro_batch
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the training data
    epochs: float = 1.0
    eval_interval: int = 100  # steps between validation losses; 0: never
    eval_batches: int = 8  # validation batches of micro_batch rows per eval; 0: the whole split
    log_interval: int = 10
    seed: int = 0  # LoRA init, dropout and data order
    remat: Literal["none", "full", "dots_saveable"] = "dots_saveable"  # backward keeps matmul outputs
    max_nonfinite: int = 10  # a non-finite step is skipped; stop after this many in a row
    # stop once the grad norm is over this many times its first steps' for 3 steps in a row; 0: never
    divergence_factor: float = 1e4

    def _validate(self) -> None:
        _at_least(self, 1, "global_batch", "micro_batch", "max_nonfinite", "log_interval", "steps")
        _at_least(self, 0, "eval_interval", "eval_batches", "divergence_factor")
        _check(
            self.global_batch % self.micro_batch == 0,
            "micro_batch",
            f"must divide train.global_batch ({self.global_batch}), got {self.micro_batch}",
        )
        _check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step."""
        return self.global_batch // self.micro_batch


@dataclass(frozen=True)
class MeshConfig(_Section):
    """Device mesh ('data', 'fsdp', 'tensor'); one size may be -1 to take the remaining devices.
    distributed: call jax.distributed.initialize() (True), never (False), or when a cluster
    (TPU pod, SLURM, ...) is detected ("auto"). allow_replication: a frozen weight over 1 MiB that
    the fsdp / tensor sizes cannot split is an error unless this is true (then a warning)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    distributed: bool | Literal["auto"] = "auto"
    allow_replication: bool = False

    def _validate(self) -> None:
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            _check(v == -1 or v >= 1, name, f"must be -1 or >= 1, got {v}")
        _check((self.data, self.fsdp, self.tensor).count(-1) <= 1, "tensor", "at most one mesh size may be -1")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for `n_devices`, with -1 filled in; a clear error when they don't fit."""
        sizes = (self.data, self.fsdp, self.tensor)
        fixed = -sizes[0] * sizes[1] * sizes[2] if -1 in sizes else sizes[0] * sizes[1] * sizes[2]
        out = tuple(n_devices // fixed if s == -1 else s for s in sizes)
        if n_devices % fixed or out[0] * out[1] * out[2] != n_devices:
            raise ConfigError(f"mesh (data, fsdp, tensor) = {sizes} does not fit {n_devices} devices", "mesh")
        return out


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Adapter + optimizer checkpoints every `interval` steps (0: only at the end), keeping the
    last `keep`. resume: continue from the latest checkpoint in output_dir when there is one."""

    interval: int = 500
    keep: int = 3
    resume: bool = True

    def _validate(self) -> None:
        _at_least(self, 0, "interval")
        _at_least(self, 1, "keep")


@dataclass(frozen=True)
class PreferenceConfig(_Section):
    """The preference objectives' settings (objective: dpo | ipo | orpo), as TRL names them. beta: the KL
    weight (ORPO: the odds-ratio weight); label_smoothing: cDPO, DPO only; max_prompt_len: a prompt keeps
    its last this many tokens (None: only max_seq_len cuts); precompute_reference: compute the reference
    log-probs once before training, cached in output_dir, so the step runs no reference forward."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    max_prompt_len: int | None = None
    precompute_reference: bool = False

    def _validate(self) -> None:
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        _at_least(self, 1, "max_prompt_len")


METHOD_SECTIONS = {"lora": "lora", "llama_adapter": "adapter"}  # each method's own config section


@dataclass(frozen=True)
class RunConfig(_Section):
    """A whole training run. tokenizer: a path, or None for the model's own (for model
    "tiny", None means jlora.train.examples.ByteTokenizer). method: LoRA (the `lora` section) or
    LLaMA-Adapter (the `adapter` section); the other method's section must stay unset. init_adapter: a
    jlora adapter directory (another run's output, e.g. an SFT run's `adapter`) or an HF PEFT one the trainable
    tree starts from instead of its fresh init; it must adapt what this run adapts, with its ranks and scales,
    for this base. A resumed run continues
    from its checkpoint instead. With objective dpo or ipo it is also the reference: the model the run starts
    from."""

    model: ModelConfig
    data: DataConfig
    tokenizer: str | None = None
    method: Literal["lora", "llama_adapter"] = "lora"
    init_adapter: str | None = None  # relative to the working directory, like output_dir: a run's output
    # sft: the token-mean cross-entropy; dpo / ipo / orpo: preference pairs (the `preference` section)
    objective: Literal["sft", "dpo", "ipo", "orpo"] = "sft"
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/default"  # where the run writes: relative to the working directory, not the config

    def _validate(self) -> None:
        self._validate_preference()
        # An empty path would silently mean the working directory (a source tree, say) as the run's home.
        _check(bool(self.output_dir.strip()), "output_dir", "must name a directory, got an empty value")
        _check(
            self.init_adapter is None or bool(self.init_adapter.strip()),
            "init_adapter",
            "must name an adapter directory, or be left out",
        )
        _check(
            not self.init_adapter or self.method != "lora" or self.lora.init != "pissa",
            "init_adapter",
            "starts from a saved adapter, but lora.init: pissa makes its own from the base; use one of them",
        )
        for method, section in METHOD_SECTIONS.items():
            unset = getattr(self, section) == type(getattr(self, section))()
            _check(
                method == self.method or unset,
                section,
                f"is for method: {method}, but this run has method: {self.method}; drop the {section} section "
                f"or set method: {method}",
            )

    def _validate_preference(self) -> None:
        p = self.preference
        if self.objective == "sft":
            _check(
                p == PreferenceConfig(),
                "preference",
                "is for objective: dpo | ipo | orpo, but this run has objective: sft; drop the preference "
                "section or set objective",
            )
            return
        _check(
            not p.label_smoothing or self.objective == "dpo",
            "preference.label_smoothing",
            f"is DPO's (cDPO); objective {self.objective} has none",
        )
        _check(
            p.max_prompt_len is None or p.max_prompt_len <= self.data.max_seq_len,
            "preference.max_prompt_len",
            f"must be in [1, data.max_seq_len={self.data.max_seq_len}] so that every response keeps a token, "
            f"got {p.max_prompt_len}",
        )
        _check(
            not self.data.packing,
            "data.packing",
            f"packs SFT examples; objective {self.objective} trains whole (chosen, rejected) pairs, one per row",
        )
        _check(
            self.objective == "orpo"
            or p.precompute_reference
            or self.init_adapter  # the reference is the adapter the run starts from, extras included
            or self.method != "lora"
            or not self.lora.train_extra,
            "lora.train_extra",
            f"trains base parameters in full, so the base with the adapter off is no longer the {self.objective} "
            "reference; set preference.precompute_reference: true (computed before the first update)",
        )
        _check(
            not p.precompute_reference or self.objective != "orpo",
            "preference.precompute_reference",
            "ORPO has no reference model; drop it",
        )

    @property
    def method_config(self) -> LoraConfig | AdapterConfig:
        """The chosen method's config: what split, checkpoints and adapters are made with."""
        return getattr(self, METHOD_SECTIONS[self.method])

    @property
    def reference_adapter(self) -> str | None:
        """The adapter that is the preference reference: init_adapter under dpo / ipo (ORPO has no reference,
        SFT no preference); None when the reference is the base with the adapter off."""
        return self.init_adapter if self.objective in ("dpo", "ipo") else None

    @property
    def tokenizer_path(self) -> str | None:
        """Where the tokenizer comes from: `tokenizer`, else the model path (None for "tiny")."""
        if self.tokenizer is not None:
            return self.tokenizer
        return None if self.model.path == "tiny" else self.model.path


MAX_USUAL_LR = 0.1  # an AdamW learning rate above this is a typo or a misunderstanding, not a choice


def run_warnings(run: RunConfig, steps: int, rows_per_epoch: float) -> list[str]:
    """One line per setting that is valid but almost surely not what the user meant, given the
    run's step count and the training rows in one pass (known only once the data is loaded)."""
    out = []
    if run.optim.lr > MAX_USUAL_LR:
        out.append(
            f"optim.lr={run.optim.lr:g} is far above the rates AdamW fine-tunes with (1e-5 .. 1e-2): the run is "
            f"likely to diverge, and stops if its grad norms explode (train.divergence_factor)"
        )
    if run.optim.warmup_steps and run.optim.warmup_steps >= steps:
        out.append(
            f"optim.warmup_steps={run.optim.warmup_steps} is not below the run's {steps} steps: the learning "
            f"rate never reaches optim.lr={run.optim.lr:g}, and the {run.optim.schedule} schedule never starts"
        )
    if rows_per_epoch < run.train.global_batch:
        out.append(
            f"the training set fills {rows_per_epoch:g} rows, fewer than one train.global_batch="
            f"{run.train.global_batch}: rows repeat within every step"
        )
    return out


def from_dict(raw: Mapping, overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from a nested mapping (as YAML gives) plus `a.b=value` overrides."""
    raw = copy.deepcopy(dict(raw))
    for o in overrides:
        try:
            set_override(RunConfig, raw, o)
        except ConfigError as e:
            raise ConfigError(f"--set {o}: {e}") from None
    return build(RunConfig, raw, "")


def load(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config and apply `--set` style overrides ("optim.lr=1e-4").

    `path` is a file, or a shipped config's name (jlora.train.config_files.find_config). The input paths the
    file writes relative are relative to its directory; output_dir and `--set` values stay as given, relative
    to the working directory (config_files says why)."""
    try:
        path = find_config(path)
    except ConfigFileError as e:
        raise ConfigError(str(e)) from None
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.load(fh, Loader=Loader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw := {} if raw is None else raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return from_dict(resolve_inputs(raw, os.path.dirname(path)), overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump(cfg: RunConfig) -> str:
    """The config as YAML text, every key spelled out (for run metadata)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
