"""Dataset specs: digits, CIFAR pickle folders, npz files, user functions, subsets and bad input."""

import pickle
import textwrap

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from landscape.data import eval_subset, list_datasets, load_dataset
from landscape.errors import LandscapeError

# Published per-channel CIFAR statistics on the [0, 1] scale, written out independently of the code.
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
CIFAR100_MEAN, CIFAR100_STD = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]


def expected_cifar(images: np.ndarray, mean: list, std: list) -> np.ndarray:
    scaled = images.astype(np.float64) / 255.0
    return (scaled - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


def test_digits_is_sklearn_digits_standardised_with_a_stratified_split(digits):
    raw = load_digits()
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8) and digits.spec == "digits"
    # Standardisation is affine and raw pixels span 0..16, so the train split's extremes map back to 0 and 16.
    x_train = digits.x_train.double().numpy().reshape(-1, 64)
    lowest, highest = x_train.min(), x_train.max()

    def to_raw(x):
        return np.rint((x - lowest) / (highest - lowest) * 16)

    mean, std = to_raw(x_train).mean(), to_raw(x_train).std()
    label_of = {tuple(image.ravel()): label for image, label in zip(raw.images, raw.target)}
    restored_rows = []
    for split in ("train", "test"):
        x, y = digits.split(split)
        x = x.double().numpy().reshape(len(x), -1)
        restored = to_raw(x)
        np.testing.assert_allclose(x, (restored - mean) / std, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal([label_of[tuple(row)] for row in restored], y.numpy())
        restored_rows.append(restored)
    np.testing.assert_array_equal(np.unique(np.concatenate(restored_rows), axis=0),
                                  np.unique(raw.images.reshape(-1, 64), axis=0))
    expected_test = np.bincount(raw.target) * 0.2
    test_counts = np.bincount(digits.y_test.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - expected_test) <= 1), (test_counts, expected_test)


def test_digits_split_depends_only_on_the_seed():
    first, again, other = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(first.x_test, again.x_test) and torch.equal(first.y_train, again.y_train)
    assert not torch.equal(first.y_test, other.y_test)


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_from_folder_or_parent(tiny_cifar, use_parent):
    path = tiny_cifar.root if use_parent else tiny_cifar.cifar10
    data = load_dataset(f"cifar10:{path}")
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32) and data.x_train.dtype == torch.float32
    for (x, y), (images, labels) in ((data.split("train"), tiny_cifar.train10), (data.split("test"), tiny_cifar.test10)):
        np.testing.assert_allclose(x.numpy(), expected_cifar(images, CIFAR10_MEAN, CIFAR10_STD), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y.numpy(), labels)


def test_cifar100_uses_fine_labels_and_its_own_statistics(tiny_cifar):
    data = load_dataset(f"cifar100:{tiny_cifar.root}")
    assert data.num_classes == 100
    images, labels = tiny_cifar.train100
    np.testing.assert_allclose(data.x_train.numpy(), expected_cifar(images, CIFAR100_MEAN, CIFAR100_STD),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data.y_train.numpy(), labels)
    np.testing.assert_array_equal(data.y_test.numpy(), tiny_cifar.test100[1])


def test_cifar_problems_name_the_file(tiny_cifar, tmp_path):
    with pytest.raises(LandscapeError, match="does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")
    with pytest.raises(LandscapeError, match="no cifar100 batches"):
        load_dataset(f"cifar100:{tiny_cifar.cifar10}")
    (tiny_cifar.cifar10 / "test_batch").unlink()
    with pytest.raises(LandscapeError, match="lacks test_batch"):
        load_dataset(f"cifar10:{tiny_cifar.cifar10}")
    (tiny_cifar.cifar100 / "test").write_bytes(b"\x80\x02truncated")
    with pytest.raises(LandscapeError, match=r"cannot read CIFAR batch .*test.*re-download"):
        load_dataset(f"cifar100:{tiny_cifar.cifar100}")


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_batches_cannot_smuggle_code(tiny_cifar, capsys):
    with open(tiny_cifar.cifar100 / "train", "wb") as handle:
        pickle.dump({b"data": Exploit(), b"fine_labels": [0]}, handle, protocol=2)
    with pytest.raises(LandscapeError, match=r"unexpected object .*print"):
        load_dataset(f"cifar100:{tiny_cifar.cifar100}")
    assert "must never run" not in capsys.readouterr().out


