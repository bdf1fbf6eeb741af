"""The training loop: validate, build, resume, train, evaluate, checkpoint, stop cleanly."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from flash_jax import data, evaluation, losses, runs, sharding
from flash_jax.config import RunConfig
from flash_jax.runs import json_safe, to_json
from flash_jax.train import (
    checkpoint,
    checkpoint_format,
    checkpoint_reader,
    distributed,
    flops,
    memory,
    profiling,
    report,
    signals,
    step,
)
from flash_jax.train import wandb_run as wandb_lib
from flash_jax.train import workdir as workdir_lib

# ----------------------------------------------------------------------------- checks


def check_mesh_fit(config, mesh) -> None:
    """The batch must split evenly over data-parallel devices and micro-batches, and sequences
    into whole chunks per device along a sequence axis."""
    dp = step.data_parallel_size(mesh, config.mesh.rules)
    per = dp * config.train.grad_accum_steps
    if config.data.batch_size % per:
        raise ValueError(
            f"data.batch_size ({config.data.batch_size}) must be divisible by the data-parallel "
            f"size ({dp}, mesh {dict(mesh.shape)}) times train.grad_accum_steps "
            f"({config.train.grad_accum_steps})"
        )
    check_sequence_fit(config.model, config.data.seq_len, mesh, config.mesh.rules)


def check_sequence_fit(model, seq_len: int, mesh, rules) -> None:
    """Context parallelism: each device along the sequence axis holds whole chunks (FLASH's
    chunks never straddle devices) and FLASH runs its XLA path there."""
    shards = sharding.shard_count(mesh, "length", rules)
    if shards == 1:
        return
    unit = model.chunk_size if model.name in ("flash", "performer") else 1
    if seq_len % (shards * unit):
        what = f"{shards} devices x model.chunk_size {unit}" if unit > 1 else f"{shards} devices"
        raise ValueError(
            f"data.seq_len ({seq_len}) must be a multiple of {shards * unit} to split over the "
            f"sequence axis ({what}, mesh {dict(mesh.shape)})"
        )
    impl_key = "flash_impl" if model.name == "flash" else "attention_impl"
    impl = getattr(model, impl_key)
    uses_impl = model.name in ("flash", "transformer", "transformer_plus", "transformer_pp")
    if uses_impl and impl not in ("auto", "xla"):
        raise ValueError(
            f"model.{impl_key}={impl!r} cannot run with the sequence split over the mesh (mesh "
            f"{dict(mesh.shape)}): context parallelism runs the XLA path"
        )


def make_mesh(config, devices=None):
    """`config.mesh` over `devices` (default: all of them)."""
    m = config.mesh
    return sharding.make_mesh(tuple(m.shape), tuple(m.axis_names), devices, m.num_slices)


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(
    config, workdir: str, *, hooks: Sequence[Callable[[int], None]] = ()
) -> dict:
    """Trains `config` (a ConfigDict or RunConfig) in `workdir`, resuming from its latest
    checkpoint if there is one.

    Returns a summary: {"status": "done" | "preempted" | "finished", "step", "last": last logged
    metrics, "checkpoint_dir", "stopped_by": the signal for "preempted", "saved": the step of the
    checkpoint it saved}. "finished": the workdir's latest checkpoint already reached
    train.num_steps and reads back intact; the run returns then (no data checks, no compile,
    nothing written; `finished_step`).
    Raises ValueError for a bad config, data or workdir (before anything is written or compiled),
    for a workdir another trainer holds, for a step that cannot fit the devices' memory or a W&B
    run that cannot start (before anything is written: a workdir this call created is removed
    again), or when no checkpoint of the workdir is intact;
    report.NonFiniteLossError when the loss diverges (only checkpoints whose own loss is finite
    are kept); checkpoint.CheckpointSaveError when the last checkpoint could not be saved.
    SIGTERM or Ctrl-C stop the run with a checkpoint of the step in flight (no further step is
    dispatched; see flash_jax/train/signals.py); that state's loss is checked by the resume.
    `hooks` are called with the number of completed steps after each step (tests use them).
    """
    # ---- everything that can fail on bad input, before any compile or write
    config = RunConfig.from_config(config)
    t = config.train
    use_compilation_cache(t.compilation_cache_dir)
    finished = finished_step(config, workdir)
    if finished is not None:  # nothing to check, build, restore or compile
        return summary("finished", finished, checkpoint_format.checkpoint_dir(workdir))
    splits = ["train", t.eval_split] if t.evaluates else ["train"]
    data.check_data(config.data, splits, vocab_size=config.model.vocab_size)
    mesh = make_mesh(config)
    check_mesh_fit(config, mesh)
    is_main = jax.process_index() == 0
    created = workdir_lib.prepare(workdir)  # local or gs://
    # Before the checkpoint manager, which removes unfinished saves: they could be another run's.
    lock = workdir_lib.lock(workdir) if is_main else None
    # Clean-ups run in reverse order, each even if another fails: metrics are flushed, the last
    # save commits, the pipeline stops, the lock is released, signals are handed back.
    with contextlib.ExitStack() as stack, jax.set_mesh(mesh):
        # Several processes stop together at the preemption sync point, never on a local signal.
        several = jax.process_count() > 1
        stop = stack.enter_context(signals.stop_requests(enabled=not several))
        release_workdir_at_exit(stack, stop, workdir, created, lock)
        checkpoint.check_writable(workdir, t.num_steps)  # before the compile, not at a save

        # ---- build and compile: a config that cannot fit stops here, before anything is written
        fns = step.build(config, mesh)
        num_params = f"{fns.num_params:,}"
        logging.info(
            "model %s: %s parameters; mesh %s", config.model.name, num_params, dict(mesh.shape)
        )
        rest = fns.init_rest()
        pipe = train_pipeline(config, mesh)  # its first batches load while the step compiles
        stack.callback(pipe.close)
        train_step = compile_train_step(config, fns, rest)
        memory.log_and_check(train_step)

        # ---- resume
        # W&B first: it is the other start that can fail on the config (not logged in).
        wandb_run, wandb_continued = start_wandb(stack, config, workdir, is_main)
        ckpts = open_checkpoints(config, workdir)
        stack.callback(ckpts.close)
        resolved = json_safe(config.to_dict())
        state = resume(ckpts, fns, config, pipe)
        if is_main:
            (epath.Path(workdir) / runs.CONFIG_FILE).write_text(to_json(resolved, indent=2))
        start = done = int(jax.device_get(state["step"]))
        # Records of the steps this run replays are dropped (a step is never logged twice).
        reporter = report.Reporter(
            workdir,
            t.num_steps,
            is_main=is_main,
            start_step=start,
            config=config,
            wandb_run=wandb_run,
            wandb_continued=wandb_continued,
        )
        stack.callback(reporter.close)
        # Every process compiled (one may have missed the compilation cache): start together.
        distributed.barrier(f"flash_jax_compiled_{start}")
        profiler = profiling.Profiler(t, str(epath.Path(workdir) / report.TENSORBOARD_DIR))
        stack.callback(profiler.close)
        metrics = report.StepMetrics(config, reporter, ckpts.keep_by_loss, model_flops(config, fns))

        eval_losses = {}  # step -> eval loss, saved with that step's checkpoint (keep_best)

        def save():
            metrics.drain()  # never save a state whose loss has not been checked
            meta = {
                "step": done,
                "data_position": pipe.position,
                "data_layout": pipe.layout,
                "model_config": checkpoint_format.model_config_dict(config.model),
                "config": resolved,
            }
            if done in eval_losses:
                meta["eval_loss"] = eval_losses[done]
            ckpts.save(done, state, meta, pipe)  # "checkpoint saved" is logged on commit

        def evaluate():
            metrics.drain()
            eval_losses[done] = periodic_eval(config, fns, state["params"], rest, reporter, done)

        # ---- train
        status = "done"
        for _ in range(start, t.num_steps):
            # Step `done` has finished (its loss is read) before the next one is dispatched: a
            # stop asked while it ran (or while compiling) saves it, not the step after it.
            metrics.drain()
            if stop.is_set() and not several:
                status = "preempted"
                break
            with profiler.step(done + 1):
                state, device_metrics = train_step(state, rest, next_batch(pipe, fns))
            done += 1
            profiler.after(done, state)
            metrics.push(done, device_metrics)  # reads the previous step's
            ckpts.poll()  # a save that committed or failed since the last step
            for hook in hooks:
                hook(done)
            preempted = ckpts.manager.reached_preemption(done) if several else stop.is_set()
            with metrics.paused():
                evaluates = t.evaluates and (done % t.eval_every == 0 or done == t.num_steps)
                if evaluates and not preempted:  # first, so that its loss is saved (keep_best)
                    evaluate()
                if done % t.checkpoint_every == 0 or preempted:
                    save()
                if evaluates and preempted:  # after the save has started: it comes first
                    evaluate()
            if preempted:
                status = "preempted"
                break
        metrics.drain()
        if done > start:
            save()
            # A preempted run's last state is checked by its resume's first step instead: the
            # forward pass (and its compile) would delay the exit a preemption grants time for.
            if ckpts.unverified == done and status != "preempted":
                check_last_loss(fns, state, rest, pipe, metrics, done)
        ckpts.finish()  # CheckpointSaveError if the last save did not commit
        preempted_by = "preemption" if several else stop.reason  # for train.py's summary line
        return summary(
            status,
            done,
            ckpts.directory,
            last=metrics.last,
            stopped_by=preempted_by if status == "preempted" else None,
            saved=done if done > start else None,
        )


def release_workdir_at_exit(stack, stop, workdir: str, created: bool, lock) -> None:
    """Hands the workdir back when the run ends: its lock released, and a workdir this run
    created removed again if nothing was saved or logged in it (its config, Ctrl-C during the
    first compile), also when a second Ctrl-C exits at once."""
    remove_unused = functools.partial(workdir_lib.remove_if_unused, workdir)
    if created:
        stack.callback(remove_unused)
    if lock is not None:
        stack.callback(lock.release)
        stop.at_exit.append(lock.release)  # a second Ctrl-C exits at once: release first
        stack.callback(stop.at_exit.remove, lock.release)
    if created:
        stop.at_exit.append(remove_unused)
        stack.callback(stop.at_exit.remove, remove_unused)


def start_wandb(stack, config: RunConfig, workdir: str, is_main: bool):
    """The run's W&B run and whether it continues the workdir's earlier one; (None, False)
    without `log.wandb_project` and on processes other than the main one. It finishes after
    the reporter's last record (`stack` closes it)."""
    if not (is_main and config.log.wandb_project):
        return None, False
    run, continued = wandb_lib.start(epath.Path(workdir), config)
    stack.callback(wandb_lib.finish, run)
    return run, continued


