"""scripts/benchmark.py and scripts/replicate.py: the numbers they compute (against hand-made
references) and that both run end to end at a tiny size into well-formed outputs; the scripts of
scripts/bench: their flags, and some end to end. Not timed."""

import importlib
import inspect
import json
import math
import os

import pytest
from absl import flags

from flash_jax import cli, runs
from flash_jax.config import ModelConfig
from flash_jax.tools import benchmarks
from flash_jax.train import flops
from scripts import benchmark, replicate
from scripts.bench import profile_step
from tests.helpers import REPO, run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- speed-up measure


def test_first_reach_interpolates_between_eval_points():
    # 32 at x=200 and 28 at x=300: 30 is reached half-way, at 250.
    assert replicate.first_reach([100, 200, 300], [45.0, 32.0, 28.0], 30.0) == pytest.approx(250.0)
    # Already at the target at its first point: that point (nothing earlier to interpolate with).
    assert replicate.first_reach([100, 200], [29.0, 20.0], 30.0) == 100.0
    # Exactly equal counts as reached.
    assert replicate.first_reach([100, 200], [40.0, 30.0], 30.0) == pytest.approx(200.0)
    assert replicate.first_reach([100, 200], [40.0, 31.0], 30.0) is None
    with pytest.raises(ValueError, match="x values"):
        replicate.first_reach([1, 2], [3.0], 1.0)


def test_speedup_at_equal_perplexity_on_hand_made_curves():
    baseline_x, baseline_ppl = [100, 200, 300, 400], [50.0, 40.0, 35.0, 30.0]
    # Candidate reaches the baseline's final perplexity 30 at step 200 + (32 - 30) / 4 * 100 = 250.
    got = replicate.speedup_at_equal_perplexity(
        baseline_x, baseline_ppl, [100, 200, 300, 400], [45.0, 32.0, 28.0, 25.0]
    )
    assert got["target_perplexity"] == 30.0
    assert got["baseline"] == 400.0
    assert got["candidate"] == pytest.approx(250.0)
    assert got["speedup"] == pytest.approx(400.0 / 250.0)
    # The same measure in wall time: uneven x spacing, target between 10 s (36) and 30 s (26).
    got = replicate.speedup_at_equal_perplexity(
        [60.0, 120.0], [40.0, 30.0], [10.0, 30.0, 50.0], [36.0, 26.0, 20.0]
    )
    assert got["candidate"] == pytest.approx(10.0 + 6.0 / 10.0 * 20.0)
    assert got["speedup"] == pytest.approx(120.0 / 22.0)
    # Never reached: reported as such, no number.
    got = replicate.speedup_at_equal_perplexity(baseline_x, baseline_ppl, [100, 400], [60, 31])
    assert got["candidate"] is None and got["speedup"] is None


