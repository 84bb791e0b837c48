"""Shared fixtures (tiny CIFAR tree, digits, a tiny CNN checkpoint) and the test session's thread setting."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# The test models are tiny: one thread is fastest, and it keeps the suite from slowing down tenfold
# when the other core of a 2-core CI machine is busy (OpenMP threads wait on each other).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses and notebook kernels


@dataclass
class TinyCifar:
    """Paths of a generated CIFAR tree and the raw uint8 images/labels written into it.

    ``root`` holds ``cifar-10-batches-py`` (= ``cifar10``) and ``cifar-100-python`` (= ``cifar100``).
    Images are ``(N, 3, 32, 32)`` uint8 in file order (train batches concatenated).
    """

    root: Path
    cifar10: Path
    cifar100: Path
    train10: tuple[np.ndarray, np.ndarray]
    test10: tuple[np.ndarray, np.ndarray]
    train100: tuple[np.ndarray, np.ndarray]
    test100: tuple[np.ndarray, np.ndarray]


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_keys: tuple[bytes, ...]) -> None:
    """One batch in the original layout: bytes keys, (N, 3072) uint8 rows, labels as a list, protocol 2."""
    batch = {b"batch_label": b"tiny batch", b"data": images.reshape(len(images), -1),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}
    for key in label_keys:
        batch[key] = labels.tolist()
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def write_tiny_cifar(root: Path, per_batch: int = 4) -> TinyCifar:
    """Write CIFAR-10 (5 train batches + test) and CIFAR-100 (train + test) folders under ``root``."""
    rng = np.random.default_rng(0)

    def images(count: int) -> np.ndarray:
        return rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)

    cifar10 = root / "cifar-10-batches-py"
    cifar10.mkdir(parents=True)
    train_batches = [(images(per_batch), rng.integers(0, 10, per_batch)) for _ in range(5)]
    for index, (x, y) in enumerate(train_batches, start=1):
        _write_batch(cifar10 / f"data_batch_{index}", x, y, (b"labels",))
    test10 = (images(per_batch), rng.integers(0, 10, per_batch))
    _write_batch(cifar10 / "test_batch", *test10, (b"labels",))

    cifar100 = root / "cifar-100-python"
    cifar100.mkdir(parents=True)
    train100 = (images(3 * per_batch), rng.integers(0, 100, 3 * per_batch))
    test100 = (images(per_batch), rng.integers(0, 100, per_batch))
    _write_batch(cifar100 / "train", *train100, (b"fine_labels", b"coarse_labels"))
    _write_batch(cifar100 / "test", *test100, (b"fine_labels", b"coarse_labels"))

    train10 = (np.concatenate([x for x, _ in train_batches]), np.concatenate([y for _, y in train_batches]))
    return TinyCifar(root, cifar10, cifar100, train10, test10, train100, test100)


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> TinyCifar:
    """A tiny CIFAR-10 and CIFAR-100 python-pickle tree in ``tmp_path / "cifar"``."""
    return write_tiny_cifar(tmp_path / "cifar")


@pytest.fixture(scope="session")
def digits():
    """The default ``digits`` dataset (seed 0), loaded once per session: never modify its tensors in place."""
    from landscape.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained digits cnn (width 2, with BatchNorm) as an own checkpoint, shared by CLI tests.

    Modules that need a different checkpoint define their own ``checkpoint`` fixture.
    """
    import torch

    from landscape.checkpoint import save_checkpoint
    from landscape.models import build_model

    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "input_shape": (1, 8, 8), "width": 2}
    path = tmp_path_factory.mktemp("ckpt") / "cnn.pt"
    save_checkpoint(path, build_model("cnn", **kwargs), arch="cnn", arch_kwargs=kwargs, dataset="digits",
                    optimizer="sgd", optimizer_hparams={}, metrics={}, seed=0)
    return path
