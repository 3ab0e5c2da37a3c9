"""What every harness shares: the input reader, the time limit, instrumentation and the entry point.

Each `fuzz/fuzz_<name>.py` has the same shape:

    with instrumented(__name__, "backend"):      # atheris instruments these only when fuzzing
        from backend.x import parse_x

    def check(data: bytes) -> None:               # pure: raises AssertionError on a broken
        ...                                       # invariant, nothing else escapes

    if __name__ == "__main__":
        fuzz(check, "name")

`check` needs no atheris, so pytest replays every corpus file through it
(tests/test_fuzz_corpus.py); `fuzz` runs it under atheris/libFuzzer with the flags it is given
(`python -m fuzz` supplies them).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class Invariant(AssertionError):
    """A harness found a broken invariant (raised as such so libFuzzer saves the input)."""


class SlowInput(Invariant):
    """One input kept the CPU busy past the harness's time limit (a denial of service)."""


def require(condition: object, message: str) -> None:
    """`assert` that survives `python -O`: harness invariants must hold in every mode."""
    if not condition:
        raise Invariant(message)


class Reader:
    """Consumes a fuzz input front to back; past its end every number reads as zero.

    A plain stand-in for atheris.FuzzedDataProvider, so that `check()` runs without atheris and
    a corpus file means the same to pytest as to libFuzzer.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def uint(self, nbytes: int) -> int:
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += len(chunk)
        return int.from_bytes(chunk, "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def int_in_range(self, low: int, high: int) -> int:
        """An integer in [low, high], from as few bytes as the range needs."""
        span = high - low
        if span <= 0:
            return low
        return low + self.uint((span.bit_length() + 7) // 8) % (span + 1)

    def bool(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, choices):
        return choices[self.int_in_range(0, len(choices) - 1)]

    def bytes(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        return self.bytes(self.remaining())


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SlowInput when the block uses more than `seconds` of CPU time.

    ITIMER_PROF (SIGPROF) and not SIGALRM, which libFuzzer's own -timeout uses. Only the main
    thread can take signals in Python; elsewhere the block runs unlimited.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(_signum: int, _frame: object) -> None:
        raise SlowInput(f"one input used more than {seconds} s of CPU")

    previous = signal.signal(signal.SIGPROF, expired)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def one_line(message: str, what: str) -> None:
    """An operator-facing error message: one non-empty line, no terminal control characters."""
    require(message and len(message.splitlines()) == 1 and message.strip() == message,
            f"{what} is not one line: {message!r}")
    require(not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in message),
            f"{what} carries control characters: {message!r}")


def instrumented(module_name: str, *packages: str) -> contextlib.AbstractContextManager:
    """Instrument `packages` as they are imported, but only in a harness run as a fuzzer."""
    if module_name != "__main__":
        return contextlib.nullcontext()
    try:
        import atheris
    except ImportError:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=list(packages))


def fuzz(check: Callable[[bytes], None], harness: str) -> None:
    """Run `check` under libFuzzer with this process's command line (libFuzzer flags).

    Inputs that trip a bug already on record in fuzz/known_bugs.py are reported once (a
    `KNOWN-BUG` line on stderr) and do not stop the run, so fuzzing goes on looking for new ones;
    `check` itself stays strict, so the corpus regression test still sees them.
    """
    import atheris

    from fuzz.known_bugs import match

    reported: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            check(data)
        except Exception as exc:
            bug = match(harness, exc)
            if bug is None:
                raise
            if bug.ident not in reported:
                reported.add(bug.ident)
                print(f"KNOWN-BUG {bug.ident}: {bug.summary}", file=sys.stderr, flush=True)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
