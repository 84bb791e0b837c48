"""The CUDA paths of the surface evaluator, against hand-built float64 models on the CPU (skipped without a GPU)."""

import numpy as np
import pytest
import torch
from helpers import assert_close, make_model
from test_surface import perturbed, plain_metrics

from landscape.data import eval_subset
from landscape.engine.evaluator import PointEvaluator
from landscape.objective import Objective
from landscape.params import surface_directions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data(digits):
    x, y, _ = eval_subset(*digits.split("train"), 160, 0)
    return x.double(), y


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_cuda_surface_points_equal_hand_built_cpu_models(data, name):
    x, y = data
    model = make_model(name)
    objective = Objective(model, x, y, dtype=torch.float64, batch_size=64, device="cuda")
    directions = surface_directions(objective.params, seed=3)
    evaluator = PointEvaluator({"train": objective}, directions)
    assert (evaluator.speedups["stack_points"] > 1) == (name == "mlp"), evaluator.speedups
    points = [[0.3, -0.2], [1.0, 0.5], [-0.7, 0.0], [0.0, 0.0], [0.25, 0.9]]
    got = evaluator.evaluate(points)
    cpu = {n: t.cpu() for n, t in directions[0].items()}, {n: t.cpu() for n, t in directions[1].items()}
    expected = np.array([plain_metrics(perturbed(model, {n: a * cpu[0][n] + b * cpu[1][n] for n in cpu[0]}),
                                       x, y) for a, b in points])
    assert_close(got["train_loss"], expected[:, 0], 1e-9, f"{name} loss on CUDA")
    assert_close(got["train_acc"], expected[:, 1], 1e-12, f"{name} accuracy on CUDA")


def test_cuda_hessian_operator_vmaps_blocks_and_counts_each_vector_once():
    from test_curvature import dense_hessian, tiny_objective

    from landscape.curvature.hessian import HessianOperator

    cpu = tiny_objective()
    exact = dense_hessian(cpu)
    objective = Objective(cpu.model, cpu.inputs, cpu.targets, batch_size=7, device="cuda")
    block = torch.randn(len(exact), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    passes = []
    operator = HessianOperator(objective, batch=4, progress=passes.append)
    got = operator @ block.cuda()   # several vectors on a GPU: vmapped forward-over-reverse, no graphs decided
    assert operator.graphs is None
    single = operator @ block[:, 0].cuda()   # one vector: double backward through cached graphs
    assert operator.graphs and passes == [4, 2, 1] and operator.products == 7
    assert_close(got.cpu(), exact @ block, 1e-10, "vmapped block on CUDA", atol=1e-12)
    assert_close(single.cpu(), exact @ block[:, 0], 1e-10, "cached single vector on CUDA", atol=1e-12)


def test_cuda_ggn_vmaps_blocks_and_fisher_keeps_gradients_on_the_gpu(data):
    from test_ggn_fisher import dense_fisher, dense_ggn
    from test_hessian import case_model

    from landscape.curvature.fisher import EmpiricalFisherOperator
    from landscape.curvature.ggn import GGNOperator

    x, y = data[0][:40], data[1][:40]
    model = case_model("cnn-bn-eval")
    objective = Objective(model, x, y, batch_size=16, device="cuda")
    rows = torch.randn(6, objective.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ggn, fisher = GGNOperator(objective), EmpiricalFisherOperator(objective)
    assert ggn.vectorize and fisher.cached
    for operator, dense in ((ggn, dense_ggn(model, x, y, "eval", 16)), (fisher, dense_fisher(model, x, y))):
        assert_close(operator.apply(rows.cuda()).cpu(), rows @ dense, 1e-10,
                     f"{type(operator).__name__} on CUDA", atol=1e-12 * float(dense.abs().max()))
    assert fisher.gradients.device.type == "cuda"