def open_checkpoints(config: RunConfig, workdir: str) -> checkpoint.Checkpoints:
    t = config.train
    return checkpoint.Checkpoints(
        workdir,
        t.keep_checkpoints,
        keep_every_steps=t.keep_every_steps,
        keep_best=t.keep_best,
        max_failed_saves=t.max_failed_saves,
    )


def resume(ckpts, fns: step.StepFns, config: RunConfig, pipe):
    """The state to train from: a fresh state, or the newest intact checkpoint's, with the input
    stream `pipe` restored to where it was. A checkpoint of another host layout is a ValueError:
    nothing of this run is written yet (but W&B's files)."""
    if ckpts.check_compatible(config.model) is None:
        return fns.init_state()
    state, _, restored = ckpts.restore_newest(fns.abstract_state, config.model, pipe)
    logging.info("resuming from step %d (input stream restored)", restored)
    return state


def model_flops(config: RunConfig, fns: step.StepFns) -> float:
    """FLOPs of one train step, analytic: XLA's cost analysis counts the scanned layer body
    once."""
    tokens_per_step = config.data.batch_size * config.data.seq_len
    return flops.analytic_flops(config.model, config.data.seq_len, tokens_per_step, fns.num_params)[
        "total"
    ]


def check_last_loss(fns: step.StepFns, state, rest, pipe, metrics, done: int) -> None:
    """The last state's own loss, which no later step computes: one forward pass on the batch
    step done + 1 would take (its checkpoint is kept only if the loss is finite)."""
    nll, weight = jax.device_get(fns.eval_step(state["params"], rest, next_batch(pipe, fns)))
    metrics.check_loss(done + 1, float(nll) / max(float(weight), 1.0))


