"""Fuzz the seccomp policy parser: any text parses or raises SeccompPolicyError, nothing else.

    python3 fuzz/fuzz_seccomp_policy.py -max_total_time=60 NEW_CORPUS_DIR fuzz/corpus/seccomp_policy

(Name a scratch directory first: libFuzzer adds what it finds to the first corpus directory.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from sandbox.seccomp_policy import SeccompPolicyError, compile_filter, parse_policy


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    try:
        policy = parse_policy(text, "fuzz.policy")
    except SeccompPolicyError:
        return
    # Whatever parses must compile: the parser is the only gate before libseccomp.
    compile_filter(policy, "log")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