def test_read_curve_accumulates_training_time_and_skips_eval_time(tmp_path):
    records = [
        {"step": 2, "loss": 5.0, "step_time": 1.0},  # steps 1-2 at 1 s each: 2 s
        {"step": 2, "eval_loss": 4.0, "eval_perplexity": math.exp(4.0)},
        {"step": 4, "loss": 4.5, "step_time": 3.0},  # steps 3-4 at 3 s: 8 s
        {"step": 4, "eval_loss": 3.9, "eval_perplexity": 50.0},  # first record of step 4 ...
        {"step": 4, "eval_loss": 3.8, "eval_perplexity": math.exp(3.8)},  # ... a resume's wins
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    curve = runs.training_curve(str(tmp_path))
    assert curve["step"] == [2, 4]
    assert curve["train_time_s"] == pytest.approx([2.0, 8.0])
    assert curve["eval_perplexity"] == pytest.approx([math.exp(4.0), math.exp(3.8)])
    assert curve["mean_step_time_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        runs.training_curve(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- FLOP counts


def _cfg(name, **kw):
    base = dict(
        name=name,
        num_layers=2,
        d_model=8,
        expansion_dim=16,
        qk_dim=4,
        chunk_size=4,
        num_heads=2,
        mlp_dim=32,
        vocab_size=10,
        max_len=16,
    )
    return ModelConfig(**{**base, **kw})


def test_analytic_flops_formulas_by_hand():
    tokens, params = 64, 1000
    embed = 10 * 8  # vocab x d: a lookup, no FLOPs
    dense = 6 * (params - embed) * tokens
    # Transformer++: 3 (fwd + bwd) * L * 4 T d per token.
    got = flops.analytic_flops(_cfg("transformer_pp"), 16, tokens, params)
    assert got["dense"] == dense
    assert got["attention"] == 3 * 2 * (4 * 16 * 8) * tokens
    # Vanilla Transformer: the position table (max_len x d) is a lookup too.
    got = flops.analytic_flops(_cfg("transformer"), 16, tokens, params)
    assert got["dense"] == 6 * (params - embed - 16 * 8) * tokens
    # FLASH-Quad: 3 * L * 2 T (s + e).
    got = flops.analytic_flops(_cfg("flash_quad"), 16, tokens, params)
    assert got["attention"] == 3 * 2 * (2 * 16 * (4 + 16)) * tokens
    # FLASH: 3 * L * (2 C (s + e) + 4 s e), independent of T when C divides T.
    for T in (8, 16):
        got = flops.analytic_flops(_cfg("flash"), T, tokens, params)
        assert got["attention"] == 3 * 2 * (2 * 4 * (4 + 16) + 4 * 4 * 16) * tokens
    # A padded last chunk is computed: T = 6 with C = 4 runs 8 positions.
    got = flops.analytic_flops(_cfg("flash"), 6, tokens, params)
    assert got["attention"] == pytest.approx(3 * 2 * (2 * 4 * 8 / 6 * 20 + 4 * 4 * 16) * tokens)
    # Bidirectional FLASH: own chunk's linear block (2 C s) and both carries (6 s e).
    got = flops.analytic_flops(_cfg("flash", causal=False), 16, tokens, params)
    assert got["attention"] == 3 * 2 * (2 * 4 * (8 + 16) + 6 * 4 * 16) * tokens
    assert got["total"] == got["dense"] + got["attention"]
    assert got["position_bias"] == 0  # Toeplitz bias (span <= 512): a gather, no FLOPs
    # FLASH-Quad over 512 tokens: the RoPE-form bias, one [T, T] x s matmul per layer and step.
    got = flops.analytic_flops(_cfg("flash_quad", max_len=1024), 1024, 1024, params)
    assert got["position_bias"] == 3 * 2 * (2 * 1024 * 1024 * 4)
    assert got["total"] == got["dense"] + got["attention"] + got["position_bias"]


def test_analytic_flops_of_performer_and_combiner_by_hand():
    tokens, params = 64, 1000
    # Performer, d = 8 in 2 heads of 4, M = 16 features, C = 4: features 4 M d (forward and input
    # gradient only: 2x), in-chunk 2 C (H M + d + H), sums and read-out 4 M (d + H) (both
    # directions: 8 M (d + H)), these three times (forward and backward).
    features = 2 * 2 * (4 * 16 * 8) * tokens
    got = flops.analytic_flops(_cfg("performer", random_features=16), 16, tokens, params)
    want = features + 3 * 2 * (2 * 4 * (32 + 8 + 2) + 4 * 16 * 10) * tokens
    assert got["attention"] == pytest.approx(want, rel=1e-12)
    got = flops.analytic_flops(
        _cfg("performer", random_features=16, causal=False), 16, tokens, params
    )
    want = features + 3 * 2 * (2 * 4 * (32 + 8 + 2) + 8 * 16 * 10) * tokens
    assert got["attention"] == pytest.approx(want, rel=1e-12)
    # Combiner, spans of 4 over 16 tokens: 4 d (C + G + 1); bidirectional 4 d (C + 2 (G + 1)).
    got = flops.analytic_flops(_cfg("combiner"), 16, tokens, params)
    assert got["attention"] == 3 * 2 * 4 * 8 * (4 + 4 + 1) * tokens
    got = flops.analytic_flops(_cfg("combiner", causal=False), 16, tokens, params)
    assert got["attention"] == 3 * 2 * 4 * 8 * (4 + 2 * 5) * tokens
    assert got["dense"] == 6 * (params - 10 * 8) * tokens and got["position_bias"] == 0


def test_flatness_verdict():
    rows = [
        dict(model="flash", context=T, step_time_median_s=t, error=None)
        for T, t in ((512, 1.0), (1024, 1.1), (8192, 1.19))
    ]
    flat = benchmark.flatness(rows)
    assert flat["within_20_percent"] is True
    assert flat["ratios"] == {512: 1.0, 1024: pytest.approx(1.1), 8192: pytest.approx(1.19)}
    rows[-1]["step_time_median_s"] = 1.3
    assert benchmark.flatness(rows)["within_20_percent"] is False
    assert benchmark.flatness(rows[:2])["within_20_percent"] is None  # 8192 not measured


def test_bad_flags_fail_with_one_line(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--contexts=512,1000", "--tokens_per_step=8192"])
    assert "1000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--models=flash,gpt"])
    assert "gpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # Performer has no choice of kernel: not silently flash_impl
        benchmark.parse_args(["--models=performer@pallas_gpu"])
    assert "performer has one attention implementation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replicate.parse_args(["--models=transformer_plus"])


# ----------------------------------------------------------------------------- end to end


def test_in_process_rows_that_cannot_run_become_error_rows(tmp_path):
    # 64-token rows of 256 tokens make batches of 4, which the 8 simulated devices (conftest)
    # cannot split: recorded per row (before any compile), not the end of the benchmark.
    # Quadratic models above --max_quadratic_context are skipped rows (nothing runs either).
    args = benchmark.parse_args(
        [
            "--models=flash,transformer_pp",
            "--contexts=64,128",
            "--tokens_per_step=256",
            "--max_quadratic_context=64",
            "--no-isolate",
        ]
    )
    rows, machine = benchmark.run_all(args)
    assert [(r["model"], r["context"]) for r in rows] == [
        ("flash", 64),
        ("flash", 128),
        ("transformer_pp", 64),
        ("transformer_pp", 128),
    ]
    for r in rows:
        assert set(r) == set(benchmark.ROW_KEYS)
        assert r["step_times_s"] == [] and r["step_time_median_s"] is None
        if r["model"] == "transformer_pp" and r["context"] == 128:
            assert r["error"].startswith("skipped")
        else:
            assert "divisible" in r["error"]
    assert machine["num_devices"] == 8
    md = benchmark.markdown(
        {
            "setup": {**vars(args), "models": args.models},
            "rows": rows,
            "machine": machine,
            "command": "test",
            "flash_flatness": benchmark.flatness(rows),
        }
    )
    assert "| FLASH | 128 | 2 | error: ValueError: data.batch_size (2)" in md
    assert "| Transformer++ | 128 | 2 | skipped" in md


def test_the_benchmark_config_takes_the_loss_blocks():
    """--loss_blocks reaches the row's config (train.loss_blocks), checked as the loop does."""
    assert "loss_blocks" in benchmark.CONFIG_FLAGS
    config = benchmarks.bench_config("flash", 64, tokens_per_step=256, loss_blocks=4)
    assert config.train.loss_blocks == 4 and config.data.seq_len == 64
    with pytest.raises(ValueError, match=r"train.loss_blocks \(3\) must divide data.seq_len"):
        benchmarks.bench_config("flash", 64, tokens_per_step=256, loss_blocks=3)


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    # The default mode: each model x context in a fresh process (one CPU device there).
    models, contexts = ("flash", "transformer_pp"), (32,)
    argv = [
        f"--models={','.join(models)}",
        f"--contexts={','.join(map(str, contexts))}",
        "--tokens_per_step=256",
        "--chunk_size=16",  # two chunks: FLASH's linear part runs
        "--vocab_size=256",
        "--repeats=2",
        "--warmup=1",
        f"--out_dir={tmp_path}",
        "--name=bench",
    ]
    benchmark.main(argv)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"command", "machine", "setup", "rows", "flash_flatness"} <= set(report)
    assert {"cpu", "cpu_cores", "jax_version", "device"} <= set(report["machine"])
    assert report["machine"]["num_devices"] == 1  # described by a child, not this process
    rows = report["rows"]
    assert [(r["model"], r["context"]) for r in rows] == [(m, T) for m in models for T in contexts]
    for r in rows:
        assert set(r) == set(benchmark.ROW_KEYS)
        assert r["error"] is None
        assert r["batch_size"] * r["context"] == 256
        assert len(r["step_times_s"]) == 2 and r["step_time_median_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(256 / r["step_time_median_s"])
        # On one device, XLA's count with the scanned layer body counted num_layers times
        # matches the analytic formula (matmuls dominate; on several devices the replicated
        # optimizer update adds per-device work the formula does not count). The raw count
        # misses num_layers - 1 layers.
        assert r["flops_compiled"] / r["flops_analytic"] == pytest.approx(1.0, abs=0.05)
        assert r["flops_compiled_raw"] < 0.8 * r["flops_compiled"]
        assert r["mfu"] is None  # no known peak for a CPU
    md = (tmp_path / "bench.md").read_text()
    for label in ("FLASH", "Transformer++"):
        assert sum(line.startswith(f"| {label} |") for line in md.splitlines()) == len(contexts)
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_replicate_end_to_end(tmp_path):
    argv = [
        "--models=flash,transformer_pp",
        f"--workdir={tmp_path / 'runs'}",
        f"--out_dir={tmp_path / 'out'}",
        "--name=rep",
        "--num_steps=2",
        "--eval_every=1",  # two eval points: a curve
        "--eval_batches=1",
        "--log_every=1",
    ]
    replicate.main(argv)
    report = json.loads((tmp_path / "out" / "rep.json").read_text())
    assert {"command", "machine", "setup", "models", "speedup", "baseline"} <= set(report)
    assert set(report["models"]) == {"flash", "transformer_pp"}
    for name, result in report["models"].items():
        curve = result["curve"]
        assert curve["step"] == [1, 2]
        assert all(p > 1 and math.isfinite(p) for p in curve["eval_perplexity"])
        assert curve["train_time_s"][0] < curve["train_time_s"][1]
        assert (tmp_path / "runs" / name / "metrics.jsonl").is_file()  # a real training run
    # Equal parameter budget: FLASH has twice the layers and about the same parameters.
    flash, tpp = report["models"]["flash"], report["models"]["transformer_pp"]
    assert flash["num_layers"] == 2 * tpp["num_layers"]
    assert flash["num_params"] == pytest.approx(tpp["num_params"], rel=0.1)
    assert set(report["speedup"]["flash"]) == {"step", "train_time_s"}
    md = (tmp_path / "out" / "rep.md").read_text()
    assert "| FLASH | 8 |" in md and "| Transformer++ | 4 |" in md
    assert "| 2 |" in md  # the per-step perplexity table
    assert (tmp_path / "out" / "rep.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_bench_decode_end_to_end(tmp_path):
    """The decode benchmark runs at a tiny size and writes its table, JSON and plot."""
    result = run_script(
        "bench/bench_decode.py",
        "--lengths=32,64",
        "--steps=4",
        "--repeats=1",
        "--chunk_size=16",
        f"--out_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_decode.json").read_text())
    rows = report["results"]
    assert {(r["model"], r["context"]) for r in rows} == {
        (m, L) for m in ("flash", "transformer_pp", "flash_quad") for L in (32, 64)
    }
    flash = [r for r in rows if r["model"] == "flash"]
    assert flash[0]["cache_bytes"] == flash[1]["cache_bytes"]  # constant-size state
    quad = sorted((r for r in rows if r["model"] == "flash_quad"), key=lambda r: r["context"])
    assert quad[1]["cache_bytes"] == 2 * quad[0]["cache_bytes"]  # keys and values grow
    assert all(r["tokens_per_sec"] > 0 for r in rows)
    assert (tmp_path / "bench_decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| context |" in result.stdout


# ----------------------------------------------------------------------------- profile_step


def _trace(*tracks):
    """A Perfetto/Chrome trace: (process, thread, [(name, dur_us, args)]) per track."""
    events = []
    for pid, (process, thread, kernels) in enumerate(tracks):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}})
        events.append(
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": 0, "args": {"name": thread}}
        )
        for name, dur, args in kernels:
            events.append({"ph": "X", "pid": pid, "tid": 0, "name": name, "dur": dur, "args": args})
    return {"traceEvents": events}


