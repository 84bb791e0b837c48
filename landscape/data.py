"""Dataset specs as strings, read the same way by the CLI and by Python.

Accepted specs (see :func:`list_datasets`):

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes), shipped with
    scikit-learn so it needs no download. Pixels (0..16) are standardised with the mean and
    standard deviation of the *train split* (one channel, so per-channel equals global). A fixed
    stratified 80/20 train/test split is drawn by ``seed``. Shape ``(N, 1, 8, 8)``.
``cifar10:PATH`` / ``cifar100:PATH``
    The standard "python version" pickle folders (``cifar-10-batches-py`` with ``data_batch_1..5``
    and ``test_batch``; ``cifar-100-python`` with ``train`` and ``test``, fine labels). ``PATH`` is
    that folder or its parent. Pixels are scaled to [0, 1] and normalised per channel with the
    usual published CIFAR mean/std, so foreign checkpoints see the inputs they were trained on.
    Shape ``(N, 3, 32, 32)``.
``npz:PATH``
    A NumPy ``.npz`` with ``x`` (N, ...) and integer labels ``y`` (N,), optionally ``x_test`` and
    ``y_test``. Arrays are used as stored (no normalisation).
``imagefolder:PATH[,key=value...]``
    One folder per class, as torchvision's ``ImageFolder`` reads it: ``PATH/<class>/**/*.jpg`` is one
    split (train), ``PATH/train/<class>/...`` with ``PATH/val/<class>/...`` (or ``test``) two splits
    whose class folders must agree. Class indices are the *sorted* folder names (every folder is a
    class; a foreign checkpoint's class order must match), files are taken in sorted order, any
    case of .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp; the names are in ``Dataset.classes``.
    Each image is read with Pillow, converted to RGB (``convert("RGB")``: greyscale is replicated,
    alpha dropped, palettes expanded), and given torchvision's evaluation transform: the shorter
    side resized to ``size`` (the longer to ``int(size * long / short)``), the centre ``crop`` x
    ``crop`` cut out (offsets ``int(round((side - crop) / 2))``), scaled to [0, 1] and normalised
    per channel. Options, comma-separated after the path (``imagefolder:~/imagenet/val,crop=224``):
    ``crop`` (224), ``size`` (``crop * 8 // 7``, i.e. 256 for 224: the 0.875 ratio), ``mean`` and
    ``std`` (three numbers each, e.g. ``mean=0.5,0.5,0.5``; ImageNet's by default), ``resample``
    (bilinear; nearest, bicubic, lanczos) and ``per_class=N`` (only the first N files of each class
    folder, before decoding). Shape ``(N, 3, crop, crop)``. Every image of both splits is decoded
    into memory (float32, 4 x 3 x crop^2 bytes each, refused up front when that does not fit; draw
    a subset with ``per_class``, as ``--subset`` is applied only after loading), in a thread pool.
``module:function``
    User code: ``function()`` is called without arguments and returns a :class:`Dataset`, a tuple
    ``(x, y)`` or a tuple ``(x, y, x_test, y_test)`` of arrays or tensors (used as returned).

Inputs are float32 tensors, labels int64. The number of classes of ``npz`` and user data is
``max(label) + 1`` over both splits; of ``imagefolder`` the number of class folders.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from landscape.errors import LandscapeError
from landscape.registry import Registry
from landscape.resources import require

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
DIGITS_TEST_FRACTION = 0.2

# Published per-channel statistics of the CIFAR training sets on the [0, 1] scale.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# (folder name, train files, test file, label key, number of classes)
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}

# torchvision's image extensions (matched in any case) and the ImageNet statistics on the [0, 1] scale.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RESAMPLING = ("nearest", "bilinear", "bicubic", "lanczos")
TEST_FOLDERS = ("val", "test")  # the first one present beside train is the test split
DECODE_BLOCK = 256  # images handed to the thread pool at a time

USER_FORM = ("module:function", "user code: function() returns a Dataset, (x, y) or (x, y, x_test, y_test)")
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled train split and an optional test split.

    ``x_*`` are float32 tensors ``(N, *input_shape)``, ``y_*`` int64 tensors ``(N,)``; ``classes``
    names the classes by index where the source has names (``imagefolder``), else None.
    """

    spec: str
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor | None
    y_test: Tensor | None
    num_classes: int
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] | None = None

    def split(self, which: str) -> tuple[Tensor, Tensor]:
        """Inputs and labels of the ``"train"`` or ``"test"`` split."""
        if which == "train":
            return self.x_train, self.y_train
        if which == "test":
            if self.x_test is None or self.y_test is None:
                raise LandscapeError(f"dataset '{self.spec}' has no test split; use the train split (--split "
                                     "train), or give it one (x_test and y_test; for imagefolder, class folders "
                                     "in PATH/train and PATH/val)")
            return self.x_test, self.y_test
        raise LandscapeError(f"unknown split '{which}'; use 'train' or 'test'")


