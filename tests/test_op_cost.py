"""scripts/op_cost.py: its HLO matmul count against hand-made programs, the largest instructions'
bytes against XLA's own count (flash_jax/tools/hlo_traffic.py), and a run end to end at a tiny
size (compiles only; nothing is timed)."""

import json

import jax
import jax.numpy as jnp
import pytest

from flash_jax.tools import hlo_traffic
from scripts import op_cost


def test_dot_flops_by_dtype_counts_each_dot_by_its_operand_dtypes():
    def program(a_bf16, b_bf16, c_f32):
        ab = jnp.einsum("bij,bjk->bik", a_bf16, b_bf16, preferred_element_type=jnp.float32)
        return ab @ c_f32  # [2, 3, 5] x [5, 7]: float32 x float32

    args = (
        jax.ShapeDtypeStruct((2, 3, 4), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 4, 5), jnp.bfloat16),
        jax.ShapeDtypeStruct((5, 7), jnp.float32),
    )
    text = jax.jit(program).lower(*args).as_text("hlo")
    flops = op_cost.dot_flops_by_dtype(text)
    # 2 x (output elements) x (contracted length)
    assert flops == {"bf16 x bf16": 2 * (2 * 3 * 5) * 4, "f32 x f32": 2 * (2 * 3 * 7) * 5}


def test_dot_flops_reads_names_per_computation():
    # The same instruction name in two computations: each dot uses its own computation's shapes.
    dims = "lhs_contracting_dims={1}, rhs_contracting_dims={1}"
    text = "\n".join(
        [
            "HloModule m",
            "",
            "inner {",
            "  x = f32[2,8]{1,0} parameter(0)",
            f"  ROOT d = f32[2,2]{{1,0}} dot(x, x), {dims}",
            "}",
            "",
            "ENTRY main {",
            "  x = bf16[4,3]{1,0} parameter(0)",
            f"  ROOT d = f32[4,4]{{1,0}} dot(x, x), {dims}",
            "}",
        ]
    )
    assert op_cost.dot_flops_by_dtype(text) == {"f32 x f32": 2 * 4 * 8, "bf16 x bf16": 2 * 16 * 3}


def test_dot_flops_reads_past_a_pallas_calls_cost_estimate():
    # A Pallas call's cost estimate spreads JSON over unindented lines inside a computation: they
    # are not headers, so the names defined above them stay known.
    dims = "lhs_contracting_dims={1}, rhs_contracting_dims={1}"
    text = "\n".join(
        [
            "ENTRY main {",
            "  x = bf16[4,3]{1,0} parameter(0)",
            '  k = bf16[4,3]{1,0} custom-call(x), backend_config={"cost_estimate": {',
            '"bytes_accessed":48,',
            '"flops":0',
            '}, "serialization_format": 1}',
            f"  ROOT d = f32[4,4]{{1,0}} dot(x, k), {dims}",
            "}",
        ]
    )
    assert op_cost.dot_flops_by_dtype(text) == {"bf16 x bf16": 2 * 16 * 3}


def test_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    path = tmp_path / "op_cost.json"
    tiny = ["--tokens=32", "--qk_dim=8", "--value_dim=16", "--chunk_size=4"]
    rows = op_cost.main(["--contexts=8,16", *tiny, f"--json={path}", "--remat=save_attn"])
    assert [row["context"] for row in rows] == [8, 16]
    for row in rows:
        for part in ("op", "layer"):
            cost = row[part]
            assert cost["bytes_per_token"] > 0 and cost["flops_per_token"] > 0
            assert cost["matmul_flops_per_token"]["bf16 x bf16"] > 0
        assert row["op"]["f32_matmul_share"] == 0.0  # bf16 inputs: bf16 matmuls only
    saved = json.loads(path.read_text())
    assert saved["rows"] == rows and saved["setup"]["remat"] == "save_attn"
    table = capsys.readouterr().out
    assert "| 8 |" in table and "| 16 |" in table


