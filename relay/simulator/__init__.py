"""A simulated Azure OpenAI realtime service (GA and preview WebSocket protocols).

Deterministic, fast (``speed=0``), and faithful enough that the official ``openai`` SDK
cannot tell it apart in a normal conversation. See ``engine.py`` for how it works.
"""

from relay.simulator.options import SimulatorOptions
from relay.simulator.server import RunningSimulator, create_simulator_app, start_simulator

__all__ = ["RunningSimulator", "SimulatorOptions", "create_simulator_app", "start_simulator"]
