"""LoRA train-step throughput and memory, jlora vs HF PEFT + transformers, on SmolLM2-135M (fp32, CPU).

--model gemma3-270m runs the same on Gemma 3 270M (the base model's Q4_K_M GGUF), writing
docs/results/train_vs_peft_gemma3.json. The GGUF is dequantized once by jlora and written as an HF
safetensors checkpoint (its config.json names the family's HF class); every side loads that same
checkpoint. Workload: batch 4 x 256 random tokens, every token trained, LoRA alpha=16 with r=8 on
q_proj and v_proj (--rank, --targets; e.g. 16 and all-linear), AdamW (lr 1e-4, weight decay 0.01) after
global-norm clipping at 1.0. --dtype bfloat16 runs every side in bf16 (the frozen weights and the compute; the
adapters stay fp32 on both sides) and writes the model's result file with a _bf16 suffix. The sides (--sides):
  jlora  jlora-train's step (jlora.train.step.make_train_step on a one-device TrainState, --remat);
  api    a user's own loop on the public API, as README shows it: jax.value_and_grad of
         jlora.causal_lm_loss, optax, jax.jit, with the library's default remat;
  naive  the same loop over plain logits: jlora.apply, then optax cross-entropy on [B,T,V];
  peft   HF PEFT on transformers, torch AdamW.
--baseline DIR adds jlora@base and naive@base: the same two sides importing jlora from another checkout
(e.g. `git worktree add /tmp/base <commit>`), for a before/after table measured in the same run.
Each side runs in its own subprocess, so each peak RSS (getrusage ru_maxrss) is that side's alone:
loading, compiling and training included. The sides run --rounds times each, interleaved, so a noisy
minute on a shared machine hits all alike; a run's step time is the median of its timed steps, and
each side's figure is its best run (its fastest median; peak RSS: its largest, the conservative side;
compile: the fastest). Prints each side, the ratios to PEFT and the compile times, and writes every
figure (each run's too), with the commit, date, machine and the load average after each run, to
docs/results/train_vs_peft.json (--out), which bench/report.py renders.
Usage: python bench/train_vs_peft.py [--model smollm2-135m] [--steps 6] [--rounds 3] [--rank 8]
                                     [--targets q_proj,v_proj] [--sides jlora,api,peft] [--baseline DIR]
                                     [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def jlora_module(path: str, before: str):
    """A jlora module by its path, or by its path `before` the package layout of the family-seam change: a
    --baseline checkout may predate it."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        return importlib.import_module(before)


_provenance = jlora_module("jlora.train.provenance", "jlora.provenance")
load_average, provenance, write_result = _provenance.load_average, _provenance.provenance, _provenance.write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
RANK, ALPHA, TARGETS, LR, WD, CLIP = 8, 16.0, ("q_proj", "v_proj"), 1e-4, 0.01, 1.0
# --model: resolve_model_path alias -> (what the result calls it, its default result file)
MODELS = {
    "smollm2-135m": ("SmolLM2-135M (GGUF, dequantized)", "train_vs_peft.json"),
    "gemma3-270m": ("Gemma 3 270M base (GGUF Q4_K_M, dequantized)", "train_vs_peft_gemma3.json"),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def random_ids(batch: int, seq: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)).astype(np.int32)


def host_reader(weights):
    """The loader that returns host (numpy) params: read_pretrained, or load_pretrained in a --baseline checkout
    from before load_pretrained placed its params on the device."""
    return getattr(weights, "read_pretrained", None) or weights.load_pretrained


def side_prep(hf_dir: str, model: str = "smollm2-135m") -> dict:
    weights = jlora_module("jlora.formats.weights", "jlora.weights")
    load_pretrained, resolve_model_path, save_pretrained = (
        host_reader(weights),
        weights.resolve_model_path,
        weights.save_pretrained,
    )

    cfg, params = load_pretrained(resolve_model_path(model))
    save_pretrained(params, cfg, hf_dir)
    return {"hf_dir": hf_dir}


