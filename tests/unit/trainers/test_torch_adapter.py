"""The torch adapter, and the heart-disease torch trainer against the numpy one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from conclave.core.errors import ConfigError, TrainerError
from conclave.core.parameters import Parameters
from conclave.core.ports import Trainer
from conclave.core.types import TrainerContext
from conclave.tasks import heart_disease
from conclave.trainers.fit_config import FitConfig
from conclave.trainers.torch_adapter import Batch, TorchTrainer, accuracy

pytestmark = pytest.mark.torch


def _batches() -> list[Batch]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen)
    y = (x[:, :1] > 0).to(torch.float32)
    return [(x[:6], y[:6]), (x[6:], y[6:])]


def _trainer(model: torch.nn.Module | None = None, **kwargs: object) -> TorchTrainer:
    data = _batches()

    def train(settings: FitConfig, rng: np.random.Generator) -> Iterable[Batch]:
        return data

    return TorchTrainer(
        model if model is not None else torch.nn.Linear(3, 1),
        train,
        lambda: data,
        torch.nn.BCEWithLogitsLoss(),
        num_train_examples=12,
        seed=0,
        **kwargs,  # type: ignore[arg-type]
    )


def test_weights_are_the_floating_state_dict_entries() -> None:
    linear = torch.nn.Linear(3, 4)
    model = torch.nn.Sequential(linear, torch.nn.BatchNorm1d(4))
    trainer = _trainer(model)
    assert isinstance(trainer, Trainer)
    weights = trainer.get_weights()
    assert weights.names == (
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
    )  # fmt: skip
    assert "1.num_batches_tracked" in model.state_dict()
    np.testing.assert_array_equal(weights["0.weight"], linear.weight.detach().numpy())


def test_set_weights_writes_into_the_model_and_get_weights_copies() -> None:
    model = torch.nn.Linear(3, 1)
    trainer = _trainer(model)
    new = Parameters.from_arrays({"weight": [[1.0, 2.0, 3.0]], "bias": [4.0]})
    new.flat.flags.writeable = False  # a read-only buffer must not warn or fail
    trainer.set_weights(new)
    assert trainer.model is model
    assert model.weight.tolist() == [[1.0, 2.0, 3.0]]
    assert model.bias.tolist() == [4.0]
    out = trainer.get_weights()
    out.flat[:] = 0.0
    assert model.bias.item() == 4.0
    with pytest.raises(ConfigError):
        trainer.set_weights(Parameters.from_arrays({"weight": [[1.0, 2.0]], "bias": [0.0]}))


def test_fit_takes_exactly_local_steps_batches_cycling_the_loader() -> None:
    calls: list[int] = []

    def counting_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(len(target))
        return torch.nn.functional.binary_cross_entropy_with_logits(out, target)

    data = _batches()
    trainer = TorchTrainer(
        torch.nn.Linear(3, 1),
        lambda settings, rng: data,
        lambda: data,
        counting_loss,
        num_train_examples=12,
        seed=0,
    )
    result = trainer.fit({"local_steps": 5, "batch_size": 6, "lr": 0.5})
    assert calls == [6] * 5
    assert result.num_examples == 12
    assert result.parameters == trainer.get_weights()


def test_training_learns_and_evaluate_reports_loss_and_accuracy() -> None:
    trainer = _trainer()
    before = trainer.evaluate({})
    losses = [trainer.fit({"local_steps": 20, "batch_size": 6, "lr": 0.5}).metrics["train_loss"]
              for _ in range(3)]  # fmt: skip
    after = trainer.evaluate({})
    assert losses[0] > losses[1] > losses[2]
    assert after.loss < before.loss
    assert after.metrics["accuracy"] >= 0.9
    assert after.num_examples == 12


def test_optimizer_factory_is_used() -> None:
    made: list[float] = []

    def adam(params: Iterable[torch.nn.Parameter], settings: FitConfig) -> torch.optim.Optimizer:
        made.append(settings.lr)
        return torch.optim.Adam(params, lr=settings.lr)

    trainer = _trainer(optimizer_fn=adam)
    start = trainer.get_weights()
    trainer.fit({"local_steps": 1, "batch_size": 6, "lr": 0.01})
    # Adam's first step moves every weight with a non-zero gradient by exactly lr.
    moved = np.abs(trainer.get_weights().flat - start.flat)
    np.testing.assert_allclose(moved, 0.01, rtol=1e-3)
    assert made == [0.01]


def test_divergence_and_empty_loaders_are_trainer_errors() -> None:
    data = _batches()
    exploding = TorchTrainer(
        torch.nn.Linear(3, 1),
        lambda settings, rng: data,
        lambda: data,
        lambda out, target: (out * 1e30).sum(),
        num_train_examples=12,
        seed=0,
    )
    with pytest.raises(TrainerError, match="non-finite"):
        exploding.fit({"local_steps": 3, "batch_size": 6, "lr": 1e30})

    def nothing(settings: FitConfig, rng: np.random.Generator) -> Iterator[Batch]:
        yield from ()

    empty = TorchTrainer(
        torch.nn.Linear(3, 1), nothing, list, torch.nn.MSELoss(),
        num_train_examples=5, seed=0,
    )  # fmt: skip
    with pytest.raises(TrainerError, match="ran dry"):
        empty.fit({"local_steps": 1, "batch_size": 1, "lr": 0.1})
    with pytest.raises(TrainerError, match="no test data"):
        empty.evaluate({})


def test_accuracy_for_binary_logits_and_classes() -> None:
    logits = torch.tensor([[2.0], [-1.0], [0.0], [0.5]])
    assert accuracy(logits, torch.tensor([[1.0], [0.0], [1.0], [0.0]])) == 0.5
    classes = torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.0, 0.0]])
    assert accuracy(classes, torch.tensor([1, 2])) == 0.5


def test_heart_torch_and_numpy_trainers_agree() -> None:
    ctx = TrainerContext(participant="hospital-0", seed=5)
    numpy_trainer = heart_disease.make_trainer(ctx)
    torch_trainer = heart_disease.make_torch_trainer(ctx)
    assert torch_trainer.get_weights() == numpy_trainer.get_weights()
    config = {"local_steps": 100, "batch_size": 4, "lr": 1e-3, "seed": 11}
    for _ in range(2):
        a, b = numpy_trainer.fit(config), torch_trainer.fit(config)
        np.testing.assert_allclose(a.parameters.flat, b.parameters.flat, atol=1e-6)
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-5)
        assert a.num_examples == b.num_examples == 199
    ea, eb = numpy_trainer.evaluate({}), torch_trainer.evaluate({})
    assert ea.loss == pytest.approx(eb.loss, rel=1e-5)
    assert ea.metrics["accuracy"] == eb.metrics["accuracy"]
    assert ea.num_examples == eb.num_examples == 104


def test_heart_torch_coordinator_trainer_has_the_initial_model_only() -> None:
    ctx = TrainerContext(participant=None, seed=3)
    trainer = heart_disease.make_torch_trainer(ctx)
    assert trainer.get_weights() == heart_disease.initial_parameters(3)
    with pytest.raises(TrainerError):
        trainer.fit(dict(heart_disease.DEFAULT_CONFIG))
    state = torch.random.get_rng_state()
    heart_disease.make_torch_trainer(ctx)
    assert torch.equal(torch.random.get_rng_state(), state)  # global generator untouched
