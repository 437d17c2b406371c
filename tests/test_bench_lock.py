"""benchmarks/scale.py takes the shared bench lock the way ``flock /tmp/dk-bench.lock CMD`` does (``fcntl.flock`` on
the file), so the two exclude each other, and an existing lock file is no obstacle (``mkdir`` waited forever)."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

from tests._helpers_bench import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


def _enters(scale) -> tuple[threading.Thread, threading.Event]:
    entered = threading.Event()

    def take():
        with scale.bench_lock():
            entered.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    return t, entered


def test_bench_lock_waits_for_a_flock_holder_and_takes_an_existing_file(tmp_path, monkeypatch):
    scale = load_benchmark("scale")
    lock = tmp_path / "dk-bench.lock"
    lock.write_text("")  # the file `flock` leaves behind
    monkeypatch.setattr(scale, "LOCK", lock)
    with open(lock, "a") as held:  # what `flock /tmp/dk-bench.lock CMD` holds while CMD runs
        fcntl.flock(held, fcntl.LOCK_EX)
        t, entered = _enters(scale)
        assert not entered.wait(0.5)  # waits while another holder has it
        fcntl.flock(held, fcntl.LOCK_UN)
        assert entered.wait(10)  # and takes it once free, though the file exists
    t.join(10)
    with open(lock, "a") as f:  # released after the block
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_bench_lock_is_not_taken_again_under_lock_held(tmp_path, monkeypatch):
    """The script run under ``flock`` (``--lock-held``) must not wait for its own parent's lock."""
    scale = load_benchmark("scale")
    lock = tmp_path / "dk-bench.lock"
    monkeypatch.setattr(scale, "LOCK", lock)
    monkeypatch.setattr(scale, "LOCK_HELD", True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t, entered = _enters(scale)
        assert entered.wait(10)
    t.join(10)
