"""Process-wide runtime settings that must be in place before torch is imported, shared by the app, the
training worker and every benchmark, so benchmarks measure what the app runs.

OMP_WAIT_POLICY=PASSIVE: the server and its training worker share the CPU. OpenMP's default busy-waiting
makes idle threads of one process spin against the other's: decode fell to ~0.5 tok/s under load, ~4-5
tok/s with PASSIVE (measured on a 2-core machine; a bench left at the default gave 3.5 instead of 22 tok/s
on a loaded machine).
"""
from __future__ import annotations

import os

RUNTIME_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_runtime_env() -> dict[str, str]:
    """Set the defaults (an explicit environment value wins); returns what is in force."""
    for k, v in RUNTIME_ENV.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in RUNTIME_ENV}
