"""scripts/sweep.py expands a config's sweep() into train.py commands."""

import os

from scripts import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_print_gives_one_command_per_run(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = sweep.main(
        ["configs/quickstart.py", "--workdir=runs/s", "--print", "--", "--config.train.num_steps=5"]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert lines[1] == (
        "python train.py --config=configs/quickstart.py --workdir=runs/s/name=flash_quad "
        "--config.model.name=flash_quad --config.train.num_steps=5"
    )


def test_run_names_and_values():
    assert sweep.run_name({"model.chunk_size": 64, "train.learning_rate": 1e-3}) == (
        "chunk_size=64,learning_rate=0.001"
    )
    assert sweep.flag_value((2, 2, 2)) == "(2,2,2)"
    assert sweep.run_name({"mesh.shape": (1, -1, 1)}) == "shape=_1,-1,1_"


def test_config_without_sweep_is_an_error(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert sweep.main(["configs/base.py", "--workdir=x", "--print"]) == 2
    assert "has no sweep() function" in capsys.readouterr().err
