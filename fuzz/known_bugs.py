"""Bugs the harnesses found that are not fixed yet, each with its reproducer in the corpus.

While a bug is listed here, `python -m fuzz` reports inputs that trip it as a `KNOWN-BUG` line
instead of stopping, so a short fuzz run can still find new bugs; and the corpus regression test
(tests/test_fuzz_corpus.py) expects its reproducer to fail (strict xfail), so the day the bug is
fixed the test says so and the entry must go. `check()` itself is never relaxed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownBug:
    ident: str
    harness: str
    pattern: str  # re.search against "<exception class>: <message>"
    reproducers: tuple[str, ...]  # file names in fuzz/corpus/<harness>/
    summary: str
    fix: str


# None at the moment: every bug found so far is fixed, and its reproducer is a regression seed.
KNOWN_BUGS: tuple[KnownBug, ...] = ()


def match(harness: str, exc: BaseException) -> KnownBug | None:
    """The known bug `exc` (raised by `harness`'s check) is an instance of, if any."""
    text = f"{type(exc).__name__}: {exc}"
    for bug in KNOWN_BUGS:
        if bug.harness == harness and re.search(bug.pattern, text):
            return bug
    return None


def reproducers(harness: str) -> dict[str, KnownBug]:
    """Corpus file name -> the known bug it reproduces, for one harness."""
    return {name: bug for bug in KNOWN_BUGS if bug.harness == harness
            for name in bug.reproducers}