def jlora_dtypes(a: argparse.Namespace) -> dict:
    """The loader's dtype keywords for --dtype (none in fp32, so a --baseline checkout need not know them)."""
    return {} if a.dtype == "float32" else {"dtype": a.dtype, "param_dtype": a.dtype}


def build_model(cfg):
    """The flax module of `cfg`'s family (a --baseline checkout from before families has only jlora.Llama)."""
    import jlora

    return jlora.build_model(cfg) if hasattr(jlora, "build_model") else jlora.Llama(cfg)


def targets_of(a: argparse.Namespace) -> tuple[str, ...] | str:
    return "all-linear" if a.targets == "all-linear" else tuple(a.targets.split(","))


def fp32_matmuls(a: argparse.Namespace) -> None:
    """In fp32, true fp32 matmuls on any backend, like torch's; a bf16 run keeps jax's default."""
    import jax

    if a.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")


def side_jlora(a: argparse.Namespace) -> dict:
    load_pretrained = host_reader(jlora_module("jlora.formats.weights", "jlora.weights"))

    cfg, params = load_pretrained(a.hf_dir, **jlora_dtypes(a))
    cfg = cfg.replace(remat=a.remat)
    state, opt = jlora_state(cfg, params, a.steps, a.rank, targets_of(a))
    del params
    return time_jlora_steps(cfg, state, opt, a)


def side_loop(a: argparse.Namespace, plain_logits: bool) -> dict:
    """A user's own train step on jlora's public API: jax.value_and_grad, optax, jax.jit, one device.

    The loss is jlora.causal_lm_loss, or with plain_logits optax cross-entropy over jlora.apply's logits."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    import jlora

    fp32_matmuls(a)
    cfg, params = jlora.load_pretrained(a.hf_dir, **jlora_dtypes(a))
    model = build_model(cfg)
    frozen, trainable = jlora.split(
        params, jlora.LoraConfig(rank=a.rank, alpha=ALPHA, targets=targets_of(a)), jax.random.key(0)
    )
    del params
    optimizer = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, weight_decay=WD))
    opt_state = optimizer.init(trainable)
    batch = {k: jnp.asarray(v) for k, v in host_batch(a.batch, a.seq, cfg.vocab_size).items()}

    def loss_fn(trainable, frozen, batch):
        if not plain_logits:
            return jlora.causal_lm_loss(model, frozen, trainable, batch)
        logits = jlora.apply(model, frozen, trainable, batch["input_ids"])  # [B,T,V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(a.steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        trainable, opt_state, loss = compiled(trainable, opt_state, frozen, batch)
        losses.append(float(loss))  # blocks
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "first_step_s": compile_s + times[0],
        "step_s": times[2:],
        "losses": losses,
        "rss_mb": peak_rss_mb(),
        "remat": cfg.remat,
    }


def jlora_state(cfg, params, steps: int, rank: int = RANK, targets: tuple[str, ...] = TARGETS):
    """(TrainState on one device, optimizer): the bench's LoRA (rank, ALPHA, targets) and AdamW on `params`."""
    import jax

    from jlora import LoraConfig

    make_mesh = jlora_module("jlora.parallel.sharding", "jlora.sharding").make_mesh
    OptimConfig = jlora_module("jlora.train.config", "jlora.config").OptimConfig
    step = jlora_module("jlora.train.step", "jlora.trainer")
    init_state, make_optimizer = step.init_state, step.make_optimizer

    lcfg = LoraConfig(rank=rank, alpha=ALPHA, targets=targets)
    opt, _ = make_optimizer(OptimConfig(lr=LR, schedule="constant", weight_decay=WD, grad_clip=CLIP), steps + 2)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return init_state(cfg, lcfg, mesh, jax.random.key(0), opt, params), opt


def host_batch(batch: int, seq: int, vocab: int) -> dict:
    """The bench's batch as host arrays [batch, seq]: random tokens, every one trained."""
    import numpy as np

    ids = random_ids(batch, seq, vocab)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq), np.int32),
    }


