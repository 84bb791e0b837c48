"""Model registry: every architecture builds and runs on digits and CIFAR shapes; options and errors."""

import textwrap

import pytest
import torch
from torch import nn

from landscape.errors import LandscapeError
from landscape.models import build_model, list_models

SHAPES = {"digits": (1, 8, 8), "cifar": (3, 32, 32)}
# Small configurations of every architecture, with and without BatchNorm.
SMALL = [
    ("mlp", {}), ("mlp", {"hidden": [16]}),
    ("cnn", {}), ("cnn", {"bn": False}),
    ("resnet18", {"width": 4}), ("resnet18", {"width": 4, "bn": False}),
    ("wrn", {"depth": 10, "width": 1}), ("wrn", {"depth": 10, "width": 1, "bn": False, "dropout": 0.3}),
    ("vgg16bn", {"width": 2}), ("vgg16bn", {"width": 2, "bn": False}),
]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize(("name", "kwargs"), SMALL, ids=[f"{n}-{k}" for n, k in SMALL])
def test_every_model_builds_runs_and_backpropagates(name, kwargs, shape_name):
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, input_shape=shape, **kwargs)
    logits = model(torch.randn(3, *shape))
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if name != "mlp":
        assert has_batchnorm(model) == kwargs.get("bn", True)


def count_vgg16(width: int, in_channels: int, classes: int, bn: bool) -> int:
    """Parameter count of VGG-16 re-derived layer by layer: 3x3 convs (+bias or BN), linear head."""
    channels = [width * m for m in (1, 1, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8, 8)]
    total, previous = 0, in_channels
    for out in channels:
        total += 9 * previous * out + (2 if bn else 1) * out  # conv weight; BN scale + shift, or conv bias
        previous = out
    return total + previous * classes + classes


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    # Published CIFAR-10 parameter counts: ResNet-18 (kuangliu/pytorch-cifar) and WRN-16-4 / WRN-28-10
    # (Zagoruyko & Komodakis 2016: 2.7M and 36.5M).
    ("resnet18", {}, 11_173_962),
    ("wrn", {"depth": 16, "width": 4}, 2_748_890),
    ("wrn", {"depth": 28, "width": 10}, 36_479_194),
    ("vgg16bn", {}, count_vgg16(64, 3, 10, bn=True)),
    ("vgg16bn", {"bn": False}, count_vgg16(64, 3, 10, bn=False)),
])
def test_named_sizes_build_with_the_published_parameter_counts(name, kwargs, expected):
    model = build_model(name, num_classes=10, input_shape=(3, 32, 32), **kwargs).eval()
    assert sum(p.numel() for p in model.parameters()) == expected
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bn_free_residual_branches_start_as_identity():
    """Without BN the last conv of each residual branch is zero, so a block maps x to relu(x) (ResNet)."""
    torch.manual_seed(0)
    resnet = build_model("resnet18", input_shape=(3, 8, 8), width=4, bn=False)
    block = resnet.layers[0]
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(x))
    wide = build_model("wrn", input_shape=(3, 8, 8), depth=10, width=1, bn=False)
    block = wide.layers[0]
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), x)


def test_registry_listing_and_defaults_match_the_builders():
    names = [info.name for info in list_models()]
    assert names == sorted(names) and {"mlp", "cnn", "resnet18", "wrn", "vgg16bn"} <= set(names)
    assert [info.name for info in list_models("res*")] == ["resnet18"]
    assert list_models("nothing*") == []
    wrn = next(info for info in list_models() if info.name == "wrn")
    assert wrn.defaults == {"depth": 16, "width": 4, "dropout": 0.0, "bn": True}
    cnn = build_model("cnn")
    assert 10_000 <= sum(p.numel() for p in cnn.parameters()) <= 40_000


