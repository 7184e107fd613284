"""Trainer factories, default settings and FLamby's published numbers for the task."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from conclave.core.parameters import Parameters
from conclave.core.ports import Trainer
from conclave.core.types import TrainerContext
from conclave.tasks.heart_disease.dataset import (
    HOSPITALS,
    NUM_FEATURES,
    HospitalData,
    hospital_index,
    load_hospital,
)
from conclave.trainers.numpy_logreg import LogisticRegressionTrainer, initial_logreg_parameters

DEFAULT_CONFIG: Mapping[str, int | float] = MappingProxyType(
    {"local_steps": 100, "batch_size": 4, "lr": 1e-3, "rounds": 15}
)
"""FLamby's FedAvg protocol: 15 rounds of 100 local SGD steps, batch size 4, lr 1e-3."""

FLAMBY_BASELINES: Mapping[str, float] = MappingProxyType(
    {
        "fedavg": 0.685,
        "fedavg_std": 0.025,
        "pooled": 0.735,
        **{
            f"fedavg/{name}": value
            for name, value in zip(HOSPITALS, (0.731, 0.719, 0.650, 0.640), strict=True)
        },
    }
)
"""FLamby's test accuracy: ``fedavg`` and ``pooled`` are means over the four hospitals' test
sets (and 5 seeds), ``fedavg_std`` the std over seeds, ``fedavg/hospital-i`` per test set."""


def initial_parameters(seed: int) -> Parameters:
    """The task's initial model for ``seed`` (same for the numpy and the torch trainer)."""
    return initial_logreg_parameters(NUM_FEATURES, seed)


def participant_data(ctx: TrainerContext) -> HospitalData:
    """The hospital whose participant name is ``ctx.participant``; empty on the coordinator."""
    if ctx.participant is None:
        empty_x = np.zeros((0, NUM_FEATURES), dtype=np.float32)
        empty_y = np.zeros((0,), dtype=np.float32)
        return HospitalData(
            name="coordinator", x_train=empty_x, y_train=empty_y, x_test=empty_x, y_test=empty_y
        )
    return load_hospital(hospital_index(ctx.participant))


def make_trainer(ctx: TrainerContext) -> Trainer:
    """Numpy logistic regression on this participant's hospital (no data on the coordinator)."""
    data = participant_data(ctx)
    return LogisticRegressionTrainer(
        data.x_train, data.y_train, data.x_test, data.y_test, seed=ctx.seed
    )


def make_torch_trainer(ctx: TrainerContext) -> Trainer:
    """The same model in PyTorch: ``nn.Linear(13, 1)`` with ``BCEWithLogitsLoss``."""
    from conclave.tasks.heart_disease.torch_model import build_torch_trainer

    return build_torch_trainer(participant_data(ctx), seed=ctx.seed)