def train_batch(mesh, batch: int, seq: int, vocab: int) -> dict:
    """`host_batch` placed on `mesh` as one micro-batch, the trainer's step input."""
    put_batch = jlora_module("jlora.train.step", "jlora.trainer").put_batch
    return put_batch(host_batch(batch, seq, vocab), mesh, 1)


def time_jlora_steps(cfg, state, opt, a: argparse.Namespace) -> dict:
    """Compile jlora's train step for `state` and time a.steps steps after two warm-up steps, on random
    tokens [a.batch, a.seq]; the side's figures (compile, first step, step times, losses, peak RSS)."""
    import jax

    fp32_matmuls(a)
    make_train_step = jlora_module("jlora.train.step", "jlora.trainer").make_train_step

    batch = train_batch(state.mesh, a.batch, a.seq, cfg.vocab_size)
    f, t, o = state.frozen, state.trainable, state.opt_state
    t0 = time.perf_counter()
    step = make_train_step(build_model(cfg), opt, state).lower(f, t, o, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(a.steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        t, o, m = step(f, t, o, batch, jax.random.key(i))
        losses.append(float(m["loss"]))  # blocks
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "first_step_s": compile_s + times[0],
        "step_s": times[2:],
        "losses": losses,
        "rss_mb": peak_rss_mb(),
    }


def side_peft(a: argparse.Namespace) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=getattr(torch, a.dtype))
    return time_peft_steps(peft_lora(model, a.rank, targets_of(a)), a)


def peft_lora(model, rank: int = RANK, targets: tuple[str, ...] | str = TARGETS):
    """`model` wrapped by HF PEFT with the bench's LoRA (rank, ALPHA, targets, no dropout)."""
    import peft

    targets = targets if isinstance(targets, str) else list(targets)
    return peft.get_peft_model(
        model, peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0)
    )


def time_peft_steps(model, a: argparse.Namespace) -> dict:
    """Time a.steps PEFT train steps (AdamW, clipping) after two warm-up steps on random tokens; the side's figures."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    ids = torch.as_tensor(random_ids(a.batch, a.seq, model.config.vocab_size)[:, :-1], dtype=torch.long)
    times, losses = [], []
    for _ in range(a.steps + 2):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    return {
        "first_step_s": times[0],
        "step_s": times[2:],
        "losses": losses,
        "rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def pin_to_one_core() -> None:
    """Run this process on one CPU core: XLA sizes its thread pools by the cores it may run on, and torch
    reads OMP_NUM_THREADS (set beside this). XLA's old `--xla_cpu_multi_thread_eigen=false` flag no longer
    keeps its matmuls on one thread, so a one-core row pins the process instead of passing flags."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def ensure_hf_dir(a: argparse.Namespace) -> tempfile.TemporaryDirectory | None:
    """Make a.hf_dir hold the bench model as an HF checkpoint (the `prep` side: the GGUF dequantized and saved)
    unless it already does; without --hf-dir, in a temporary directory, returned for the caller to clean up."""
    tmp = None
    if a.hf_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="jlora-bench-")
        a.hf_dir = tmp.name
    if not (pathlib.Path(a.hf_dir) / "config.json").exists():
        run_side("prep", a)
    return tmp


