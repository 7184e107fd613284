"""Aggregators: pure math over Parameters."""

from conclave.core.aggregation.fedavg import WeightedMean, validate_update

__all__ = ["WeightedMean", "validate_update"]
