"""Fuzz the seccomp policy parser (sandbox/seccomp_policy.py): parse_policy + compile_filter.

The input is a policy file's text (decoded as UTF-8, undecodable bytes replaced). Invariants:
  * SeccompPolicyError is the only exception from parsing, and it is one line naming the file;
  * whatever parses also compiles: the parser is the only gate before libseccomp, so a policy
    it accepts and libseccomp refuses would stop the backend at start-up;
  * every rule's syscall appears once, and a `return` rule carries no condition.

    python -m fuzz seccomp_policy --seconds 60
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import instrumented, one_line, require, time_limit

with instrumented(__name__, "sandbox.seccomp_policy"):
    from sandbox.seccomp_policy import SeccompPolicyError, compile_filter, parse_policy

SOURCE = "fuzz.policy"


def check(data: bytes) -> None:
    with time_limit(2.0):
        _check(data)


def _check(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    try:
        policy = parse_policy(text, SOURCE)
    except SeccompPolicyError as exc:
        one_line(str(exc), "SeccompPolicyError")
        require(str(exc).startswith(SOURCE), f"error does not name the file: {exc}")
        return
    require(len(set(policy.syscalls)) == len(policy.syscalls), "a syscall has two rules")
    require(all(rule.errno is None or not rule.alternatives for rule in policy.rules),
            "a return rule has a condition")
    compile_filter(policy, "log")


if __name__ == "__main__":
    from fuzz._harness import fuzz

    fuzz(check, "seccomp_policy")