def run_side(
    side: str,
    a: argparse.Namespace,
    script: str = __file__,
    extra: tuple[str, ...] = (),
    check: bool = True,
    jlora_from: str | None = None,
    one_core: bool | None = None,
) -> dict:
    """Run `script --side SIDE` in its own process and return the JSON its "SIDE: " line carries. A side that
    fails exits this process, or with check=False gives {"error": its exit status and last stderr line}.
    jlora_from: a checkout whose jlora the side imports instead of this one's. one_core (default:
    a.single_thread): the side runs on one core with one torch thread (pin_to_one_core)."""
    cmd = [
        sys.executable,
        script,
        "--side",
        side,
        "--hf-dir",
        a.hf_dir,
        "--batch",
        str(a.batch),
        "--seq",
        str(a.seq),
        "--steps",
        str(a.steps),
        "--remat",
        a.remat,
        *(("--dtype", a.dtype) if getattr(a, "dtype", None) else ()),  # qlora_vs_peft's / dpo_vs_trl's take none
        *(("--model", a.model) if getattr(a, "model", None) else ()),  # qlora_vs_peft's sides take no --model
        *extra,
    ]
    one_core = getattr(a, "single_thread", False) if one_core is None else one_core
    one_core = one_core and side != "prep"
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if one_core else {})}
    if jlora_from:
        env["PYTHONPATH"] = os.pathsep.join([jlora_from, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    pin = pin_to_one_core if one_core else None
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, preexec_fn=pin)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SIDE: ")]
    if proc.returncode or not lines:
        if not check:
            last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            return {"error": f"exit {proc.returncode}: {last}"}
        sys.exit(
            f"{pathlib.Path(script).stem}: the {side} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("SIDE: ") :])


SIDES = {
    "jlora": "jlora-train step",
    "api": "custom loop (causal_lm_loss)",
    "naive": "custom loop (CE on logits)",
    "peft": "HF PEFT",
    "jlora@base": "jlora-train step, baseline",
    "naive@base": "custom loop (CE on logits), baseline",
}


def side_rows(runs: dict, tps: dict, rss: dict, a: argparse.Namespace, threads: str, flops: float | None) -> list[dict]:
    """Result rows of one thread mode: each jlora side's tokens/s and peak RSS against PEFT's, its compile time,
    and (given the model FLOPs per token) the GFLOP/s every side achieves."""
    rows = []
    mode = "" if threads == "default" else " (one core)"
    for s in (s for s in SIDES if s in runs and s != "peft"):
        label = f"{SIDES[s]}{' @ ' + a.baseline_commit if s.endswith('@base') else ''}{mode}"
        rows += [
            {
                "metric": f"{label}: train tokens/s",
                "unit": "tokens/s",
                "jlora": tps[s],
                "peer": "HF PEFT",
                "peer_value": tps.get("peft"),
                "better": "higher",
            },
            {
                "metric": f"{label}: peak RSS",
                "unit": "MB",
                "jlora": rss[s],
                "peer": "HF PEFT",
                "peer_value": rss.get("peft"),
                "better": "lower",
            },
        ]
        if threads == "default":
            rows.append(
                {
                    "metric": f"{label}: compile",
                    "unit": "s",
                    "jlora": min(r["compile_s"] for r in runs[s]),
                    "peer": None,
                    "peer_value": None,
                    "better": "lower",
                }
            )
        if flops:
            rows.append(
                {
                    "metric": f"{label}: model GFLOP/s",
                    "unit": "GFLOP/s",
                    "jlora": tps[s] * flops / 1e9,
                    "peer": "HF PEFT",
                    "peer_value": tps["peft"] * flops / 1e9 if "peft" in tps else None,
                    "better": "higher",
                }
            )
    return rows


def side_peak(a: argparse.Namespace) -> dict:
    """The matmul rate this process gets at --dtype (GFLOP/s, best of 5 after a warm-up) from jax and from torch,
    at the step's own GEMM shapes ([batch*seq, hidden] times each frozen projection, and the output head) and at
    2048^3: the ceiling a matmul-bound train step runs under with these threads. In bf16, jax's is bf16 x bf16
    summed into fp32 (jlora.matmul's product) and torch's its bf16 matmul."""
    import jax
    import jax.numpy as jnp
    import torch

    fp32_matmuls(a)
    jdt, tdt = getattr(jnp, a.dtype), getattr(torch, a.dtype)
    acc = jnp.float32 if a.dtype != "float32" else None
    cfg = json.loads((pathlib.Path(a.hf_dir) / "config.json").read_text())
    m, d, f, v = a.batch * a.seq, cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = [(m, d, d), (m, d, f), (m, f, d), (m, d, v), (2048, 2048, 2048)]

    def best(run, n: int) -> float:
        run()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return n / min(times) / 1e9

    out = {"shapes": shapes, "jax": [], "torch": []}
    for mm, k, n in shapes:
        x, w = jnp.ones((mm, k), jdt), jnp.ones((k, n), jdt)
        f_jax = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=acc))
        out["jax"].append(best(lambda: f_jax(x, w).block_until_ready(), 2 * mm * k * n))
        tx, tw = torch.ones(mm, k, dtype=tdt), torch.ones(k, n, dtype=tdt)
        out["torch"].append(best(lambda: tx @ tw, 2 * mm * k * n))
    out["jax_peak"], out["torch_peak"] = max(out["jax"]), max(out["torch"])
    return out


