"""The training loop behind `jlora-train`: a RunConfig in, a trained adapter and metrics out.

Owns building a run (jax.distributed, tokenizer, model, per-host data, mesh, sharded state), the
start-of-run summary, the loop (progress bar, metrics.jsonl + TensorBoard, eval, the non-finite
guard, periodic checkpoints, resume, a checkpoint on SIGTERM / SIGINT) and the CLI. The step itself is
jlora.train.step; placement is jlora.parallel.sharding; files on disk are jlora.checkpoint; signals are
jlora.train.preemption. A preference objective (dpo | ipo | orpo) trains on streams of pairs
(jlora.train.preference_data), logs TRL's metric names, and may read its reference log-probs from a cache
(jlora.train.preference_cache). Only process 0 prints and writes metrics.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jlora.checkpoint import metadata, train_state
from jlora.checkpoint.adapter import adapter_content_sha256, barrier, save_adapter
from jlora.checkpoint.fingerprint import fingerprint
from jlora.checkpoint.run_dir import claim
from jlora.models.family import build_model
from jlora.parallel.sharding import BATCH_AXES, describe_mesh, make_mesh
from jlora.peft.lora import count_params, describe, pissa_to_lora, unadapted
from jlora.train import preference_cache
from jlora.train.builders import DenseFingerprint, load_base, load_tok, method_config, start_from_adapter
from jlora.train.config import ConfigError, RunConfig, run_warnings
from jlora.train.config_files import check_inputs, checkpoint_over_preset
from jlora.train.data import data_warnings, make_batches
from jlora.train.data_stream import check_resume
from jlora.train.metrics_log import MetricsLog
from jlora.train.plan import check_load_fits
from jlora.train.preemption import Stopped, StopSignals
from jlora.train.preference import REFERENCE_FREE
from jlora.train.preference_data import make_pair_batches
from jlora.train.step import (
    DivergenceWatch,
    Objective,
    TrainState,
    check_nonfinite,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    put_batch,
    quantize_frozen,
)
from jlora.train.typed_yaml import to_dict

log = logging.getLogger(__name__)

# Any of these means a multi-process launch that jax.distributed.initialize() can pick up.
CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
)


def init_distributed(setting: bool | str = "auto") -> bool:
    """Call jax.distributed.initialize() when `setting` is True, or "auto" and a cluster is detected.

    Besides jax's own cluster detection (TPU pods, SLURM, Open MPI), JAX_COORDINATOR_ADDRESS with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID launch processes by hand. Returns whether it initialized."""
    if setting is False or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    if setting == "auto" and not any(os.environ.get(k) for k in CLUSTER_ENV):
        return False
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs = {
            "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
            "process_id": int(os.environ.get("JAX_PROCESS_ID", "0")),
        }
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:  # no coordinator found, bad env, timeout: say which setting
        msg = " ".join(str(e).split())[:300]
        raise ConfigError(f"jax.distributed.initialize() failed: {msg}", "mesh.distributed") from None
    return True


def replicated_key(key: jax.Array, mesh) -> jax.Array:
    """`key` replicated over the mesh, as the step takes it: a checkpoint of a single-device array fails on
    several hosts. Placed from host data, which device_put spreads over every process's devices."""
    data = jax.device_put(np.asarray(jax.random.key_data(key)), NamedSharding(mesh, PartitionSpec()))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def evaluate(eval_step, state: TrainState, val_it, n_batches: int) -> tuple[float, float]:
    """(mean validation loss, loss tokens) over the first `n_batches` batches (0: all) of one pass."""
    total, count = 0.0, 0.0
    for i, batch in enumerate(val_it.one_pass()):
        if n_batches and i >= n_batches:
            break
        s, n = eval_step(state.frozen, state.trainable, put_batch(batch, state.mesh), *state.reference_args())
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0), count


def evaluate_pairs(eval_step, state: TrainState, val_it, n_batches: int) -> tuple[float, dict[str, float], float]:
    """(mean validation loss, mean metrics, pairs) of a preference objective over the first `n_batches`
    batches (0: all) of one pass: each batch's means weighted by its real pairs."""
    total, sums, count = 0.0, {}, 0.0
    for i, batch in enumerate(val_it.one_pass()):
        if n_batches and i >= n_batches:
            break
        b = put_batch(batch, state.mesh)
        loss, metrics, n = jax.device_get(eval_step(state.frozen, state.trainable, b, *state.reference_args()))
        total, count = total + float(loss) * float(n), count + float(n)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * float(n)
    return total / max(count, 1.0), {k: v / max(count, 1.0) for k, v in sums.items()}, count


