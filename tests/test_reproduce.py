"""`landscape reproduce` end to end with tiny sizes: every artefact appears, and a rerun resumes."""

import math

from clitools import invoke

from landscape.reproduce import Settings, reproduce
from landscape.store import list_groups

TINY = Settings(epochs=1, subset=64, surface_points=3, radius_points=3, radius_draws=1, lanczos_steps=8,
                cosine_rhos=2, batches=1, minibatch=32)


def test_pipeline_writes_every_result_figure_and_summary(tmp_path):
    lines = []
    summary = reproduce(tmp_path, ["sgd", "sam"], settings=TINY, device="cpu", log=lines.append)
    for name in ("sgd", "sam"):
        assert (tmp_path / f"{name}.pt").exists()
        assert set(list_groups(tmp_path / f"{name}.h5")) == {"hessian", "surface", "radius", "cosine", "ratio"}
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    for group in ("hessian", "surface", "radius", "cosine", "ratio"):
        assert f"compare_{group}.png" in figures and f"sgd_{group}.png" in figures
    table = summary.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| s")]
    assert len(rows) == 2, table
    lambda1 = float(rows[0].split("|")[3])
    assert math.isfinite(lambda1) and lambda1 > 0

    lines.clear()  # a second run reuses everything: no training, no analysis
    reproduce(tmp_path, ["sgd", "sam"], settings=TINY, device="cpu", log=lines.append)
    assert not any("training" in line or "Hessian" in line for line in lines), lines


def test_cli_rejects_unknown_optimizer(tmp_path):
    result = invoke("reproduce", "--optimizers", "sgd,adam9", "--out-dir", tmp_path)
    assert result.exit_code == 2 and "adam9" in result.output and "Traceback" not in result.output


def test_cli_refuses_torchrun_in_one_line(tmp_path, monkeypatch):
    from landscape import distributed
    monkeypatch.setattr(distributed, "launched", lambda: True)   # as under torchrun (without joining a group)
    monkeypatch.setattr(distributed, "setup", lambda: None)
    result = invoke("reproduce", "--out-dir", tmp_path)
    assert result.exit_code == 2 and "without torchrun" in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())
