"""Quick-start demo: a real guest doing disk and network I/O through the whole privilege split.

In a temporary deployment it creates the users, an Ed25519 key and a signed policy, a fresh
raw image, and a network namespace holding a bridge with a peer at 10.99.0.1 (nothing outside
it sees a frame). It starts the root broker in that namespace; the broker creates the VM's tap
on the bridge and spawns a confined backend (no capabilities, seccomp, empty namespaces),
handing it the image, the tap and the VM's sockets. `ringfence run-qemu` then boots a small
Linux guest under TCG with no disk and no network access of its own. The guest writes a known
pattern with O_DIRECT, drops its caches and reads it back; then, as 10.99.0.2, it pings the
peer, takes a download from it and sends it back. The demo checks the hashes, the image file
and the bytes that came back, and prints `ringfence status` and `ringfence audit`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.deploy import Deployment, ensure_user, ringfence
from tests.devproc import REPO, wait_until
from tests.e2e.guest import (
    KERNEL_CMDLINE,
    GuestResult,
    blk_check_problems,
    blk_check_script,
    guest_image,
    write_initrd,
)
from tests.e2e.network import Peer, bridged_namespace, exchange_script, nic_entry

IMAGE_MIB = 128
TRANSFER_MIB = 16
GUEST_IP = "10.99.0.2"


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def console_result(console: Path) -> GuestResult:
    text = console.read_text(errors="replace").replace("\r\n", "\n")
    return GuestResult(output=text, exit_status=0, qemu_returncode=0, qemu_stderr="",
                       timed_out=False, elapsed=0.0)


def main() -> int:
    ensure_user("rf-demo")
    with bridged_namespace("rfd") as ns, Deployment.temporary() as deploy:
        image = deploy.image("demo.raw", IMAGE_MIB)
        script = (blk_check_script(["vda"]) + exchange_script(GUEST_IP)
                  + "echo RF: checked=yes\nsleep 600\n")
        initrd = write_initrd(script, deploy.root / "initrd.cpio.gz")
        initrd.chmod(0o644)
        deploy.write_policy({"demo": (
            f'group = "tenant-a"\nuser = "rf-demo"\nmemory = "256M"\n'
            f'kernel = "{guest_image().kernel}"\ninitrd = "{initrd}"\n'
            f'append = "{KERNEL_CMDLINE}"\ndisks = [ {{ image = "demo.raw" }} ]\n'
            f'nics = [ {nic_entry("rfd-demo-0", 0)} ]')})
        say(f"deployment in {deploy.root}: signed policy {deploy.policy}, image {image}")
        say(f"network namespace {ns}: bridge with the peer at 10.99.0.1; the guest is {GUEST_IP}")
        peer = Peer(ns, os.urandom(TRANSFER_MIB << 20))
        peer.listen()
        notified = deploy.start_broker(netns=ns)
        say(f"broker (root) is up and told systemd {notified.splitlines()[0]!r}")
        say(f"backend pid {deploy.backend_pid()} serves {deploy.socket('demo')}")
        console = deploy.root / "console.log"
        with open(console, "w") as out:
            qemu = subprocess.Popen(
                [sys.executable, "-m", "backend", "run-qemu", "--policy", str(deploy.policy),
                 "demo", "--", "-nographic", "-no-reboot", "-accel", "tcg"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        say("ringfence run-qemu: QEMU as rf-demo in an empty network namespace, booting ...")
        started = time.monotonic()
        try:
            wait_until(lambda: "RF: listening=yes" in console.read_text(errors="replace")
                       or qemu.poll() is not None, 300, "the guest's disk check")
            say(f"guest finished its disk check after {time.monotonic() - started:.1f} s; "
                f"sending it {TRANSFER_MIB} MiB over TCP ...")
            peer.download_to(GUEST_IP)
            wait_until(lambda: "RF: checked=yes" in console.read_text(errors="replace")
                       or qemu.poll() is not None, 300, "the guest's upload")
            peer.wait_upload()
            say(f"the guest sent them back; network exchange done after "
                f"{time.monotonic() - started:.1f} s")
            print(ringfence("status", "--policy", str(deploy.policy)).stdout, end="",
                  flush=True)
            audit = ringfence("audit", "--policy", str(deploy.policy))
            print(audit.stdout, end="", flush=True)
            report = json.loads(ringfence("audit", "--policy", str(deploy.policy),
                                          "--json").stdout)
        finally:
            qemu.send_signal(signal.SIGTERM)
            qemu.wait(timeout=30)
            peer.close()
        result = console_result(console)
        values = result.values()
        say(f"guest saw vda with {values.get('vda.sectors')} sectors")
        for key in sorted(k for k in values if k.endswith((".written", ".read"))):
            say(f"  {key:22} sha256 {values[key][:16]}...")
        problems = blk_check_problems(result, {"vda": image})
        digest = hashlib.sha256(peer.data).hexdigest()
        say(f"guest: ping {values.get('ping')}, received {values.get('rx_bytes')} bytes, "
            f"sha256 {values.get('rx_sha', '')[:16]}...; peer got back "
            f"{peer.received_bytes} bytes, sha256 {peer.received.hexdigest()[:16]}...")
        if values.get("ping") != "ok":
            problems.append("the guest could not ping the peer")
        if values.get("rx_sha") != digest:
            problems.append("the guest's download does not match what the peer sent")
        if peer.errors or peer.received.hexdigest() != digest:
            problems.append(f"the upload does not match what the peer sent {peer.errors}")
        violations = [p for p in report["processes"] if p["violations"]]
        if problems or violations or audit.returncode != 0:
            say("FAILED:\n  " + "\n  ".join(problems + [json.dumps(v) for v in violations]))
            print(result.output[-3000:], deploy.log()[-3000:], sep="\n", file=sys.stderr)
            return 1
        say("OK: the guest's O_DIRECT writes read back identical and the host finds them in the "
            f"image; {TRANSFER_MIB} MiB went to the guest and came back intact over its "
            "virtio-net NIC; audit finds no process outside its expectations")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
