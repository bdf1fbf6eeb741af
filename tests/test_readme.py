"""The README's model example and its first-hour walkthrough run as written."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def test_readme_model_example_runs():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)
    example = next(b for b in blocks if "models.create" in b)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    logits = namespace["logits"]
    assert logits.shape == (2, 128, namespace["config"].model.vocab_size)
    assert logits.dtype == np.float32


# ----------------------------------------------------------------------------- the walkthrough

# Tiny sizes and few steps for the walkthrough's long commands (appended to them as written).
TINY_TRAIN = [
    "--config.model.num_layers=2",
    "--config.model.d_model=64",
    "--config.model.expansion_dim=128",
    "--config.model.qk_dim=32",
    "--config.model.chunk_size=16",
    "--config.model.mlp_dim=128",
    "--config.model.max_len=64",
    "--config.data.seq_len=64",
    "--config.data.batch_size=4",
    "--config.train.num_steps=4",
    "--config.train.log_every=2",
    "--config.train.eval_every=4",
    "--config.train.eval_batches=1",
    "--config.train.checkpoint_every=2",
]
LONG_COMMANDS = {  # what makes each command short
    "train.py": TINY_TRAIN,
    "eval.py": ["--max_batches=2"],
    "make train": TINY_TRAIN,
    "make eval": ["--max_batches=2"],
    "make sample": ["--num_tokens=8"],
    "make tensorboard": ["--inspect"],  # prints what the logdir holds and exits
}
# Library startup lines that a quiet console never shows (flash_jax/cli/console.py).
NOISE = (
    "E0000",
    "cuInit",
    "cudart_stub",
    "Unable to initialize backend",
    "InitializeLog",
    "fast data loading",  # TensorBoard's note
    "Given directory is read only",  # Orbax, to a reader that asked for exactly that
)


def walkthrough_commands() -> list[str]:
    """The commands of the README's "The first hour" block (continuations joined, comments cut)."""
    with open(README) as f:
        section = f.read().split("## The first hour", 1)[1]
    block = re.search(r"```\n(.*?)```", section, flags=re.DOTALL).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        command = line.split("#", 1)[0].strip()
        if command:
            commands.append(" ".join(command.split()))
    return commands


def shortened(command: str) -> list[str]:
    """The command as written, plus its tiny-size flags (make: in ARGS)."""
    argv = shlex.split(command)
    key = " ".join(argv[:2]) if argv[0] == "make" else argv[1]
    extra = LONG_COMMANDS.get(key, [])
    if argv[0] == "make":
        return argv + ([f"ARGS={' '.join(extra)}"] if extra else [])
    return argv + extra


