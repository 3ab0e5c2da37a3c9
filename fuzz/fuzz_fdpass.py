"""Fuzz the broker <-> backend frame decoder (broker/fdpass.py): decode_frame.

The input is one SOCK_SEQPACKET frame as it arrives:

    <B  bits 0-1: how many FDs came with it (0..3); bits 2-3: which direction decodes it
        (0 any kind, 1 broker -> backend kinds, 2 backend -> broker kinds)
    the rest: the frame's bytes

Invariants:
  * FrameError is the only exception, and its message is one line;
  * a decoded frame is of an accepted kind, came with exactly that kind's FDs, fits MAX_FRAME;
  * it re-encodes (encode_frame must accept whatever decode_frame accepted, or the broker
    could not even log or forward it) and the re-encoded bytes decode to an equal frame.

    python -m fuzz fdpass --seconds 60
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import instrumented, one_line, require, time_limit

with instrumented(__name__, "broker.fdpass", "json"):
    from broker.fdpass import (
        MAX_FRAME,
        TO_BACKEND,
        TO_BROKER,
        FrameError,
        Kind,
        decode_frame,
        encode_frame,
        fd_count,
    )

DIRECTIONS = (frozenset(Kind), TO_BACKEND, TO_BROKER, frozenset(Kind))


def check(data: bytes) -> None:
    with time_limit(2.0):
        _check(data)


def _check(data: bytes) -> None:
    control = data[0] if data else 0
    nfds, accept = control & 3, DIRECTIONS[(control >> 2) & 3]
    frame_bytes = data[1:]
    try:
        frame = decode_frame(frame_bytes, nfds, accept)
    except FrameError as exc:
        one_line(str(exc), "FrameError")
        return
    require(frame.kind in accept, f"{frame.kind.name} decoded where it is not accepted")
    require(nfds == fd_count(frame.kind, frame.fields),
            f"{frame.kind.name} decoded with {nfds} FDs")
    require(len(frame_bytes) <= MAX_FRAME, "a frame over MAX_FRAME decoded")
    try:
        again = encode_frame(frame.kind, frame.fields)
    except FrameError as exc:
        raise AssertionError(f"decoded {frame.kind.name} frame does not re-encode: {exc}") from None
    require(len(again) <= MAX_FRAME, "re-encoded frame over MAX_FRAME")
    require(decode_frame(again, nfds, accept) == frame, "re-encoded frame decodes differently")


if __name__ == "__main__":
    from fuzz._harness import fuzz

    fuzz(check, "fdpass")