def test_profile_counts_each_device_kernel_once():
    # A GPU trace has the kernels on stream tracks and the same time again on op/module tracks:
    # only the streams count. A TPU trace: its "XLA Ops" track. A CPU trace: the hlo_op events.
    gpu = _trace(
        ("/device:GPU:0", "Stream #7(compute)", [("nvjet_gemm", 3000, {}), ("fusion_1", 500, {})]),
        ("/device:GPU:0 ", "XLA Ops", [("fusion.1", 3500, {})]),
        ("/host:CPU", "python", [("train_step", 9000, {"hlo_op": "x"})]),
    )
    assert [e["name"] for e in profile_step.device_events(gpu)] == ["nvjet_gemm", "fusion_1"]
    tpu = _trace(
        ("/device:TPU:0", "XLA Modules", [("jit_train_step", 4000, {})]),
        ("/device:TPU:0", "XLA Ops", [("fusion.3", 1000, {}), ("convolution.2", 2500, {})]),
    )
    assert [e["name"] for e in profile_step.device_events(tpu)] == ["fusion.3", "convolution.2"]
    cpu = _trace(("/host:CPU", "tf_XLACpu", [("dot.1", 700, {"hlo_op": "dot.1"}), ("py", 9, {})]))
    assert [e["name"] for e in profile_step.device_events(cpu)] == ["dot.1"]