def model_flops_per_token(hf_dir: str, a: argparse.Namespace) -> float:
    """Model FLOPs per trained token of the bench's step, by bench/gpu_train.py's formula (remat not counted)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_train import step_flops

    from jlora.formats.weights import hf_checkpoint

    cfg = hf_checkpoint(pathlib.Path(hf_dir), {})[0]
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
    dims |= {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    targets = targets_of(a)
    n_lora = cfg.num_hidden_layers * a.rank * sum(sum(dims[t]) for t in (dims if targets == "all-linear" else targets))
    return step_flops(cfg, n_lora, a.batch, a.seq) / (a.batch * a.seq)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=["prep", "peak", "jlora", "api", "naive", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m", choices=MODELS, help="the GGUF every side trains on")
    p.add_argument("--hf-dir", help="the converted checkpoint (default: a temporary dir)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run, after 2 warm-up steps")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved; each figure is the best run")
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated modules, or all-linear")
    p.add_argument(
        "--remat",
        default="dots_saveable",
        choices=["none", "full", "dots_saveable"],
        help="the jlora side's remat policy (api / naive use the library's default)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every side's dtype")
    p.add_argument("--sides", default="jlora,api,naive,peft", help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--baseline", help="a jlora checkout to measure too (adds jlora@base and naive@base)")
    p.add_argument(
        "--threads",
        default="default,one-core",
        help="thread modes, comma-separated: default (as a user runs it: the headline) and one-core "
        "(each side pinned to one core, one torch thread)",
    )
    p.add_argument("--out", help="the result file (default: docs/results/, the --model's file)")
    a = p.parse_args()
    if a.side:
        out = {
            "prep": lambda: side_prep(a.hf_dir, a.model),
            "peak": lambda: side_peak(a),
            "jlora": lambda: side_jlora(a),
            "peft": lambda: side_peft(a),
            "api": lambda: side_loop(a, plain_logits=False),
            "naive": lambda: side_loop(a, plain_logits=True),
        }
        print("SIDE: " + json.dumps(out[a.side]()), flush=True)
        return

    sides = a.sides.split(",") + (["jlora@base", "naive@base"] if a.baseline else [])
    unknown = [s for s in sides if s not in SIDES]
    modes = a.threads.split(",")
    if a.rounds < 1 or a.steps < 1 or unknown or not set(modes) <= {"default", "one-core"}:
        p.error(
            f"--rounds and --steps must be >= 1; --sides takes {', '.join(SIDES)} (got {unknown}); "
            f"--threads takes default and one-core"
        )
    a.baseline_commit = None
    if a.baseline:
        a.baseline_commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=a.baseline, capture_output=True, text=True
            ).stdout.strip()
            or a.baseline
        )
    title, result_file = MODELS[a.model]
    if a.dtype != "float32":
        result_file = result_file.replace(".json", "_bf16.json")
    a.out = a.out or str(RESULTS / result_file)
    started = provenance()
    tmp = ensure_hf_dir(a)  # the GGUF dequantized, saved as an HF checkpoint, unless --hf-dir has one
    extra = ("--rank", str(a.rank), "--targets", a.targets)
    dt = {"float32": "fp32", "bfloat16": "bf16"}[a.dtype]
    runs = {m: {s: [] for s in [*sides, "peak"]} for m in modes}
    for r in range(a.rounds):  # interleaved: every side in every thread mode once per round
        for m in modes:
            for s in [*sides, "peak"]:
                print(f"[train_vs_peft] round {r + 1}/{a.rounds}, {m}: {s}", file=sys.stderr, flush=True)
                base = a.baseline if s.endswith("@base") else None
                run = run_side(s.split("@")[0], a, extra=extra, jlora_from=base, one_core=m == "one-core")
                if s != "peak":
                    run["median_step_s"] = statistics.median(run["step_s"])
                run["load_average_after"] = load_average()
                runs[m][s].append(run)
    tokens = a.batch * a.seq
    flops = model_flops_per_token(a.hf_dir, a)
    rows, summary = [], {}
    print(
        f"{title.split(' (')[0]} {dt} LoRA train step (r={a.rank}, alpha={ALPHA:g}, {a.targets}, AdamW), "
        f"batch {a.batch} x {a.seq}, CPU; jlora-train remat={a.remat}; best of {a.rounds} interleaved runs per "
        f"side; model FLOPs {flops / 1e9:.3f} GFLOP/token"
    )
    for m in modes:
        best = {s: min(rs, key=lambda run: run["median_step_s"]) for s, rs in runs[m].items() if s != "peak"}
        tps = {s: tokens / r["median_step_s"] for s, r in best.items()}
        rss = {s: max(run["rss_mb"] for run in rs) for s, rs in runs[m].items() if s != "peak"}
        peak = {k: max(run[f"{k}_peak"] for run in runs[m]["peak"]) for k in ("jax", "torch")}
        summary[m] = {"tokens_per_s": tps, "peak_rss_mb": rss, "matmul_peak_gflops": peak}
        print(
            f"-- threads: {m}; measured {dt} matmul peak: jax {peak['jax']:.0f} GFLOP/s, "
            f"torch {peak['torch']:.0f} GFLOP/s"
        )
        for s, r in best.items():
            medians = ", ".join(f"{run['median_step_s']:.2f}" for run in runs[m][s])
            vs = f" = {tps[s] / tps['peft']:.2f}x PEFT, RSS {rss[s] / rss['peft']:.2f}x" if "peft" in tps else ""
            compile_s = f"  compile {min(x['compile_s'] for x in runs[m][s]):.1f} s" if "compile_s" in r else ""
            lib_peak = peak["torch"] if s == "peft" else peak["jax"]
            print(
                f"{s:11s} {tps[s]:6,.0f} tokens/s{vs}; {tps[s] * flops / 1e9:.0f} GFLOP/s = "
                f"{100 * tps[s] * flops / 1e9 / lib_peak:.0f}% of its library's matmul peak (best run's median "
                f"step {r['median_step_s']:.2f} s; each run's: {medians})  peak RSS {rss[s]:,.0f} MB{compile_s}  "
                f"losses {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
            )
        rows += side_rows(runs[m], tps, rss, a, m, flops)
        rows += [
            {
                "metric": f"{dt} matmul peak{'' if m == 'default' else ' (one core)'}",
                "unit": "GFLOP/s",
                "jlora": peak["jax"],
                "peer": "torch",
                "peer_value": peak["torch"],
                "better": "higher",
            }
        ]
    print("targets (issue 26): default threads, tokens/s >= 1.3x PEFT; the custom loop >= 1.2x and RSS <= 0.6x")
    config = {
        "model": title,
        "dtype": a.dtype,
        "batch": a.batch,
        "seq": a.seq,
        "lora": f"r={a.rank} alpha={ALPHA:g} {a.targets}",
        "remat": a.remat,
        "timed_steps": a.steps,
        "best_of": a.rounds,
        "threads": modes,
        "sides": sides,
        "baseline": a.baseline_commit,
        "model_flops_per_token": flops,
    }
    command = shlex.join(["python", "bench/train_vs_peft.py", *sys.argv[1:]])
    out = write_result(
        a.out,
        started,
        {
            "bench": "train_vs_peft",
            "command": command,
            "config": config,
            "rows": rows,
            "summary": summary,
            "runs": runs,
        },
    )
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
