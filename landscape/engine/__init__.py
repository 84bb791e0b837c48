"""Evaluating many points of weight space fast, and running them resumably.

- :mod:`landscape.engine.evaluator`: :class:`~landscape.engine.evaluator.PointEvaluator`, loss and
  accuracy at ``w + Σ_i c_i d_i`` for many coefficient vectors ``c``, on a private copy of the model.
- :mod:`landscape.engine.rewrites`: the speed-up rewrites of that copy, one small function each
  (BatchNorm folding, in-place activations, the first-layer cache, stacked Linear points,
  cache-sized micro-batches, channels-last).
- :mod:`landscape.engine.graph`: what the rewrites read from the model's ``torch.fx`` graph.
- :mod:`landscape.engine.layers`: the layers the rewrites put in: the cached first layer and the
  stacked Linear layer.
- :mod:`landscape.engine.metrics`: loss and correct predictions per point from stacked outputs.
- :mod:`landscape.engine.batchnorm`: BatchNorm running statistics recomputed at a point (``bn_recompute``).
- :mod:`landscape.engine.runner`: the resumable point runner that every analysis evaluating points
  uses (surfaces, interpolation, radius, sharpness): fixed blocks, crash-safe writes, resume.
- :mod:`landscape.engine.allocator`: :func:`tune_allocator`, glibc's malloc tuned for stacked points,
  called once by the commands that evaluate points (never as a side effect of building anything).
"""

from landscape.engine.allocator import tune_allocator

__all__ = ["tune_allocator"]
