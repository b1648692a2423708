"""Coupling with a running simulation: online training through a replay buffer, surrogates called in-process."""

from caldera.coupling.online import OnlineTrainer as OnlineTrainer
from caldera.coupling.replay import ReplayBuffer as ReplayBuffer
from caldera.coupling.surrogate import Surrogate as Surrogate

__all__ = ["OnlineTrainer", "ReplayBuffer", "Surrogate"]
