"""Built-in architectures by name, with keyword options, plus ``module:function`` user models.

Every image model adapts to any ``(C, H, W)`` input (8x8 digits, 32x32 CIFAR, ...) through
adaptive average pooling, and has a BatchNorm-free variant (``bn=False``), because Hessians in
the SAM paper are measured without BatchNorm. Without BN, convolutions get biases and each
residual branch ends in a zero-initialised convolution (as in Fixup/SkipInit), so a deep
BN-free ResNet starts as a well-conditioned near-identity map.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from landscape.data import import_function, names_code
from landscape.errors import LandscapeError
from landscape.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture: its name, a one-line description, its keyword defaults and
    ``builder(num_classes, input_shape, **options)``."""

    name: str
    description: str
    defaults: dict
    builder: Callable[..., nn.Module] = field(repr=False)


MODELS: Registry[ModelInfo] = Registry("model", hint=" or module:function for your own", sort=True)


def register(name: str, description: str) -> Callable:
    """Decorator adding ``builder(num_classes, input_shape, **options)`` to :data:`MODELS`.

    The options and their defaults are read from the builder's signature; a default's type
    says what a value must be (see :func:`_check_option`). A name registered before is refused.
    """

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        options = list(inspect.signature(builder).parameters.values())[2:]
        MODELS.register(name, ModelInfo(name, description, {option.name: option.default for option in options},
                                        builder))
        return builder

    return add


def list_models(pattern: str | None = None) -> list[ModelInfo]:
    """Registered architectures, sorted by name, optionally filtered by a glob (e.g. ``"res*"``)."""
    return MODELS.list(pattern)


def build_model(name: str, num_classes: int = 10, input_shape: tuple = (1, 8, 8), **kwargs) -> nn.Module:
    """Build a registered architecture, or call a user ``"module:function"`` with ``**kwargs`` only.

    ``input_shape`` excludes the batch dimension, e.g. ``(1, 8, 8)`` for digits, ``(3, 32, 32)``
    for CIFAR. Unknown names, unknown or ill-typed options, non-positive sizes and options the
    builder rejects raise :class:`LandscapeError`.
    """
    if names_code(name):
        model = _call(import_function(name, "model", f"a built-in model: {', '.join(MODELS.names())}"),
                      name, kwargs)
        if not isinstance(model, nn.Module):
            raise LandscapeError(f"model function '{name}' returned {type(model).__name__}; "
                                 "return a torch.nn.Module")
        return model
    info = MODELS.get(name)
    unknown = sorted(set(kwargs) - set(info.defaults))
    if unknown:
        raise LandscapeError(f"unknown option(s) {', '.join(unknown)} for model '{name}'; "
                             f"accepted: {', '.join(info.defaults) or 'none'}")
    if not _is_size(num_classes):
        raise LandscapeError(f"model '{name}' needs num_classes >= 1, got {num_classes!r}; "
                             "fix num_classes in --arch-kwargs or the dataset's labels")
    if not (isinstance(input_shape, (tuple, list)) and input_shape and all(map(_is_size, input_shape))):
        raise LandscapeError(f"model '{name}' needs input_shape as a list of sizes >= 1 (e.g. [1, 8, 8]), "
                             f"got {input_shape!r}; fix input_shape in --arch-kwargs")
    for option, value in kwargs.items():
        _check_option(name, option, value, info.defaults[option])
    return _call(info.builder, name, kwargs, int(num_classes), tuple(int(size) for size in input_shape))


def model_options(value: object, source: str = "--arch-kwargs") -> dict:
    """``value`` (``None`` or a mapping of option names to values) as a dict; anything else is bad input."""
    if value is None:
        return {}
    if not (isinstance(value, Mapping) and all(isinstance(key, str) for key in value)):
        raise LandscapeError(f"{source} must be an object of option names to values, got "
                             f"{type(value).__name__} {value!r}; e.g. '{{\"width\": 16, \"bn\": false}}'")
    return dict(value)


def _is_size(value: object) -> bool:
    """True for an integer >= 1 (booleans are not sizes)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_option(name: str, option: str, value: object, default: object) -> None:
    """Check ``value`` against the kind of the option's default.

    Booleans must be booleans, integer options are sizes or counts (>= 1), float options finite
    numbers, tuple options lists of sizes.
    """
    if isinstance(default, bool):
        valid, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        valid, wanted = _is_size(value), "an integer >= 1"
    elif isinstance(default, float):
        valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a finite number"
    else:
        valid, wanted = isinstance(value, (list, tuple)) and all(map(_is_size, value)), "a list of integers >= 1"
    if not valid:
        raise LandscapeError(f"option '{option}' of model '{name}' must be {wanted}, got "
                             f"{json.dumps(value, default=str)}; fix it in --arch-kwargs "
                             f"(default: {json.dumps(default)})")


def _call(builder: Callable[..., nn.Module], name: str, kwargs: dict, *args: object) -> nn.Module:
    """``builder(*args, **kwargs)``, its TypeError/ValueError/RuntimeError turned into one-line bad input."""
    try:
        return builder(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LandscapeError(f"cannot build model '{name}' with options {json.dumps(kwargs, default=str)} "
                             f"({type(error).__name__}: {reason}); fix --arch-kwargs "
                             "(see `landscape models`)") from None


def _image_channels(name: str, input_shape: tuple[int, ...]) -> int:
    """Channel count of an image input ``(C, H, W)``; other shapes raise a LandscapeError."""
    if len(input_shape) != 3:
        raise LandscapeError(f"model '{name}' needs image inputs of shape (C, H, W), got {input_shape}; "
                             "use mlp for flat inputs or reshape the data")
    return input_shape[0]


def _norm(channels: int, bn: bool) -> nn.Module:
    """BatchNorm over ``channels``, or the identity for the BN-free variant."""
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


def _conv(in_channels: int, out_channels: int, bn: bool, stride: int = 1, kernel: int = 3,
          zero: bool = False) -> nn.Conv2d:
    """Same-padding convolution, Kaiming-normal (fan-out, ReLU) or all-zero weights.

    Biased (zero-initialised) only without BN, since BN supplies the shift.
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=not bn)
    if zero:
        nn.init.zeros_(conv.weight)
    else:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


