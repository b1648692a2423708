"""ZeroMQ sockets from address strings: ``tcp://host:port`` connects, ``@tcp://*:port`` binds (czmq's notation)."""

from __future__ import annotations

from typing import Any

import zmq

KINDS = {"pull": zmq.PULL, "sub": zmq.SUB, "push": zmq.PUSH, "pub": zmq.PUB}


def open_socket(ctx: zmq.Context, kind: str, address: str, hwm: int, max_bytes: int = -1) -> Any:
    """A socket of ``kind`` bound (``@`` prefix) or connected (none, or ``>``) to ``address``.

    ``hwm``: messages queued per peer before a PUSH blocks and a PUB drops; ``max_bytes``: a peer that sends a
    larger message is disconnected by ZeroMQ before any of it reaches Caldera (-1: no limit)."""
    sock = ctx.socket(KINDS[kind])
    sock.setsockopt(zmq.SNDHWM if kind in ("push", "pub") else zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 2000)  # results still queued at close get 2 s to leave, then the socket goes
    if max_bytes > 0:
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    if kind == "sub":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        if address.startswith("@"):
            sock.bind(address[1:])
        else:
            sock.connect(address.removeprefix(">"))
    except zmq.ZMQError as exc:
        sock.close(0)
        verb = "bind to" if address.startswith("@") else "connect to"
        raise ValueError(f"cannot {verb} {address!r}: {exc}; write tcp://HOST:PORT (connect) or "
                         "@tcp://*:PORT (bind)") from None  # fmt: skip
    return sock