def test_bad_names_options_and_shapes_are_input_errors():
    with pytest.raises(LandscapeError, match="unknown model 'resnet50'.*cnn, mlp, resnet18, vgg16bn, wrn"):
        build_model("resnet50")
    with pytest.raises(LandscapeError, match="unknown option.*depth.*accepted: width, bn"):
        build_model("cnn", depth=3)
    with pytest.raises(LandscapeError, match="6n\\+4"):
        build_model("wrn", input_shape=(3, 32, 32), depth=15)
    with pytest.raises(LandscapeError, match=r"image inputs of shape \(C, H, W\)"):
        build_model("cnn", input_shape=(64,))
    assert build_model("mlp", input_shape=(64,))(torch.randn(2, 64)).shape == (2, 10)


USER_MODELS = textwrap.dedent("""
    from torch import nn

    def linear(features=4, classes=3):
        return nn.Linear(features, classes)

    def not_a_model():
        return 42
""")


def test_module_function_models(tmp_path, monkeypatch):
    (tmp_path / "my_user_models.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    model = build_model("my_user_models:linear", num_classes=99, input_shape=(1,), features=5)
    assert isinstance(model, nn.Linear) and model.in_features == 5 and model.out_features == 3
    with pytest.raises(LandscapeError, match="returned int"):
        build_model("my_user_models:not_a_model")
    with pytest.raises(LandscapeError, match="cannot import module 'absent_models_xyz'.*built-in model"):
        build_model("absent_models_xyz:net")


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("cnn", {"width": -3}, "option 'width' of model 'cnn' must be an integer >= 1, got -3"),
    ("cnn", {"width": 0}, "option 'width' of model 'cnn' must be an integer >= 1, got 0"),
    ("cnn", {"width": "big"}, "option 'width' of model 'cnn' must be an integer >= 1, got \"big\""),
    ("cnn", {"width": 2.5}, "option 'width' of model 'cnn' must be an integer >= 1, got 2.5"),
    ("cnn", {"bn": "no"}, "option 'bn' of model 'cnn' must be true or false"),
    ("mlp", {"hidden": [-1]}, "option 'hidden' of model 'mlp' must be a list of integers >= 1, got [-1]"),
    ("mlp", {"hidden": 64}, "option 'hidden' of model 'mlp' must be a list of integers >= 1, got 64"),
    ("cnn", {"num_classes": 0}, "model 'cnn' needs num_classes >= 1, got 0"),
    ("resnet18", {"num_classes": "ten"}, "model 'resnet18' needs num_classes >= 1"),
    ("cnn", {"input_shape": [1, -8, 8]}, "model 'cnn' needs input_shape as a list of sizes >= 1"),
    ("mlp", {"input_shape": 64}, "model 'mlp' needs input_shape as a list of sizes >= 1"),
    ("wrn", {"depth": 5}, "wrn depth 5 is invalid"),
    ("wrn", {"depth": 10, "dropout": float("nan")}, "option 'dropout' of model 'wrn' must be a finite number"),
    ("wrn", {"depth": 10, "width": 1, "dropout": 2.0},
     "cannot build model 'wrn' with options {\"depth\": 10, \"width\": 1, \"dropout\": 2.0} (ValueError: dropout"),
])
def test_bad_options_are_one_line_input_errors(name, kwargs, message):
    with pytest.raises(LandscapeError) as error:
        build_model(name, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_user_builder_errors_are_input_errors(tmp_path, monkeypatch):
    (tmp_path / "my_strict_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def linear(features=4):
            if features > 100:
                raise ValueError("at most 100 features")
            return nn.Linear(features, 3)
    """))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LandscapeError, match=r"cannot build model 'my_strict_models:linear' with options "
                                             r"\{\"size\": 5\} \(TypeError: .*unexpected keyword.*fix --arch-kwargs"):
        build_model("my_strict_models:linear", size=5)
    with pytest.raises(LandscapeError, match=r"\(ValueError: at most 100 features\)"):
        build_model("my_strict_models:linear", features=101)
