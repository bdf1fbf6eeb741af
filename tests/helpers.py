"""Helpers shared by several test files (no test file imports another): tiny configs, inputs, the
synthetic input pipeline, run and CLI helpers. The shared fixtures are in tests/conftest.py."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from configs import base
from flash_jax import sharding
from flash_jax.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------------- tiny models


# Chunks of 8 and sequences of 13-32 tokens: several chunks, documents inside and across them.
TINY = dict(
    num_layers=2,
    d_model=32,
    expansion_dim=64,
    qk_dim=16,
    chunk_size=8,
    num_heads=4,
    mlp_dim=64,
    vocab_size=64,
    max_len=64,
)


def tiny_model_config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, "name": name, **overrides})


def packed_segments(T=29):
    """Two rows: documents that start and end inside chunks, one spanning several chunks, and
    trailing padding; T is not a multiple of the chunk size 8."""
    row0 = [1] * 5 + [2] * 14 + [3] * 6 + [0] * (T - 25)
    row1 = [1] * 20 + [2] * (T - 20)
    return np.array([row0, row1], np.int32)


def random_tokens(key, shape, vocab=64):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab, dtype=jnp.int32)


def randomise(layer, seed):
    """Larger random parameters than the init, so every term of the layer matters."""
    key = jax.random.key(seed)
    for _, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Param):
            key, sub = jax.random.split(key)
            var.value = 0.5 * jax.random.normal(sub, var.value.shape, var.value.dtype)


# ------------------------------------------------------------------------ attention inputs and cost


QKV_HEADS, QKV_HEAD_DIM = 2, 8  # the heads and head width of qkv_inputs


def qkv_inputs(B, T, seed, scale=1.0):
    """q, k, v: float32 normal draws of [B, T, QKV_HEADS, QKV_HEAD_DIM], times `scale`."""
    rng = np.random.default_rng(seed)
    return [
        (scale * rng.normal(size=(B, T, QKV_HEADS, QKV_HEAD_DIM))).astype(np.float32)
        for _ in range(3)
    ]


def _avals(jaxpr):
    """All abstract values of a (closed) jaxpr, recursing into sub-jaxprs (scan, pjit, ...)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for var in list(jaxpr.invars) + list(jaxpr.constvars):
        yield var.aval
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _avals(sub)


def has_quadratic_array(fn, args, T):
    for aval in _avals(jax.make_jaxpr(fn)(*args)):
        shape = getattr(aval, "shape", ())
        if sum(d >= T for d in shape) >= 2 or int(np.prod(shape)) >= T * T:
            return True
    return False


def assert_no_T_by_T_array(attend, seed):
    """`attend(q, k, v, causal, segment_ids)` builds no `[T, T]`-sized array, forward or backward
    (T = 64 in chunks of 8, two documents and padding)."""
    T = 64
    seg = np.asarray([[1] * 20 + [2] * 40 + [0] * 4], np.int32)
    args = qkv_inputs(1, T, seed=seed)
    for causal in (True, False):

        def f(q, k, v, causal=causal):
            return attend(q, k, v, causal, seg)

        assert not has_quadratic_array(f, args, T)
        grad_f = jax.grad(lambda *a, f=f: jnp.sum(f(*a)), argnums=(0, 1, 2))
        assert not has_quadratic_array(grad_f, args, T)


def num_instructions(hlo_text):
    return len(re.findall(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=", hlo_text, flags=re.MULTILINE))


# --------------------------------------------------- in-process training runs (tests/test_train.py)


class SyntheticPipeline:
    """Deterministic learnable batches (arithmetic progressions) keyed by batch position."""

    nan_from: int | None = None  # batches from this position on get nan weights (fault test)

    def __init__(
        self,
        data_config,
        split="train",
        *,
        mesh=None,
        seed=0,
        shuffle=True,
        repeat=True,
        start_batch=0,
        rules=sharding.DEFAULT_RULES,
    ):
        self.config, self.split, self.seed, self.repeat = data_config, split, seed, repeat
        self.position = start_batch
        cfg = data_config
        self.layout = {  # the keys of data.host_layout
            **{k: getattr(cfg, k) for k in ("batch_size", "seq_len", "shuffle_buffer")},
            "use_cached": cfg.use_cached,
            **{"processes": 1, "process_index": 0, "sharded_by": "documents", "seed": seed},
            **{"batch_per_host": cfg.batch_size, "task": "synthetic", "documents": None},
        }
        spec = sharding.logical_to_spec(("batch", "length"), rules, mesh.axis_names)
        self.sharding = NamedSharding(mesh, spec)

    def __iter__(self):
        return self

    def __next__(self):
        if not self.repeat and self.position >= 2:
            raise StopIteration
        B, T = self.config.batch_size, self.config.seq_len
        rng = np.random.default_rng([self.seed, self.position, self.split == "train"])
        start, stride = rng.integers(0, 50, (B, 1)), rng.integers(1, 4, (B, 1))
        tokens = (start + stride * np.arange(T + 1)) % 50 + 5
        weights = np.ones((B, T), np.float32)
        if self.nan_from is not None and self.position >= self.nan_from:
            weights[:] = np.nan
        self.position += 1
        batch = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": weights,
            "segment_ids": np.ones((B, T)),
            "positions": np.broadcast_to(np.arange(T), (B, T)),
        }
        return {
            k: jax.device_put(v.astype(np.float32 if k == "weights" else np.int32), self.sharding)
            for k, v in batch.items()
        }

    def save_state(self, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "synthetic.json"), "w") as f:
            json.dump({"position": self.position}, f)

    def restore_state(self, directory):
        with open(os.path.join(directory, "synthetic.json")) as f:
            self.position = json.load(f)["position"]

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tiny_train_config(**train):
    config = base.get_config()
    m = config.model
    m.name = "flash"
    m.num_layers, m.d_model, m.expansion_dim, m.qk_dim, m.chunk_size = 2, 32, 64, 16, 8
    m.num_heads, m.mlp_dim, m.max_len = 2, 64, 32
    m.vocab_size = 4096  # the shipped vocabulary (the loop checks it fits)
    config.data.seq_len, config.data.batch_size = 32, 8
    t = config.train
    t.num_steps, t.log_every, t.checkpoint_every, t.keep_checkpoints = 6, 1, 2, 5
    t.eval_every, t.eval_batches, t.warmup_steps, t.learning_rate = 3, 2, 2, 1e-2
    t.update(train)
    return config


