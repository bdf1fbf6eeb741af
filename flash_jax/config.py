"""The run's configuration, typed: frozen dataclasses built from the ConfigDict in one place.

The ConfigDict (`configs/*.py`, `--config.section.key=value`) is the user interface; its keys and
defaults are the fields of the dataclasses below (`configs/base.py` is `default_config_dict()`).
`RunConfig.from_config(config)` builds the typed tree, rejecting unknown keys and bad values with
one line naming the key; library code receives the typed pieces (the model `ModelConfig`, the data
pipeline `DataConfig`, the optimizer `TrainConfig`), never the ConfigDict. Checks that need devices
or data (the mesh against the devices, the vocabulary, the splits) run where those are: the loop
and `flash_jax.data.check_data`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from flash_jax.dispatch import ATTENTION_IMPLS, FLASH_IMPLS, PROJ_IMPLS
from flash_jax.sharding import DEFAULT_RULES

MODEL_NAMES = (
    "flash",
    "flash_quad",
    "transformer",
    "transformer_plus",
    "transformer_pp",
    "performer",
    "combiner",
)
# How tables and plots name the models (the paper's names).
DISPLAY_NAMES = {
    "flash": "FLASH",
    "flash_quad": "FLASH-Quad",
    "transformer": "Transformer",
    "transformer_plus": "Transformer+",
    "transformer_pp": "Transformer++",
    "performer": "Performer",
    "combiner": "Combiner",
}
# Models built from Transformer blocks (multi-head attention + FFN). Performer and Combiner are
# Transformer++ blocks (RoPE, SwiGLU) whose attention is FAVOR+ or Combiner's factorised softmax.
TRANSFORMER_BLOCKS = ("transformer", "transformer_plus", "transformer_pp", "performer", "combiner")
# Models whose decoding state does not grow with the context: they decode past model.max_len.
CONSTANT_STATE = ("flash", "performer")
# Models whose math depends on model.max_len, so that they run on at most max_len tokens: the
# vanilla Transformer's learned absolute positions (a max_len table) and FLASH-Quad's score scale
# n = max_len and its relative bias over that span. The others (FLASH's scale is C; RoPE) take
# any length (flash_jax.long_context evaluates them past it).
MAX_LEN_BOUND = ("transformer", "flash_quad")
NORMS = ("scale_norm", "layer_norm")
REL_POS = ("auto", "toeplitz", "rope", "none")
REMAT = ("none", "full", "save_proj", "save_attn")
DTYPES = ("float32", "bfloat16", "float16")
TOEPLITZ_MAX_LEN = 512  # the paper's switch from a Toeplitz bias to the RoPE-form bias
DATASETS = ("pg19", "wiki40b", "c4")
OBJECTIVES = ("lm", "mlm")
SOURCES = ("tfds", "local")
OPTIMIZERS = ("adamw", "adafactor")
DECAYS = ("cosine", "linear", "rsqrt", "constant")

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# The default corpus and vocabulary ship inside the package (no download needed).
SHIPPED_CORPUS = os.path.join(_PACKAGE, "data", "corpora", "austen-pg19.tar.xz")
SHIPPED_VOCAB = os.path.join(_PACKAGE, "data", "vocabs", "austen_spm_4k.model")
# The paper-scale vocabulary: T5's 32k SentencePiece model (needs GCS access).
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"


# ----------------------------------------------------------------------------- checks


def _check_int(section: str, key: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{section}.{key} must be an integer >= {low}, got {value!r}")


def _check_choice(section: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{key} must be one of {choices}, got {value!r}")


def _tuples(value):
    """Lists (from JSON: a saved run config) back to the tuples the config files write."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def _from_mapping(cls, section: str, config: Any, **extra):
    """`cls` from a ConfigDict or mapping (or `cls` itself); unknown keys are an error."""
    if isinstance(config, cls):
        return config
    values = dict(config.items()) if hasattr(config, "items") else dict(config)
    known = {f.name for f in dataclasses.fields(cls)} - set(extra)
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{section}." if section else ""
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    return cls(**values, **extra)