@dataclass(frozen=True)
class DatasetKind:
    """A built-in reader: its name (the spec's prefix), a description, whether the spec carries a
    path (``name:PATH``), ``load(spec, path, seed)``, with ``path`` a :class:`Path` or None, and the
    ``,key=value`` options the spec accepts after the path, in words ("" for none)."""

    name: str
    description: str
    takes_path: bool
    load: Callable[[str, Path | None, int], Dataset] = field(repr=False)
    options: str = ""

    @property
    def form(self) -> str:
        """The spec form, e.g. ``cifar10:PATH``."""
        return f"{self.name}:PATH" if self.takes_path else self.name


DATASETS: Registry[DatasetKind] = Registry("dataset kind")


def register(name: str, description: str, takes_path: bool = True, options: str = "") -> Callable:
    """Decorator adding ``load(spec, path, seed) -> Dataset`` to :data:`DATASETS` as the spec
    ``name:PATH`` (``name`` alone without ``takes_path``), which accepts ``options`` (in words).
    A name registered before is refused."""

    def add(load: Callable[[str, Path | None, int], Dataset]) -> Callable[[str, Path | None, int], Dataset]:
        DATASETS.register(name, DatasetKind(name, description, takes_path, load, options))
        return load

    return add


def list_datasets(pattern: str | None = None) -> list[tuple[str, str]]:
    """Accepted dataset spec forms as ``(form, description)`` pairs: the built-in kinds whose name matches
    the glob ``pattern`` (all if None), then ``module:function`` (only without a pattern)."""
    forms = [(kind.form, kind.description) for kind in DATASETS.list(pattern)]
    return forms if pattern is not None else [*forms, USER_FORM]


def load_dataset(spec: str = "digits", seed: int = 0) -> Dataset:
    """Load the dataset named by ``spec``; ``seed`` picks the digits train/test split."""
    name, colon, path = spec.partition(":")
    if name in DATASETS:
        kind = DATASETS.get(name)
        if kind.takes_path == bool(path):
            return kind.load(spec, Path(path).expanduser() if path else None, seed)
    elif names_code(spec, DATASET_SCHEMES) and _FUNCTION_SPEC.match(spec):
        return _load_user(spec)
    raise LandscapeError(f"unknown dataset spec '{spec}'; use one of: {_forms()}")


def eval_subset(x: Tensor, y: Tensor, subset: int | None, seed: int) -> tuple[Tensor, Tensor, np.ndarray]:
    """A fixed evaluation subset: ``subset`` examples drawn without replacement by ``seed``.

    Returns ``(x[indices], y[indices], indices)`` with ``indices`` sorted int64; the same
    ``(N, subset, seed)`` always gives the same indices. ``subset=None`` keeps every example.
    """
    count = len(x)
    if subset is None:
        indices = np.arange(count, dtype=np.int64)
    elif not 0 < subset <= count:
        raise LandscapeError(f"subset of {subset} examples is impossible from a split of {count}; "
                             f"choose --subset between 1 and {count}, or omit it to use all")
    else:
        indices = np.sort(np.random.default_rng(seed).permutation(count)[:subset]).astype(np.int64)
    selection = torch.from_numpy(indices)
    return x[selection], y[selection], indices