def use_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory` ("" leaves JAX's setting)."""
    if not directory or jax.config.jax_compilation_cache_dir == directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    # JAX opens its cache once, at the first compile: a process that has compiled already (a
    # notebook, a sweep of runs) reopens it in the new folder.
    compilation_cache.reset_cache()
    logging.info("persistent compilation cache in %s", directory)


def train_pipeline(config, mesh) -> data.InputPipeline:
    return data.InputPipeline(
        config.data,
        split="train",
        mesh=mesh,
        seed=config.seed,
        shuffle=True,
        repeat=True,
        rules=config.mesh.rules,
    )


def finished_step(config: RunConfig, workdir: str) -> int | None:
    """The latest checkpoint's step when it reaches train.num_steps and reads back intact (a
    finished run), else None.

    Read-only, before the data checks (which build TF pipelines) and without compiling: it reads
    the checkpoint as a resume would, so that a damaged latest step is left to restore_newest
    (which falls back to an earlier one and trains on). Another model's checkpoint is refused
    (ValueError) as the full run would."""
    if not (epath.Path(checkpoint_format.checkpoint_dir(workdir))).is_dir():
        return None
    ckpts = checkpoint_reader.CheckpointReader(workdir)
    try:
        latest = ckpts.check_compatible(config.model)
        if latest is None or latest < config.train.num_steps:
            return None
        mesh = make_mesh(config)
        with jax.set_mesh(mesh):
            ckpts.restore(step.build(config, mesh).abstract_state, latest, config.model)
    except checkpoint_format.DamagedCheckpointError:
        return None
    finally:
        ckpts.close()
    return latest


def summary(
    status: str,
    step_done: int,
    checkpoint_dir: str,
    *,
    last: dict | None = None,
    stopped_by: str | None = None,
    saved: int | None = None,
) -> dict:
    """What `train_and_evaluate` returns (its docstring says what each key means); train.py's
    summary lines are made from it."""
    return {
        "status": status,
        "step": step_done,
        "last": {} if last is None else last,
        "checkpoint_dir": checkpoint_dir,
        "stopped_by": stopped_by,
        "saved": saved,
    }


def next_batch(pipe, fns: step.StepFns) -> dict:
    return step.put_batch(next(pipe), fns.batch_sharding)


def compile_train_step(config, fns: step.StepFns, rest):
    """The train step compiled ahead of time: one compile, before the first batch is needed."""
    t0 = time.time()
    shape = (config.data.batch_size, config.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(
            shape, jnp.float32 if k == "weights" else jnp.int32, sharding=fns.batch_sharding
        )
        for k in step.BATCH_KEYS
    }
    compiled = fns.train_step.lower(fns.abstract_state, rest, batch).compile()
    logging.info("compiled the train step in %.1f s", time.time() - t0)
    return compiled


def periodic_eval(config, fns: step.StepFns, params, rest, reporter, done: int) -> float:
    """Perplexity over `train.eval_batches` batches of the eval split (all of it if smaller);
    returns the eval loss."""
    t = config.train
    progress = evaluation.progress_logger(f"eval at step {done} ({t.eval_split})", at_ends=False)
    sums = evaluation.evaluate(
        fns, params, rest, config, t.eval_split, max_batches=t.eval_batches, progress=progress
    )
    nll_sum, tokens = sums["nll_sum"], sums["tokens"]
    scalars = {
        "eval_loss": nll_sum / tokens if tokens > 0 else math.nan,
        "eval_perplexity": losses.perplexity(nll_sum, tokens),
        "eval_tokens": tokens,
    }
    reporter.write(done, scalars)
    logging.info(
        "eval at step %d: loss %s, perplexity %s",
        done,
        report.figure(scalars["eval_loss"], ".4f"),
        report.figure(scalars["eval_perplexity"]),
    )
    return scalars["eval_loss"]
