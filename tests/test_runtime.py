"""How many threads a model step uses while other processes share the CPU (backend/runtime.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from backend.runtime import ThreadGovernor, apply_runtime_env

BURN = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 30: pass\n"


def settle(gov: ThreadGovernor, want: int, seconds: float = 8.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gov.threads_now() == want:
            return want
        time.sleep(0.05)
    return gov.threads_now()


@pytest.mark.skipif(not os.path.exists("/proc/stat") or os.cpu_count() < 2, reason="needs Linux and 2 cores")
def test_the_governor_drops_to_one_thread_while_another_process_keeps_a_core_busy():
    before = torch.get_num_threads()
    gov = ThreadGovernor(2, every=0.2)
    try:
        assert settle(gov, 2) == 2 and torch.get_num_threads() == 2  # a quiet machine: all threads
        burner = subprocess.Popen([sys.executable, "-c", BURN])
        try:
            assert settle(gov, 1) == 1, f"others used {gov.others:.2f} cores"
            assert torch.get_num_threads() == 1 and gov.others > 0.75
        finally:
            burner.kill()
            burner.wait()
        assert settle(gov, 2) == 2 and torch.get_num_threads() == 2  # and back once it is gone
    finally:
        torch.set_num_threads(before)


def test_the_governor_does_not_count_its_own_process():
    before = torch.get_num_threads()
    gov = ThreadGovernor(2, every=0.2)
    try:
        t = time.monotonic()
        while time.monotonic() - t < 1.0:  # this process busy: not "other processes"
            gov.threads_now()
        assert gov.current == 2, f"others {gov.others:.2f}"
    finally:
        torch.set_num_threads(before)


def test_runtime_env_leaves_an_explicit_wait_policy_alone(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert apply_runtime_env() == {"OMP_WAIT_POLICY": "PASSIVE"} and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert apply_runtime_env() == {"GOMP_SPINCOUNT": "10000"}
