"""Fuzz the admin socket's request parser (broker/admin.py): parse_request.

The input is one request line as the broker reads it. Invariants:
  * AdminError is the only exception, and its message is one line without control characters
    (it goes back to the client and into the log);
  * nothing over MAX_LINE bytes is accepted;
  * an accepted line is exactly the JSON object {"cmd": <a known command>}, and the canonical
    encoding of that request parses to the same request.

    python -m fuzz admin --seconds 60
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import instrumented, one_line, require, time_limit

with instrumented(__name__, "broker.admin", "json"):
    from broker.admin import MAX_LINE, AdminError, Command, parse_request


def check(data: bytes) -> None:
    with time_limit(2.0):
        _check(data)


def _check(data: bytes) -> None:
    try:
        request = parse_request(data)
    except AdminError as exc:
        one_line(str(exc), "AdminError")
        return
    require(len(data) <= MAX_LINE, f"a {len(data)}-byte request was accepted")
    require(isinstance(request.cmd, Command), f"command {request.cmd!r} is not a Command")
    require(json.loads(data.removesuffix(b"\n")) == {"cmd": request.cmd.value},
            "accepted a line that is not exactly one command")
    canonical = json.dumps({"cmd": request.cmd.value}).encode() + b"\n"
    require(parse_request(canonical) == request, "the canonical request parses differently")


if __name__ == "__main__":
    from fuzz._harness import fuzz

    fuzz(check, "admin")
