"""HDF5 store: round trips, refusal to overwrite, corrupt files, locking, resume checks, and kills at every write."""

import subprocess
import sys
import textwrap

import crashtools
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
    import sys
    import numpy as np
    from landscape.store import IncrementalGroup
    run = IncrementalGroup(sys.argv[1], "grid", {"loss": (), "vector": (3,)}, (3, 4), {"config": {"n": 12}},
                           static={"xcoordinates": np.arange(3.0)}, resume=True)
    done = run.done.reshape(-1)
    for start in range(0, 12, 3):  # blocks of three units, like run_points
        if not done[start:start + 3].all():
            units = np.arange(start, start + 3)
            print(*(f"unit {u}" for u in units), sep="\\n", flush=True)
            run.write(start, {"loss": units * 10.0 + 0.5, "vector": np.stack([units, -units, units ** 2], 1)})
    run.finalize({"total": np.nansum(run.arrays()["loss"])}, {"note": "derived"})
""")


def test_a_kill_at_any_write_leaves_a_sidecar_that_resumes_to_the_same_bits(tmp_path):
    """Every pwrite/rename/unlink of creation, blocks and the final move, killed in turn; then
    the claim behind it: after creation, only raw data bytes of the sidecar's datasets change."""
    (tmp_path / "worker.py").write_text(WORKER)
    run = crashtools.Resumable([str(tmp_path / "worker.py"), "{out}"], "grid", block=3, values=2,
                               preload="import landscape.store")
    events = crashtools.kill_everywhere(run, tmp_path)
    assert [e.file for e in events if e.syscall.startswith("rename")] == [".r.h5.grid.partial.tmp", ".r.h5.tmp"]
    assert events[-1].syscall.startswith("unlink") and events[-1].file == "r.h5.grid.partial" and len(events) > 30

    layout = store.IncrementalGroup(tmp_path / "layout" / "r.h5", "grid", {"loss": (), "vector": (3,)}, (3, 4),
                                    {"config": {"n": 12}}, static={"xcoordinates": np.arange(3.0)})
    with h5py.File(layout.partial, "r") as handle:
        ranges = [(handle[n].id.get_offset(), handle[n].id.get_offset() + handle[n].id.get_storage_size())
                  for n in ("loss", "vector", "done")]
    layout.close()
    writes = [e.offset for e in events if e.syscall == "pwrite64" and e.file == "r.h5.grid.partial"]
    assert len(writes) == 4 * 3
    assert all(any(low <= offset < high for low, high in ranges) for offset in writes), (writes, ranges)


CONCURRENT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from landscape import store
    write_tree = store._write_tree

    def slow(group, arrays, attrs):  # inside the read-modify-replace of the results file
        print("writing", flush=True)
        time.sleep(float(sys.argv[3]))
        write_tree(group, arrays, attrs)

    store._write_tree = slow
    store.write_group(sys.argv[1], sys.argv[2], {"v": np.arange(3.0)}, {})