def read_jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(workdir) if "loss" in r}


def restore_params(workdir, config):
    from flash_jax.train import checkpoint, loop, step  # here: the loop imports TensorFlow

    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        ckpts = checkpoint.Checkpoints(workdir, 5)
        try:
            state, meta = ckpts.restore(fns.abstract_state)
        finally:
            ckpts.close()
    return jax.tree.map(np.asarray, state), meta


def sigterm_at(step_to_stop):
    def hook(done):
        if done == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def files_under(directory):
    return sorted(
        os.path.relpath(os.path.join(root, f), directory)
        for root, _, names in os.walk(directory)
        for f in names
    )


# -------------------------------------------------- the tiny eval run, eval.py (tests/test_eval.py)


SEQ_LEN = 32
WORDS = "the of and to a in that it was her not be he his as you she with for had".split()


def _write_corpus(root):
    """Train and validation books, no test/ folder."""
    rng = np.random.default_rng(0)
    books = {}
    for split, sizes in (("train", [400, 250, 300]), ("validation", [260, 45, 170])):
        os.makedirs(os.path.join(root, split))
        for i, n in enumerate(sizes):
            words = rng.choice(WORDS, size=n)
            text = "\n".join(" ".join(words[j : j + 11]) for j in range(0, n, 11)) + "\n"
            with open(os.path.join(root, split, f"{100 + i}.txt"), "w") as f:
                f.write(text)
            books.setdefault(split, []).append(text)
    return books


def tiny_eval_run_config(corpus, name="flash"):
    config = base.get_config()
    config.model.update(
        name=name,
        num_layers=2,
        d_model=32,
        expansion_dim=64,
        qk_dim=16,
        chunk_size=8,  # 4 chunks per window: the cross-chunk (linear) part is used
        num_heads=2,
        mlp_dim=64,
        max_len=SEQ_LEN,
    )
    config.data.update(data_dir=str(corpus), seq_len=SEQ_LEN, batch_size=8, shuffle_buffer=16)
    config.train.update(
        num_steps=2,
        log_every=1,
        eval_every=0,
        checkpoint_every=1,
        keep_checkpoints=3,
        warmup_steps=1,
        learning_rate=1e-2,
    )
    return config


def train_tiny_run(root, name="flash"):
    """Trains a tiny `name` model (once per pytest session and root) and returns (workdir,
    validation texts)."""
    workdir, corpus, done = root / "run", root / "corpus", root / "DONE"
    if not done.exists():
        from flash_jax.train import loop

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        books = _write_corpus(corpus)
        summary = loop.train_and_evaluate(tiny_eval_run_config(corpus, name), str(workdir))
        assert summary["status"] == "done" and summary["step"] == 2
        done.write_text(json.dumps(books))
    return str(workdir), json.loads(done.read_text())["validation"]


def eval_cli(*args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "eval.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(folder):
    found = []
    for where, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(where, name)
            found.append(
                (os.path.relpath(path, folder), os.path.getsize(path), os.stat(path).st_mtime_ns)
            )
    return sorted(found)


def error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


# ------------------------------------------------------------------------------------------ scripts


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """scripts/<script> with `args` in a CPU-only subprocess of this checkout."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", script), *args],
        cwd=REPO,
        # PYTHONPATH: this checkout's flash_jax, whatever copy of the package is installed.
        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )


def free_port() -> int:
    """A TCP port nothing listens on now (for a coordinator of several local processes)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
