"""The round protocol as a sans-I/O state machine."""

from conclave.core.rounds.events import Stage, Timer
from conclave.core.rounds.machine import RunMachine, participant_seed

__all__ = ["RunMachine", "Stage", "Timer", "participant_seed"]