def check_continues(saved: dict, where: str, data_stream: dict, reference: dict | None) -> None:
    """CheckpointError unless the checkpoint's run continues as this one: the same data stream
    (jlora.train.data_stream.check_resume) and the same reference adapter (run.init_adapter, by content) of a
    preference run, since a changed one would change the loss the resumed steps minimise."""
    check_resume(saved, where, data_stream)
    old, now = saved.get("reference_adapter"), reference
    if (old or {}).get("content_sha256") == (now or {}).get("content_sha256"):
        return
    what = lambda r: f"sha256 {str(r['content_sha256'])[:12]} in {r['path']}" if r else "none"
    raise metadata.CheckpointError(
        f"{where}: cannot resume: the reference adapter (init_adapter) changed since this checkpoint "
        f"({what(old)} -> {what(now)}); set it back, or start over (jlora-train --overwrite)"
    )


def train(
    run: RunConfig, *, resume: bool | None = None, quiet: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run a whole training job; returns a summary (steps, losses, val_loss, tokens_per_s, ...).

    resume: None follows run.checkpoint.resume (continue if output_dir holds a checkpoint); True
    requires one; False starts over, which an output_dir holding checkpoints refuses unless
    `overwrite` moves the earlier run aside. The run holds a lock on output_dir (jlora.checkpoint.run_dir).

    SIGTERM or SIGINT (jlora.train.preemption): before the first step, raises `Stopped` at once; later,
    the step under way finishes, a checkpoint is saved on every process, then `Stopped` says where.

    The files the run reads are checked first (jlora.train.config_files.check_inputs); model.preset beside a
    model.path only names the checkpoint's shape (for --plan), so the checkpoint is what trains."""
    check_inputs(run)
    run = checkpoint_over_preset(run)
    init_distributed(run.mesh.distributed)
    fresh = not (run.checkpoint.resume if resume is None else resume)
    reads = [p for p in (run.data.train, run.data.val, run.model.path, run.tokenizer) if p]
    claimed = claim(
        run.output_dir, fresh=fresh, overwrite=overwrite, primary=jax.process_index() == 0, sync=barrier, reads=reads
    )
    with StopSignals() as stop, claimed as aside:  # the handlers first: a signal while claiming stops cleanly
        if aside is not None and not quiet:
            print(f"moved the earlier run in {run.output_dir} to {aside}", flush=True)
        return _train(run, resume=resume, quiet=quiet, stop=stop)


PREFERENCE_EXTRA = ("nll_loss", "log_odds_ratio", "log_odds_chosen")  # ORPO's, beside rewards/* and logps/*


def window_means(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over a logging window's steps (their finite values)."""
    out = {}
    for k in rows[0] if rows else ():
        finite = [r[k] for r in rows if math.isfinite(r[k])]
        out[k] = float(np.mean(finite)) if finite else float("nan")
    return out


def _train(run: RunConfig, *, resume: bool | None, quiet: bool, stop: StopSignals) -> dict[str, Any]:
    """train()'s body, run while the output_dir is claimed."""
    init_distributed(run.mesh.distributed)
    main_proc = jax.process_index() == 0
    say = (lambda *a: None) if quiet or not main_proc else (lambda *a: print(*a, flush=True))
    out_dir = pathlib.Path(run.output_dir)
    tok = load_tok(run)
    mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    check_load_fits(run, mesh)  # before any weight is read or made
    dense_print = DenseFingerprint()  # a QLoRA base packed as it loads is sampled dense on the way
    cfg, params = load_base(run, tok, mesh, on_dense=dense_print)
    method = method_config(run, cfg)
    objective = Objective.of_run(run)
    pairs = run.objective != "sft"  # a preference objective: batch sizes count (chosen, rejected) pairs
    train_it, val_it, stats = (make_pair_batches if pairs else make_batches)(
        run, tok, process_index=jax.process_index(), process_count=jax.process_count(), model_vocab=cfg.vocab_size
    )
    steps = run.train.steps or math.ceil(run.train.epochs * train_it.steps_per_epoch)
    rows = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if run.train.micro_batch % rows:
        raise ConfigError(
            f"must be a multiple of mesh data*fsdp = {rows}, got {run.train.micro_batch}", "train.micro_batch"
        )

    optimizer, schedule = make_optimizer(run.optim, steps, run.train.max_nonfinite)
    key = jax.random.key(run.train.seed)
    state = init_state(
        cfg,
        method,
        mesh,
        jax.random.fold_in(key, 0),
        optimizer,
        params,
        model_key=jax.random.key(run.model.seed),
        allow_replication=run.mesh.allow_replication,
    )
    # PiSSA trains on W_res = W - s*A0@B0: keep the split's (A0, B0) to save the run for the base on disk
    initial = jax.tree.map(jnp.copy, state.trainable) if run.method == "lora" and run.lora.init == "pissa" else None
    host_params, params = params, None  # the host copy is only needed for the fingerprint below
    rng, start = replicated_key(jax.random.fold_in(key, 1), mesh), 0
    fingerprint_src = state.frozen  # sampled by a jitted gather that every process runs alike
    if run.model.quantize in ("int8", "nf4"):  # QLoRA; the adapter records the dense base it applies to
        fingerprint_src = dense_print.fingerprint(state.frozen) if dense_print else fingerprint(state.frozen)
        if not dense_print:  # a random preset, or PiSSA's split: the base arrived dense, packed only now
            quantize_frozen(state, run.model.quantize, double_quant=run.model.double_quant)
    meta = metadata.make_metadata(method, cfg, fingerprint_src, to_dict(run), data_stream=train_it.identity)
    model = build_model(cfg)
    reference_sha = None  # the reference adapter's content hash, when the reference is an adapter
    if run.init_adapter:  # before the restore, which continues from the run's own checkpoint instead
        state.trainable, reference = start_from_adapter(run.init_adapter, state.trainable, cfg, method, fingerprint_src)
        if run.reference_adapter:
            state.reference = reference  # the model the run starts from; a copy of the adapter only
            # a resume reloads it: what the checkpoint was trained against must still be what is on disk
            reference_sha = adapter_content_sha256(run.init_adapter)
            meta["reference_adapter"] = {"path": run.init_adapter, "content_sha256": reference_sha}
        say(f"starting from the adapter in {run.init_adapter}" + (" (the reference)" if state.reference else ""))
    if objective.precomputed:  # before the restore: a cache of other data is refused first, in its own words
        train_it.reference, cached = preference_cache.load_or_compute(
            out_dir,
            preference_cache.cache_key(train_it.identity, fingerprint_src, reference_sha),
            lambda: preference_cache.compute(model, state, train_it, run.train.micro_batch),
            len(train_it.pairs),
            write=main_proc,
        )
        summary_reference = "cached" if cached else "computed"
        where = out_dir / preference_cache.CACHE
        say(f"reference log-probs of {len(train_it.pairs)} pairs: {summary_reference} ({where})")
    else:
        summary_reference = "in the step" if pairs and run.objective not in REFERENCE_FREE else None
    manager = train_state.open_manager(
        out_dir / "checkpoints", keep=run.checkpoint.keep, interval=run.checkpoint.interval
    )
    want_resume = run.checkpoint.resume if resume is None else resume
    if want_resume:
        abstract = {
            "trainable": state.trainable,
            "opt_state": state.opt_state,
            "step": 0,
            "data": train_it.state(),
            "rng": rng,
        }
        restored = train_state.restore_latest(
            manager,
            abstract,
            base=cfg,
            params=fingerprint_src,
            lcfg=method,
            check=functools.partial(
                check_continues, data_stream=train_it.identity, reference=meta.get("reference_adapter")
            ),
        )
        if restored is None and resume:
            raise metadata.CheckpointError(f"{out_dir / 'checkpoints'}: --resume, but there is no checkpoint")
        if restored is not None:
            state.trainable, state.opt_state, rng = restored["trainable"], restored["opt_state"], restored["rng"]
            train_it.restore(restored["data"])
            start = int(restored["step"])
            say(f"resumed from {out_dir / 'checkpoints'} at step {start} (data row {train_it.row})")
    del host_params

    n_micro = run.train.grad_accum
    rows_per_step = run.train.global_batch * (2 if pairs else 1)
    tokens_per_step = rows_per_step * run.data.max_seq_len
    say(
        f"model: {cfg.name}  layers={cfg.num_hidden_layers} d={cfg.hidden_size} vocab={cfg.vocab_size} "
        f"dtype={cfg.dtype} param_dtype={cfg.param_dtype} remat={cfg.remat}  base params "
        f"{count_params(state.frozen):,}"
    )
    say(f"mesh: {describe_mesh(mesh)}  processes: {jax.process_count()}")
    say(describe(state.trainable, state.frozen))
    say(f"data: {stats.summary()}" + ("  (examples: preference pairs)" if pairs else ""))
    say(
        f"steps: {steps}  tokens/step: {tokens_per_step:,} ({rows_per_step} rows x "
        f"{run.data.max_seq_len}, {n_micro} micro-batch{'es' * (n_micro > 1)} of {run.train.micro_batch}"
        f"{' pairs' if pairs else ''})"
        + (f"  objective: {run.objective} (beta {run.preference.beta:g})" if pairs else "")
    )
    if main_proc:  # on stderr, even when quiet: settings that are valid but almost surely a mistake
        rows_per_epoch = train_it.steps_per_epoch * run.train.global_batch
        lines = run_warnings(run, steps, rows_per_epoch) + data_warnings(run.data, stats)
        for line in lines + getattr(train_it, "warnings", []):
            print(f"warning: {line}", file=sys.stderr, flush=True)

    diverged = DivergenceWatch(run.train.divergence_factor, run.optim.lr)
    step_fn = make_train_step(model, optimizer, state, objective=objective)
    eval_on = val_it is not None and run.train.eval_interval
    eval_fn = make_eval_step(model, state, objective=objective) if eval_on else None
    metrics_log = MetricsLog(out_dir, main_proc)
    summary: dict[str, Any] = {
        "steps": steps,
        "start_step": start,
        "losses": [],
        "val_losses": [],
        "skipped": 0,
        "output_dir": str(out_dir),
        "tokens_per_step": tokens_per_step,
        "reference": summary_reference,  # preference runs: where the reference log-probs came from
    }
    # optimizer updates so far: skipped steps do not advance the schedule
    applied = start - int(jax.device_get(state.opt_state.total_notfinite))
    window = {"loss": [], "skipped": 0, "time": 0.0, "steps": 0, "pref": []}
    bar = None  # made after the first step, so its rate and ETA leave the compile out
    try:
        batch = put_batch(next(train_it), mesh, n_micro) if start < steps else None
        data_state = train_it.state()  # the position after this step's batch: what a checkpoint records
        t0 = time.perf_counter()
        if start < steps:
            say(f"step {start + 1}/{steps}: compiling the train step (the first step includes it) ...")
        stop.start_training()  # from here a signal lets the step under way finish, then saves it
        for step in range(start, steps):
            stop.step = step + 1
            state.trainable, state.opt_state, m = step_fn(
                state.frozen,
                state.trainable,
                state.opt_state,
                batch,
                jax.random.fold_in(rng, step),
                *state.reference_args(),
            )
            step_data_state = data_state
            if step + 1 < steps:  # build the next batch on the host while the device runs this step
                batch = put_batch(next(train_it), mesh, n_micro)
                data_state = train_it.state()
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            if step == start:
                summary["first_step_s"] = dt  # includes compilation
            else:
                window["time"] += dt
                window["steps"] += 1
            lr = float(schedule(applied))
            applied += not bool(m["skipped"])
            summary["losses"].append(float(m["loss"]))
            summary["skipped"] = int(m["nonfinite_total"])
            window["loss"].append(float(m["loss"]))
            pref = {k: float(v) for k, v in m.items() if "/" in k or k in PREFERENCE_EXTRA}  # TRL's names
            window["pref"].append(pref)
            window["skipped"] += int(bool(m["skipped"]))
            check_nonfinite(m, run.train.max_nonfinite, step + 1)
            diverged(float(m["grad_norm"]), step + 1)
            tps = tokens_per_step * window["steps"] / window["time"] if window["time"] else float("nan")
            done = step + 1
            if bar is None:
                bar = tqdm(total=steps, initial=done, disable=quiet or not main_proc, unit="step", dynamic_ncols=True)
                stop.mid_line = not bar.disable
            else:
                bar.update(1)
            # tok_s from the second step on: the first one's time is mostly compilation
            bar.set_postfix(
                loss=f"{float(m['loss']):.4f}",
                **(
                    {"acc": f"{pref['rewards/accuracies']:.2f}", "margin": f"{pref['rewards/margins']:.3f}"}
                    if pref
                    else {}
                ),
                lr=f"{lr:.2e}",
                **({"tok_s": f"{tps:,.0f}"} if math.isfinite(tps) else {}),
            )
            if done % run.train.log_interval == 0 or done == steps:
                finite = [x for x in window["loss"] if math.isfinite(x)]
                metrics_log.write(
                    {
                        "step": done,
                        "loss": float(np.mean(finite)) if finite else float("nan"),
                        "lr": lr,
                        "tokens_per_s": tps if math.isfinite(tps) else None,
                        "grad_norm": float(m["grad_norm"]),
                        "skipped": window["skipped"],
                        **window_means(window["pref"]),
                    }
                )
                if math.isfinite(tps):
                    summary["tokens_per_s"] = tps
                window = {"loss": [], "skipped": 0, "time": 0.0, "steps": 0, "pref": []}
            if eval_fn is not None and (done % run.train.eval_interval == 0 or done == steps):
                n = run.train.eval_batches or "all"  # what it covers: a few batches are not the whole split
                if pairs:
                    val_loss, val_m, val_pairs = evaluate_pairs(eval_fn, state, val_it, run.train.eval_batches)
                    row = {"val_loss": val_loss, **{f"val_{k}": v for k, v in val_m.items()}, "val_pairs": val_pairs}
                    covers = f"{n} val batches, {val_pairs:,.0f} pairs; accuracy {val_m['rewards/accuracies']:.3f}"
                else:
                    val_loss, val_tokens = evaluate(eval_fn, state, val_it, run.train.eval_batches)
                    row, covers = (
                        {"val_loss": val_loss, "val_tokens": val_tokens},
                        f"{n} val batches, {val_tokens:,.0f} tokens",
                    )
                summary["val_losses"].append((done, val_loss))
                summary.setdefault("val_metrics", []).append((done, row))
                metrics_log.write({"step": done, **row})
                if main_proc and not quiet:
                    bar.write(f"step {done}: val_loss {val_loss:.4f} ({covers})")
            # every process asks after every step, so all of them stop after the same one
            signum = stop.stop_at(done, manager.reached_preemption) if done < steps else 0
            train_state.save_checkpoint(
                manager,
                done,
                {
                    "trainable": state.trainable,
                    "opt_state": state.opt_state,
                    "step": done,
                    "data": step_data_state,
                    "rng": rng,
                },
                meta,
                force=done == steps or bool(signum),
            )
            if signum:
                raise Stopped(signum, step=done, steps=steps, checkpoint=pathlib.Path(manager.directory) / str(done))
            t0 = time.perf_counter()  # evaluation and checkpointing are not step time
    finally:
        if bar is not None:
            bar.close()
        metrics_log.close()
    adapter_lcfg, adapter, adapter_print = method, state.trainable, fingerprint_src
    if initial is not None:  # the equivalent rank-2r plain LoRA; W_res's adapted kernels are not the base's
        adapter_lcfg, adapter = pissa_to_lora(state.trainable, initial, run.lora)
        adapter_print = None if fingerprint_src is None else unadapted(fingerprint_src, adapter)
    save_adapter(out_dir / "adapter", adapter, adapter_lcfg, cfg, adapter_print, to_dict(run))
    summary.update(
        final_loss=summary["losses"][-1] if summary["losses"] else None,
        val_loss=summary["val_losses"][-1][1] if summary["val_losses"] else None,
        adapter_dir=str(out_dir / "adapter"),
    )
    final = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    say(f"done: {steps - start} steps, final loss {final}, adapter in {out_dir / 'adapter'}")
    summary["state"] = state
    return summary