def test_the_causal_op_meets_its_traffic_bound_on_this_cpu():
    """The paper's shapes (S = 128, E = 2048, C = 256, bf16, 65,536 tokens, forward + backward),
    compiled for this CPU: at most 180 KiB per token at 1K and 32K, 32K within 1.1x of 1K, no
    float32 matmul. 166.6 KiB at both; 208.6 while the sums over tokens (k_lin^T v, q_lin^T dO)
    took their left operand transposed, which this backend runs in float32 on converted copies
    of v and dO (`state_passing.per_direction_transposed`)."""
    rows = op_cost.main(["--contexts=1024,32768", "--no-layer"])
    kib = [row["op"]["bytes_per_token"] / 1024 for row in rows]
    assert max(kib) <= 180 and kib[1] <= 1.1 * kib[0], kib
    assert [row["op"]["f32_matmul_share"] for row in rows] == [0.0, 0.0]


def test_one_layer_in_the_train_step(tmp_path, capsys):
    """`--layer_in_step`: quickstart's step with two layers less the step with one. XLA counts
    every matmul FLOP the analytic model count has (6 x the layer's parameters plus attention,
    per token) and the elementwise work besides (SiLUs, norms, the optimizer's update: 3.5%
    more at these widths), so its count lies within [1, 1.1] x the model's; a step counted
    whole, or a layer counted twice, would not."""
    path = tmp_path / "op_cost.json"
    tiny = ["--contexts=128", "--tokens=1024", "--no-layer", "--qk_dim=64", "--value_dim=256"]
    config = ["--config=configs/quickstart.py", "--layer_in_step"]
    op_cost.main([*tiny, *config, f"--json={path}"])
    step = json.loads(path.read_text())["step"]
    layer = step["layer"]
    assert 1.0 <= layer["flops_per_token"] / layer["model_flops_per_token"] <= 1.1, layer
    assert 0 < layer["bytes_per_token"] < step["bytes_per_token"] / 2, layer
    assert "one layer in the step:" in capsys.readouterr().out


def test_the_largest_instructions_attribute_the_compiled_programs_bytes():
    """hlo_traffic.instructions sums to XLA's own "bytes accessed" on programs whose operands are
    read whole: three fusions exactly, and a scanned loop (its body listed, the loop itself not
    counted) within its condition's few bytes."""

    def two_layers(x, w1, w2):
        return jnp.tanh(x @ w1) @ w2

    def scanned(x, w1, w2):
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ w1), None), x, None, length=3)
        return h @ w2

    args = (jnp.ones((512, 256)), jnp.ones((256, 256)), jnp.ones((256, 128)))
    for fn, slack in ((two_layers, 0), (scanned, 64)):
        compiled = jax.jit(fn).lower(*args).compile()
        rows = hlo_traffic.instructions(compiled.as_text())
        sizes = [row["bytes"] for row in rows]
        assert abs(sum(sizes) - compiled.cost_analysis()["bytes accessed"]) <= slack, rows
        assert sizes == sorted(sizes, reverse=True)


def test_top_lists_the_layer_programs_largest_instructions(capsys):
    tiny = ["--contexts=16", "--tokens=64", "--qk_dim=8", "--value_dim=16", "--chunk_size=4"]
    rows = op_cost.main([*tiny, "--top=3"])
    largest = rows[0]["layer"]["largest"]
    assert len(largest) == 3 and "largest" not in rows[0]["op"]
    assert sum(r["bytes"] for r in largest) <= rows[0]["layer"]["bytes_per_token"]
    assert "layer at 16: largest instructions" in capsys.readouterr().out


def test_bad_arguments_name_the_flag():
    with pytest.raises(SystemExit):
        op_cost.parse_args(["--tokens=100", "--contexts=64"])  # 64 does not divide 100
    with pytest.raises(SystemExit):
        op_cost.parse_args(["--value_dim=15"])
    with pytest.raises(SystemExit):  # the kernel would run interpreted on this CPU
        op_cost.parse_args(["--proj_impl=pallas_tpu"])
    with pytest.raises(SystemExit):  # the same for the attention's kernel
        op_cost.parse_args(["--flash_impl=pallas_tpu"])
    with pytest.raises(SystemExit):
        op_cost.parse_args(["--layer_in_step"])  # needs --config
