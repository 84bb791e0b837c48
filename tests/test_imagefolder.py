"""``imagefolder:PATH``: class-per-folder images with torchvision's evaluation transform, and its bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_input_error, invoke
from PIL import Image

from landscape.data import load_dataset
from landscape.errors import LandscapeError

# ImageNet's per-channel statistics on the [0, 1] scale, written out independently of the code.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL = "size=10,crop=8"
# (width, height) -> (the size after resizing the shorter side to 10, (left, top) of the centre 8x8 crop),
# worked out by hand: the longer side is int(10 * long / short), offsets int(round((side - 8) / 2)) with
# Python's round-half-to-even, as torchvision's Resize and CenterCrop compute them.
GEOMETRY = {
    (40, 30): ((13, 10), (2, 1)),   # 13.33 -> 13; (13 - 8) / 2 = 2.5 -> 2
    (30, 45): ((10, 15), (1, 4)),   # 3.5 -> 4
    (24, 24): ((10, 10), (1, 1)),
    (50, 20): ((25, 10), (8, 1)),   # 8.5 -> 8
    (17, 33): ((10, 19), (1, 6)),   # 19.41 -> 19; 5.5 -> 6
}


def write_image(path: Path, kind: str, size: tuple[int, int], seed: int) -> np.ndarray:
    """Write an image of ``kind`` and ``size`` (width, height) to ``path``; return its RGB pixels (H, W, 3)
    uint8 as torchvision's loader sees them (greyscale replicated, alpha dropped, palette looked up)."""
    rng = np.random.default_rng(seed)
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "grey":
        grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
        Image.fromarray(grey, "L").save(path)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if kind == "rgba":
        rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(path)
        return rgba[:, :, :3]
    if kind == "palette":
        palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
        indices = rng.integers(0, 16, (height, width), dtype=np.uint8)
        image = Image.fromarray(indices, "P")
        image.putpalette(palette.ravel().tolist())
        image.save(path)
        return palette[indices]
    if kind == "cmyk":
        Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "CMYK").save(path, "JPEG")
    else:  # rgb, in the format the file name says (lossless except JPEG)
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(rgb, "RGB").save(path, **({"quality": 95} if kind == "jpeg" else {}))
        if kind != "jpeg":
            return rgb
    with Image.open(path) as decoded:  # lossy: the reference starts from Pillow's decoding of the file
        return np.asarray(decoded.convert("RGB"))