@register("mlp", "fully connected ReLU network on flattened inputs")
def mlp(num_classes: int, input_shape: tuple[int, ...], hidden=(64, 64)) -> nn.Module:
    """Flatten, then ``Linear + ReLU`` per hidden size, then a linear classifier."""
    sizes = [int(torch.Size(input_shape).numel()), *(int(size) for size in hidden)]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))


@register("cnn", "small 3-layer ConvNet for digits (~25k parameters at width 16)")
def cnn(num_classes: int, input_shape: tuple[int, ...], width: int = 16, bn: bool = True) -> nn.Module:
    """Conv(w)-Conv(2w)-MaxPool-Conv(4w), each with BN and ReLU, 2x2 average pool, linear head."""
    channels = _image_channels("cnn", input_shape)
    widths = (width, 2 * width, 4 * width)
    return nn.Sequential(
        _conv(channels, widths[0], bn), _norm(widths[0], bn), nn.ReLU(),
        _conv(widths[0], widths[1], bn), _norm(widths[1], bn), nn.ReLU(),
        nn.MaxPool2d(2) if min(input_shape[1:]) >= 2 else nn.Identity(),
        _conv(widths[1], widths[2], bn), _norm(widths[2], bn), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * widths[2], num_classes))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with a (projected) identity shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bn: bool):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, bn, stride)
        self.bn1 = _norm(out_channels, bn)
        self.conv2 = _conv(out_channels, out_channels, bn, zero=not bn)
        self.bn2 = _norm(out_channels, bn)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(_conv(in_channels, out_channels, bn, stride, kernel=1),
                                          _norm(out_channels, bn))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem without max-pool, four stages of two basic blocks."""

    def __init__(self, num_classes: int, in_channels: int, width: int, bn: bool):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = _conv(in_channels, width, bn)
        self.bn1 = _norm(width, bn)
        self.relu = nn.ReLU()
        blocks, channels = [], width
        for stage, out_channels in enumerate(widths):
            for index in range(2):
                blocks.append(BasicBlock(channels, out_channels, 2 if stage > 0 and index == 0 else 1, bn))
                channels = out_channels
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(out).flatten(1))


@register("resnet18", "ResNet-18, CIFAR variant (3x3 stem, no max-pool)")
def resnet18(num_classes: int, input_shape: tuple[int, ...], width: int = 64, bn: bool = True) -> nn.Module:
    """CIFAR ResNet-18 with ``width`` stem channels (64 in the original)."""
    return ResNet18(num_classes, _image_channels("resnet18", input_shape), int(width), bool(bn))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: (BN-ReLU-conv) twice, dropout in between."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float, bn: bool):
        super().__init__()
        self.bn1 = _norm(in_channels, bn)
        self.conv1 = _conv(in_channels, out_channels, bn, stride)
        self.bn2 = _norm(out_channels, bn)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(out_channels, out_channels, bn, zero=not bn)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(_conv(in_channels, out_channels, bn, stride, kernel=1))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis): three stages of (depth-4)/6 wide blocks."""

    def __init__(self, num_classes: int, in_channels: int, depth: int, width: int, dropout: float, bn: bool):
        super().__init__()
        widths = [16, 16 * width, 32 * width, 64 * width]
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = _conv(in_channels, widths[0], bn)
        blocks, channels = [], widths[0]
        for stage, out_channels in enumerate(widths[1:]):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(WideBlock(channels, out_channels, stride, dropout, bn))
                channels = out_channels
        self.layers = nn.Sequential(*blocks)
        self.bn = _norm(channels, bn)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(self.pool(out).flatten(1))


@register("wrn", "wide ResNet WRN-depth-width (e.g. 16-4, 28-10), optional dropout")
def wrn(num_classes: int, input_shape: tuple[int, ...], depth: int = 16, width: int = 4,
        dropout: float = 0.0, bn: bool = True) -> nn.Module:
    """WRN-``depth``-``width``; ``depth`` must be 6n+4 (10, 16, 22, 28, 40, ...)."""
    if depth < 10 or (depth - 4) % 6:
        raise LandscapeError(f"wrn depth {depth} is invalid; use 6n+4 with n >= 1, e.g. 16 or 28")
    return WideResNet(num_classes, _image_channels("wrn", input_shape), int(depth), int(width),
                      float(dropout), bool(bn))


VGG16_LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")  # channels / width


@register("vgg16bn", "VGG-16 with BatchNorm, CIFAR variant (bn=False: plain VGG-16)")
def vgg16bn(num_classes: int, input_shape: tuple[int, ...], width: int = 64, bn: bool = True) -> nn.Module:
    """13 conv layers (64..512 channels at width 64); max-pools stop once the map is 1x1."""
    channels = _image_channels("vgg16bn", input_shape)
    size = min(input_shape[1:])
    layers: list[nn.Module] = []
    for item in VGG16_LAYOUT:
        if item == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            continue
        out_channels = item * int(width)
        layers += [_conv(channels, out_channels, bool(bn)), _norm(out_channels, bool(bn)), nn.ReLU()]
        channels = out_channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
