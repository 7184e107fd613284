"""Run any ``torch.nn.Module`` as a Conclave trainer.

This is the only module of ``conclave.trainers`` that imports torch; nothing else in Conclave
imports it, so Conclave works without torch installed (``pip install conclave[torch]``).

Weights cross the boundary as :class:`Parameters`: one float32 array per floating-point entry of
the module's ``state_dict`` (parameters and buffers such as batch-norm statistics), named by its
``state_dict`` key, in ``state_dict`` order. Integer buffers (``num_batches_tracked``) stay local.
Each direction is a single copy per tensor, straight between the tensor's storage and the flat
buffer; the trainer never keeps a reference to the caller's buffer, nor the caller to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeAlias

import numpy as np
import torch

from conclave.core.errors import ConfigError, TrainerError
from conclave.core.parameters import Layout, Parameters
from conclave.core.types import Config, EvaluateResult, FitResult
from conclave.trainers.fit_config import FitConfig

Batch: TypeAlias = tuple[torch.Tensor, torch.Tensor]
TrainLoaderFn: TypeAlias = Callable[[FitConfig, np.random.Generator], Iterable[Batch]]
"""Given one fit's settings and a generator for its batch order, the training batches.
The trainer takes ``local_steps`` batches, iterating the result again when it runs out."""
TestLoaderFn: TypeAlias = Callable[[], Iterable[Batch]]
LossFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(outputs, targets) -> mean loss over the batch."""
MetricFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], float]
OptimizerFn: TypeAlias = Callable[[Iterable[torch.nn.Parameter], FitConfig], torch.optim.Optimizer]


def sgd(parameters: Iterable[torch.nn.Parameter], settings: FitConfig) -> torch.optim.Optimizer:
    """Plain SGD with the fit's learning rate (the default optimizer)."""
    return torch.optim.SGD(parameters, lr=settings.lr)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of correct predictions from logits.

    One output per example (shape (N,) or (N, 1)) is a binary logit: predicted positive when
    > 0, i.e. probability > 0.5, against 0/1 targets. Several outputs per example are class
    logits: the argmax against integer class targets.
    """
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        predicted = outputs.reshape(-1) > 0
        correct = predicted == (targets.reshape(-1) > 0.5)
    else:
        correct = outputs.argmax(dim=-1) == targets.reshape(-1)
    return float(correct.to(torch.float64).mean().item())


class TorchTrainer:
    """A :class:`conclave.core.ports.Trainer` around a torch module.

    ``fit`` trains ``local_steps`` optimizer steps (see :class:`FitConfig`) with a fresh
    optimizer from ``optimizer_fn`` each call; ``evaluate`` reports the mean loss over the
    test batches and every metric in ``metric_fns`` (default: accuracy).
    ``num_train_examples`` is the weight of this participant's updates (its training-set size).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_loader_fn: TrainLoaderFn,
        test_loader_fn: TestLoaderFn,
        loss_fn: LossFn,
        *,
        num_train_examples: int,
        seed: int,
        optimizer_fn: OptimizerFn = sgd,
        metric_fns: Mapping[str, MetricFn] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_train_examples < 0:
            raise ConfigError("num_train_examples", num_train_examples, "zero or more")
        self._device = torch.device(device)
        self._model = model.to(self._device)
        self._train_loader_fn = train_loader_fn
        self._test_loader_fn = test_loader_fn
        self._loss_fn = loss_fn
        self._optimizer_fn = optimizer_fn
        self._metric_fns = dict(metric_fns) if metric_fns is not None else {"accuracy": accuracy}
        self._num_train_examples = num_train_examples
        self._seed = seed
        self._fits = 0
        self._layout = Layout.of(
            [(name, tuple(t.shape)) for name, t in self._exchanged_tensors().items()]
        )

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def layout(self) -> Layout:
        return self._layout

    # -- weights ------------------------------------------------------------------------
    def get_weights(self) -> Parameters:
        params = Parameters.zeros(self._layout)
        tensors = self._exchanged_tensors()
        for name, view in params.items():
            source = tensors[name].detach().to(device="cpu", dtype=torch.float32)
            np.copyto(view, source.numpy())  # zero-copy read of a CPU float32 tensor
        return params

    def set_weights(self, parameters: Parameters) -> None:
        if parameters.layout != self._layout:
            raise ConfigError(
                "parameters",
                parameters.layout.describe(),
                f"this model's layout is [{self._layout.describe()}]",
            )
        tensors = self._exchanged_tensors()
        with torch.no_grad():
            for name, view in parameters.items():
                source = view if view.flags.writeable else view.copy()
                tensors[name].copy_(torch.from_numpy(source))

    # -- training -----------------------------------------------------------------------
    def fit(self, config: Config) -> FitResult:
        settings = FitConfig.from_config(config)
        if self._num_train_examples == 0:
            raise TrainerError("this trainer has no training data")
        rng = settings.rng(self._seed, self._fits)
        self._fits += 1
        self._model.train()
        optimizer = self._optimizer_fn(self._model.parameters(), settings)
        total_loss = 0.0
        for inputs, targets in _take(self._train_loader_fn(settings, rng), settings.local_steps):
            optimizer.zero_grad(set_to_none=True)
            loss = self._loss_fn(self._model(inputs.to(self._device)), targets.to(self._device))
            torch.autograd.backward(loss)
            optimizer.step()
            total_loss += float(loss.detach().item())
        params = self.get_weights()
        if not params.is_finite():
            raise TrainerError("training diverged: non-finite weights after fit")
        return FitResult(
            parameters=params,
            num_examples=self._num_train_examples,
            metrics={"train_loss": total_loss / settings.local_steps},
        )

    def evaluate(self, config: Config) -> EvaluateResult:
        del config  # evaluation takes no settings
        self._model.eval()
        outputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        with torch.no_grad():
            for inputs, batch_targets in self._test_loader_fn():
                outputs.append(self._model(inputs.to(self._device)))
                targets.append(batch_targets.to(self._device))
        if not outputs:
            raise TrainerError("this trainer has no test data")
        all_outputs, all_targets = torch.cat(outputs), torch.cat(targets)
        loss = float(self._loss_fn(all_outputs, all_targets).item())
        metrics = {name: fn(all_outputs, all_targets) for name, fn in self._metric_fns.items()}
        return EvaluateResult(loss=loss, num_examples=int(all_targets.shape[0]), metrics=metrics)

    def _exchanged_tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: tensor
            for name, tensor in self._model.state_dict().items()
            if tensor.is_floating_point()
        }


def _take(loader: Iterable[Batch], steps: int) -> Iterator[Batch]:
    """``steps`` batches from ``loader``, starting it again each time it runs out."""
    taken = 0
    while taken < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            taken += 1
            if taken == steps:
                return
        if empty:
            raise TrainerError(f"the training loader ran dry after {taken} of {steps} batches")
