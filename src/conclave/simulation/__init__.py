"""Many virtual participants and one coordinator in one process, on a simulated clock."""

from conclave.simulation.engine import SimulatedClock, Simulation

__all__ = ["SimulatedClock", "Simulation"]
