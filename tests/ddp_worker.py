"""Training scenarios for ``test_distributed.py``: run on every rank by torchrun, or in-process as references.

    torchrun --standalone --nproc-per-node N tests/ddp_worker.py OUT_DIR SCENARIO...

Each scenario trains with :func:`landscape.train.train_model` and writes ``OUT_DIR/<scenario>.rank<r>.pt``:
the final weights and buffers, the history, the metrics and the rows of every training forward on that rank.
Models are float64 (the data too) unless a scenario says otherwise, so that comparisons hold to ~1e-12.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import landscape.train
from landscape import distributed
from landscape.data import Dataset, load_dataset
from landscape.tracking import Tracking
from landscape.trajectory import TrajectoryWriter

torch.set_num_threads(1)

EXAMPLES = 290            # batches of 100, 100 and 90: shares differ by a row on 3 ranks
MLP = {"hidden": [12]}
SCENARIOS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd", "epochs": 2},
    "sam": {"optimizer": "sam", "opt_args": {"rho": 0.5}, "cosine": False},
    "sam_global": {"optimizer": "sam", "opt_args": {"rho": 0.5, "ascent_scope": "global"}},
    "sam_group": {"optimizer": "sam", "opt_args": {"rho": 0.5, "ascent_scope": "group:2"}, "cosine": False},
    "rsam_global": {"optimizer": "rsam", "opt_args": {"gamma": 0.05, "ascent_scope": "global"}},
    "ssamf": {"optimizer": "ssamf", "opt_args": {"num_samples": 101}},
    "ssamd": {"optimizer": "ssamd", "opt_args": {"refresh": 1}},
    "mrwp_parallel": {"optimizer": "mrwp", "opt_args": {"parallel": True, "sigma": 0.3}},
    "marwp_parallel": {"optimizer": "marwp", "opt_args": {"parallel": True, "sigma": 0.3}, "epochs": 2},
    "bn_sam": {"optimizer": "sam", "arch": "cnn", "arch_kwargs": {"width": 2}, "float64": False},
    "bn_mrwp_parallel": {"optimizer": "mrwp", "opt_args": {"parallel": True}, "arch": "cnn",
                         "arch_kwargs": {"width": 2}, "float64": False},
    "resume_start": {"optimizer": "marwp", "opt_args": {"sigma": 0.3}, "epochs": 3, "interrupt_at": 4},
    "resume_finish": {"optimizer": "marwp", "opt_args": {"sigma": 0.3}, "epochs": 3, "resume": True},
    "tracked": {"optimizer": "sgd", "epochs": 2, "track": {"metrics": "lambda1,trace,loss", "every": 2, "subset": 150,
                                                           "top_k": 2, "tol": 1e-8, "trace_hvps": 9}},
}


class Interrupted(Exception):
    """Raised by :class:`StepCounter` to stop a run as a crash would."""


class StepCounter:
    """A training callback that counts steps (its state resumes with the run) and can interrupt the run."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls, self.steps, self.interrupt_at = 0, [], interrupt_at

    def __call__(self, *, step: int, epoch: int, model, optimizer, lr: float) -> None:
        if step == self.interrupt_at:
            raise Interrupted
        self.calls += 1
        self.steps.append(step)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "steps": list(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.steps = state["calls"], list(state["steps"])


def dataset(float64: bool = True) -> Dataset:
    """The first :data:`EXAMPLES` digits (train) and 60 test images, float64 unless asked otherwise."""
    digits = load_dataset("digits")
    dtype = torch.float64 if float64 else torch.float32
    return Dataset(f"digits[:{EXAMPLES}]", "digits", digits.x_train[:EXAMPLES].to(dtype), digits.y_train[:EXAMPLES],
                   digits.x_test[:60].to(dtype), digits.y_test[:60], digits.num_classes, digits.input_shape)


def train(optimizer: str, *, opt_args: dict[str, Any] | None = None, epochs: int = 1, cosine: bool = True,
          arch: str = "mlp", arch_kwargs: dict[str, Any] | None = None, float64: bool = True,
          out: str | None = None, resume: bool = False, interrupt_at: int | None = None,
          track: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one scenario on this rank; returns what the tests compare."""
    rows: list[int] = []
    build = landscape.train.build_model

    def recording_model(*args, **kwargs):
        model = build(*args, **kwargs).to(torch.float64 if float64 else torch.float32)
        model.register_forward_pre_hook(lambda module, inputs: rows.append(len(inputs[0])) if module.training
                                        else None)
        return model

    counter = StepCounter(interrupt_at)
    callbacks = [counter] if out is None else [  # a run writing a checkpoint also records its trajectory
        counter, TrajectoryWriter(Path(out).with_name("trajectory.h5"), 1, resume=resume)]
    landscape.train.build_model = recording_model
    try:
        result = landscape.train.train_model(dataset(float64), arch, optimizer, epochs=epochs, batch_size=100,
                                             opt_args=opt_args, arch_kwargs=arch_kwargs or MLP, cosine=cosine,
                                             seed=0, device="cpu", out=out, resume=resume, callbacks=callbacks,
                                             track=None if track is None else Tracking(**track))
    except Interrupted:
        return {"interrupted": True, "rows": rows, "calls": counter.calls}
    finally:
        landscape.train.build_model = build
    return {"state": {name: tensor.clone() for name, tensor in result.model.state_dict().items()},
            "history": result.history, "metrics": {k: v for k, v in result.metrics.items() if k != "seconds"},
            "rows": rows, "calls": counter.calls, "steps": counter.steps,
            "masks": result.optimizer.masks() if hasattr(result.optimizer, "masks") else None,
            "tracking": None if result.tracking is None else {name: torch.as_tensor(values) for name, values
                                                              in result.tracking.arrays.items()}}


def main(folder: str, names: list[str]) -> None:
    for name in names:
        options = dict(SCENARIOS[name])
        if name.startswith("resume"):
            options["out"] = str(Path(folder) / "resume.pt")
        if "track" in options:
            options["track"] = {**options["track"], "out": str(Path(folder) / f"{name}.h5")}
        torch.save(train(**options), Path(folder) / f"{name}.rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