@pytest.mark.slow  # 7 processes (two tiny trainings): about 70 s on 2 CPU cores
def test_readme_walkthrough_runs_as_written(tmp_path):
    """Each command of "The first hour", from a checkout where `make` has made .venv: here a
    directory of links to this checkout's files and a .venv with this interpreter's packages."""
    commands = walkthrough_commands()
    assert commands[0] == commands[1] == "make train" and len(commands) == 7, commands
    for name in ("Makefile", "pyproject.toml", "train.py", "eval.py", "scripts", "configs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    # A .venv sharing this interpreter's packages: its pyvenv.cfg and lib/ (when it is a venv).
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(os.path.realpath(sys.executable), venv / "bin" / "python")
    scripts_dir = os.path.dirname(sys.executable)
    os.symlink(os.path.join(scripts_dir, "tensorboard"), venv / "bin" / "tensorboard")
    if sys.prefix != sys.base_prefix:
        shutil.copy(os.path.join(sys.prefix, "pyvenv.cfg"), venv / "pyvenv.cfg")
        os.symlink(os.path.join(sys.prefix, "lib"), venv / "lib")
    (tmp_path / ".venv" / ".installed").touch()  # newer than pyproject.toml: no setup
    # A user's shell: not inside another make (CI runs the suite through `make test`, whose
    # MAKELEVEL / MAKEFLAGS would make these make commands print "Entering directory" lines).
    user_shell = ("TF_CPP", "JAX_PLATFORMS", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(user_shell)}
    env["PYTHONPATH"] = REPO  # this checkout's flash_jax (the venv has it installed)
    # The processes share compiled programs (evaluation compiles what training's eval did).
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

    outputs = []
    for command in commands:
        result = subprocess.run(
            shortened(command),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        text = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\n{text[-3000:]}"
        assert "Traceback" not in text, f"{command}\n{text[-3000:]}"
        noise = [line for line in text.splitlines() if any(n in line for n in NOISE)]
        assert not noise, f"{command}: {noise}"
        outputs.append(result)

    first, again, evaluated, _, tpp, compared, _ = (r.stderr for r in outputs)
    assert "train.py: done: 4 steps in runs/quickstart\n" in first
    assert "checkpoint: runs/quickstart/checkpoints/4" in first
    assert ".venv/bin/python eval.py --workdir=runs/quickstart\n" in first
    assert "already finished" in again and "compiled the train step" not in again
    result = json.loads(outputs[2].stdout.strip().splitlines()[-1])
    assert (result["workdir"], result["step"], result["batches"]) == ("runs/quickstart", 4, 2)
    assert "eval_py/validation_first2batches at step 4" in evaluated
    assert "It is a truth universally acknowledged" in outputs[3].stdout
    assert "train.py: done: 4 steps in runs/quickstart_tpp" in tpp
    assert "plot: runs/quickstart/eval/compare_validation.png" in compared
    assert os.path.getsize(tmp_path / "runs/quickstart/eval/compare_validation.png") > 0
    board = outputs[6].stdout  # --inspect: the tags of every run under runs/
    assert "runs/quickstart/tensorboard" in board and "runs/quickstart_tpp/tensorboard" in board
    assert "_hparams_/session_start_info" in board
    assert "eval_py/validation_first2batches/perplexity" in board


def test_the_readme_quotes_the_recorded_figures():
    """The figures the README gives about its own commands are the ones
    scripts/bench/readme_figures.py recorded (docs/results/readme_figures.json), so that they
    cannot drift apart."""
    with open(os.path.join(REPO, "docs", "results", "readme_figures.json")) as f:
        figures = json.load(f)
    with open(README) as f:
        text = " ".join(f.read().split())
    memory = figures["memory_example"]
    assert (
        f"needs about {memory['needs_gib']:.2f} GiB per device ... and the device has "
        f'{memory["device_gib"]:.2f} GiB", {memory["seconds"]} s after the command' in text
    )


def test_the_long_context_table_is_the_recorded_study():
    """The README's long-context rows are docs/results/long_context_cpu.json's perplexities
    (scripts/bench/long_context.py wrote it)."""
    with open(os.path.join(REPO, "docs", "results", "long_context_cpu.json")) as f:
        study = json.load(f)
    with open(README) as f:
        text = f.read()
    names = {"flash": "FLASH", "transformer_pp": "Transformer++", "combiner": "Combiner"}
    for run in study["runs"]:
        cells = []
        for label in ("512", "2048", "16384", "whole documents"):
            result = run["results"].get(label)
            cells.append("-" if result is None else f"{result['perplexity']:.2f}")
        row = f"| {names[run['model']]} | " + " | ".join(cells) + " |"
        assert row in text, row


def test_the_tpu_roofline_rows_are_the_recorded_compiles():
    """The README's train-step rows on v5p and v5e, on the XLA path and with the kernels, are
    scripts/op_cost.py's JSON rows in docs/results/op_cost_tpu/ (the 8-block row adds the blocks
    XLA's count leaves out: docs/benchmarks.md)."""
    with open(README) as f:
        text = f.read()
    results = os.path.join(REPO, "docs", "results", "op_cost_tpu")
    rows = [
        ("v5p-8", "whole float32 logits (the default)", "step_pg19_flash_v5p"),
        ("v5p-8", "whole logits, the projections' kernels", "step_pg19_flash_v5p_proj_kernels"),
        ("v5p-8", "whole logits, every kernel", "step_pg19_flash_v5p_all_kernels"),
        ("v5e-16", "whole float32 logits (the default)", "step_pg19_flash_v5e16"),
        ("v5e-16", "whole logits, the projections' kernels", "step_pg19_flash_v5e16_proj_kernels"),
        ("v5e-16", "whole logits, every kernel", "step_pg19_flash_v5e16_all_kernels"),
    ]
    for chips, label, name in rows:
        with open(os.path.join(results, name + ".json")) as f:
            step = json.load(f)["step"]
        # A v5p slice is named by its TensorCores, two per chip; a v5e slice by its chips.
        assert step["chips"] == int(chips.split("-")[1]) // (2 if chips.startswith("v5p") else 1)
        row = (
            f"| {chips} | {label} | {step['bytes_per_token'] / 1024:,.1f} | "
            f"{step['flops_per_token'] / 1e6:,.1f} | {step['model_flops_per_token'] / 1e6:,.1f} | "
            f"{step['roofline_step_seconds'] * 1e3:,.1f} ms | {step['bound']} | {step['mfu']:.1%} |"
        )
        assert row in text, row


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} minutes"


@pytest.mark.parametrize(
    "key, mention",
    [("make_train", "`make train`"), ("make_smoke", "`make smoke`"), ("ci_run", "`make test`")],
)
def test_the_readme_gives_the_recorded_times_of_its_commands(key, mention):
    """The README's time for `make train`, `make smoke` and `make test` (CI's `.ci/run` on a
    fresh clone: setup, libtpu and the whole suite) is the one readme_figures.py recorded,
    within the paragraph that first names the command."""
    with open(os.path.join(REPO, "docs", "results", "readme_figures.json")) as f:
        figure = json.load(f)[key]
    with open(README) as f:
        text = " ".join(f.read().split())
    start = text.index(f"{mention} ")
    near = text[start : start + 700]
    assert _minutes(figure["seconds"]) in near, (key, _minutes(figure["seconds"]), near)
    if key == "ci_run":
        assert f"{figure['passed']:,} tests" in near, near
