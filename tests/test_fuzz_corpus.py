"""The fuzz harnesses in CI: every corpus file replayed through `check()`, and a short live run.

Each file of fuzz/corpus/<harness>/ is a regression test of its harness: the seeds for every
rejection reason, the sessions recorded from QEMU, and the reproducers of every bug the fuzzer
found. A reproducer of a bug not fixed yet (fuzz/known_bugs.py) is a strict xfail: fixing the
bug turns it into a failure that says to drop the entry. Every harness must also take every
other harness's corpus without a broken invariant (any bytes are valid input to each of them).
Then `python -m fuzz` fuzzes every harness for a few seconds and must leave no crash behind.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzz.__main__ import HARNESSES
from fuzz.known_bugs import match, reproducers

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "fuzz" / "corpus"
LIVE_SECONDS = 5  # per harness; run two at a time, the whole live run stays under 60 s
LIVE_BUDGET = 60


def corpus_files(harness: str) -> list[Path]:
    return sorted(p for p in (CORPUS / harness).iterdir() if p.is_file())


def own_corpus_cases() -> list:
    cases = []
    for harness in HARNESSES:
        known = reproducers(harness)
        for path in corpus_files(harness):
            marks = []
            if path.name in known:
                marks.append(pytest.mark.xfail(reason=f"known bug {known[path.name].ident}",
                                               strict=True, raises=AssertionError))
            cases.append(pytest.param(harness, path, marks=marks, id=f"{harness}/{path.name}"))
    return cases


def test_every_harness_has_a_seed_corpus() -> None:
    assert set(HARNESSES) >= {"chain", "vhost_user", "blk_request", "net", "fdpass", "admin",
                              "policy", "seccomp_policy", "scheduler"}
    for harness in HARNESSES:
        assert corpus_files(harness), f"fuzz/corpus/{harness}/ is empty"


@pytest.mark.parametrize(("harness", "path"), own_corpus_cases())
def test_corpus_file_passes_its_harness(harness: str, path: Path) -> None:
    importlib.import_module(f"fuzz.fuzz_{harness}").check(path.read_bytes())


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_takes_every_other_harness_corpus(harness: str) -> None:
    check = importlib.import_module(f"fuzz.fuzz_{harness}").check
    failures = []
    for other in HARNESSES:
        if other == harness:
            continue
        for path in corpus_files(other):
            try:
                check(path.read_bytes())
            except Exception as exc:
                if match(harness, exc) is None:
                    failures.append(f"{other}/{path.name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def test_short_live_fuzz_run_of_every_harness_leaves_no_crash(tmp_path: Path) -> None:
    crashes = tmp_path / "crashes"
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "fuzz", "--seconds", str(LIVE_SECONDS), "--jobs", "2",
         "--crash-dir", str(crashes), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=LIVE_BUDGET + 60, check=False)
    elapsed = time.monotonic() - start
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not list(crashes.iterdir()), f"crash reproducers: {sorted(crashes.iterdir())}"
    for harness in HARNESSES:
        line = next(x for x in run.stdout.splitlines() if x.startswith(harness + " "))
        assert int(line.split()[1]) > 0, f"{harness} executed nothing: {line}"
    assert elapsed < LIVE_BUDGET, f"the live fuzz run took {elapsed:.0f} s"
