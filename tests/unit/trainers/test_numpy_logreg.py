"""The numpy logistic-regression trainer, its fit settings and its mini-batch order."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.core.errors import ConfigError, TrainerError
from conclave.core.parameters import Parameters
from conclave.core.ports import Trainer
from conclave.trainers import FitConfig, LogisticRegressionTrainer, minibatch_indices
from conclave.trainers.numpy_logreg import binary_cross_entropy, initial_logreg_parameters

CONFIG = {"local_steps": 50, "batch_size": 4, "lr": 0.1, "seed": 3}


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs, separable along the first feature."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 3.0, -3.0).astype(np.float32)
    return x, y


def _trainer(seed: int = 0, n: int = 40) -> LogisticRegressionTrainer:
    x, y = _blobs(n, seed=1)
    xt, yt = _blobs(20, seed=2)
    return LogisticRegressionTrainer(x, y, xt, yt, seed=seed)


def test_is_a_trainer_with_torch_linear_shapes_and_init() -> None:
    trainer = _trainer()
    assert isinstance(trainer, Trainer)
    weights = trainer.get_weights()
    assert weights.layout.entries == (("weight", (1, 3)), ("bias", (1,)))
    assert weights.flat.dtype == np.float32
    assert np.abs(weights.flat).max() <= 1 / math.sqrt(3)
    assert weights == _trainer(seed=0).get_weights()
    assert weights != _trainer(seed=1).get_weights()


def test_init_is_uniform_within_the_torch_bound() -> None:
    draws = np.concatenate([initial_logreg_parameters(16, s).flat for s in range(200)])
    assert np.abs(draws).max() <= 0.25
    assert np.abs(draws).max() > 0.24 and abs(float(draws.mean())) < 0.01


def test_get_weights_is_a_copy_and_set_weights_checks_the_layout() -> None:
    trainer = _trainer()
    weights = trainer.get_weights()
    weights.flat[:] = 5.0
    assert trainer.get_weights() != weights
    trainer.set_weights(weights)
    assert trainer.get_weights() == weights
    with pytest.raises(ConfigError, match="weight"):
        trainer.set_weights(Parameters.from_arrays({"weight": np.zeros((1, 4)), "bias": [0.0]}))


def test_one_full_batch_step_is_exact_gradient_descent() -> None:
    trainer = _trainer(n=8)
    x, y = _blobs(8, seed=1)
    start = trainer.get_weights()
    w, b = start["weight"][0].astype(np.float64), float(start["bias"][0])
    p = 1 / (1 + np.exp(-(x.astype(np.float64) @ w + b)))
    result = trainer.fit({"local_steps": 1, "batch_size": 8, "lr": 0.5, "seed": 0})
    np.testing.assert_allclose(result.parameters["weight"][0], w - 0.5 * (p - y) @ x / 8, rtol=1e-5)
    np.testing.assert_allclose(result.parameters["bias"][0], b - 0.5 * np.mean(p - y), rtol=1e-5)
    expected_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert result.metrics["train_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result.num_examples == 8
    assert trainer.get_weights() == result.parameters


def test_fit_is_deterministic_given_the_seed() -> None:
    first, second, other = _trainer(), _trainer(), _trainer()
    a, b = first.fit(CONFIG), second.fit(CONFIG)
    c = other.fit({**CONFIG, "seed": 4})
    assert a.parameters == b.parameters and a.metrics == b.metrics
    assert a.parameters != c.parameters
    # Without a seed the order comes from the trainer's seed and its fit count.
    unseeded = {k: v for k, v in CONFIG.items() if k != "seed"}
    d1, d2 = _trainer().fit(unseeded), _trainer().fit(unseeded)
    assert d1.parameters == d2.parameters


def test_training_learns_and_evaluation_reports_loss_and_accuracy() -> None:
    trainer = _trainer()
    before = trainer.evaluate({})
    losses = [trainer.fit({**CONFIG, "seed": s}).metrics["train_loss"] for s in range(3)]
    after = trainer.evaluate({})
    assert losses[0] > losses[1] > losses[2]
    assert after.loss < before.loss
    assert before.metrics["accuracy"] < 0.9 <= after.metrics["accuracy"]
    assert after.num_examples == 20


def test_evaluate_with_zero_weights_gives_log2_and_predicts_negative() -> None:
    trainer = _trainer()
    trainer.set_weights(Parameters.zeros(trainer.get_weights().layout))
    result = trainer.evaluate({})
    assert result.loss == pytest.approx(math.log(2), rel=1e-6)
    assert result.metrics["accuracy"] == 0.5  # logit 0 is not > 0: everything negative


def test_single_class_data_trains_without_nan() -> None:
    x, _ = _blobs(30, seed=1)
    ones = np.ones(30, dtype=np.float32)
    trainer = LogisticRegressionTrainer(x, ones, x[:5], ones[:5], seed=0)
    result = trainer.fit({"local_steps": 500, "batch_size": 4, "lr": 1.0, "seed": 0})
    assert result.parameters.is_finite()
    assert math.isfinite(result.metrics["train_loss"])
    assert trainer.evaluate({}).metrics["accuracy"] == 1.0


def test_cross_entropy_is_stable_for_huge_logits() -> None:
    logits = np.array([-1e4, 1e4, -1e4, 1e4, 0.0], dtype=np.float32)
    labels = np.array([0.0, 1.0, 1.0, 0.0, 1.0], dtype=np.float32)
    loss = binary_cross_entropy(logits, labels)
    assert loss.dtype == np.float32
    np.testing.assert_allclose(loss, [0.0, 0.0, 1e4, 1e4, math.log(2)], rtol=1e-6)


def test_huge_features_never_give_nan() -> None:
    x, y = _blobs(16, seed=1)
    trainer = LogisticRegressionTrainer(x * 1e6, y, x * 1e9, y, seed=0)
    result = trainer.fit({"local_steps": 20, "batch_size": 4, "lr": 1.0, "seed": 0})
    assert result.parameters.is_finite() and math.isfinite(result.metrics["train_loss"])
    assert math.isfinite(trainer.evaluate({}).loss)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"batch_size": 4, "lr": 0.1}, "local_steps"),
        ({"local_steps": True, "batch_size": 4, "lr": 0.1}, "local_steps"),
        ({"local_steps": 1, "batch_size": 0, "lr": 0.1}, "batch_size"),
        ({"local_steps": 1, "batch_size": 4, "lr": -0.1}, "lr"),
        ({"local_steps": 1, "batch_size": 4, "lr": "fast"}, "lr"),
        ({"local_steps": 1, "batch_size": 4, "lr": 0.1, "seed": -1}, "seed"),
    ],
)
def test_bad_fit_settings_are_config_errors(config: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        FitConfig.from_config(config)  # type: ignore[arg-type]
    assert info.value.field == field


def test_bad_data_is_refused_and_empty_data_cannot_train() -> None:
    x, y = _blobs(4, seed=0)
    with pytest.raises(ConfigError, match="y_train"):
        LogisticRegressionTrainer(x, y * 2, x, y, seed=0)
    with pytest.raises(ConfigError, match="x_test"):
        LogisticRegressionTrainer(x, y, x[:, :2], y, seed=0)
    empty = LogisticRegressionTrainer(np.zeros((0, 3)), [], np.zeros((0, 3)), [], seed=0)
    assert empty.get_weights().layout.entries[0] == ("weight", (1, 3))
    with pytest.raises(TrainerError):
        empty.fit(CONFIG)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    batch_size=st.integers(1, 12),
    steps=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_minibatches_cycle_through_fresh_permutations(
    n: int, batch_size: int, steps: int, seed: int
) -> None:
    batches = list(minibatch_indices(n, batch_size, steps, np.random.default_rng(seed)))
    assert len(batches) == steps
    per_pass = math.ceil(n / batch_size)
    for start in range(0, steps, per_pass):
        one_pass = batches[start : start + per_pass]
        sizes = [len(b) for b in one_pass]
        assert all(size == batch_size for size in sizes[:-1])
        joined = np.concatenate(one_pass) if one_pass else np.array([], dtype=np.intp)
        assert len(set(joined.tolist())) == len(joined)  # no row twice within a pass
        if len(one_pass) == per_pass:
            assert sorted(joined.tolist()) == list(range(n))
