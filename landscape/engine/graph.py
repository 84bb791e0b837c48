"""What the evaluator's rewrites read from a model's ``torch.fx`` graph.

The private copy of the model is traced once (:func:`trace`), before any rewrite; the graph's
module paths then say

- which Conv/Linear layer feeds a BatchNorm alone (:func:`conv_batchnorm_pairs`: folding);
- which activations get a fresh tensor that nothing else reads (:func:`activations_on_fresh_tensors`:
  running them in place);
- which layer may be replaced by the first-layer cache (:func:`cacheable_first_layer`): the first
  module with parameters of its own, a Linear/Conv layer called once per forward on the model input
  (or a row-wise flattening of it), whose parameters nothing else reads.

A model that ``torch.fx`` cannot trace gets none of these rewrites; every refusal is logged at
DEBUG level with its reason.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter

import torch
from torch import fx, nn

log = logging.getLogger(__name__)

FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CACHEABLE_LAYERS = FOLDABLE_LAYERS + (nn.ConvTranspose1d, nn.ConvTranspose2d)  # output linear in the weights
INPLACE_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish, nn.Hardswish)
_BATCHNORM = nn.modules.batchnorm._BatchNorm


def trace(model: nn.Module) -> fx.Graph | None:
    """The ``torch.fx`` graph of ``model``, or ``None`` (logged) when fx cannot trace it."""
    try:
        return fx.symbolic_trace(model).graph
    except Exception as error:  # noqa: BLE001 - any model may be given; it then gets no graph rewrites
        log.debug("torch.fx cannot trace the %s model (%s: %s): no BatchNorm folding, in-place activations or "
                  "first-layer cache", type(model).__name__, type(error).__name__, error)
        return None


def _sole_inputs(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """The (producer, module call) node pairs where the call's only input is the producer's output
    and nothing else uses that output."""
    return [(node.args[0], node) for node in graph.nodes
            if node.op == "call_module" and len(node.args) == 1 and not node.kwargs
            and isinstance(node.args[0], fx.Node) and len(node.args[0].users) == 1]


def _calls(graph: fx.Graph) -> Counter:
    """How often each module path is called per forward."""
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def conv_batchnorm_pairs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """(layer, BatchNorm) module paths where the BatchNorm's only input is a Conv/Linear layer's output
    that nothing else uses, each called once."""
    modules, calls = dict(model.named_modules()), _calls(graph)
    return [(source.target, node.target) for source, node in _sole_inputs(graph)
            if source.op == "call_module" and type(modules[node.target]) in FOLDABLE_NORMS
            and type(modules[source.target]) in FOLDABLE_LAYERS and modules[node.target].running_mean is not None
            and calls[node.target] == calls[source.target] == 1]


def activations_on_fresh_tensors(model: nn.Module, graph: fx.Graph) -> list[str]:
    """Paths of activation modules every call of which gets a new tensor that nothing else uses (a
    Conv/Linear/BatchNorm output or a sum), so they may overwrite it."""
    modules, calls = dict(model.named_modules()), _calls(graph)
    makers = FOLDABLE_LAYERS + (_BATCHNORM,)
    fresh = Counter(node.target for source, node in _sole_inputs(graph)
                    if isinstance(modules[node.target], INPLACE_ACTIVATIONS) and (
                        (source.op == "call_module" and isinstance(modules[source.target], makers))
                        or (source.op == "call_function" and source.target in (operator.add, torch.add))))
    return [path for path, count in fresh.items() if count == calls[path]]


def _reads_parameters(node: fx.Node, modules: dict[str, nn.Module], parameters: set[str]) -> bool:
    """Whether ``node`` calls a module with parameters of its own or reads a parameter."""
    if node.op == "call_module":
        return next(modules[node.target].parameters(recurse=False), None) is not None
    return node.op == "get_attr" and node.target in parameters


def _flattened(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The input of ``node`` when ``node`` only keeps it or flattens it row by row (``nn.Flatten``,
    ``flatten`` from a dimension >= 1, ``contiguous``, ``nn.Identity``); else ``None``."""
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        module = modules[node.target]
        keeps = (type(module) is nn.Identity or (type(module) is nn.Flatten and module.start_dim >= 1)) \
            and len(node.args) == 1 and not node.kwargs
    elif node.op == "call_method" and node.target == "contiguous":
        keeps = len(node.args) == 1
    elif (node.op, node.target) in (("call_method", "flatten"), ("call_function", torch.flatten)):
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        keeps = isinstance(start, int) and start >= 1 and len(node.args) <= 3 and set(node.kwargs) <= {"start_dim",
                                                                                                       "end_dim"}
    else:
        keeps = False
    return source if keeps else None


def cacheable_first_layer(model: nn.Module, graph: fx.Graph) -> str | None:
    """The path of the layer that the first-layer cache may stand in for, or ``None`` (logged).

    That is the first node of the graph that reads parameters, when it is a call of a Linear/Conv
    layer (:data:`CACHEABLE_LAYERS`) that is called once per forward, whose parameters are read
    nowhere else, and whose one input is the model's (first) input, flattened row by row at most.
    Any other first layer would see other inputs than the cached ones: twice called, weight-shared,
    or fed by an expression of the input.
    """
    modules = dict(model.named_modules())
    parameters = {name for name, _ in model.named_parameters()}
    first = next((node for node in graph.nodes if _reads_parameters(node, modules, parameters)), None)
    if first is None:
        log.debug("no first-layer cache: the model has no parameters")
        return None
    if first.op != "call_module" or type(modules[first.target]) not in CACHEABLE_LAYERS:
        what = (f"a {type(modules[first.target]).__name__} module" if first.op == "call_module"
                else f"a direct read of {first.target}")
        log.debug("no first-layer cache: the first use of parameters, %s, is not a Linear/Conv layer", what)
        return None
    path = first.target
    calls = _calls(graph)[path]
    if calls > 1:
        log.debug("no first-layer cache: the first layer %s is called %d times per forward", path, calls)
        return None
    shared = [node.target for node in graph.nodes if node.op == "get_attr" and node.target.startswith(f"{path}.")]
    if shared:
        log.debug("no first-layer cache: the parameters of the first layer %s are also read as %s", path, shared[0])
        return None
    if len(first.args) != 1 or first.kwargs or not isinstance(first.args[0], fx.Node):
        log.debug("no first-layer cache: the first layer %s takes other arguments than one tensor", path)
        return None
    source = first.args[0]
    while source.op != "placeholder":
        upstream = _flattened(source, modules)
        if upstream is None:
            log.debug("no first-layer cache: the input of the first layer %s is not the model input but %s",
                      path, source.format_node())
            return None
        source = upstream
    if source is not next(node for node in graph.nodes if node.op == "placeholder"):
        log.debug("no first-layer cache: the first layer %s takes the model's argument %s, not its input",
                  path, source.target)
        return None
    return path
