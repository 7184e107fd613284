"""The participant side: the agent loop that runs user trainers on local data."""

from conclave.participant.agent import ParticipantAgent, load_trainer_factory

__all__ = ["ParticipantAgent", "load_trainer_factory"]
