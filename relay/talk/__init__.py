"""`relay talk`: speak a WAV file to a relay and hear (and read) the reply.

``audio`` reads and writes WAV files (resampling with soxr); ``turn`` follows one spoken turn
from the server's events, without I/O; ``client`` streams the audio over a WebSocket;
``command`` is the command line, with a rich progress display. Needs the ``talk`` extra.
"""
