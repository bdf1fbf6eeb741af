"""Context parallelism: one sequence over the devices of a `sequence` mesh axis.

The sharded op must equal the op on the whole sequence. Both are float32; the whole-sequence op
is held to the float64 reference at rtol 1e-5 (forward) and 1e-4 (gradients) by test_ops.py, and
the sharded one only re-associates the same float32 sums (the other devices' edge runs are summed
apart and added to the passed state), so the two agree within twice those tolerances.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import base, quickstart
from flash_jax import models, sharding
from flash_jax.config import RunConfig
from flash_jax.layers import document_positions
from flash_jax.ops import attention, context_parallel
from flash_jax.tools import benchmarks
from flash_jax.train import loop, memory, step
from tests.helpers import REPO, tiny_model_config

C, S, E = 4, 8, 6
FWD_TOL, GRAD_TOL = 2e-5, 2e-4


def _mesh(n):
    return sharding.make_mesh([n], ["sequence"], devices=jax.devices()[:n])


# Stretches of 8 tokens (two chunks) on 4 devices. Row 0: one document over everything. Row 1:
# a document over devices 0-2 that ends mid-device 2, one ending exactly at a device edge, one
# starting at an edge, padding at the end. Row 2: short documents, one per chunk or less, and a
# document that starts in the last token of device 1.
SEGMENTS = np.array(
    [
        [1] * 32,
        [1] * 20 + [2] * 4 + [3] * 5 + [0] * 3,
        [1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4] + [4] * 9 + [5] * 4 + [0] * 3,
    ],
    np.int32,
)


def _inputs(seed=0):
    B, T = SEGMENTS.shape
    rng = np.random.default_rng(seed)
    shapes = [(B, T, S)] * 4 + [(B, T, E)]
    xs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
    bias = jnp.asarray(rng.normal(size=(C, C)), jnp.float32)
    d_out = jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32)
    return xs, bias, d_out


def _whole(causal, *xs_and_bias):
    *xs, bias = xs_and_bias
    return attention.mixed_chunk_attention(
        *xs, chunk_size=C, causal=causal, segment_ids=jnp.asarray(SEGMENTS), quad_bias=bias
    )


def _sharded(mesh, causal, *xs_and_bias):
    *xs, bias = xs_and_bias
    seq = P(None, "sequence")
    fn = jax.shard_map(
        functools.partial(
            context_parallel.mixed_chunk_attention_sharded,
            axis_name="sequence",
            chunk_size=C,
            causal=causal,
        ),
        mesh=mesh,
        in_specs=(seq,) * 6 + (P(),),
        out_specs=seq,
        check_vma=False,
    )
    return fn(*xs, jnp.asarray(SEGMENTS), bias)


def _out_and_grads(fn, xs, bias, d_out):
    out, vjp = jax.vjp(fn, *xs, bias)
    return out, vjp(d_out)


def _close(got, want, tol, name=""):
    scale = float(np.max(np.abs(want))) or 1.0
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=tol, atol=tol * scale, err_msg=name
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_sharded_flash_attention_equals_the_whole_sequence(causal):
    mesh = _mesh(4)
    xs, bias, d_out = _inputs()
    want, want_grads = jax.jit(lambda *a: _out_and_grads(functools.partial(_whole, causal), *a))(
        xs, bias, d_out
    )
    got, got_grads = jax.jit(
        lambda *a: _out_and_grads(functools.partial(_sharded, mesh, causal), *a)
    )(xs, bias, d_out)
    _close(got, want, FWD_TOL)
    for name, g, w in zip(
        ("qq", "kq", "ql", "kl", "v", "bias"), got_grads, want_grads, strict=True
    ):
        _close(g, w, GRAD_TOL, name)


def test_sharded_document_positions_equal_the_whole_sequence():
    mesh = _mesh(4)
    fn = jax.shard_map(
        functools.partial(context_parallel.document_positions_sharded, axis_name="sequence"),
        mesh=mesh,
        in_specs=P(None, "sequence"),
        out_specs=P(None, "sequence"),
        check_vma=False,
    )
    got = jax.jit(fn)(jnp.asarray(SEGMENTS))
    np.testing.assert_array_equal(got, document_positions(jnp.asarray(SEGMENTS)))


# ---------------------------------------------------------------------------------------------
# Whole models: the loss and every parameter's gradient with the sequence over 4 devices equal
# the unsharded model's. Float32; the layers compose the op's re-association error (above) with
# ordinary float32 work that GSPMD partitions by rows, so the op's tolerances hold.

MODEL_SEGMENTS = np.array(
    [
        [1] * 40 + [2] * 13 + [0] * 11,  # document 1 over three devices, padding at the end
        [1] * 16 + [2] * 21 + [3] * 27,  # a document that ends exactly at a device edge
    ],
    np.int32,
)


def _loss(model, tokens, seg):
    logp = jax.nn.log_softmax(model(tokens, segment_ids=seg)[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(seg[:, 1:] != 0, nll, 0.0)) / jnp.sum(seg[:, 1:] != 0)


def _loss_and_grads(model, tokens, seg):
    loss, grads = jax.jit(nnx.value_and_grad(_loss))(model, tokens, seg)
    return loss, nnx.state(grads)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, causal",
    [
        ("flash", True),
        ("flash", False),
        ("transformer_pp", True),
        ("flash_quad", True),
        ("performer", True),
        ("combiner", True),
    ],
)
def test_a_model_with_the_sequence_over_four_devices_equals_the_unsharded_one(name, causal):
    model = models.create(tiny_model_config(name, causal=causal), rngs=nnx.Rngs(0))
    seg = jnp.asarray(MODEL_SEGMENTS)
    tokens = jax.random.randint(jax.random.key(1), seg.shape, 0, 64, dtype=jnp.int32)
    want_loss, want_grads = _loss_and_grads(model, tokens, seg)
    mesh = sharding.make_mesh(
        (1, 1, 1, 4), ("data", "fsdp", "tensor", "sequence"), devices=jax.devices()[:4]
    )
    with jax.set_mesh(mesh):
        batch = jax.sharding.NamedSharding(mesh, P(None, "sequence"))
        got_loss, got_grads = _loss_and_grads(
            model, jax.device_put(tokens, batch), jax.device_put(seg, batch)
        )
    _close(got_loss, want_loss, FWD_TOL, "loss")
    got_leaves = jax.tree_util.tree_leaves_with_path(got_grads)
    for (path, got), want in zip(got_leaves, jax.tree.leaves(want_grads), strict=True):
        _close(got, want, GRAD_TOL, jax.tree_util.keystr(path))


def _step_config(name, causal, seq_len, mesh_shape):
    config = base.get_config()
    m = config.model
    m.name, m.causal = name, causal
    m.num_layers, m.d_model, m.expansion_dim, m.qk_dim, m.chunk_size = 2, 32, 64, 16, 8
    m.num_heads, m.mlp_dim, m.vocab_size, m.max_len = 2, 64, 64, seq_len
    config.data.seq_len, config.data.batch_size = seq_len, 2
    config.mesh.axis_names, config.mesh.shape = ("data", "fsdp", "tensor", "sequence"), mesh_shape
    return config


def _compiled_train_step(config, devices=4):
    mesh = sharding.make_mesh(
        config.mesh.shape, config.mesh.axis_names, devices=jax.devices()[:devices]
    )
    B, T = config.data.batch_size, config.data.seq_len
    ints = jax.ShapeDtypeStruct((B, T), jnp.int32)
    batch = {k: ints for k in step.BATCH_KEYS} | {
        "weights": jax.ShapeDtypeStruct((B, T), jnp.float32)
    }
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        return fns.train_step.lower(fns.abstract_state, fns.abstract_rest, batch).compile()


@pytest.mark.slow
@pytest.mark.parametrize("name, causal", [("flash", True), ("flash", False), ("performer", True)])
def test_constant_state_models_move_the_same_bytes_between_sequence_shards_at_any_context(
    name, causal
):
    """What crosses devices in the train step on a sequence axis of 4: the edge states (FLASH:
    one `[S, E]` sum per device and direction; Performer: `[H, M, D + 1]`), the loss's scalars
    and the parameters' gradients (replicated over the axis): the same bytes at 64 and 256
    tokens. Without the edge states GSPMD gathers 4x more at 4x the context."""
    moved = {}
    for T in (64, 256):
        hlo = _compiled_train_step(_step_config(name, causal, T, (1, 1, 1, 4))).as_text()
        moved[T] = benchmarks.collective_bytes(hlo)
    assert moved[64] == moved[256], moved
    assert "all-gather" in moved[64], moved  # the edge states


# ---------------------------------------------------------------------------------------------
# train.py as a user runs it: 4 CPU devices, the shipped corpus (packed documents cross the
# devices' edges), the sequence axis against the data axis on the same batches.


def _run(script, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_losses(workdir, model_name, mesh_shape):
    args = [
        "--config=configs/quickstart.py",
        f"--workdir={workdir}",
        f"--config.model.name={model_name}",
        "--config.model.num_layers=2",
        "--config.train.num_steps=4",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.mesh.axis_names=data,fsdp,tensor,sequence",
        f"--config.mesh.shape={mesh_shape}",
    ]
    _run("train.py", *args)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["flash", "transformer_pp"])
def test_train_py_with_the_sequence_over_four_devices_matches_data_parallel(tmp_path, model_name):
    """Float32 quickstart steps: relative 1e-4 (the model-level tolerances, compounded over 4
    optimizer steps, stay well inside it)."""
    sequence = _train_losses(tmp_path / "sequence", model_name, "1,1,1,4")
    data_parallel = _train_losses(tmp_path / "data", model_name, "4,1,1,1")
    assert len(sequence) == 4
    np.testing.assert_allclose(sequence, data_parallel, rtol=1e-4)
    # eval.py restores the run with its mesh: the sequence axis, here.
    result = _run("eval.py", f"--workdir={tmp_path / 'sequence'}", "--max_batches=1").stdout
    assert np.isfinite(json.loads(result.strip().splitlines()[-1])["loss"])


@pytest.mark.slow
def test_four_sequence_shards_cut_a_long_steps_temporaries_per_device():
    """The quickstart FLASH at 16,384 tokens (one sequence), compiled for this CPU: XLA's
    temporaries per device on 4 sequence shards are at most 0.4 of one device's (measured 0.26:
    activations fall 4x, the parameters' gradients and optimizer work do not)."""
    temporaries = {}
    for shards in (1, 4):
        config = quickstart.get_config()
        config.data.seq_len = config.model.max_len = 16384
        config.data.batch_size = 1
        config.mesh.axis_names = ("data", "fsdp", "tensor", "sequence")
        config.mesh.shape = (1, 1, 1, shards)
        compiled = _compiled_train_step(RunConfig.from_config(config), devices=shards)
        temporaries[shards] = memory.step_memory(compiled)["temporaries"]
    assert temporaries[4] <= 0.4 * temporaries[1], temporaries


