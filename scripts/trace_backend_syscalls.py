"""Find the syscalls the confined backend makes, to keep policies/backend.policy exact.

    python3 scripts/trace_backend_syscalls.py [--kill] [--keep-traces DIR] [PYTEST ARGS...]

Runs tests (by default every test that starts a backend: `ringfence dev` integration,
hostile front-end and QEMU tests, and the broker tests) with each backend confined by the
real policy and traced by strace from before it confines itself:

* every `ringfence dev` the tests start runs this script's `serve` mode instead: the same
  backend set up the same way, then confined as the broker confines its backends;
* every `ringfence backend` the broker spawns is traced through a sitecustomize hook.

Seccomp runs in log mode, so a missing rule shows up here instead of killing the backend. The
script prints each syscall made after the filter was loaded, with its count, and how that
differs from the policy. Traced backends are slow: tests with deadlines may fail then. With
--kill nothing is traced and seccomp kills: the tests must pass as they do unconfined.
Run as root with strace installed (and QEMU for the e2e tests).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.blk import BlkDevice  # noqa: E402 - after the sys.path line above
from backend.cli import build_parser, listen_unix, open_image, parse_blk_exports  # noqa: E402
from backend.server import Endpoint, Loop  # noqa: E402
from sandbox.confine import confine  # noqa: E402
from sandbox.seccomp_policy import read_policy  # noqa: E402

POLICY = REPO / "policies" / "backend.policy"
DEFAULT_TESTS = ("tests/test_integration_blk.py", "tests/test_hostile.py", "tests/test_broker.py",
                 "tests/e2e")
UNPRIVILEGED = 65534  # nobody / nogroup
TRACE_DIR_ENV = "RINGFENCE_TRACE_DIR"
SECCOMP_ENV = "RINGFENCE_TRACE_SECCOMP"
STRACE_LINE = re.compile(r"(?P<pid>\d+)\s+(?P<name>[a-z0-9_]+)\(")
FILTER_LOADED = re.compile(r"seccomp\(SECCOMP_SET_MODE_FILTER, 0, .*\) = 0$")
# Loaded by every Python process the tests start; acts only in the broker's backends.
SITECUSTOMIZE = f"""\
import sys
with open("/proc/self/cmdline", "rb") as cmdline:
    if cmdline.read().split(b"\\0")[1:4] == [b"-m", b"backend", b"backend"]:
        sys.path.insert(0, {str(REPO / "scripts")!r})
        import trace_backend_syscalls
        trace_backend_syscalls.adopt_broker_backend()
"""

log = logging.getLogger("trace")


# --- in the backends ----------------------------------------------------------------------


def serve(argv: Sequence[str]) -> None:
    """`ringfence dev` with the same arguments, confined before it serves anything."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exports = parse_blk_exports(args.blk, args.readonly)
    loop = Loop()
    image_fds = [open_image(export) for export in exports]
    sockets = [listen_unix(export.socket_path) for export in exports]
    endpoints = [
        Endpoint(export.socket_path, sock,
                 BlkDevice(fd, readonly=export.readonly, num_queues=args.num_queues,
                           serial=os.path.basename(export.image_path)),
                 loop, require_sealed_memory=not args.allow_unsealed_memory)
        for export, fd, sock in zip(exports, image_fds, sockets, strict=True)
    ]
    loop.stop_on_signals()
    trace_dir = os.environ.get(TRACE_DIR_ENV)
    if trace_dir:
        attach_strace(Path(trace_dir) / f"backend.{os.getpid()}")
    keep = [loop.epoll.fileno(), *loop.signal_fds(), *image_fds, *(s.fileno() for s in sockets)]
    confine(keep_fds=keep, uid=UNPRIVILEGED, gid=UNPRIVILEGED, seccomp_policy=POLICY,
            seccomp_action=os.environ.get(SECCOMP_ENV, "log"))
    # A bug reached by front-end input is logged with its traceback and costs only that
    # connection: the traceback must not cost the process under the filter either.
    try:
        raise RuntimeError("traceback logging under the seccomp filter")
    except RuntimeError:
        log.exception("exercising the internal-error path")
    try:
        loop.run()
    finally:
        for endpoint in endpoints:
            endpoint.close()


