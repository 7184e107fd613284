"""A round progress display: a redrawn bar on a terminal, plain lines everywhere else."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO


class RoundProgress:
    """One line per round on a pipe or log (the round's line waits for its evaluation when one
    is due, so no round is printed twice and no line repeats an older round's test loss); a
    bar redrawn in place on a terminal."""

    def __init__(self, total_rounds: int, *, stream: TextIO | None = None,
                 interactive: bool | None = None, width: int = 24,
                 evaluate_every: int = 0) -> None:
        self.total = total_rounds
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.width = width
        self.evaluate_every = evaluate_every  # 0: the last round only, as the run does
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._done = 0
        self._last: dict[str, float] = {}
        self._test: dict[str, float] = {}  # the latest evaluation's metrics
        self._test_round = 0
        self._held = 0  # a committed round whose line waits for its evaluation

    def _evaluation_due(self, round_: int) -> bool:
        every = self.evaluate_every
        return round_ >= self.total or (every > 0 and round_ % every == 0)

    def round_committed(self, round_: int, metrics: Mapping[str, float]) -> None:
        with self._lock:
            self._done = max(self._done, round_)
            self._last = {k: v for k, v in metrics.items() if k == "train_loss"}
            if self.interactive or not self._evaluation_due(round_):
                self._draw(round_)
            else:
                self._held = round_

    def evaluated(self, round_: int, metrics: Mapping[str, float]) -> None:
        with self._lock:
            self._test = {k: v for k, v in metrics.items()
                          if k in ("loss", "accuracy", "mean_accuracy")}
            self._test_round = round_
            self._held = 0
            self._draw(round_, evaluated=True)

    def round_failed(self, round_: int, kind: str, reason: str) -> None:
        """An attempt failed (it is retried while attempts remain)."""
        with self._lock:
            text = f"round {round_:>3}/{self.total} {kind} attempt failed: {reason}"
            if self.interactive:
                self.stream.write(f"\r{text}\x1b[K\n")
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def _draw(self, round_: int, *, evaluated: bool = False) -> None:
        parts = [f"round {round_:>3}/{self.total}"]
        if "train_loss" in self._last:
            parts.append(f"train loss {self._last['train_loss']:.4f}")
        # test metrics belong to the round they were measured on: a plain line shows them only
        # on that round's line; the bar keeps the latest in view
        if self._test and (self.interactive or self._test_round == round_):
            if "loss" in self._test:
                parts.append(f"test loss {self._test['loss']:.4f}")
            if "mean_accuracy" in self._test:
                parts.append(f"mean acc {self._test['mean_accuracy']:.3f}")
        parts.append(f"elapsed {time.monotonic() - self._started:5.1f} s")
        text = " | ".join(parts)
        if self.interactive:
            filled = int(self.width * self._done / max(self.total, 1))
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {text}\x1b[K")
            if self._done >= self.total and evaluated:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._held:  # the run stopped before the evaluation came: say the round anyway
                self._draw(self._held)
                self._held = 0
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