def _forms() -> str:
    """The accepted spec forms, comma-separated, for error messages."""
    return ", ".join(form for form, _ in list_datasets())


def names_code(spec: str, schemes: tuple[str, ...] = ()) -> bool:
    """True when ``spec`` is a ``module:function`` that loading would import and call.

    That is any spec with a colon whose prefix is not one of the built-in ``schemes`` (e.g.
    ``DATASET_SCHEMES``; models have none). Deliberately broad: callers use it to refuse code
    named by a file, so it must hold for every spec that reaches :func:`import_function`.
    """
    return ":" in spec and spec.partition(":")[0] not in schemes


@contextlib.contextmanager
def _current_directory_importable() -> Iterator[None]:
    """Append the current directory to ``sys.path`` for the duration, unless it is there already.

    On exit, however the block ends, exactly the entry added here goes again (found by identity), so
    ``sys.path`` is left as the block left it: an equal entry that the imported code added stays, and
    one it removed is not removed twice.
    """
    cwd = os.getcwd()
    if cwd in sys.path:
        yield
        return
    sys.path.append(cwd)
    try:
        yield
    finally:
        for index in reversed(range(len(sys.path))):
            if sys.path[index] is cwd:
                del sys.path[index]
                break


def import_function(spec: str, what: str, alternatives: str) -> Callable:
    """Import ``function`` from ``module`` for a ``"module:function"`` spec (current directory included).

    ``what`` names the purpose in error messages (e.g. "dataset"), ``alternatives`` the other
    accepted forms offered as a fix.
    """
    module_name, _, function_name = spec.partition(":")
    try:
        with _current_directory_importable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name and not module_name.startswith(f"{error.name}."):
            raise  # the user's module itself failed to import one of its dependencies
        raise LandscapeError(f"cannot import module '{module_name}' for {what} '{spec}'; make it importable "
                             f"(run from its folder or add it to PYTHONPATH), or use {alternatives}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise LandscapeError(f"module '{module_name}' has no function '{function_name}' for {what} '{spec}'; "
                             f"check the name after ':', or use {alternatives}")
    return function


def _dataset(spec: str, name: str, arrays: tuple, num_classes: int | None = None,
             classes: tuple[str, ...] | None = None) -> Dataset:
    """Build a :class:`Dataset` from ``(x, y)`` or ``(x, y, x_test, y_test)`` arrays, checking them."""
    x_train, y_train = _inputs(arrays[0], spec), _labels(arrays[1], spec)
    x_test = _inputs(arrays[2], spec) if len(arrays) > 2 else None
    y_test = _labels(arrays[3], spec) if len(arrays) > 2 else None
    pairs = [(x_train, y_train)] + ([(x_test, y_test)] if x_test is not None else [])
    for x, y in pairs:
        if len(x) != len(y) or len(x) == 0:
            raise LandscapeError(f"dataset '{spec}' has {len(x)} inputs but {len(y)} labels; "
                                 "give one label per input and at least one example")
        if x.shape[1:] != x_train.shape[1:]:
            raise LandscapeError(f"dataset '{spec}' has test inputs of shape {tuple(x.shape[1:])} but train "
                                 f"inputs of shape {tuple(x_train.shape[1:])}; make them match")
    if num_classes is None:
        num_classes = int(max(int(y.max()) for _, y in pairs)) + 1
    return Dataset(spec, name, x_train, y_train, x_test, y_test, num_classes, tuple(x_train.shape[1:]), classes)


