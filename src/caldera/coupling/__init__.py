"""Coupling with a running simulation: online training through a replay buffer (on the simulation's ranks or,
with ``connect``, on ranks of their own), and surrogates called in-process."""

from caldera.coupling.online import OnlineTrainer as OnlineTrainer
from caldera.coupling.replay import ReplayBuffer as ReplayBuffer
from caldera.coupling.stream import SimulationLink as SimulationLink
from caldera.coupling.stream import TrainerLink as TrainerLink
from caldera.coupling.stream import connect as connect
from caldera.coupling.surrogate import Surrogate as Surrogate

__all__ = ["OnlineTrainer", "ReplayBuffer", "SimulationLink", "Surrogate", "TrainerLink", "connect"]
