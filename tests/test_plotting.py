"""The plotting package leaves matplotlib's backend alone; the CLI draws headless with Agg."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from landscape.store import write_group

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"

# In a fresh interpreter: import landscape.plotting, check the backend setting is untouched (read raw,
# so an unresolved automatic choice is not resolved by reading it), then draw and save from Python.
IMPORT_AND_PLOT = """
import sys
import matplotlib
before = dict.__getitem__(matplotlib.rcParams, "backend")
import landscape.plotting
after = dict.__getitem__(matplotlib.rcParams, "backend")
assert after == before, f"importing landscape.plotting changed the backend from {before!r} to {after!r}"
written = landscape.plotting.plot_file(sys.argv[1], out_dir=sys.argv[2])
written += [landscape.plotting.plot_compare([sys.argv[1]] * 2, "hessian", sys.argv[2] + "/both.png", ["a", "b"])]
import matplotlib.pyplot as plt
assert plt.get_fignums() == [], f"figures left open: {plt.get_fignums()}"
print(matplotlib.get_backend(), *written)
"""


def _environment(backend: str | None) -> dict[str, str]:
    """This process's environment without a display, with MPLBACKEND set to ``backend`` (or unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY")}
    if backend is not None:
        env["MPLBACKEND"] = backend
    return env


@pytest.fixture
def hessian_file(tmp_path: Path) -> Path:
    """A results file with a small /hessian group (density and top eigenvalues)."""
    grid = np.linspace(-1.0, 5.0, 50)
    path = tmp_path / "spectrum.h5"
    write_group(path, "hessian", {"density_grid": grid, "density": np.exp(-grid ** 2),
                                  "eigenvalues": np.array([4.0, 2.0])}, {"lambda1": 4.0, "config": {}})
    return path


@pytest.mark.parametrize("backend", [None, "svg", "pdf"])
def test_importing_plotting_keeps_the_backend_and_figures_save_and_close_in_any_backend(backend, hessian_file,
                                                                                        tmp_path):
    run = subprocess.run([sys.executable, "-c", IMPORT_AND_PLOT, str(hessian_file), str(tmp_path)], cwd=ROOT,
                         env=_environment(backend), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    used, *written = run.stdout.split()
    if backend is not None:
        assert used == backend
    assert [Path(p).name for p in written] == ["spectrum_hessian.png", "both.png"]
    assert all(Path(p).read_bytes().startswith(PNG) for p in written)


@pytest.mark.parametrize("backend", [None, "svg"])
def test_the_cli_writes_pngs_headless(backend, hessian_file, tmp_path):
    out_dir = tmp_path / "figures"
    run = subprocess.run([sys.executable, "-m", "landscape.cli.main", "plot", str(hessian_file), "--out-dir",
                          str(out_dir)], cwd=ROOT, env=_environment(backend), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert (out_dir / "spectrum_hessian.png").read_bytes().startswith(PNG)