def adopt_broker_backend() -> None:
    """At the start of each `ringfence backend`: log mode instead of kill, and trace it."""
    if os.environ.get(SECCOMP_ENV) == "log" and "--seccomp" in sys.argv:
        sys.argv[sys.argv.index("--seccomp") + 1] = "log"
    trace_dir = os.environ.get(TRACE_DIR_ENV)
    if trace_dir:
        attach_strace(Path(trace_dir) / f"backend.{os.getpid()}")


def attach_strace(output: Path) -> None:
    """Trace this process from now on, with strace detached from us (not our child)."""
    subprocess.run(["sh", "-c", 'strace -q -f -o "$1" -p "$2" &', "sh", str(output),
                    str(os.getpid())], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while "TracerPid:\t0\n" in Path("/proc/self/status").read_text():
        if time.monotonic() > deadline:
            raise SystemExit("strace did not attach within 10 s")
        time.sleep(0.01)


# --- in the test run ----------------------------------------------------------------------


class ServeInsteadOfDev:
    """pytest plugin: each `python -m backend ... dev ...` the tests start runs `serve`."""

    def __init__(self) -> None:
        self._popen = subprocess.Popen

    def pytest_configure(self) -> None:
        subprocess.Popen = self._start  # type: ignore[misc, assignment]

    def pytest_unconfigure(self) -> None:
        subprocess.Popen = self._popen  # type: ignore[misc]

    def _start(self, argv: Sequence[str], *args: object, **kwargs: object) -> subprocess.Popen:
        if list(argv[:3]) == [sys.executable, "-m", "backend"] and "dev" in argv:
            argv = [sys.executable, __file__, "serve", *argv[3:]]
        return self._popen(argv, *args, **kwargs)


def post_filter_syscalls(text: str) -> collections.Counter[str]:
    """Syscalls in one strace log made after the seccomp filter was loaded."""
    counts: collections.Counter[str] = collections.Counter()
    confined = False
    for line in text.splitlines():
        if not confined:
            confined = bool(FILTER_LOADED.search(line))
        elif match := STRACE_LINE.match(line):
            counts[match["name"]] += 1
    return counts


def wait_for_end(trace: Path, timeout: float = 10) -> str:
    """The whole log: strace writes the exit line after the traced process is gone."""
    deadline = time.monotonic() + timeout
    while "+++ " not in (text := trace.read_text(errors="replace")):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return text


def run(argv: Sequence[str]) -> int:
    import pytest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill", action="store_true",
                        help="no strace, seccomp in kill mode: the tests prove the policy")
    parser.add_argument("--keep-traces", metavar="DIR", type=Path,
                        help="leave the strace logs in DIR (default: a temporary directory)")
    args, pytest_args = parser.parse_known_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rf-trace-")))
        trace_dir = args.keep_traces.resolve() if args.keep_traces else work / "traces"
        trace_dir.mkdir(parents=True, exist_ok=True)
        os.environ[SECCOMP_ENV] = "kill" if args.kill else "log"
        if not args.kill:
            os.environ[TRACE_DIR_ENV] = str(trace_dir)
            (work / "site").mkdir()
            (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(work / "site"), os.environ.get("PYTHONPATH")]))
        status = pytest.main(["-q", "-p", "no:cacheprovider", *(pytest_args or DEFAULT_TESTS)],
                             plugins=[ServeInsteadOfDev()])
        logs = [wait_for_end(trace) for trace in sorted(trace_dir.glob("backend.*"))]
    if args.kill:
        return int(status)
    counts: collections.Counter[str] = collections.Counter()
    for text in logs:
        counts.update(post_filter_syscalls(text))
    allowed = set(read_policy(POLICY).syscalls)
    print(f"\n{len(logs)} confined backends traced; syscalls after the filter was loaded:")
    for name, count in sorted(counts.items()):
        print(f"  {name:<20} {count:>9}{'' if name in allowed else '   NOT IN POLICY'}")
    print(f"policy rules never used: {', '.join(sorted(allowed - set(counts))) or 'none'}")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        with contextlib.suppress(KeyboardInterrupt):
            serve(sys.argv[2:])
        return 0
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