def _inputs(x, spec: str) -> Tensor:
    """Inputs as a float32 tensor with a batch dimension."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(torch.float32)
    if x.ndim < 2:
        raise LandscapeError(f"dataset '{spec}' inputs have shape {tuple(x.shape)}; "
                             "inputs need shape (N, features...) with a leading example dimension")
    return x.contiguous()


def _labels(y, spec: str) -> Tensor:
    """Labels as an int64 tensor ``(N,)`` of non-negative class indices."""
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    integral = y.dtype != torch.bool and not y.is_complex() and (
        not y.is_floating_point() or bool(torch.equal(y, y.round())))
    if y.ndim != 1 or not integral:
        raise LandscapeError(f"dataset '{spec}' labels have shape {tuple(y.shape)} and dtype {y.dtype}; "
                             "labels must be integer class indices of shape (N,)")
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        raise LandscapeError(f"dataset '{spec}' has negative labels; labels must be class indices 0..C-1")
    return y


@register("digits", "scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), stratified 80/20 split by seed",
          takes_path=False)
def _load_digits(spec: str, path: Path | None, seed: int) -> Dataset:
    """scikit-learn digits, standardised with train-split statistics, stratified split by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, stratify=digits.target, random_state=seed)
    mean, std = x_train.mean(), x_train.std()
    return _dataset("digits", "digits", ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test), 10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays, dicts, lists and scalars (CIFAR batches are pickles)."""

    _reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    _frombuffer = np.arange(2).__reduce_ex__(5)[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}") from None


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` from one CIFAR pickle batch."""
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as error:  # any failure means the file is not a readable CIFAR batch
        raise LandscapeError(f"cannot read CIFAR batch '{path}' ({type(error).__name__}: {error}); "
                             f"re-download the python version from {CIFAR_URL}") from None
    if len(images) != len(labels):
        raise LandscapeError(f"CIFAR batch '{path}' has {len(images)} images but {len(labels)} labels; "
                             f"re-download the python version from {CIFAR_URL}")
    return images, labels


def _cifar_folder(path: Path, kind: str) -> Path:
    """The batch folder: ``path`` itself or ``path/<standard folder name>``."""
    folder_name, train_files, _, _, _ = CIFAR_LAYOUT[kind]
    for folder in (path, path / folder_name):
        if (folder / train_files[0]).is_file():
            return folder
    if not path.exists():
        raise LandscapeError(f"{kind} folder '{path}' does not exist; pass {kind}:PATH pointing at "
                             f"'{folder_name}' or its parent (download the python version from {CIFAR_URL})")
    raise LandscapeError(f"no {kind} batches in '{path}' (expected '{train_files[0]}' there or in "
                         f"'{path / folder_name}'); point {kind}:PATH at the extracted '{folder_name}' folder")


@register("cifar10", "CIFAR-10 python-pickle folder (cifar-10-batches-py) or its parent")
def _load_cifar10(spec: str, path: Path, seed: int) -> Dataset:
    return _load_cifar(spec, "cifar10", path)


@register("cifar100", "CIFAR-100 python-pickle folder (cifar-100-python) or its parent, fine labels")
def _load_cifar100(spec: str, path: Path, seed: int) -> Dataset:
    return _load_cifar(spec, "cifar100", path)


def _load_cifar(spec: str, kind: str, path: Path) -> Dataset:
    """CIFAR-10/100 from the python-pickle folder, normalised with the published channel stats."""
    _, train_files, test_file, label_key, num_classes = CIFAR_LAYOUT[kind]
    folder = _cifar_folder(path, kind)
    missing = [name for name in (*train_files, test_file) if not (folder / name).is_file()]
    if missing:
        raise LandscapeError(f"{kind} folder '{folder}' lacks {', '.join(missing)}; "
                             f"re-extract the python version from {CIFAR_URL}")
    train = [_read_cifar_batch(folder / name, label_key) for name in train_files]
    x_test, y_test = _read_cifar_batch(folder / test_file, label_key)
    mean, std = (np.asarray(s, dtype=np.float32).reshape(1, 3, 1, 1) for s in CIFAR_STATS[kind])

    def normalise(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) / 255.0 - mean) / std

    x_train = normalise(np.concatenate([images for images, _ in train]))
    y_train = np.concatenate([labels for _, labels in train])
    return _dataset(spec, kind, (x_train, y_train, normalise(x_test), y_test), num_classes)


