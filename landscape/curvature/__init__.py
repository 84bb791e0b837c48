"""Curvature matrices as linear operators, and the solvers that take any of them.

- :mod:`~landscape.curvature.operator`: :class:`CurvatureOperator`, the base type of a symmetric
  ``d x d`` matrix known only through its products (``shape``, ``dtype``, ``device``, ``op @ v``,
  one product counter, ``to_scipy()``); :class:`DenseOperator` for an explicit matrix; Rademacher probes.
- :mod:`~landscape.curvature.hessian`: :class:`HessianOperator`, the Hessian of an
  :class:`~landscape.objective.Objective`: the one place a Hessian-vector product is computed.
- :mod:`~landscape.curvature.ggn`: :class:`GGNOperator`, the generalised Gauss-Newton matrix
  ``(1/N) sum J^T H_L J`` by Jacobian- and vector-Jacobian products.
- :mod:`~landscape.curvature.fisher`: :class:`EmpiricalFisherOperator`, the empirical Fisher
  ``(1/N) sum g_i g_i^T`` from per-example gradients at the true labels (not the Fisher).
- :mod:`~landscape.curvature.lanczos`: thick-restart Lanczos for the top/bottom eigenpairs, with
  measured residuals.
- :mod:`~landscape.curvature.slq`: stochastic Lanczos quadrature and its broadened spectral density.
- :mod:`~landscape.curvature.trace`: Hutchinson and Hutch++ trace estimates.
- :mod:`~landscape.curvature.pyhessian_backend`: PyHessian 0.1 on an objective, for comparison with papers.
"""

NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher": "empirical Fisher"}   # curvature -> how results name it
