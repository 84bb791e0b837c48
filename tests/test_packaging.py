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


SIDE_EFFECTS = """
import atexit, importlib, os, pkgutil, random, signal, sys, warnings
import numpy as np, torch
# what the dependencies do when imported is theirs: import them first
for name in ("scipy.sparse.linalg", "scipy.special", "scipy.stats", "h5py", "matplotlib.pyplot", "sklearn.datasets",
             "sklearn.model_selection", "click", "tqdm.auto", "safetensors.torch", "torch.distributed", "torch.func"):
    importlib.import_module(name)

def state():
    return {"sys.path": list(sys.path), "os.environ": dict(os.environ), "cwd": os.getcwd(),
            "threads": torch.get_num_threads(), "default dtype": torch.get_default_dtype(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "float32 matmul": torch.get_float32_matmul_precision(),
            "tf32": (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32),
            "grad": torch.is_grad_enabled(), "torch rng": torch.get_rng_state().tolist(),
            "numpy rng": np.random.get_state()[1].tolist(), "random": random.getstate(),
            "numpy errors": np.geterr(), "warning filters": list(warnings.filters),
            "showwarning": warnings.showwarning, "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],
            "excepthook": sys.excepthook, "recursion limit": sys.getrecursionlimit(), "atexit": atexit._ncallbacks(),
            "matplotlib backend": sys.modules["matplotlib"].rcParams._get_backend_or_none()}

before = state()
import landscape, landscape.cli
names = [m.name for package, prefix in ((landscape, "landscape."), (landscape.cli, "landscape.cli."))
         for m in pkgutil.walk_packages(package.__path__, prefix) if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
after = state()
print(len(names), [key for key in before if before[key] != after[key]])
"""


def test_importing_any_module_changes_no_process_wide_state():
    result = subprocess.run([sys.executable, "-c", SIDE_EFFECTS], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    count, changed = result.stdout.split(maxsplit=1)
    assert int(count) > 40 and changed.strip() == "[]", result.stdout
