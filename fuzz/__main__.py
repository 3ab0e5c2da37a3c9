"""Run the fuzz harnesses: `python -m fuzz [HARNESS ...] --seconds N`.

Each harness runs in its own process under atheris/libFuzzer for N seconds, starting from its
seed corpus `fuzz/corpus/<harness>/` (read, never written) plus what earlier runs found in
`fuzz/.work/<harness>/` (where libFuzzer adds new inputs), with `fuzz/dict/<harness>.dict`
as libFuzzer's dictionary where there is one. A crashing input is written as a
reproducer `fuzz/crashes/<harness>-crash-<sha1>`; replay it with
`python -m fuzz.fuzz_<harness> fuzz/crashes/<file>` or with `check()` from Python. Inputs
that trip a bug on record in fuzz/known_bugs.py are counted, not fatal.

Prints, per harness: executions, executions per second, libFuzzer's coverage figures (`cov`:
instrumented edges hit, `ft`: features), corpus size, new inputs, known bugs hit, crashes.
Exits 1 if any harness crashed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent
HARNESSES = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py"))
# Inputs larger than libFuzzer's 4096-byte default: whole recorded QEMU sessions, guest memory,
# real frames.
MAX_LEN = {"vhost_user": 16384, "chain": 8192, "policy": 4096, "seccomp_policy": 8192,
           "net": 8192}
TIMEOUT_S = 10  # libFuzzer's per-input limit; the harnesses' own CPU limit (1-2 s) comes first


@dataclass
class Result:
    harness: str
    returncode: int = 0
    seconds: float = 0.0
    execs: int = 0
    exec_per_sec: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    new_units: int = 0
    known_bugs: list[str] = field(default_factory=list)
    crashes: list[Path] = field(default_factory=list)
    log: Path | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.crashes and not self.error


def run_harness(name: str, seconds: int, crash_dir: Path, work_dir: Path) -> Result:
    result = Result(name)
    corpus = FUZZ_DIR / "corpus" / name
    found = work_dir / name
    corpus.mkdir(parents=True, exist_ok=True)
    found.mkdir(parents=True, exist_ok=True)
    crash_dir.mkdir(parents=True, exist_ok=True)
    before = set(crash_dir.glob(f"{name}-*"))
    argv = [sys.executable, "-m", f"fuzz.fuzz_{name}",
            f"-max_total_time={seconds}", "-print_final_stats=1", f"-timeout={TIMEOUT_S}",
            f"-artifact_prefix={crash_dir}/{name}-", str(found), str(corpus)]
    if name in MAX_LEN:
        argv.insert(3, f"-max_len={MAX_LEN[name]}")
    dictionary = FUZZ_DIR / "dict" / f"{name}.dict"
    if dictionary.exists():
        argv.insert(3, f"-dict={dictionary}")
    result.log = work_dir / f"{name}.log"
    start = time.monotonic()
    with open(result.log, "wb") as log:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
        proc = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=seconds + 120, check=False)
    result.seconds = time.monotonic() - start
    result.returncode = proc.returncode
    parse_log(result.log.read_text(errors="replace"), result)
    result.crashes = sorted(set(crash_dir.glob(f"{name}-*")) - before)
    return result


def parse_log(text: str, result: Result) -> None:
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", text, re.M))
    result.execs = int(stats.get("number_of_executed_units", 0))
    result.exec_per_sec = int(stats.get("average_exec_per_sec", 0))
    result.new_units = int(stats.get("new_units_added", 0))
    progress = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", text)
    if progress:
        result.cov, result.ft, result.corpus = map(int, progress[-1])
    result.known_bugs = sorted(set(re.findall(r"^KNOWN-BUG ([\w-]+):", text, re.M)))
    if not stats and result.returncode == 0:
        result.error = "libFuzzer printed no final statistics"
    if "Uncaught Python exception" in text:
        tail = text.split("Uncaught Python exception", 1)[1].strip().splitlines()
        result.error = next((line for line in reversed(tail[:40])
                             if re.match(r"^\w*(Error|Exception|Invariant|Input)\b", line)),
                            "uncaught exception")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("harness", nargs="*", metavar="HARNESS",
                        help=f"which to run (default: all of {', '.join(HARNESSES)})")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per harness")
    parser.add_argument("--jobs", type=int, default=1, help="harnesses run at once")
    parser.add_argument("--crash-dir", type=Path, default=FUZZ_DIR / "crashes")
    parser.add_argument("--work-dir", type=Path, default=FUZZ_DIR / ".work")
    args = parser.parse_args(argv)
    unknown = [h for h in args.harness if h not in HARNESSES]
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; choose from {', '.join(HARNESSES)}")
    if args.seconds < 1 or args.jobs < 1:
        parser.error("--seconds and --jobs must be at least 1")
    names = args.harness or HARNESSES
    crash_dir, work_dir = args.crash_dir.resolve(), args.work_dir.resolve()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda n: run_harness(n, args.seconds, crash_dir, work_dir),
                                names))
    print(f"{'harness':<15} {'execs':>9} {'exec/s':>7} {'cov':>5} {'ft':>6} {'corpus':>6} "
          f"{'new':>5}  result")
    for r in results:
        verdict = "ok" if r.ok else f"CRASH ({r.error or f'exit {r.returncode}'})"
        if r.known_bugs:
            verdict += f"; known bugs hit: {', '.join(r.known_bugs)}"
        print(f"{r.harness:<15} {r.execs:>9} {r.exec_per_sec:>7} {r.cov:>5} {r.ft:>6} "
              f"{r.corpus:>6} {r.new_units:>5}  {verdict}")
    total = sum(r.execs for r in results)
    print(f"{'total':<15} {total:>9}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        for crash in r.crashes:
            print(f"reproducer: {crash}  (replay: python -m fuzz.fuzz_{r.harness} {crash})")
        print(f"log: {r.log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