def reference(rgb: np.ndarray, resized: tuple[int, int], corner: tuple[int, int], crop: int, mean, std,
              resample=Image.Resampling.BILINEAR) -> np.ndarray:
    """The expected (3, crop, crop) input, in float64: resize, crop at ``corner``, scale, normalise."""
    left, top = corner
    image = Image.fromarray(rgb, "RGB").resize(resized, resample).crop((left, top, left + crop, top + crop))
    scaled = np.asarray(image, dtype=np.float64) / 255.0
    return ((scaled - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


# (split, class folder, file, kind, size): the class folders are created out of sorted order on purpose.
TREE = [
    ("train", "Zebra", "b.png", "rgba", (40, 30)),
    ("train", "Zebra", "a.JPEG", "jpeg", (30, 45)),
    ("train", "Zebra", "sub/c.bmp", "rgb", (24, 24)),
    ("train", "ant", "x.jpeg", "cmyk", (50, 20)),
    ("train", "ant", "y.png", "grey", (17, 33)),
    ("train", "bee", "k.png", "palette", (40, 30)),
    ("val", "bee", "v.jpg", "jpeg", (17, 33)),
    ("val", "Zebra", "w.png", "grey", (24, 24)),
    ("val", "ant", "z.PNG", "rgb", (50, 20)),
]
CLASSES = ("Zebra", "ant", "bee")  # sorted: upper case before lower case, as Python (and torchvision) sort
# The files of each split in the expected order: class by class (sorted), files sorted, subfolders after.
TRAIN_ORDER = ["Zebra/a.JPEG", "Zebra/b.png", "Zebra/sub/c.bmp", "ant/x.jpeg", "ant/y.png", "bee/k.png"]
VAL_ORDER = ["Zebra/w.png", "ant/z.PNG", "bee/v.jpg"]


@pytest.fixture
def tree(tmp_path) -> tuple[Path, dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """The split tree of TREE under ``tmp_path / "images"`` (plus a file that is not an image), with each
    file's RGB pixels and original size, keyed by ``split/class/file``."""
    root = tmp_path / "images"
    pixels, sizes = {}, {}
    for seed, (split, label, name, kind, size) in enumerate(TREE):
        key = f"{split}/{label}/{name}"
        pixels[key], sizes[key] = write_image(root / key, kind, size, seed), size
    (root / "train" / "bee" / "notes.txt").write_text("not an image: skipped")
    return root, pixels, sizes


def expected_split(split: str, order: list[str], pixels, sizes, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   resample=Image.Resampling.BILINEAR) -> tuple[np.ndarray, list[int]]:
    images = [reference(pixels[f"{split}/{key}"], *GEOMETRY[sizes[f"{split}/{key}"]], 8, mean, std, resample)
              for key in order]
    return np.stack(images), [CLASSES.index(key.split("/")[0]) for key in order]


def test_train_and_val_folders_give_sorted_class_indices_and_torchvision_s_eval_transform(tree):
    root, pixels, sizes = tree
    data = load_dataset(f"imagefolder:{root},{SMALL}")
    assert data.classes == CLASSES and data.num_classes == 3 and data.input_shape == (3, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.spec == f"imagefolder:{root},{SMALL}"
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 2] and data.y_test.tolist() == [0, 1, 2]
    for split, order, (x, y) in (("train", TRAIN_ORDER, data.split("train")), ("val", VAL_ORDER, data.split("test"))):
        images, labels = expected_split(split, order, pixels, sizes)
        assert y.tolist() == labels
        np.testing.assert_allclose(x.numpy(), images, rtol=1e-6, atol=1e-6)


def test_options_set_the_statistics_and_the_filter(tree):
    root, pixels, sizes = tree
    mean, std = (0.5, 0.25, 0.0), (0.5, 2.0, 1.0)
    data = load_dataset(f"imagefolder:{root}/val,{SMALL},mean=0.5,0.25,0,std=0.5,2,1,resample=bicubic")
    images, labels = expected_split("val", VAL_ORDER, pixels, sizes, mean, std, Image.Resampling.BICUBIC)
    np.testing.assert_allclose(data.x_train.numpy(), images, rtol=1e-6, atol=1e-6)
    assert data.y_train.tolist() == labels and data.x_test is None


def test_the_default_is_the_centre_224_crop_of_the_shorter_side_resized_to_256(tmp_path):
    rgb = {name: write_image(tmp_path / name / "only.png", "rgb", size, seed)
           for seed, (name, size) in enumerate((("a", (300, 260)), ("b", (224, 230))))}
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.input_shape == (3, 224, 224) and data.classes == ("a", "b")
    # 256 * 300 / 260 = 295.4 -> 295, (295 - 224) / 2 = 35.5 -> 36; 256 * 230 / 224 = 262.9 -> 262, 19
    expected = [reference(rgb["a"], (295, 256), (36, 16), 224, IMAGENET_MEAN, IMAGENET_STD),
                reference(rgb["b"], (256, 262), (16, 19), 224, IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(data.x_train.numpy(), np.stack(expected), rtol=1e-6, atol=1e-6)


def test_a_folder_of_class_folders_is_one_split_and_per_class_takes_the_first_files(tree):
    root, pixels, sizes = tree
    data = load_dataset(f"imagefolder:{root / 'train'},{SMALL},per_class=1")
    assert data.x_test is None and data.classes == CLASSES
    images, labels = expected_split("train", ["Zebra/a.JPEG", "ant/x.jpeg", "bee/k.png"], pixels, sizes)
    np.testing.assert_allclose(data.x_train.numpy(), images, rtol=1e-6, atol=1e-6)
    assert data.y_train.tolist() == labels == [0, 1, 2]
    with pytest.raises(LandscapeError, match=r"no test split; .*PATH/train and PATH/val"):
        data.split("test")


def test_an_imagefolder_spec_is_data_never_code(tmp_path):
    from landscape.checkpoint import recorded_spec
    from landscape.data import DATASET_SCHEMES, names_code

    spec = f"imagefolder:{tmp_path},crop=8"
    assert not names_code(spec, DATASET_SCHEMES) and names_code("imagefolder_x:load", DATASET_SCHEMES)
    assert recorded_spec({"dataset": spec}, "dataset", tmp_path / "model.pt", trust=False) == spec


def test_train_then_analyse_end_to_end(tree, tmp_path):
    root = tree[0]
    spec = f"imagefolder:{root / 'train'},{SMALL}"
    out = tmp_path / "model.pt"
    trained = invoke("train", "--data", spec, "--arch", "cnn", "--arch-kwargs", '{"width": 2}', "--epochs", "1",
                     "--batch-size", "4", "--device", "cpu", "--out", out)
    assert trained.exit_code == 0, trained.output
    # The recorded imagefolder spec is data: the analysis reloads it without --data or --trust.
    measured = invoke("hessian", out, "--top-k", "1", "--device", "cpu", "--out", tmp_path / "r.h5")
    assert measured.exit_code == 0, measured.output
    assert_input_error(invoke("hessian", out, "--split", "test", "--top-k", "1", "--device", "cpu",
                              "--out", tmp_path / "r.h5", "--overwrite"), "no test split", "PATH/val")


def corrupt(root: Path) -> str:
    (root / "train" / "bee" / "k.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return "k.png"


def truncated(root: Path) -> str:
    path = root / "train" / "Zebra" / "a.JPEG"
    path.write_bytes(path.read_bytes()[:300])
    return "a.JPEG"


def empty_class(root: Path) -> str:
    (root / "train" / "empty").mkdir()
    (root / "val" / "empty").mkdir()
    return "holds no images"


def no_classes(root: Path) -> str:
    for path in sorted(root.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    return "has no class folders"


def other_classes(root: Path) -> str:
    (root / "val" / "Zebra").rename(root / "val" / "zebras")
    return "only in train: Zebra; only in val: zebras"


def val_only(root: Path) -> str:
    (root / "train").rename(root / "elsewhere")
    return "no 'train' folder"


PROBLEMS = {  # what breaks the tree and says so in the one-line error, and the options after the path
    "corrupt image": (corrupt, ",crop=8"),
    "truncated image": (truncated, ",crop=8"),
    "empty class folder": (empty_class, ",crop=8"),
    "no class folders": (no_classes, ",crop=8"),
    "other classes in val": (other_classes, ",crop=8"),
    "val without train": (val_only, ",crop=8"),
    "missing folder": (lambda root: "does not exist", "/nowhere,crop=8"),
    "unknown option": (lambda root: "unknown option 'zoom'; the options are crop, size", ",crop=8,zoom=2"),
    "repeated option": (lambda root: "'crop' twice", ",crop=8,crop=4"),
    "crop beyond size": (lambda root: "choose crop <= size", ",crop=8,size=6"),
    "bad number": (lambda root: "a whole number >= 1", ",crop=8,size=-3"),
    "two means": (lambda root: "three numbers", ",crop=8,mean=0.5,0.5"),
    "zero std": (lambda root: "must be > 0", ",crop=8,std=1,0,1"),
    "unknown filter": (lambda root: "use one of nearest, bilinear", ",crop=8,resample=box"),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_bad_image_folders_and_options_are_one_line_errors(tree, tmp_path, problem):
    root = tree[0]
    damage, options = PROBLEMS[problem]
    fragment = damage(root)
    result = invoke("train", "--data", f"imagefolder:{root}{options}", "--arch", "cnn", "--epochs", "1",
                    "--device", "cpu", "--out", tmp_path / "model.pt")
    assert_input_error(result, fragment)


def test_a_folder_too_large_for_memory_is_refused_before_decoding(tree, tmp_path, monkeypatch):
    import landscape.resources

    monkeypatch.setattr(landscape.resources, "available_memory", lambda: 1000.0)
    # 9 images of 3 x 8 x 8 float32 = 6,912 bytes
    result = invoke("train", "--data", f"imagefolder:{tree[0]},{SMALL}", "--epochs", "1", "--out", tmp_path / "m.pt")
    assert_input_error(result, "decoding 9 images", "~6.9 kB of memory", "per_class=", "--subset does not help")


def test_datasets_lists_imagefolder_with_its_options():
    result = invoke("datasets", "image*")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("imagefolder:PATH ") and "sorted" in lines[0]
    assert lines[1].split() == ["options:", "crop=224,", "size=crop*8//7", "(256),", "mean=0.485,0.456,0.406,",
                                "std=0.229,0.224,0.225,", "resample=bilinear,", "per_class=all", "(e.g.",
                                "imagefolder:~/imagenet/val,per_class=10)"]