@register("npz", "NumPy .npz with arrays x, y and optionally x_test, y_test")
def _load_npz(spec: str, path: Path, seed: int) -> Dataset:
    """Arrays ``x``, ``y`` (and optionally ``x_test``, ``y_test``) from an ``.npz`` file."""
    if not path.is_file():
        raise LandscapeError(f"npz file '{path}' does not exist; check the path in npz:PATH")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # any failure means the file is not a readable npz
        raise LandscapeError(f"cannot read npz file '{path}' ({type(error).__name__}: {error}); "
                             "write it with numpy.savez(path, x=..., y=...)") from None
    if "x" not in arrays or "y" not in arrays or ("x_test" in arrays) != ("y_test" in arrays):
        raise LandscapeError(f"npz file '{path}' holds arrays {sorted(arrays)}; it needs x and y, and "
                             "x_test with y_test if it has a test split")
    names = ("x", "y", "x_test", "y_test") if "x_test" in arrays else ("x", "y")
    return _dataset(spec, path.stem, tuple(arrays[name] for name in names))


@dataclass(frozen=True)
class ImageTransform:
    """torchvision's evaluation transform of one RGB image: the shorter side resized to ``size`` pixels
    with the Pillow filter ``resample``, the centre ``crop`` x ``crop`` cut out, scaled to [0, 1] and
    normalised per channel by ``mean`` and ``std``."""

    size: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_STATS[0]
    std: tuple[float, ...] = IMAGENET_STATS[1]
    resample: str = "bilinear"

    def __call__(self, image) -> np.ndarray:
        """The float32 array ``(3, crop, crop)`` of a Pillow RGB ``image``."""
        from PIL import Image

        width, height = image.size
        longer = int(self.size * max(width, height) / min(width, height))  # as torchvision's Resize
        new_width, new_height = (self.size, longer) if width <= height else (longer, self.size)
        image = image.resize((new_width, new_height), Image.Resampling[self.resample.upper()])
        left, top = (int(round((side - self.crop) / 2.0)) for side in (new_width, new_height))  # as CenterCrop
        pixels = np.asarray(image.crop((left, top, left + self.crop, top + self.crop)), dtype=np.uint8)
        scaled = pixels.astype(np.float32) / np.float32(255)
        normalised = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return normalised.transpose(2, 0, 1)


IMAGEFOLDER_OPTIONS = ("crop", "size", "mean", "std", "resample", "per_class")
IMAGEFOLDER_EXAMPLE = "e.g. imagefolder:PATH,crop=32,size=36,per_class=10"
_IMAGEFOLDER_OPTION = re.compile(r",(?=[A-Za-z_]\w*=)")  # a comma that starts the next key=value


