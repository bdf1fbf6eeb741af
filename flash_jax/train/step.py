"""Train state, sharded initialisation, and the jitted train and eval steps.

The train state is a plain pytree of arrays, so that `jax.jit` shardings, donation and Orbax see
ordinary arrays:

    {"step": int32[], "params": nnx.State, "opt_state": optax state, "rng": uint32[2] key data}

The model is rebuilt inside the step with `nnx.merge(graphdef, params, rest)`; `rest` holds the
model's non-trained variables (e.g. RNG streams), is re-created from the seed and never updated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flash_jax import losses, models, sharding
from flash_jax.train import optim

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
BATCH_AXES = ("batch", "length")


@dataclasses.dataclass
class StepFns:
    """Everything the loop needs to build, run and checkpoint one model on one mesh."""

    mesh: jax.sharding.Mesh
    graphdef: Any
    abstract_state: Any  # ShapeDtypeStructs carrying their shardings (Orbax restore target)
    abstract_rest: Any  # the non-trained variables, likewise (to compile without values)
    state_shardings: Any
    batch_sharding: NamedSharding
    schedule: optax.Schedule
    num_params: int
    init_state: Callable[[], Any]
    init_rest: Callable[[], Any]
    train_step: Callable  # (state, rest, batch) -> (state, metrics); state is donated
    eval_step: Callable  # (params, rest, batch) -> (nll_sum, weight_sum)


def data_parallel_size(mesh: jax.sharding.Mesh, rules) -> int:
    """How many ways the batch dimension is split on `mesh` under the logical `rules`."""
    return sharding.shard_count(mesh, "batch", rules)


def _reseed(model, key) -> None:
    """Gives every RNG stream of the model (dropout, if any) a key derived from `key`."""
    tags = sorted(
        {node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}
    )
    if tags:
        nnx.reseed(model, **{tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)})


def summed_grads(
    graphdef,
    params,
    rest,
    batch,
    key,
    *,
    accum: int = 1,
    loss_blocks: int = 1,
    batch_shards: int = 1,
    rules=None,
):
    """Gradients of the summed token NLL, with that sum and the summed weight.

    With `loss_blocks` > 1 the loss takes the final hidden states and the output projection
    and scores the tokens in blocks (`losses.blocked_head_cross_entropy`): no `[B, T, V]`
    logits; `batch_shards` (the mesh's data-parallel size) keeps the head gradient's sum over
    the blocks on each device.

    With `accum` > 1 the batch is cut into `accum` micro-batches, run one after another (a
    scan: activation memory of one micro-batch) and summed, which equals the whole batch at once.
    Micro-batch i takes rows i, i + k, i + 2k, ...: each device keeps its own rows, so the split
    moves no data between devices.
    """
    rules = sharding.DEFAULT_RULES if rules is None else rules

    def micro_batch_grads(micro_batch, micro_key):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            _reseed(model, micro_key)
            inputs = (micro_batch["inputs"], micro_batch["segment_ids"], micro_batch["positions"])
            targets, weights = micro_batch["targets"], micro_batch["weights"]
            if loss_blocks > 1:
                x_BTD = model.hidden(*inputs)
                kernel_DV = model.head_kernel(x_BTD.dtype)
                return losses.blocked_head_cross_entropy(
                    x_BTD, kernel_DV, targets, weights, loss_blocks, batch_shards
                )
            return losses.cross_entropy(model(*inputs), targets, weights)

        (nll_sum, weight_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, nll_sum, weight_sum

    if accum == 1:
        return micro_batch_grads(batch, jax.random.fold_in(key, 0))

    def split(x_BT):
        x_MkT = x_BT.reshape(x_BT.shape[0] // accum, accum, *x_BT.shape[1:])
        return sharding.constrain(jnp.swapaxes(x_MkT, 0, 1), (None, *BATCH_AXES), rules)

    def body(carry, xs):
        micro_batch, i = xs
        out = micro_batch_grads(micro_batch, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, out), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
    micro = {k: split(batch[k]) for k in BATCH_KEYS}
    summed, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    return summed


def build(config, mesh: jax.sharding.Mesh) -> StepFns:
    """Abstract state, shardings and jitted functions for `config` on `mesh` (nothing runs yet)."""
    rules = config.mesh.rules
    seed = int(config.seed)

    def create_model():
        return models.create(config.model, rngs=nnx.Rngs(seed), sharding_rules=rules)

    graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(create_model), nnx.Param, ...)
    tx, schedule = optim.make_optimizer(config.train, optim.decay_mask(abs_params))
    abstract_state, state_shardings = _abstract_state(abs_params, tx, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    rest_shardings = jax.tree.map(lambda _: replicated, nnx.as_pure(abs_rest))
    abstract_rest = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        nnx.as_pure(abs_rest),
    )
    batch_sharding = NamedSharding(
        mesh, sharding.logical_to_spec(BATCH_AXES, rules, mesh.axis_names)
    )
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state["params"]))

    def init_state():
        model = create_model()
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        # The training key differs from the parameter-init key (both come from the seed).
        key = jax.random.fold_in(jax.random.key(seed), 1)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(key),
        }

    def init_rest():
        # Only the non-trained variables are returned; XLA drops the parameter initialisers.
        return nnx.as_pure(nnx.split(create_model(), nnx.Param, ...)[2])

    train_step = make_train_step(graphdef, tx, schedule, config.train, mesh, rules)
    return StepFns(
        mesh=mesh,
        graphdef=graphdef,
        abstract_state=abstract_state,
        abstract_rest=abstract_rest,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        schedule=schedule,
        num_params=num_params,
        init_state=jax.jit(init_state, out_shardings=state_shardings),
        init_rest=jax.jit(init_rest, out_shardings=rest_shardings),
        train_step=jax.jit(
            train_step,
            in_shardings=(state_shardings, rest_shardings, batch_shardings),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        ),
        eval_step=jax.jit(
            make_eval_step(graphdef),
            in_shardings=(state_shardings["params"], rest_shardings, batch_shardings),
            out_shardings=replicated,
        ),
    )


def _abstract_state(abs_params, tx: optax.GradientTransformation, mesh, rules):
    """The train state's ShapeDtypeStructs, each carrying its sharding, and those shardings."""
    # Variables (with their logical axes) go through tx.init so that the optimizer state inherits
    # the parameters' metadata, hence their shardings.
    abs_state_vars = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abs_params,
        "opt_state": jax.eval_shape(tx.init, abs_params),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    state_shardings = sharding.param_shardings(abs_state_vars, mesh, rules, strict=False)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.as_pure(abs_state_vars),
        state_shardings,
    )
    return abstract_state, state_shardings


