"""kvx.testing: what tests, benchmarks and the demo use to run nodes, not what an agent
embeds — node daemons as local processes, and a deterministic swarm simulator that drives
thousands of real node cores in one process."""

from ._launch import NodeProcess, wait_for
from ._sim import HostileCore, Network, Simulation

__all__ = ["HostileCore", "Network", "NodeProcess", "Simulation", "wait_for"]