def parse_imagefolder(spec: str) -> tuple[Path, ImageTransform, int | None]:
    """The folder, the transform and ``per_class`` (None: every file) of ``imagefolder:PATH[,key=value...]``.

    The options start at the first comma followed by ``key=``; commas elsewhere belong to the path or value."""
    text, *items = _IMAGEFOLDER_OPTION.split(spec.partition(":")[2])
    if not text:
        raise LandscapeError(f"dataset spec '{spec}' names no folder; use imagefolder:PATH ({IMAGEFOLDER_EXAMPLE})")
    options: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in IMAGEFOLDER_OPTIONS:
            raise LandscapeError(f"dataset spec '{spec}' has the unknown option '{key}'; the options are "
                                 f"{', '.join(IMAGEFOLDER_OPTIONS)} ({IMAGEFOLDER_EXAMPLE})")
        if key in options:
            raise LandscapeError(f"dataset spec '{spec}' gives '{key}' twice; give each option once")
        options[key] = value
    crop = _whole(options, "crop", 224, spec)
    transform = ImageTransform(_whole(options, "size", crop * 8 // 7, spec), crop,
                               _channels(options, "mean", IMAGENET_STATS[0], spec),
                               _channels(options, "std", IMAGENET_STATS[1], spec),
                               options.get("resample", "bilinear").lower())
    if transform.crop > transform.size:
        raise LandscapeError(f"dataset spec '{spec}' crops {crop} pixels from a shorter side resized to "
                             f"{transform.size}; choose crop <= size")
    if transform.resample not in RESAMPLING:
        raise LandscapeError(f"dataset spec '{spec}' has resample={options['resample']}; use one of "
                             f"{', '.join(RESAMPLING)}")
    if min(transform.std) <= 0:
        raise LandscapeError(f"dataset spec '{spec}' has std={options['std']}; the standard deviations must be > 0")
    per_class = _whole(options, "per_class", None, spec)
    return Path(text).expanduser(), transform, per_class


def _whole(options: dict[str, str], key: str, default: int | None, spec: str) -> int | None:
    """``options[key]`` as a whole number >= 1 (``default`` when absent)."""
    if key not in options:
        return default
    value = options[key]
    if not (value.isascii() and value.isdigit() and int(value) >= 1):
        raise LandscapeError(f"dataset spec '{spec}' has {key}={value}; {key} must be a whole number >= 1 "
                             f"({IMAGEFOLDER_EXAMPLE})")
    return int(value)


def _channels(options: dict[str, str], key: str, default: tuple[float, ...], spec: str) -> tuple[float, ...]:
    """``options[key]`` as three finite numbers, one per RGB channel (``default`` when absent)."""
    if key not in options:
        return default
    try:
        values = tuple(float(part) for part in options[key].split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(np.isfinite(values)):
        raise LandscapeError(f"dataset spec '{spec}' has {key}={options[key]}; give three numbers, one per "
                             f"RGB channel (e.g. {key}=0.5,0.5,0.5)")
    return values


def _image_splits(root: Path) -> tuple[Path, Path | None]:
    """The train folder and the test folder (None: no test split) of an image folder ``root``."""
    if not root.is_dir():
        raise LandscapeError(f"image folder '{root}' does not exist; point imagefolder:PATH at a folder of class "
                             "folders (PATH/<class>/*.jpg) or of train and val folders of them")
    test = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    if (root / "train").is_dir():
        return root / "train", test
    if test is not None:
        raise LandscapeError(f"image folder '{root}' has a '{test.name}' folder but no 'train' folder; point "
                             f"imagefolder:PATH at '{test}' to use it alone (as the train split)")
    return root, None


def _image_files(folder: Path, per_class: int | None) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names (sorted folder names), image files (sorted, class by class) and their labels ``(N,)``;
    the first ``per_class`` files of each class (all if None)."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise LandscapeError(f"image folder '{folder}' has no class folders; put each class's images in a "
                             "folder of its own (PATH/<class>/*.jpg)")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = [Path(parent, file) for parent, _, names in sorted(os.walk(folder / name, followlinks=True))
                 for file in sorted(names) if file.lower().endswith(IMAGE_EXTENSIONS)][:per_class]
        if not found:
            raise LandscapeError(f"class folder '{folder / name}' holds no images ({' '.join(IMAGE_EXTENSIONS)}); "
                                 "add images or remove the folder (every folder there is a class)")
        files += found
        labels += [index] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _read_image(path: Path, transform: ImageTransform) -> np.ndarray:
    """The transformed ``(3, crop, crop)`` float32 array of the image file ``path``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB"))
    except Exception as error:  # any failure means the file is not a readable image
        detail = (str(error).strip().splitlines() or [""])[0]
        raise LandscapeError(f"cannot read image '{path}' ({type(error).__name__}: {detail}); replace the file "
                             "with a readable image or delete it") from None


def _decode(files: Sequence[Path], transform: ImageTransform, desc: str) -> Tensor:
    """Every image of ``files`` through ``transform``: float32 ``(N, 3, crop, crop)``, decoded by a thread
    pool (Pillow releases the GIL) straight into place, with a progress bar on stderr after 2 s (when stderr
    is a terminal or LANDSCAPE_PROGRESS is set)."""
    from tqdm import tqdm

    images = torch.empty((len(files), 3, transform.crop, transform.crop), dtype=torch.float32)
    array = images.numpy()

    def decode(index: int) -> None:
        array[index] = _read_image(files[index], transform)

    hidden = not (sys.stderr.isatty() or os.environ.get("LANDSCAPE_PROGRESS"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(min(32, cores)) as pool, \
            tqdm(total=len(files), desc=desc, unit="image", file=sys.stderr, delay=2.0, leave=False,
                 disable=hidden) as bar:
        for start in range(0, len(files), DECODE_BLOCK):
            stop = min(start + DECODE_BLOCK, len(files))
            for _ in pool.map(decode, range(start, stop)):  # the first unreadable file, in order, raises
                bar.update()
    return images


@register("imagefolder", "images in a folder per class, PATH/<class>/* (or PATH/train/<class>/* and "
          "PATH/val/<class>/*); class index = place of the folder name in sorted order; resized and centre-cropped",
          options="crop=224, size=crop*8//7 (256), mean=0.485,0.456,0.406, std=0.229,0.224,0.225, "
                  "resample=bilinear, per_class=all (e.g. imagefolder:~/imagenet/val,per_class=10)")
def _load_imagefolder(spec: str, path: Path, seed: int) -> Dataset:
    """Class-per-folder images with torchvision's evaluation transform (see the module docstring)."""
    root, transform, per_class = parse_imagefolder(spec)
    train, test = _image_splits(root)
    classes, train_files, y_train = _image_files(train, per_class)
    test_files: list[Path] = []
    y_test = None
    if test is not None:
        test_classes, test_files, y_test = _image_files(test, per_class)
        if test_classes != classes:
            only_train, only_test = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
            raise LandscapeError(f"image folder '{root}' has other class folders in {train.name} and {test.name} "
                                 f"(only in {train.name}: {', '.join(only_train) or 'none'}; only in {test.name}: "
                                 f"{', '.join(only_test) or 'none'}); give both the same class folders, so that "
                                 "their class indices agree")
    count = len(train_files) + len(test_files)
    require(f"decoding {count:,} images of '{root}' to float32 3x{transform.crop}x{transform.crop}",
            f"decode fewer (e.g. imagefolder:PATH,per_class=10: the first 10 files of each class) or smaller images "
            f"(crop=); --subset does not help, it is drawn after the whole folder is decoded",
            memory=4.0 * count * 3 * transform.crop ** 2)
    x_train = _decode(train_files, transform, f"decoding {train}")
    if test is None:
        return _dataset(spec, root.resolve().name, (x_train, y_train), len(classes), tuple(classes))
    x_test = _decode(test_files, transform, f"decoding {test}")
    return _dataset(spec, root.resolve().name, (x_train, y_train, x_test, y_test), len(classes), tuple(classes))


def _load_user(spec: str) -> Dataset:
    """Data from a user ``module:function`` returning a Dataset, (x, y) or (x, y, x_test, y_test)."""
    returned = import_function(spec, "dataset", f"one of: {_forms()}")()
    if isinstance(returned, Dataset):
        return returned
    if isinstance(returned, (tuple, list)) and len(returned) in (2, 4):
        return _dataset(spec, spec.partition(":")[2], tuple(returned))
    raise LandscapeError(f"dataset function '{spec}' returned {type(returned).__name__}; return a "
                         "landscape.data.Dataset, a tuple (x, y) or a tuple (x, y, x_test, y_test)")


DATASET_SCHEMES = tuple(DATASETS.names())  # spec prefixes that name built-in readers, never code
