"""A round progress display: a redrawn bar on a terminal, plain lines everywhere else."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO


class RoundProgress:
    def __init__(self, total_rounds: int, *, stream: TextIO | None = None,
                 interactive: bool | None = None, width: int = 24,
                 evaluates_every_round: bool = False) -> None:
        self.total = total_rounds
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.width = width
        self.evaluates_every_round = evaluates_every_round
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._done = 0
        self._last: dict[str, float] = {}

    def round_committed(self, round_: int, metrics: Mapping[str, float]) -> None:
        with self._lock:
            self._done = max(self._done, round_)
            self._last.update({k: v for k, v in metrics.items() if k == "train_loss"})
            self._draw(round_)

    def evaluated(self, round_: int, metrics: Mapping[str, float]) -> None:
        with self._lock:
            self._last.update({k: v for k, v in metrics.items()
                               if k in ("loss", "accuracy", "mean_accuracy")})
            self._draw(round_, evaluated=True)

    def _draw(self, round_: int, *, evaluated: bool = False) -> None:
        parts = [f"round {round_:>3}/{self.total}"]
        if "train_loss" in self._last:
            parts.append(f"train loss {self._last['train_loss']:.4f}")
        if "loss" in self._last:
            parts.append(f"test loss {self._last['loss']:.4f}")
        if "mean_accuracy" in self._last:
            parts.append(f"mean acc {self._last['mean_accuracy']:.3f}")
        parts.append(f"elapsed {time.monotonic() - self._started:5.1f} s")
        text = " | ".join(parts)
        if self.interactive:
            filled = int(self.width * self._done / max(self.total, 1))
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {text}\x1b[K")
            if self._done >= self.total and evaluated:
                self.stream.write("\n")
        elif evaluated or not self.evaluates_every_round:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
