"""The task's PyTorch trainer (imported only by ``make_torch_trainer``)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from conclave.tasks.heart_disease.dataset import NUM_FEATURES, HospitalData
from conclave.tasks.heart_disease.task import initial_parameters
from conclave.trainers.fit_config import FitConfig
from conclave.trainers.minibatches import minibatch_indices
from conclave.trainers.torch_adapter import Batch, TorchTrainer


def build_torch_trainer(data: HospitalData, *, seed: int) -> TorchTrainer:
    """Logistic regression as ``nn.Linear(13, 1)`` + ``BCEWithLogitsLoss``.

    Initial weights come from :func:`initial_parameters` (not torch's global generator), and
    the batches follow :func:`minibatch_indices`, so for the same seeds this trainer sees the
    same weights and batches as the numpy one.
    """
    x_train = torch.from_numpy(np.array(data.x_train, dtype=np.float32))
    y_train = torch.from_numpy(np.array(data.y_train, dtype=np.float32)).reshape(-1, 1)
    x_test = torch.from_numpy(np.array(data.x_test, dtype=np.float32))
    y_test = torch.from_numpy(np.array(data.y_test, dtype=np.float32)).reshape(-1, 1)

    def train_batches(settings: FitConfig, rng: np.random.Generator) -> Iterator[Batch]:
        steps = minibatch_indices(len(x_train), settings.batch_size, settings.local_steps, rng)
        for rows in steps:
            index = torch.from_numpy(rows)
            yield x_train[index], y_train[index]

    def test_batches() -> Iterator[Batch]:
        if len(x_test):
            yield x_test, y_test

    with torch.random.fork_rng(devices=[]):  # leave torch's global generator untouched
        model = torch.nn.Linear(NUM_FEATURES, 1)
    trainer = TorchTrainer(
        model,
        train_batches,
        test_batches,
        torch.nn.BCEWithLogitsLoss(),
        num_train_examples=len(x_train),
        seed=seed,
    )
    trainer.set_weights(initial_parameters(seed))
    return trainer