def test_profile_groups_kernels_by_their_source_op_and_direction():
    hlo = (
        '  %fusion.1 = f32[4] fusion(%p), metadata={op_name="jit(train_step)/jvp()/while/body/'
        'closed_call/bgik,bgke->bgie/dot_general" stack_frame_id=3}\n'
        '  ROOT %fusion.2 = f32[4] fusion(%q), metadata={op_name="jit(train_step)/transpose('
        'jvp())/while/body/checkpoint/mul"}\n'
    )
    sources = profile_step.op_sources(hlo)
    assert profile_step.short_source(sources["fusion.1"]) == (
        "fwd closed_call/bgik,bgke->bgie/dot_general"
    )
    assert profile_step.short_source(sources["fusion.2"]) == "bwd mul"
    # TPU / CPU events name their HLO op; GPU kernels are named after it with "_" for "." and
    # point at the command buffer that launched them; library kernels map to nothing.
    events = [
        {"name": "fusion.1", "dur": 3000, "args": {"hlo_op": "fusion.1"}},
        {"name": "fusion_2", "dur": 1000, "args": {"hlo_op": "command_buffer_9"}},
        {"name": "fusion.2", "dur": 1000, "args": {"hlo_op": "fusion.2"}},
        {"name": "nvjet_sm90_tss", "dur": 500, "args": {"hlo_op": "command_buffer_9"}},
    ]
    total, kernels, by_source = profile_step.summarize(events, sources, steps=2, top=5)
    assert total == 2.75  # ms per step
    assert kernels[0] == ("fusion.1", 1.5)
    assert dict(by_source) == {
        "fwd closed_call/bgik,bgke->bgie/dot_general": 1.5,
        "bwd mul": 1.0,
        "library nvjet_sm90_tss": 0.25,
    }