""")


def test_concurrent_writers_of_one_file_keep_every_group(tmp_path):
    script, path = tmp_path / "writer.py", tmp_path / "r.h5"
    script.write_text(CONCURRENT)
    store.write_group(path, "first", {"v": np.zeros(1)}, {})
    slow = subprocess.Popen([sys.executable, str(script), str(path), "hessian", "2"], stdout=subprocess.PIPE, text=True)
    assert slow.stdout.readline() == "writing\n"
    fast = subprocess.run([sys.executable, str(script), str(path), "radius", "0"], capture_output=True, text=True,
                          timeout=60)
    assert slow.wait(timeout=60) == 0 and fast.returncode == 0, fast.stderr
    assert fast.stderr.strip() == f"waiting for another landscape process writing {path} ..."
    assert sorted(store.list_groups(path)) == ["first", "hessian", "radius"]


def test_a_second_run_of_one_incremental_group_is_refused(tmp_path):
    path = tmp_path / "r.h5"
    first = store.IncrementalGroup(path, "grid", {"loss": ()}, (2, 2), {"config": {}})
    with pytest.raises(LandscapeError, match=r"another landscape process \(pid \d+\) is computing /grid"):
        store.IncrementalGroup(path, "grid", {"loss": ()}, (2, 2), {"config": {}}, resume=True)
    other = store.IncrementalGroup(path, "other", {"loss": ()}, (2,), {"config": {}})  # another group may run
    first.write(0, {"loss": [1.0, 2.0]})
    first.close()
    second = store.IncrementalGroup(path, "grid", {"loss": ()}, (2, 2), {"config": {}}, resume=True)
    np.testing.assert_array_equal(second.done, [[True, True], [False, False]])
    second.close()
    other.close()


@pytest.mark.parametrize("wanted, named", [
    ({"checkpoint_sha256": "b" * 64}, "another checkpoint (bbbbbbbbbbbb… here, aaaaaaaaaaaa… stored)"),
    ({"eval_set": {"split": "train", "n": 32}}, "another evaluation set"),
    ({"dataset": "npz:x.npz"}, "another dataset (npz:x.npz here, digits stored)"),
    ({"seed": 1}, "another seed (1 here, 0 stored)"),
    ({"config": {"top_k": 3, "tol": 1e-4}}, "options differ (top_k)"),
    ({"config": {"new_option": 1}}, "options differ (new_option)"),
])
def test_check_resume_names_what_differs(wanted, named):
    stored = {"checkpoint_sha256": "a" * 64, "dataset": "digits", "eval_set": {"split": "train", "n": 64},
              "seed": 0, "config": {"top_k": 5, "tol": 1e-4}}
    store.check_resume("/hessian of r.h5", stored, {k: v for k, v in stored.items() if k != "config"} | {"config": {}})
    with pytest.raises(LandscapeError) as error:
        store.check_resume("/hessian of r.h5", stored, {**stored, **wanted})
    message = str(error.value)
    assert message.startswith("cannot resume /hessian of r.h5: ") and named in message and "\n" not in message


def test_resume_of_a_complete_group_is_a_no_op(tmp_path):
    path = tmp_path / "r.h5"
    run = store.IncrementalGroup(path, "g", {"v": ()}, (2,), {"config": {}})
    run.write(0, {"v": [1.0, 1.0]})
    run.finalize()
    again = store.IncrementalGroup(path, "g", {"v": ()}, (2,), {"config": {}}, resume=True)
    assert again.done.all() and again.complete
    np.testing.assert_array_equal(again.arrays()["v"], [1.0, 1.0])
    with pytest.raises(LandscapeError, match="--overwrite"):
        store.IncrementalGroup(path, "g", {"v": ()}, (2,), {"config": {}})
    with pytest.raises(LandscapeError, match="options differ"):
        store.IncrementalGroup(path, "g", {"v": ()}, (2,), {"config": {"other": 1}}, resume=True)


def test_sidecar_is_laid_out_whole_at_creation(tmp_path):
    """Contiguous, allocated, NaN-filled datasets and a done mask: later writes change no metadata."""
    run = store.IncrementalGroup(tmp_path / "r.h5", "g", {"loss": (), "vector": (3,)}, (5, 4), {"config": {}})
    with h5py.File(run.partial, "r") as handle:
        for name, shape in (("loss", (5, 4)), ("vector", (5, 4, 3)), ("done", (5, 4))):
            assert handle[name].chunks is None and handle[name].shape == shape
            assert handle[name].id.get_storage_size() == np.prod(shape) * handle[name].dtype.itemsize
        assert np.isnan(handle["vector"][()]).all() and not handle["done"][()].any()
    size = run.partial.stat().st_size
    run.write(2, {"loss": [1.0, 2.0], "vector": np.ones((2, 3))})
    assert run.partial.stat().st_size == size
    with h5py.File(run.partial, "r") as handle:
        np.testing.assert_array_equal(handle["loss"][0], [np.nan, np.nan, 1.0, 2.0])
        np.testing.assert_array_equal(handle["done"][0], [False, False, True, True])
    with pytest.raises(ValueError):
        run.write(19, {"loss": [1.0, 2.0], "vector": np.ones((2, 3))})  # past the last unit
    run.close()
