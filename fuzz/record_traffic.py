"""Record the vhost-user messages a real QEMU sends, as seeds for fuzz_vhost_user.

    python fuzz/record_traffic.py [--out fuzz/corpus/vhost_user] [--queues 1 2]

For each queue count, this boots a real guest (tests/e2e/guest.py, QEMU under TCG) whose only
disk is a vhost-user-blk device served by `ringfence dev`, with a small recording proxy between
them: a unix socket QEMU connects to, which forwards every recvmsg (bytes and FDs) to the
backend and the backend's replies back. What QEMU sent is written in the harness's chunk format
(one chunk per recvmsg, its FD count in the control byte) as `qemu-<n>q-session`: feature
negotiation, memory table, ring set-up, the guest's I/O phase, and ring stop at power-off.
Each session is also cut after the ring set-up (`qemu-<n>q-setup`), a shorter seed that the
fuzzer mutates faster.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.devproc import DevBackend  # noqa: E402
from tests.e2e.guest import blk_check_problems, blk_check_script, raw_image, start_guest  # noqa: E402

CHUNK = struct.Struct("<BH")
MAX_FDS = 8
SET_VRING_ENABLE = 18
SET_VRING_KICK = 12


class RecordingProxy:
    """Accepts one front-end on `path`, relays it to `backend`, records front-end -> backend."""

    def __init__(self, path: str, backend: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.backend = backend
        self.chunks: list[tuple[bytes, int]] = []  # (data, FD count) per recvmsg from QEMU
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            front, _ = self.listener.accept()
            back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            back.connect(self.backend)
            with front, back:
                self._relay(front, back)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _relay(self, front: socket.socket, back: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(front, selectors.EVENT_READ, back)
        sel.register(back, selectors.EVENT_READ, front)
        while True:
            for key, _ in sel.select():
                src, dst = key.fileobj, key.data
                data, fds, _flags, _ = socket.recv_fds(src, 65535, MAX_FDS)
                try:
                    if src is front:
                        self.chunks.append((data, len(fds)))
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    sent = socket.send_fds(dst, [data], fds) if fds else 0
                    dst.sendall(data[sent:])  # FDs travel with the first byte only
                finally:
                    for fd in fds:
                        os.close(fd)

    def join(self, timeout: float) -> list[tuple[bytes, int]]:
        self.thread.join(timeout)
        self.listener.close()
        if self.error is not None:
            raise RuntimeError(f"recording proxy failed: {self.error}") from self.error
        return self.chunks


def encode(chunks: list[tuple[bytes, int]]) -> bytes:
    return b"".join(CHUNK.pack(nfds, len(data)) + data for data, nfds in chunks)


def setup_prefix(chunks: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
    """The chunks up to the device's first start: through the first run of chunks that enable
    rings (SET_VRING_ENABLE 1) after a SET_VRING_KICK."""
    kicked, end = False, 0
    for i, (data, _nfds) in enumerate(chunks):
        enables = False
        pos = 0
        while pos + 12 <= len(data):
            request, _flags, size = struct.unpack_from("<III", data, pos)
            kicked |= request == SET_VRING_KICK
            if request == SET_VRING_ENABLE and kicked and data[pos + 16 : pos + 20] == b"\1\0\0\0":
                enables = True
            pos += 12 + size
        if enables:
            end = i + 1
        elif end:
            break
    return chunks[:end] or chunks


def record(queues: int, work: Path, timeout: float) -> list[tuple[bytes, int]]:
    image = raw_image(work / f"disk{queues}.raw", 64)
    back_sock, front_sock = str(work / f"backend{queues}.sock"), str(work / f"qemu{queues}.sock")
    script = blk_check_script(["vda"], pattern_mib=1, offsets_mib=(0, 33))
    with DevBackend({back_sock: image}, num_queues=queues) as backend:
        proxy = RecordingProxy(front_sock, back_sock)
        extra = ["-smp", str(queues), "-global", f"vhost-user-blk-pci.num-queues={queues}"]
        with start_guest([front_sock], script, timeout=timeout, extra_args=extra) as guest:
            result = guest.wait()
        chunks = proxy.join(timeout=10)
        if not backend.alive():
            raise RuntimeError(f"ringfence dev died:\n{backend.log()}")
    problems = blk_check_problems(result, {"vda": image}, pattern_mib=1, offsets_mib=(0, 33))
    if problems:
        raise RuntimeError(f"guest I/O check failed: {problems}\n{result.output[-2000:]}")
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "fuzz" / "corpus" / "vhost_user")
    parser.add_argument("--queues", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rf-record-") as tmp:
        for queues in args.queues:
            chunks = record(queues, Path(tmp), args.timeout)
            for name, part in ((f"qemu-{queues}q-session", chunks),
                               (f"qemu-{queues}q-setup", setup_prefix(chunks))):
                data = encode(part)
                (args.out / name).write_bytes(data)
                fds = sum(n for _, n in part)
                print(f"{name}: {len(part)} recvmsg chunks, {len(data)} bytes, {fds} FDs")


if __name__ == "__main__":
    main()
