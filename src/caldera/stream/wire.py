"""The wire format of ``caldera stream``: ZeroMQ multipart messages of a small JSON header and raw array bytes.

    frame    [header, data]   header {"seq": 17, "shape": [1, 11, 11], "dtype": "float32", "t": 1733380000.123,
                                      "label": [5.2, 4.9] (optional)}; data: the C-ordered array bytes
    end      [header]         {"end": true, "count": 1000}: the sender has sent frames 0..count-1
    result   [header, data]   {"seq": 17, "t": (the frame's), "shape": [2], "dtype": "float32", "rank": 0,
                               "batch": 64 (samples in the forward pass)}
    error    [header]         {"seq": 17 (null if unreadable), "error": "one line naming the problem", "rank": 0}

Nothing received is unpickled or evaluated: the header is JSON (size-capped before parsing), the data is read with
``numpy.frombuffer`` as one of a fixed list of real-number dtypes, its size checked against shape x itemsize.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bytes of JSON: a frame's header is ~100 bytes; a label of a few thousand numbers fits.
MAX_HEADER = 64 * 1024
MAX_DIMS = 8
# Real numbers only (as caldera serve): names and numpy's own strings ("<f4") both accepted.
_NAMES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
          "uint64", "bool")  # fmt: skip
DTYPES = {**{n: np.dtype(n) for n in _NAMES}, **{np.dtype(n).str: np.dtype(n) for n in _NAMES}}


class FrameError(ValueError):
    """A message that is not a valid frame; ``seq`` is its sequence number when the header could be read."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass
class Frame:
    """One received frame: its sequence number, send time (sender's clock, seconds), array and optional label."""

    seq: int
    t: float | None
    x: np.ndarray
    label: np.ndarray | None = None


@dataclass
class End:
    """The sender's end-of-stream message: ``count`` frames were sent (None: not said)."""

    count: int | None


def _header(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def encode_frame(seq: int, x: np.ndarray, t: float | None = None, label: Any = None) -> list[bytes]:
    """The two parts of a frame message (``t`` defaults to now, ``time.time()``)."""
    x = np.ascontiguousarray(x)
    if x.dtype.str not in DTYPES:
        raise ValueError(f"frames of dtype {x.dtype} cannot be sent; use one of {', '.join(_NAMES)}")
    head: dict[str, Any] = {"seq": int(seq), "shape": list(x.shape), "dtype": x.dtype.name,
                            "t": time.time() if t is None else float(t)}  # fmt: skip
    if label is not None:
        head["label"] = np.asarray(label, dtype=np.float64).tolist()
    return [_header(head), x.tobytes()]


def encode_end(count: int | None) -> list[bytes]:
    """The end-of-stream message."""
    return [_header({"end": True, "count": count})]


def encode_result(
    seq: int, t: float | None, y: np.ndarray, rank: int, batch: int, **extra: Any
) -> list[bytes]:
    """The two parts of a result message."""
    y = np.ascontiguousarray(y)
    head = {"seq": seq, "t": t, "shape": list(y.shape), "dtype": y.dtype.name, "rank": rank, "batch": batch,
            **extra}  # fmt: skip
    return [_header(head), y.tobytes()]


def encode_error(seq: int | None, message: str, rank: int) -> list[bytes]:
    """An error record: the frame ``seq`` (None: unreadable) was not answered, and why."""
    return [_header({"seq": seq, "error": message, "rank": rank})]


def read_header(part: bytes) -> dict[str, Any]:
    """A message's JSON header as a dict (size-capped first); FrameError if it is not one."""
    if len(part) > MAX_HEADER:
        raise FrameError(f"header of {len(part)} bytes: at most {MAX_HEADER} bytes of JSON")
    try:
        head = json.loads(part)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise FrameError(f"the header is not JSON ({type(exc).__name__}); send a JSON object") from None
    if not isinstance(head, dict):
        raise FrameError("the header is not a JSON object")
    return head


def decode(parts: list[bytes], max_bytes: int) -> Frame | End:
    """A received message as a Frame or End; FrameError (with the sequence number if readable) if invalid."""
    if not parts:
        raise FrameError("an empty message")
    head = read_header(parts[0])
    if head.get("end") is True:
        count = head.get("count")
        return End(count if _is_int(count) and count >= 0 else None)
    seq = head.get("seq")
    if not _is_int(seq) or seq < 0:
        raise FrameError('the header has no "seq" (a sequence number, an integer >= 0)')
    if len(parts) != 2:
        raise FrameError(f"a frame is 2 parts (header, data), this message has {len(parts)}", seq)
    shape, dtype = head.get("shape"), DTYPES.get(str(head.get("dtype")))
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise FrameError(f'"shape" must be a list of at most {MAX_DIMS} sizes (integers >= 0)', seq)
    if dtype is None:
        raise FrameError(
            f'"dtype" {str(head.get("dtype"))[:20]!r} is not accepted: send {", ".join(_NAMES)}', seq
        )
    need = math.prod(shape) * dtype.itemsize
    if need > max_bytes:
        raise FrameError(f"a frame of {need} bytes is over the limit of {max_bytes} (--max-frame-mb)", seq)
    if len(parts[1]) != need:
        raise FrameError(
            f"shape {shape} of {dtype.name} is {need} bytes but the data has {len(parts[1])}", seq
        )
    x = np.frombuffer(parts[1], dtype=dtype).reshape(shape)
    t = head.get("t")
    t = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) else None
    label = None
    if head.get("label") is not None:
        try:
            label = np.asarray(head["label"], dtype=np.float32)
        except (ValueError, TypeError, OverflowError):
            raise FrameError('"label" must be a number or a nested list of numbers', seq) from None
        if not np.isfinite(label).all():
            raise FrameError('"label" holds NaN or infinity', seq)
    return Frame(seq, t, x, label)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
