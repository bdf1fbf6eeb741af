"""The training loop: validate, build, resume, train, evaluate, checkpoint, stop cleanly."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

from flash_jax import data, evaluation, flops, metrics, results, sharding
from flash_jax.config import RunConfig
from flash_jax.train import checkpoint, report, signals, step
from flash_jax.train import workdir as workdir_lib


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became nan / inf; the run stopped, keeping only checkpoints
    whose own loss is finite."""


# ----------------------------------------------------------------------------- checks


def check_mesh_fit(config, mesh) -> None:
    """The batch must split evenly over data-parallel devices and micro-batches."""
    dp = step.data_parallel_size(mesh, config.mesh.rules)
    per = dp * config.train.grad_accum_steps
    if config.data.batch_size % per:
        raise ValueError(
            f"data.batch_size ({config.data.batch_size}) must be divisible by the data-parallel "
            f"size ({dp}, mesh {dict(mesh.shape)}) times train.grad_accum_steps "
            f"({config.train.grad_accum_steps})"
        )


def make_mesh(config):
    return sharding.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))


def initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when the environment describes several processes.

    Cloud TPU pod slices (TPU_WORKER_HOSTNAMES lists several hosts), SLURM / Open MPI jobs with
    several tasks, or an explicit JAX_COORDINATOR_ADDRESS. A single process: nothing to do.
    """
    env = os.environ
    several = (
        "JAX_COORDINATOR_ADDRESS" in env
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    )
    if several:
        jax.distributed.initialize()
    return several


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(
    config, workdir: str, *, hooks: Sequence[Callable[[int], None]] = ()
) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Returns a summary: {"status": "done" | "preempted", "step", "last": last logged metrics,
    "stopped_by": the signal for "preempted", "saved": the step of the checkpoint it saved}.
    Raises ValueError for a bad config, data or workdir (before anything is written or compiled),
    for a workdir another trainer holds, or when no checkpoint of the workdir is intact;
    NonFiniteLossError when the loss diverges (only checkpoints whose own loss is finite are kept);
    checkpoint.CheckpointSaveError when the last checkpoint could not be saved.
    SIGTERM or Ctrl-C stop the run at the next step boundary with a checkpoint (see
    flash_jax/train/signals.py). `hooks` are called with the number of completed steps after each
    step (tests use them).
    """
    # ---- everything that can fail on bad input, before any compile or write
    config = RunConfig.from_config(config)  # unknown keys and bad values: ValueError
    model_config = config.model
    t = config.train
    splits = ["train", t.eval_split] if t.evaluates else ["train"]
    data.check_data(config.data, splits, vocab_size=config.model.vocab_size)
    mesh = make_mesh(config)
    check_mesh_fit(config, mesh)
    is_main = jax.process_index() == 0
    workdir_lib.prepare(workdir)  # local or gs://
    # Before the checkpoint manager, which removes unfinished saves: they could be another run's.
    lock = workdir_lib.lock(workdir) if is_main else None
    tokens_per_step = config.data.batch_size * config.data.seq_len
    # Clean-ups run in reverse order, each even if another fails: the pipeline stops, metrics
    # are flushed, the last save commits, signals are handed back, then the lock is released.
    with contextlib.ExitStack() as stack:
        if lock is not None:
            stack.callback(lock.release)
        # Several processes stop together at the preemption sync point, never on a local signal.
        several = jax.process_count() > 1
        stop = stack.enter_context(signals.stop_requests(enabled=not several))
        if lock is not None:
            stop.at_exit.append(lock.release)  # a second Ctrl-C exits at once: release first
            stack.callback(stop.at_exit.remove, lock.release)
        ckpts = checkpoint.Checkpoints(workdir, t.keep_checkpoints)
        stack.callback(ckpts.close)
        latest = ckpts.check_compatible(model_config)
        resolved = config.to_dict()
        if is_main:
            (epath.Path(workdir) / results.CONFIG_FILE).write_text(json.dumps(resolved, indent=2))
        with jax.set_mesh(mesh):
            fns = step.build(config, mesh)
            logging.info(
                "model %s: %s parameters; mesh %s",
                model_config.name,
                f"{fns.num_params:,}",
                dict(mesh.shape),
            )
            rest = fns.init_rest()
            if latest is None:
                state, position = fns.init_state(), 0
            else:
                state, meta, restored = ckpts.restore_newest(fns.abstract_state, model_config)
                position = int(meta["data_position"])
                logging.info("resuming from step %d (data position %d)", restored, position)
            start = int(jax.device_get(state["step"]))
            # Records of the steps this run replays are dropped (a step is never logged twice).
            reporter = report.Reporter(workdir, t.num_steps, is_main=is_main, start_step=start)
            stack.callback(reporter.close)
            pipe = data.InputPipeline(
                config.data,
                split="train",
                mesh=mesh,
                seed=config.seed,
                shuffle=True,
                repeat=True,
                start_batch=position,
                rules=config.mesh.rules,
            )
            stack.callback(pipe.close)

            # Compile ahead of time: one compile, before the first batch is needed.
            t0 = time.time()
            batch_abstract = {
                k: jax.ShapeDtypeStruct(
                    (config.data.batch_size, config.data.seq_len),
                    jnp.float32 if k == "weights" else jnp.int32,
                    sharding=fns.batch_sharding,
                )
                for k in step.BATCH_KEYS
            }
            train_step = fns.train_step.lower(fns.abstract_state, rest, batch_abstract).compile()
            logging.info("compiled the train step in %.1f s", time.time() - t0)
            # Model FLOPs (analytic: XLA's cost analysis counts the scanned layer body once).
            model_flops = flops.analytic_flops(
                model_config, config.data.seq_len, tokens_per_step, fns.num_params
            )["total"]
            peak = peak_flops_per_device()
            peak_total = peak * jax.device_count() if peak else None

            def meta(done):
                return {
                    "step": done,
                    "data_position": pipe.position,
                    "model_config": checkpoint.model_config_dict(model_config),
                    "config": resolved,
                }

            # Metrics are fetched one step late: step k's scalars are read after step k + 1 has
            # been dispatched, so the device always has queued work.
            pending = None
            window = {"losses": [], "time": None, "step": None}  # since the last console line
            last_logged: dict = {}

            def check_loss(done, loss, grad_norm=None):
                """Step `done`'s loss is the loss of the state after step done - 1: it decides
                whether that state's checkpoint (if any) is kept."""
                if math.isfinite(loss):
                    ckpts.confirm(done - 1)
                    if grad_norm is None or math.isfinite(grad_norm):
                        return
                    problem = f"non-finite gradient norm ({grad_norm}) at step {done}"
                else:
                    removed = ckpts.discard(done - 1)
                    problem = (
                        f"non-finite loss ({loss}) at step {done}, computed from the state after "
                        f"step {done - 1}" + ("; its checkpoint was removed" if removed else "")
                    )
                good = ckpts.latest_good_step()
                kept = (
                    f"the newest checkpoint with a finite loss is step {good} in {ckpts.directory}"
                    if good is not None
                    else f"no checkpoint with a finite loss is kept in {ckpts.directory}"
                )
                raise NonFiniteLossError(f"{problem}; stopped, nothing more saved; {kept}")

            def drain():
                nonlocal pending
                if pending is None:
                    return
                done, device_metrics = pending
                pending = None
                host = jax.device_get(device_metrics)
                loss, grad_norm = float(host["loss"]), float(host["grad_norm"])
                check_loss(done, loss, grad_norm)
                now = time.time()
                window["losses"].append(loss)
                if window["time"] is None:  # timing starts after the first step (warm-up)
                    window.update(time=now, step=done)
                if done % t.log_every and done != t.num_steps:
                    return
                steps = done - window["step"]
                step_time = (now - window["time"]) / steps if steps else None
                mean_loss = sum(window["losses"]) / len(window["losses"])
                scalars = {
                    "loss": mean_loss,
                    "perplexity": metrics.perplexity(mean_loss, 1.0),
                    "learning_rate": float(host["learning_rate"]),
                    "grad_norm": grad_norm,
                    "step_time": step_time,
                    "tokens_per_sec": tokens_per_step / step_time if step_time else None,
                    "mfu": model_flops / step_time / peak_total
                    if step_time and peak_total
                    else None,
                }
                reporter.write(done, scalars)
                reporter.console(done, scalars, step_time)
                last_logged.clear()
                last_logged.update(scalars, step=done)
                window.update(losses=[], time=now, step=done)

            def save(done):
                drain()  # never save a state whose loss has not been checked
                ckpts.save(done, state, meta(done))  # "checkpoint saved" is logged on commit

            def check_final_state(done):
                """The last state's own loss: one forward pass on the batch step done + 1 would
                take (no later step computes it)."""
                batch = step.put_batch(next(pipe), fns.batch_sharding)
                nll, weight = jax.device_get(fns.eval_step(state["params"], rest, batch))
                check_loss(done + 1, float(nll) / max(float(weight), 1.0))

            status = "done"
            done = start
            for _ in range(start, t.num_steps):
                if stop.is_set() and not several:  # asked before the first step (compiling)
                    status = "preempted"
                    break
                batch = step.put_batch(next(pipe), fns.batch_sharding)
                state, step_metrics = train_step(state, rest, batch)
                drain()
                ckpts.poll()  # a save that committed or failed since the last step
                done += 1
                pending = (done, step_metrics)
                for hook in hooks:
                    hook(done)
                preempted = ckpts.manager.reached_preemption(done) if several else stop.is_set()
                paused = time.time()
                if done % t.checkpoint_every == 0 or preempted:
                    save(done)
                if (
                    t.eval_every
                    and t.eval_batches
                    and (done % t.eval_every == 0 or done == t.num_steps)
                ):
                    drain()
                    sums = evaluation.evaluate(
                        fns, state["params"], rest, config, t.eval_split, max_batches=t.eval_batches
                    )
                    nll_sum, tokens = sums["nll_sum"], sums["tokens"]
                    scalars = {
                        "eval_loss": nll_sum / tokens if tokens > 0 else math.nan,
                        "eval_perplexity": metrics.perplexity(nll_sum, tokens),
                        "eval_tokens": tokens,
                    }
                    reporter.write(done, scalars)
                    logging.info(
                        "eval at step %d: loss %.4f, perplexity %.2f",
                        done,
                        scalars["eval_loss"],
                        scalars["eval_perplexity"],
                    )
                if window["time"] is not None:
                    # Eval and saving do not count as step time. drain() may have restarted the
                    # window during the pause: then only the rest of the pause is excluded.
                    window["time"] += time.time() - max(paused, window["time"])
                if preempted:
                    status = "preempted"
                    break
            drain()
            if done > start:
                save(done)
                if ckpts.unverified == done:
                    check_final_state(done)
            ckpts.finish()  # CheckpointSaveError if the last save did not commit
            saved = done if done > start else None
            stopped_by = None
            if status == "preempted":
                stopped_by = "preemption" if several else stop.reason
                logging.warning(
                    "stopped by %s at step %d; %s",
                    stopped_by,
                    done,
                    f"checkpoint saved in {ckpts.directory}" if saved else "nothing new to save",
                )
            return {
                "status": status,
                "step": done,
                "last": dict(last_logged),
                "checkpoint_dir": ckpts.directory,
                "stopped_by": stopped_by,
                "saved": saved,
            }


def peak_flops_per_device() -> float | None:
    return report.peak_flops_per_device(jax.devices()[0].device_kind)