def make_train_step(graphdef, tx, schedule: optax.Schedule, train_config, mesh, rules):
    """(state, rest, batch) -> (new state, metrics): one optimizer step on the batch's mean
    token loss (summed over `train_config.grad_accum_steps` micro-batches), not yet jitted."""
    accum = int(train_config.grad_accum_steps)
    loss_blocks = int(train_config.loss_blocks)

    def train_step(state, rest, batch):
        params = state["params"]
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grads, nll_sum, weight_sum = summed_grads(
            graphdef,
            params,
            rest,
            batch,
            step_key,
            accum=accum,
            loss_blocks=loss_blocks,
            batch_shards=data_parallel_size(mesh, rules),
            rules=rules,
        )
        # Summed losses / summed weights: k micro-batches give the mean over the whole batch.
        denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll_sum / denom
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        step_metrics = {
            "loss": loss,
            "weight_sum": weight_sum,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state["step"]), jnp.float32),
        }
        return new_state, step_metrics

    return train_step


def make_eval_step(graphdef):
    """(params, rest, batch) -> (summed NLL, summed weight), not yet jitted."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        logits_BTV = model(
            batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
        )
        return losses.cross_entropy(logits_BTV, batch["targets"], batch["weights"])

    return eval_step


def put_batch(batch: dict, batch_sharding: NamedSharding) -> dict:
    """The step's inputs from a pipeline batch (a no-op when already laid out as the step wants)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"input batch lacks key(s) {missing}; it has {sorted(batch)}")
    return {k: jax.device_put(batch[k], batch_sharding) for k in BATCH_KEYS}
