"""Streaming inference next to an instrument: ``caldera stream`` and its detector simulator ``caldera stream-sim``.

Frames arrive over ZeroMQ (PULL from a PUSH, or SUB from a PUB) as a JSON header and raw array bytes
(``caldera.stream.wire``), are batched by size and time window, run through a model (a run directory, a registry
model or an exported artefact) and answered, sequence number by sequence number (``caldera.stream.consumer``).
Not to be confused with ``caldera.coupling.stream``'s simulation-to-trainer link over MPI. Needs ``pyzmq``
(``pip install 'caldera[stream]'``); nothing here imports it until a stream starts.
"""
