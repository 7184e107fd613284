"""Participant selection: pure functions of (candidates, k, rng)."""

from conclave.core.selection.uniform import select_uniform

__all__ = ["select_uniform"]
