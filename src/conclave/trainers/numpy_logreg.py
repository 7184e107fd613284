"""Binary logistic regression in plain numpy: one linear layer, sigmoid, cross-entropy.

Parameters are ``weight`` (1, n_features) and ``bias`` (1,), the names and shapes of a
``torch.nn.Linear(n_features, 1)``, so this trainer and a torch model exchange weights. Training
is plain mini-batch SGD on the mean binary cross-entropy, computed from logits in a form that
cannot overflow, so no input produces NaN.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from conclave.core.errors import ConfigError, TrainerError
from conclave.core.parameters import Layout, Parameters
from conclave.core.types import Config, EvaluateResult, FitResult
from conclave.trainers.fit_config import FitConfig
from conclave.trainers.minibatches import minibatch_indices

Float32Array = npt.NDArray[np.float32]


def logreg_layout(n_features: int) -> Layout:
    """The layout of a logistic regression on ``n_features`` inputs."""
    return Layout.of({"weight": (1, n_features), "bias": (1,)})


def initial_logreg_parameters(n_features: int, seed: int) -> Parameters:
    """Weights drawn like ``torch.nn.Linear``'s default: uniform in ±1/sqrt(n_features)."""
    if n_features <= 0:
        raise ConfigError("n_features", n_features, "a positive integer is required")
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(n_features)
    weight = rng.uniform(-bound, bound, size=(1, n_features)).astype(np.float32)
    bias = rng.uniform(-bound, bound, size=(1,)).astype(np.float32)
    return Parameters.from_arrays({"weight": weight, "bias": bias})


def binary_cross_entropy(logits: Float32Array, labels: Float32Array) -> Float32Array:
    """Per-example BCE of ``sigmoid(logits)`` against 0/1 labels, without overflow."""
    loss: Float32Array = np.logaddexp(np.float32(0.0), logits) - labels * logits
    return loss


def sigmoid(logits: Float32Array) -> Float32Array:
    """The logistic function in a form that never overflows."""
    half = np.float32(0.5)
    probabilities: Float32Array = half * (np.tanh(half * logits) + np.float32(1.0))
    return probabilities


class LogisticRegressionTrainer:
    """A :class:`conclave.core.ports.Trainer` for binary logistic regression.

    Empty train or test arrays are allowed (a coordinator only reads the initial weights);
    ``fit`` or ``evaluate`` on an empty split raises ``TrainerError``.
    """

    def __init__(
        self,
        x_train: npt.ArrayLike,
        y_train: npt.ArrayLike,
        x_test: npt.ArrayLike,
        y_test: npt.ArrayLike,
        *,
        seed: int,
    ) -> None:
        self._x_train, self._y_train = _checked_split("train", x_train, y_train)
        self._x_test, self._y_test = _checked_split("test", x_test, y_test)
        n_features = self._x_train.shape[1]
        if self._x_test.shape[1] != n_features:
            raise ConfigError(
                "x_test", f"{self._x_test.shape[1]} features", f"{n_features} like x_train"
            )
        self._seed = seed
        self._fits = 0
        self._params = initial_logreg_parameters(n_features, seed)

    @property
    def n_features(self) -> int:
        return int(self._x_train.shape[1])

    # -- weights ------------------------------------------------------------------------
    def get_weights(self) -> Parameters:
        return self._params.copy()

    def set_weights(self, parameters: Parameters) -> None:
        if parameters.layout != self._params.layout:
            raise ConfigError(
                "parameters",
                parameters.layout.describe(),
                f"this model's layout is [{self._params.layout.describe()}]",
            )
        np.copyto(self._params.flat, parameters.flat)

    # -- training -----------------------------------------------------------------------
    def fit(self, config: Config) -> FitResult:
        settings = FitConfig.from_config(config)
        n = self._x_train.shape[0]
        if n == 0:
            raise TrainerError("this trainer has no training data")
        rng = settings.rng(self._seed, self._fits)
        self._fits += 1
        weight, bias = self._params["weight"], self._params["bias"]
        lr = np.float32(settings.lr)
        total_loss = 0.0
        for rows in minibatch_indices(n, settings.batch_size, settings.local_steps, rng):
            x, y = self._x_train[rows], self._y_train[rows]
            logits = x @ weight[0] + bias[0]
            total_loss += float(binary_cross_entropy(logits, y).mean(dtype=np.float32))
            residual = (sigmoid(logits) - y) / np.float32(len(rows))
            weight[0] -= lr * (residual @ x)
            bias[0] -= lr * residual.sum(dtype=np.float32)
        if not self._params.is_finite():
            raise TrainerError("logistic regression diverged: non-finite weights after fit")
        return FitResult(
            parameters=self.get_weights(),
            num_examples=int(n),
            metrics={"train_loss": total_loss / settings.local_steps},
        )

    def evaluate(self, config: Config) -> EvaluateResult:
        del config  # evaluation takes no settings
        if self._x_test.shape[0] == 0:
            raise TrainerError("this trainer has no test data")
        logits = self.logits(self._x_test)
        loss = float(binary_cross_entropy(logits, self._y_test).mean(dtype=np.float64))
        accuracy = float(((logits > 0) == (self._y_test > 0.5)).mean())
        return EvaluateResult(
            loss=loss, num_examples=int(self._x_test.shape[0]), metrics={"accuracy": accuracy}
        )

    def logits(self, x: npt.ArrayLike) -> Float32Array:
        """The model's logits for the rows of ``x``."""
        features = np.asarray(x, dtype=np.float32)
        result: Float32Array = features @ self._params["weight"][0] + self._params["bias"][0]
        return result


def _checked_split(
    name: str, x: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[Float32Array, Float32Array]:
    features = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.ascontiguousarray(y, dtype=np.float32).reshape(-1)
    if features.ndim != 2:
        raise ConfigError(f"x_{name}", f"shape {features.shape}", "a 2-D array (rows, features)")
    if labels.shape[0] != features.shape[0]:
        raise ConfigError(
            f"y_{name}",
            f"{labels.shape[0]} labels",
            f"one per row of x_{name} ({features.shape[0]})",
        )
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ConfigError(f"y_{name}", "labels outside {0, 1}", "binary 0/1 labels")
    if not np.isfinite(features).all():
        raise ConfigError(f"x_{name}", "NaN or infinite values", "finite features")
    return features, labels
