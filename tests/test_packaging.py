"""Packaging: the built wheel ships cli/ as landscape.cli and the console script works from it."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_cli_to_landscape_cli(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("landscape-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "landscape/cli/main.py" in names and "landscape/cli/common.py" in names
    assert "landscape/curvature/operator.py" in names and "landscape/analysis/hessian.py" in names
    assert "landscape/engine/evaluator.py" in names and "landscape/engine/runner.py" in names
    assert not any(n.startswith("cli/") for n in names), "a bare top-level cli package was shipped"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "landscape = landscape.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-c", "import landscape.cli.main as m; print(m.__file__)"],
                            cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert str(target) in result.stdout


def test_help_is_fast_because_nothing_heavy_is_imported():
    code = "import sys; from landscape.cli.main import cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
