"""FLamby's FedAvg protocol run in-process, without any Conclave orchestration.

The yardstick for the real thing: a federated run of this task through the coordinator with the
same seeds must land where this loop lands. Each round every hospital starts from the global
model, runs ``local_steps`` SGD steps, and the new global model is the mean of the returned
weights weighted by training-set size. The score is the final model's test accuracy on each
hospital, and their mean (FLamby's metric).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from conclave.core.parameters import Parameters
from conclave.core.ports import TrainerFactory
from conclave.core.types import TrainerContext
from conclave.tasks.heart_disease.dataset import HOSPITALS
from conclave.tasks.heart_disease.task import DEFAULT_CONFIG, make_trainer


@dataclass(frozen=True, slots=True, kw_only=True)
class ReferenceResult:
    accuracy: Mapping[str, float]
    """Final model's test accuracy per hospital (participant name -> accuracy)."""
    parameters: Parameters

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(list(self.accuracy.values())))


def fit_seed(run_seed: int, round_number: int, hospital: int) -> int:
    """The batch-order seed of one hospital's fit in one round."""
    state = np.random.SeedSequence([run_seed, round_number, hospital]).generate_state(1)
    return int(state[0])


def reference_fedavg(
    run_seed: int,
    *,
    factory: TrainerFactory = make_trainer,
    rounds: int = int(DEFAULT_CONFIG["rounds"]),
    local_steps: int = int(DEFAULT_CONFIG["local_steps"]),
    batch_size: int = int(DEFAULT_CONFIG["batch_size"]),
    lr: float = float(DEFAULT_CONFIG["lr"]),
) -> ReferenceResult:
    """Run FedAvg over the four hospitals and score the final global model."""
    global_params = factory(TrainerContext(participant=None, seed=run_seed)).get_weights()
    trainers = [factory(TrainerContext(participant=name, seed=run_seed)) for name in HOSPITALS]
    for round_number in range(1, rounds + 1):
        weighted = np.zeros_like(global_params.flat, dtype=np.float64)
        total = 0
        for index, trainer in enumerate(trainers):
            trainer.set_weights(global_params)
            result = trainer.fit(
                {
                    "local_steps": local_steps,
                    "batch_size": batch_size,
                    "lr": lr,
                    "seed": fit_seed(run_seed, round_number, index),
                }
            )
            weighted += result.num_examples * result.parameters.flat.astype(np.float64)
            total += result.num_examples
        global_params = Parameters.from_flat(global_params.layout, weighted / total)
    accuracy: dict[str, float] = {}
    for name, trainer in zip(HOSPITALS, trainers, strict=True):
        trainer.set_weights(global_params)
        accuracy[name] = float(trainer.evaluate({}).metrics["accuracy"])
    return ReferenceResult(accuracy=accuracy, parameters=global_params)
