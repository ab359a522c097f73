"""A simulated Azure OpenAI realtime service: the GA and preview WebSocket protocols.

Deterministic and fast (``speed=0``), and faithful enough that the official ``openai`` SDK
cannot tell it apart in a normal conversation::

    simulator = await start_simulator(SimulatorOptions(api_keys=frozenset({"key"}), speed=0))
    # GA:      ws://127.0.0.1:{port}/openai/v1/realtime?model=<deployment>
    # preview: ws://127.0.0.1:{port}/openai/realtime?api-version=<v>&deployment=<deployment>
    await simulator.close()

Replies are ``SimulatorOptions.reply_text`` or built from the latest user input ("You said:
…" / "I heard 1.5 seconds of audio."), spoken as a melody of 60 ms per character in 24 kHz
PCM16. Server VAD works on the energy of the appended audio. Module map: ``server``
(HTTP, auth), ``connection`` (socket I/O, pacing), ``engine`` (state machine, start here),
``response``, ``conversation``, ``input_buffer``, ``vad``, ``audio``, ``session``,
``settings``, ``params``, ``schema`` (GA vs beta names), ``events``, ``usage``.
"""

from relay.simulator.options import SimulatorOptions
from relay.simulator.server import RunningSimulator, create_simulator_app, start_simulator

__all__ = ["RunningSimulator", "SimulatorOptions", "create_simulator_app", "start_simulator"]
