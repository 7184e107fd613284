"""The coordinator: carries out the run machine's commands against a ledger and a clock."""

from conclave.coordinator.service import Coordinator, RoundTiming

__all__ = ["Coordinator", "RoundTiming"]
