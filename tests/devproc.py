"""Run `ringfence dev` as a real process for integration and end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until true; no sleeping as synchronisation beyond a short poll."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


class DevBackend:
    """`ringfence dev` serving `exports` (socket path -> image path), logging to a file."""

    def __init__(
        self,
        exports: dict[str, str | os.PathLike[str]],
        *,
        readonly: Sequence[str] = (),
        num_queues: int = 1,
        extra: Sequence[str] = (),
        nets: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        """`nets` maps socket paths to `TAP[,mac=M][,mtu=N]`; `netns` runs the backend in
        that network namespace (where its taps then live)."""
        argv = [sys.executable, "-m", "backend", "--log-level", "debug", "dev",
                "--num-queues", str(num_queues), *extra]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]  # ip execs: the pid stays Python's
        for sock, image in exports.items():
            argv += ["--blk", f"{sock}={os.fspath(image)}"]
        for sock, tap in (nets or {}).items():
            argv += ["--net", f"{sock}={tap}"]
        for sock in readonly:
            argv += ["--readonly", sock]
        self.sockets = [*exports, *(nets or {})]
        self._final_log: str | None = None
        # Lives as long as the backend; closed in __exit__.
        self._log = tempfile.NamedTemporaryFile(prefix="ringfence-dev-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=self._log)
        try:
            wait_until(self._ready, what="ringfence dev listening")
        except TimeoutError:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"ringfence dev exited early:\n{self.log()}")
        return all(os.path.exists(s) for s in self.sockets)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return Path(self._log.name).read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> None:
        wait_until(lambda: needle in self.log(), timeout, f"log line containing {needle!r}")

    def log_mark(self) -> int:
        """Where the log ends now; pass as `since` to look only at later lines."""
        return len(self.log())

    def wait_for_line(self, *needles: str, since: int = 0, timeout: float = 10.0) -> str:
        """Wait for one log line (after `since`) containing every needle; return it."""
        found: list[str] = []

        def line_present() -> bool:
            for line in self.log()[since:].splitlines():
                if all(n in line for n in needles):
                    found.append(line)
                    return True
            return False

        wait_until(line_present, timeout, f"log line containing all of {needles!r}")
        return found[0]

    def frontends_on(self, sock: str) -> int:
        """Front-ends the backend has accepted on `sock` and not yet seen go (from the log)."""
        log = self.log()
        return log.count(f"{sock}: front-end connected") - log.count(f"{sock}: connection closed")

    def wait_until_free(self, sock: str, timeout: float = 10.0) -> None:
        """Wait until the backend has dropped every front-end of `sock`, so a new one is
        accepted rather than refused as a second front-end."""
        wait_until(lambda: self.frontends_on(sock) == 0, timeout, f"{sock} free")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> DevBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._final_log = self.log()  # still readable after the temp file is gone
        self._log.close()