def test_npz_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), np.array([0, 1, 2] * 4)
    x_test, y_test = rng.normal(size=(3, 5)), np.array([3, 0, 1])
    np.savez(tmp_path / "full.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    full = load_dataset(f"npz:{tmp_path / 'full.npz'}")
    np.testing.assert_array_equal(full.x_train.numpy(), x.astype(np.float32))
    np.testing.assert_array_equal(full.y_test.numpy(), y_test)
    assert full.num_classes == 4 and full.input_shape == (5,) and full.y_train.dtype == torch.int64
    train_only = load_dataset(f"npz:{tmp_path / 'train.npz'}")
    assert train_only.x_test is None and train_only.num_classes == 3
    with pytest.raises(LandscapeError, match="no test split"):
        train_only.split("test")


def test_npz_problems(tmp_path):
    with pytest.raises(LandscapeError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "no_y.npz", x=np.zeros((2, 3)))
    with pytest.raises(LandscapeError, match="needs x and y"):
        load_dataset(f"npz:{tmp_path / 'no_y.npz'}")
    np.savez(tmp_path / "half_test.npz", x=np.zeros((2, 3)), y=[0, 1], x_test=np.zeros((1, 3)))
    with pytest.raises(LandscapeError, match="x_test with y_test"):
        load_dataset(f"npz:{tmp_path / 'half_test.npz'}")
    np.savez(tmp_path / "float_labels.npz", x=np.zeros((2, 3)), y=[0.5, 1.0])
    with pytest.raises(LandscapeError, match="integer class indices"):
        load_dataset(f"npz:{tmp_path / 'float_labels.npz'}")
    np.savez(tmp_path / "lengths.npz", x=np.zeros((3, 3)), y=[0, 1])
    with pytest.raises(LandscapeError, match="3 inputs but 2 labels"):
        load_dataset(f"npz:{tmp_path / 'lengths.npz'}")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(LandscapeError, match="cannot read npz file .*corrupt.npz"):
        load_dataset(f"npz:{tmp_path / 'corrupt.npz'}")


USER_DATA = textwrap.dedent("""
    import numpy as np
    import torch
    from landscape.data import Dataset

    def pair():
        return np.ones((4, 2, 3, 3)), np.array([0, 1, 1, 0])

    def four():
        return torch.zeros(4, 6), torch.tensor([0, 1, 2, 3]), torch.ones(2, 6), torch.tensor([4, 0])

    def ready():
        x = torch.zeros(2, 3)
        return Dataset("mine", "mine", x, torch.tensor([0, 1]), None, None, 7, (3,))

    def wrong():
        return "not data"
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_data.py").write_text(USER_DATA)
    monkeypatch.chdir(tmp_path)  # importable from the current directory, as from the CLI
    yield "my_user_data"


def test_module_function_specs(user_module):
    pair = load_dataset(f"{user_module}:pair")
    assert pair.input_shape == (2, 3, 3) and pair.num_classes == 2 and pair.x_test is None
    four = load_dataset(f"{user_module}:four")
    assert four.num_classes == 5 and four.split("test")[1].tolist() == [4, 0]
    assert load_dataset(f"{user_module}:ready").num_classes == 7
    with pytest.raises(LandscapeError, match="returned str"):
        load_dataset(f"{user_module}:wrong")
    with pytest.raises(LandscapeError, match="has no function 'absent'"):
        load_dataset(f"{user_module}:absent")
    with pytest.raises(LandscapeError, match="cannot import module 'no_such_module_xyz'"):
        load_dataset("no_such_module_xyz:load")


SYS_PATH_MODULES = {  # module source -> the exception importing it and taking its function ``load`` raises
    "def load():\n    return 1\n": None,
    "raise RuntimeError('broken at import')\n": RuntimeError,
    "import no_such_dependency_xyz\n": ModuleNotFoundError,
    "x = 1\n": LandscapeError,                                          # no function 'load'
    "import os, sys\nsys.path.insert(0, os.getcwd())\ndef load():\n    return 1\n": None,
    "import os, sys\nsys.path.remove(os.getcwd())\ndef load():\n    return 1\n": None,
}


@pytest.mark.parametrize("index, source", list(enumerate(SYS_PATH_MODULES)))
def test_importing_a_user_function_leaves_sys_path_as_the_module_left_it(tmp_path, monkeypatch, index, source):
    import os
    import sys

    from landscape.data import import_function

    name = f"sys_path_case_{index}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, name, raising=False)
    before = list(sys.path)
    error = SYS_PATH_MODULES[source]
    if error is None:
        assert import_function(f"{name}:load", "dataset", "digits")() == 1
    else:
        with pytest.raises(error):
            import_function(f"{name}:load", "dataset", "digits")
    sys.modules.pop(name, None)
    expected = [os.getcwd(), *before] if "insert(0" in source else before   # the module's own edit stays
    assert sys.path == expected


def test_importing_a_user_function_keeps_the_current_directory_that_was_on_sys_path(tmp_path, monkeypatch):
    import os
    import sys

    from landscape.data import import_function

    (tmp_path / "sys_path_present.py").write_text("def load():\n    return 2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path, os.getcwd()])
    monkeypatch.delitem(sys.modules, "sys_path_present", raising=False)
    before = list(sys.path)
    assert import_function("sys_path_present:load", "dataset", "digits")() == 2
    sys.modules.pop("sys_path_present", None)
    assert sys.path == before


@pytest.mark.parametrize("spec", ["", "mnist", "cifar10:", "npz:", "cifar10", "a:b:c", "digits:extra"])
def test_bad_specs_list_the_accepted_forms(spec):
    with pytest.raises(LandscapeError) as error:
        load_dataset(spec)
    message = str(error.value)
    print(message)
    assert "\n" not in message
    for form, _ in list_datasets():
        assert form in message


def test_eval_subset_is_deterministic_and_recoverable(digits):
    x, y = digits.split("train")
    sub_x, sub_y, indices = eval_subset(x, y, 100, seed=3)
    again = eval_subset(x, y, 100, seed=3)[2]
    other = eval_subset(x, y, 100, seed=4)[2]
    np.testing.assert_array_equal(indices, again)
    assert not np.array_equal(indices, other)
    assert indices.dtype == np.int64 and len(np.unique(indices)) == 100 and np.all(np.diff(indices) > 0)
    assert torch.equal(sub_x, x[torch.from_numpy(indices)]) and torch.equal(sub_y, y[torch.from_numpy(indices)])
    all_x, _, all_indices = eval_subset(x, y, None, seed=0)
    np.testing.assert_array_equal(all_indices, np.arange(len(x)))
    assert torch.equal(all_x, x)
    for bad in (len(x) + 1, 0, -5):
        with pytest.raises(LandscapeError, match="--subset"):
            eval_subset(x, y, bad, seed=0)


def test_unknown_split_is_an_input_error(digits):
    with pytest.raises(LandscapeError, match="'train' or 'test'"):
        digits.split("validation")