@pytest.mark.slow
def test_profile_step_end_to_end(tmp_path):
    """The profiler script traces a tiny step on the CPU and writes its two tables."""
    result = run_script("bench/profile_step.py", f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["device_ms_per_step"] > 0
    sources = [name for name, _ in report["by_source_ms"]]
    assert any(s.startswith("fwd ") for s in sources) and any(s.startswith("bwd ") for s in sources)
    assert "by source op" in result.stdout


@pytest.mark.slow
def test_profile_step_parts_end_to_end(tmp_path):
    """--mode=parts times a tiny FLASH step's parts on the CPU and writes its table."""
    tiny = ["--context=64", "--tokens_per_step=128", "--chunk_size=16", "--transformer_layers=1"]
    result = run_script(
        "bench/profile_step.py", "--mode=parts", *tiny, "--repeats=1", f"--out_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "step_parts.json").read_text())
    assert list(report["parts_ms"]) == [
        "attention op (xla)",
        "layer (xla)",
        "layer, attention replaced by v",
        "head + loss",
        "optimizer",
        "step",
    ]
    assert all(ms > 0 for ms in report["parts_ms"].values())
    assert "| step |" in (tmp_path / "step_parts.md").read_text()


# ----------------------------------------------------------------------------- scripts/bench


def docstring_commands(doc: str, script: str) -> list[list[str]]:
    """The arguments of each `python scripts/bench/<script>` line of a docstring (a trailing
    backslash in the docstring already joined a command's lines; [--flag] is an optional one)."""
    commands = []
    for line in doc.splitlines():
        words = line.split("#")[0].split()
        python = words[:1] in (["python"], [".venv/bin/python"])
        if python and words[1:2] == [f"scripts/bench/{script}"]:
            commands.append([word.strip("[]") for word in words[2:]])
    return commands


def test_every_bench_script_starts_with_commands_whose_flags_parse(monkeypatch):
    """One flag convention in scripts/bench: flags in the script's own FlagValues, read by
    `main(argv)`, and the docstring's commands (its first indented lines) parse."""
    monkeypatch.chdir(REPO)  # the commands' relative paths (--config files)
    scripts = sorted(os.listdir(os.path.join(REPO, "scripts", "bench")))
    scripts = [name for name in scripts if name.endswith(".py")]
    assert "profile_step.py" in scripts
    for script in scripts:
        module = importlib.import_module(f"scripts.bench.{script[:-3]}")
        assert isinstance(module.FLAGS, flags.FlagValues), script
        assert inspect.signature(module.main).parameters["argv"].default == (), script
        first_indented = next(line for line in module.__doc__.splitlines() if line[:4] == "    ")
        assert f"scripts/bench/{script}" in first_indented, script
        commands = docstring_commands(module.__doc__, script)
        assert commands, script
        for args in commands:
            try:
                cli.parse_script_flags(module.FLAGS, args, script)
            except SystemExit:
                pytest.fail(f"{script} {' '.join(args)}: does not parse (its error is above)")
