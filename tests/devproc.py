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
    ) -> None:
        argv = [sys.executable, "-m", "backend", "--log-level", "debug", "dev",
                "--num-queues", str(num_queues), *extra]
        for sock, image in exports.items():
            argv += ["--blk", f"{sock}={os.fspath(image)}"]
        for sock in readonly:
            argv += ["--readonly", sock]
        self.sockets = list(exports)
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