# ----------------------------------------------------------------------------- the sections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """`config.model`: what model code receives."""

    # flash | flash_quad | transformer | transformer_plus | transformer_pp | performer | combiner
    name: str = "flash"
    num_layers: int = 4
    d_model: int = 256
    expansion_dim: int = 512  # e = 2d
    qk_dim: int = 128  # s
    # C: FLASH's chunk (the paper uses 256), Combiner's span, Performer's prefix-sum chunk
    chunk_size: int = 128
    num_heads: int = 4  # Transformer baselines only
    mlp_dim: int = 1024  # Transformer FFN hidden width (4d; SwiGLU uses 2/3 of it per branch)
    random_features: int = 256  # Performer only: FAVOR+ random features per head (m ~ d log d)
    vocab_size: int = 4096  # must be >= the data vocabulary's size
    max_len: int = 512  # the training length; bounds only MAX_LEN_BOUND models (FLASH-Quad's n)
    causal: bool = True  # False: bidirectional (masked LM)
    dtype: str = "float32"  # compute dtype; "bfloat16" on accelerators
    param_dtype: str = "float32"
    norm: str = "scale_norm"  # scale_norm | layer_norm
    rel_pos: str = "auto"  # auto (toeplitz up to 512, rope beyond) | toeplitz | rope | none
    # none | full | save_proj (keep the tagged projection outputs, recompute the rest) |
    # save_attn (save_proj + the attention outputs: the backward never reruns attention)
    remat: str = "none"
    # True: the layer stack unrolled (straight-line code), not one scanned body: saved activations
    # are separate buffers, not slices of a stacked buffer the loop zero-fills and updates in place
    # (an 11% faster step on an H100: docs/benchmarks.md), at num_layers times the compile work.
    unroll_layers: bool = False
    # Transformer MHSA (flash_jax.ops.dot_product): auto (splash on TPU, cuDNN on GPU in bf16,
    # else XLA) | xla | cudnn | splash; what auto picks: flash_jax/dispatch.py
    attention_impl: str = "auto"
    flash_impl: str = "auto"  # FLASH attention: auto (XLA) | xla | pallas_tpu | pallas_gpu
    # The norm + input and gate + output projections as Pallas TPU kernels (ops/pallas_norm_proj.py
    # with ScaleNorm, pallas_gate.py): auto (XLA: not yet run on a TPU) | xla | pallas_tpu
    proj_impl: str = "auto"
    tie_embeddings: bool = False
    # Logical axis -> mesh axes for activation constraints: config.mesh.rules (not a model key).
    sharding_rules: tuple = DEFAULT_RULES

    def __post_init__(self):
        for key, choices in (
            ("name", MODEL_NAMES),
            ("norm", NORMS),
            ("rel_pos", REL_POS),
            ("remat", REMAT),
            ("attention_impl", ATTENTION_IMPLS),
            ("flash_impl", FLASH_IMPLS),
            ("proj_impl", PROJ_IMPLS),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
        ):
            _check_choice("model", key, getattr(self, key), choices)
        for key in (
            "num_layers",
            "d_model",
            "expansion_dim",
            "qk_dim",
            "chunk_size",
            "num_heads",
            "mlp_dim",
            "random_features",
            "vocab_size",
            "max_len",
        ):
            _check_int("model", key, getattr(self, key))
        if self.is_transformer and self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.num_heads "
                f"({self.num_heads})"
            )
        if self.rope_width % 2:
            raise ValueError(f"RoPE needs an even width, got {self.rope_width}")

    @classmethod
    def from_config(cls, config: Any, sharding_rules=None) -> ModelConfig:
        """From `config.model` (a ConfigDict or mapping); the sharding rules are config.mesh's
        (by default: those of a ModelConfig passed in, which comes back as it is, else
        DEFAULT_RULES)."""
        if isinstance(config, cls):
            if sharding_rules is None or sharding_rules == config.sharding_rules:
                return config
            return dataclasses.replace(config, sharding_rules=sharding_rules)
        rules = DEFAULT_RULES if sharding_rules is None else sharding_rules
        return _from_mapping(cls, "model", config, sharding_rules=rules)

    def to_dict(self) -> dict:
        """The `config.model` keys (the sharding rules belong to config.mesh)."""
        values = dataclasses.asdict(self)
        del values["sharding_rules"]
        return values

    @property
    def is_transformer(self) -> bool:
        """Built from Transformer blocks (multi-head attention + FFN), Performer and Combiner
        included."""
        return self.name in TRANSFORMER_BLOCKS

    @property
    def uses_glu(self) -> bool:
        """SwiGLU FFN: Transformer++ and the Transformer++ blocks of Performer and Combiner."""
        return self.name in ("transformer_pp", "performer", "combiner")

    @property
    def constant_state(self) -> bool:
        """Decodes with a state that does not grow with the context (past model.max_len)."""
        return self.name in CONSTANT_STATE

    @property
    def uses_rope(self) -> bool:
        return self.name != "transformer"

    @property
    def rope_width(self) -> int:
        return self.d_model // self.num_heads if self.is_transformer else self.qk_dim

    @property
    def rel_pos_kind(self) -> str:
        """The relative position bias of the quadratic parts (GAU models only)."""
        if self.rel_pos != "auto":
            return self.rel_pos
        quad_span = self.chunk_size if self.name == "flash" else self.max_len
        return "toeplitz" if quad_span <= TOEPLITZ_MAX_LEN else "rope"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`: what the input pipeline reads (flash_jax.data)."""

    dataset: str = "pg19"  # pg19 | wiki40b | c4
    objective: str = "lm"  # lm | mlm
    source: str = "local"  # tfds | local
    data_dir: str = SHIPPED_CORPUS  # local: PG-19-layout folder/.tar.xz or folder of .txt
    tfds_data_dir: str = ""  # tfds: TFDS data dir ("" = TFDS default)
    vocab: str = SHIPPED_VOCAB  # "byte" or a SentencePiece model path
    seq_len: int = 512
    batch_size: int = 8  # global, over all hosts
    mask_rate: float = 0.15  # mlm only
    shuffle_buffer: int = 1024
    prefetch: int = 2
    # "" tokenizes on the fly; a folder (local or gs://) reads seqio's offline cache of the task
    # there, built by scripts/data/cache_data.py (or seqio's cache_tasks_main; docs/data.md).
    use_cached: str = ""

    def __post_init__(self):
        for key, choices in (("dataset", DATASETS), ("objective", OBJECTIVES), ("source", SOURCES)):
            _check_choice("data", key, getattr(self, key), choices)
        for key in ("seq_len", "batch_size", "shuffle_buffer"):
            _check_int("data", key, getattr(self, key))
        _check_int("data", "prefetch", self.prefetch, low=0)
        if self.objective == "mlm" and not 0.0 < float(self.mask_rate) < 1.0:
            raise ValueError(f"data.mask_rate must be in (0, 1), got {self.mask_rate!r}")
        if self.source == "local" and not self.data_dir:
            raise ValueError("data.data_dir must name a local corpus when data.source is 'local'")
        if not isinstance(self.use_cached, str):
            raise ValueError(
                f"data.use_cached must be a folder of seqio's offline cache, or empty to tokenize "
                f"on the fly; got {self.use_cached!r}"
            )

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        return _from_mapping(cls, "data", config)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`config.train`: the schedule, the optimizer, logging, evaluation and checkpoints."""

    num_steps: int = 1000
    log_every: int = 10
    # A record (console line, metrics.jsonl, TensorBoard) also for the first step of a run (or of
    # a resume) and whenever this many seconds have passed since the last one, whatever log_every
    # says: slow steps never leave the console silent for long (0: log_every alone).
    log_every_seconds: int = 60
    eval_every: int = 200  # 0: no periodic evaluation
    eval_batches: int = 8
    eval_split: str = "validation"  # the split periodic eval reads
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    optimizer: str = "adamw"  # adamw | adafactor
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | rsqrt | constant
    end_learning_rate_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: no clipping
    grad_accum_steps: int = 1
    # The training loss scores the tokens in this many blocks along the sequence, the output
    # projection folded in, so that no [batch, length, vocab] logits are kept (a memory saving:
    # about 1.5 x 4 x vocab bytes per token of a device's batch, 12 GiB at 65,536 tokens and a
    # 32k vocabulary); 1: the logits whole. Must divide data.seq_len. Eval is unaffected.
    loss_blocks: int = 1
    # Checkpoints kept besides the newest keep_checkpoints (only steps whose own loss was finite):
    # every multiple of keep_every_steps, for good (0: none), and the keep_best with the lowest
    # eval loss (0: none; steps saved at eval steps compete).
    keep_every_steps: int = 0
    keep_best: int = 0
    # The run stops (one line, keeping the newest committed checkpoint) once this many saves in a
    # row have failed (a full disk, a quota, lost storage); 0: it trains on whatever fails, and
    # only a failed last save ends it with an error.
    max_failed_saves: int = 3
    # A jax.profiler trace of steps profile_start + 1 .. profile_start + profile_steps into the
    # run's tensorboard/ folder (0 steps: none); profile_port: a profiler server for on-demand
    # capture (0: none).
    profile_start: int = 0
    profile_steps: int = 0
    profile_port: int = 0
    # JAX's persistent compilation cache in this folder (local or gs://; "": JAX's default).
    compilation_cache_dir: str = ""

    def __post_init__(self):
        _check_choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train", "decay", self.decay, DECAYS)
        for key in (
            "num_steps",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "grad_accum_steps",
            "loss_blocks",
        ):
            _check_int("train", key, getattr(self, key))
        for key in (
            "log_every_seconds",
            "eval_every",
            "eval_batches",
            "warmup_steps",
            "keep_every_steps",
            "keep_best",
            "max_failed_saves",
            "profile_start",
            "profile_steps",
            "profile_port",
        ):
            _check_int("train", key, getattr(self, key), low=0)
        if self.profile_port > 65535:
            raise ValueError(
                f"train.profile_port must be a TCP port <= 65535, got {self.profile_port}"
            )
        if not isinstance(self.compilation_cache_dir, str):
            raise ValueError(
                "train.compilation_cache_dir must be a folder path, got "
                f"{self.compilation_cache_dir!r}"
            )
        for key in ("learning_rate", "weight_decay", "grad_clip", "end_learning_rate_fraction"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate!r}")

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates periodically."""
        return bool(self.eval_every and self.eval_batches)

    @classmethod
    def from_config(cls, config: Any) -> TrainConfig:
        return _from_mapping(cls, "train", config)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: the device mesh and the logical-axis rules (flash_jax/sharding.py)."""

    axis_names: tuple = ("data", "fsdp", "tensor")
    shape: tuple = (-1, 1, 1)  # -1 fills an axis with the remaining devices
    # Logical axis name -> mesh axes: parameters and activations are annotated with logical
    # names; this table decides data / FSDP / tensor parallelism.
    rules: tuple = DEFAULT_RULES
    # Slices joined by the data-center network (DCN), much slower than the links inside a slice:
    # TPU slices of a multi-slice run, or GPU hosts (JAX puts each host's GPUs in one slice). The
    # "data" axis spans them (data parallelism across slices: the gradients' all-reduce crosses
    # DCN) and the other axes stay inside each slice. mesh.shape is the whole mesh; its data entry
    # must be a multiple of the slice count. 0: as many as the devices lie in; N: exactly N
    # (a run on another count stops with one line).
    num_slices: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):  # tuples, also when the values come from JSON
            object.__setattr__(self, field.name, _tuples(getattr(self, field.name)))
        # `--config.mesh.axis_names=data,fsdp,tensor,sequence` arrives as one string.
        names = tuple(n.strip() for name in self.axis_names for n in str(name).split(","))
        object.__setattr__(self, "axis_names", names)
        if len(self.shape) != len(self.axis_names):
            raise ValueError(
                f"mesh.shape {self.shape} needs one entry per axis of mesh.axis_names "
                f"{self.axis_names}"
            )
        _check_int("mesh", "num_slices", self.num_slices, low=0)
        if self.num_slices > 1 and "data" not in self.axis_names:
            raise ValueError(
                f"mesh.num_slices={self.num_slices} needs a 'data' axis in mesh.axis_names "
                f"{self.axis_names}: data parallelism spans the slices"
            )

    @classmethod
    def from_config(cls, config: Any) -> MeshConfig:
        return _from_mapping(cls, "mesh", config)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """`config.log`: where results go besides the workdir (metrics.jsonl and TensorBoard are
    always written)."""

    # A Weights & Biases project: the main process logs the run's records there, with the
    # resolved config as the run's config; a resumed run continues the same W&B run (its id is
    # kept in the workdir). "" (the default): W&B is not imported. WANDB_MODE=offline works.
    wandb_project: str = ""

    def __post_init__(self):
        if not isinstance(self.wandb_project, str):
            raise ValueError(f"log.wandb_project must be a string, got {self.wandb_project!r}")

    @classmethod
    def from_config(cls, config: Any) -> LogConfig:
        return _from_mapping(cls, "log", config)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole config of a run; `from_config` is where a ConfigDict becomes typed."""

    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.data.seq_len > self.model.max_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_len ({self.model.max_len})"
            )
        if self.data.objective == "mlm" and self.model.causal:
            raise ValueError(
                "data.objective='mlm' needs a bidirectional model: set model.causal=False "
                "(--config.model.causal=false)"
            )
        if self.data.seq_len % self.train.loss_blocks:
            raise ValueError(
                f"train.loss_blocks ({self.train.loss_blocks}) must divide data.seq_len "
                f"({self.data.seq_len})"
            )
        if self.data.batch_size % self.train.grad_accum_steps:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by "
                f"train.grad_accum_steps ({self.train.grad_accum_steps})"
            )

    @classmethod
    def from_config(cls, config: Any) -> RunConfig:
        """From the ConfigDict (or a mapping: a saved config.json); ValueError names the key."""
        if isinstance(config, cls):
            return config
        values = dict(config.items()) if hasattr(config, "items") else dict(config)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        mesh = MeshConfig.from_config(values.get("mesh", {}))
        return cls(
            seed=values.get("seed", 0),
            model=ModelConfig.from_config(values.get("model", {}), sharding_rules=mesh.rules),
            data=DataConfig.from_config(values.get("data", {})),
            train=TrainConfig.from_config(values.get("train", {})),
            mesh=mesh,
            log=LogConfig.from_config(values.get("log", {})),
        )

    def to_dict(self) -> dict:
        """The ConfigDict's keys and values (as `config.json` and checkpoints record them)."""
        values = dataclasses.asdict(self)
        values["model"] = self.model.to_dict()
        return values


def default_config_dict() -> ml_collections.ConfigDict:
    """The base ConfigDict (configs/base.py): every key with its default."""
    return ml_collections.ConfigDict(RunConfig().to_dict())
