"""HDF5 store: round trips, refusal to overwrite, corrupt files, and resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from landscape import store
from landscape.errors import LandscapeError
from landscape.results import Result


def test_round_trip_with_nested_groups_and_json_attributes(tmp_path):
    path = tmp_path / "r.h5"
    arrays = {"eigenvalues": np.array([3.0, 2.0]), "layers": {"conv1": np.arange(4)}}
    attrs = {"config": {"top_k": 2, "params": None}, "trace": 1.5, "checkpoint": "a.pt", "seed": 3}
    store.write_group(path, "hessian", arrays, attrs)
    store.write_group(path, "surface", {"xcoordinates": np.linspace(-1, 1, 3)}, {"seed": 0})
    read_arrays, read_attrs = store.read_group(path, "hessian")
    np.testing.assert_array_equal(read_arrays["eigenvalues"], arrays["eigenvalues"])
    np.testing.assert_array_equal(read_arrays["layers"]["conv1"], np.arange(4))
    assert read_attrs["config"] == {"top_k": 2, "params": None}
    assert read_attrs["trace"] == 1.5 and read_attrs["seed"] == 3
    assert set(store.list_groups(path)) == {"hessian", "surface"}
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_existing_group_needs_overwrite(tmp_path):
    path = tmp_path / "r.h5"
    store.write_group(path, "radius", {"radii": np.ones(2)}, {})
    with pytest.raises(LandscapeError, match="--overwrite"):
        store.write_group(path, "radius", {"radii": np.zeros(2)}, {})
    np.testing.assert_array_equal(store.read_group(path, "radius")[0]["radii"], np.ones(2))
    store.write_group(path, "radius", {"radii": np.zeros(2)}, {}, overwrite=True)
    np.testing.assert_array_equal(store.read_group(path, "radius")[0]["radii"], np.zeros(2))


def test_missing_and_corrupt_files_are_input_errors(tmp_path):
    with pytest.raises(LandscapeError, match="does not exist"):
        store.read_group(tmp_path / "nope.h5", "hessian")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(LandscapeError, match="corrupt"):
        store.list_groups(bad)
    with pytest.raises(LandscapeError, match="corrupt"):
        store.write_group(bad, "hessian", {}, {})
    assert bad.read_bytes() == b"not an hdf5 file at all"
    store.write_group(tmp_path / "ok.h5", "hessian", {}, {})
    with pytest.raises(LandscapeError, match="no /surface"):
        store.read_group(tmp_path / "ok.h5", "surface")


def test_provenance_has_the_standard_attributes():
    attrs = store.provenance({"a": 1}, {"checkpoint": "c.pt", "checkpoint_sha256": "ab", "dataset": "digits"},
                             seed=4, device="cpu")
    for key in ("config", "checkpoint", "checkpoint_sha256", "dataset", "seed", "landscape_version",
                "torch_version", "created", "device"):
        assert key in attrs
    assert attrs["checkpoint"] == "c.pt" and attrs["seed"] == 4


def test_result_saves_and_loads(tmp_path):
    result = Result({"values": np.arange(3.0)}, {"note": "x"}, group="custom")
    result.save(tmp_path / "r.h5")
    loaded = Result.load(tmp_path / "r.h5", "custom")
    np.testing.assert_array_equal(loaded["values"], np.arange(3.0))
    assert loaded["note"] == "x"


WORKER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from landscape.store import IncrementalGroup
    path, delay = sys.argv[1], float(sys.argv[2])
    run = IncrementalGroup(path, "grid", {"loss": (), "vector": (3,)}, (4, 5), {"config": {"n": 20}},
                           static={"xcoordinates": np.arange(4.0)}, resume="--resume" in sys.argv)
    for index in run.pending():
        i, j = index
        time.sleep(delay)
        run.write(index, {"loss": i * 10.0 + j, "vector": np.array([i, j, -1.0])})
        print(f"{i},{j}", flush=True)
    run.finalize()
""")


def run_worker(tmp_path: Path, path: Path, delay: float, *extra: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(path), str(delay), *extra],
                            stdout=subprocess.PIPE, text=True)


def test_resume_after_sigkill_loses_nothing_and_recomputes_nothing(tmp_path):
    reference = tmp_path / "reference.h5"
    assert run_worker(tmp_path, reference, 0.0).wait(timeout=120) == 0

    path = tmp_path / "killed.h5"
    worker = run_worker(tmp_path, path, 0.2)
    partial = path.with_name(path.name + ".grid.partial")
    for _ in range(4):  # each printed line is a unit already flushed to disk
        assert worker.stdout.readline(), "worker ended early"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert not path.exists(), "the main file must not hold a half-finished group"
    with h5py.File(partial, "r") as handle:
        done_mask = handle["done"][()]
        assert 4 <= done_mask.sum() < 20
        assert np.isnan(handle["loss"][()][~done_mask]).all()

    with pytest.raises(LandscapeError, match="--resume"):
        store.IncrementalGroup(path, "grid", {"loss": ()}, (4, 5), {"config": {"n": 20}})
    with pytest.raises(LandscapeError, match="options differ"):
        store.IncrementalGroup(path, "grid", {"loss": ()}, (4, 5), {"config": {"n": 21}}, resume=True).close()

    resumed = run_worker(tmp_path, path, 0.0, "--resume")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    recomputed = {tuple(map(int, line.split(","))) for line in out.split()}
    assert len(recomputed) == 20 - done_mask.sum(), "a finished point was recomputed"
    assert not any(done_mask[i, j] for i, j in recomputed)
    assert not partial.exists()

    got, attrs = store.read_group(path, "grid")
    want, _ = store.read_group(reference, "grid")
    for name in ("loss", "vector", "xcoordinates", "done"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert attrs["config"] == {"n": 20}


def test_resume_of_a_complete_group_is_a_no_op(tmp_path):
    path = tmp_path / "r.h5"
    run = store.IncrementalGroup(path, "g", {"v": ()}, (2,), {"config": {}})
    for index in run.pending():
        run.write(index, {"v": 1.0})
    run.finalize()
    again = store.IncrementalGroup(path, "g", {"v": ()}, (2,), {"config": {}}, resume=True)
    assert again.pending() == [] and again.complete
    np.testing.assert_array_equal(again.arrays()["v"], [1.0, 1.0])
    with pytest.raises(LandscapeError, match="--overwrite"):
        store.IncrementalGroup(path, "g", {"v": ()}, (2,), {"config": {}})


def test_incremental_chunks_are_runs_of_units_along_the_last_axis(tmp_path):
    """A grid row per chunk for scalar units (what a flush writes); one unit per chunk once a unit is large."""
    run = store.IncrementalGroup(tmp_path / "r.h5", "g", {"loss": (), "curve": (3,), "vector": (10_000,)},
                                 (51, 60), {"config": {}})
    chunks = {name: run.handle[name].chunks for name in ("loss", "curve", "vector")}
    run.close()
    assert chunks == {"loss": (1, 60), "curve": (1, 60, 3), "vector": (1, 1, 10_000)}
    long = store.IncrementalGroup(tmp_path / "long.h5", "g", {"loss": ()}, (100_000,), {"config": {}})
    assert long.handle["loss"].chunks == (store.CHUNK_VALUES,)
    long.close()