# ---------------------------------------------------------------------------------------------
# Configuration.


def test_comma_separated_axis_names_parse_like_the_shape():
    config = base.get_config()
    config.mesh.axis_names = ("data,fsdp,tensor,sequence",)  # what the flag parser hands over
    config.mesh.shape = (1, 1, 1, 4)
    run = RunConfig.from_config(config)
    assert run.mesh.axis_names == ("data", "fsdp", "tensor", "sequence")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "flash", "chunk_size": 8}, r"data.seq_len \(48\) must be a multiple of 32 "),
        ({"name": "transformer_pp"}, None),
        ({"name": "flash", "chunk_size": 4, "flash_impl": "pallas_tpu"}, "flash_impl='pallas_tpu'"),
        ({"name": "transformer_pp", "attention_impl": "splash"}, "attention_impl='splash'"),
        ({"name": "performer", "chunk_size": 8}, r"must be a multiple of 32 "),
    ],
)
def test_a_sequence_that_does_not_split_into_whole_chunks_is_one_line(overrides, message):
    mesh = sharding.make_mesh((1, 4), ("data", "sequence"), devices=jax.devices()[:4])
    model = tiny_model_config(**overrides)
    if message is None:  # 48 tokens split over 4 devices, 12 each: no chunks to respect
        loop.check_sequence_fit(model, 48, mesh, sharding.DEFAULT_RULES)
        return
    with pytest.raises(ValueError, match=message):
        loop.check_sequence_fit(model, 48, mesh, sharding.DEFAULT_RULES)
