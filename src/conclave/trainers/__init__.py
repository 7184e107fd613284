"""Built-in trainers: ready-made implementations of :class:`conclave.core.ports.Trainer`.

``numpy_logreg`` needs only numpy. ``torch_adapter`` wraps any ``torch.nn.Module`` and is the
only place Conclave imports torch; import it explicitly (``conclave.trainers.torch_adapter``)
when torch is installed.
"""

from conclave.trainers.fit_config import FitConfig
from conclave.trainers.minibatches import minibatch_indices
from conclave.trainers.numpy_logreg import (
    LogisticRegressionTrainer,
    initial_logreg_parameters,
    logreg_layout,
)

__all__ = [
    "FitConfig",
    "LogisticRegressionTrainer",
    "initial_logreg_parameters",
    "logreg_layout",
    "minibatch_indices",
]
