"""Quick-start demo: a real guest doing disk I/O through the whole privilege split.

In a temporary deployment it creates the users, an Ed25519 key and a signed policy, a fresh
raw image, and starts the root broker, which spawns a confined backend (no capabilities,
seccomp, empty namespaces) and hands it the image and the VM's socket. `ringfence run-qemu`
then boots a small Linux guest under TCG with no disk and no network access of its own; the
guest writes a known pattern with O_DIRECT, drops its caches and reads it back. The demo
checks the hashes and the image file, and prints `ringfence audit` of the running processes.
"""

from __future__ import annotations

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

IMAGE_MIB = 128


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def console_result(console: Path) -> GuestResult:
    text = console.read_text(errors="replace").replace("\r\n", "\n")
    return GuestResult(output=text, exit_status=0, qemu_returncode=0, qemu_stderr="",
                       timed_out=False, elapsed=0.0)


def main() -> int:
    ensure_user("rf-demo")
    with Deployment.temporary() as deploy:
        image = deploy.image("demo.raw", IMAGE_MIB)
        script = blk_check_script(["vda"]) + "echo RF: checked=yes\nsleep 600\n"
        initrd = write_initrd(script, deploy.root / "initrd.cpio.gz")
        initrd.chmod(0o644)
        deploy.write_policy({"demo": (
            f'group = "tenant-a"\nuser = "rf-demo"\nmemory = "256M"\n'
            f'kernel = "{guest_image().kernel}"\ninitrd = "{initrd}"\n'
            f'append = "{KERNEL_CMDLINE}"\ndisks = [ {{ image = "demo.raw" }} ]')})
        say(f"deployment in {deploy.root}: signed policy {deploy.policy}, image {image}")
        notified = deploy.start_broker()
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
            wait_until(lambda: "RF: checked=yes" in console.read_text(errors="replace")
                       or qemu.poll() is not None, 300, "the guest's disk check")
            say(f"guest finished its disk check after {time.monotonic() - started:.1f} s")
            audit = ringfence("audit", "--policy", str(deploy.policy))
            print(audit.stdout, end="", flush=True)
            report = json.loads(ringfence("audit", "--policy", str(deploy.policy),
                                          "--json").stdout)
        finally:
            qemu.send_signal(signal.SIGTERM)
            qemu.wait(timeout=30)
        result = console_result(console)
        values = result.values()
        say(f"guest saw vda with {values.get('vda.sectors')} sectors")
        for key in sorted(k for k in values if k.endswith((".written", ".read"))):
            say(f"  {key:22} sha256 {values[key][:16]}...")
        problems = blk_check_problems(result, {"vda": image})
        violations = [p for p in report["processes"] if p["violations"]]
        if problems or violations or audit.returncode != 0:
            say("FAILED:\n  " + "\n  ".join(problems + [json.dumps(v) for v in violations]))
            print(result.output[-3000:], deploy.log()[-3000:], sep="\n", file=sys.stderr)
            return 1
        say("OK: the guest's O_DIRECT writes read back identical, the host finds them in the "
            "image, and audit finds no process outside its expectations")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
