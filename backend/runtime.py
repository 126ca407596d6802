"""Process-wide runtime settings that must be in place before torch is imported, shared by the app, the
training worker and every benchmark, so benchmarks measure what the app runs; and the one place that
decides how many threads a step uses while other processes share the CPU.

OpenMP's idle threads (torch's CPU build uses GNU libgomp): a parallel region ends with the threads
waiting for the next one. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every op pay a futex wake-up
and a core's exit from its idle state; the fused decode step of the bundled model took 15.0 ms instead of
5.1 ms, and a 300-token prefill 0.60 s instead of 0.26 s (2 threads, idle machine). Spinning for ever
(libgomp's default is 300,000 spins) makes the idle threads of one process burn the cores another needs:
decode fell to ~0.5 tok/s under a training job. GOMP_SPINCOUNT=10000 spins ~0.3 ms, then sleeps, so an
idle server costs nothing and back-to-back ops never sleep. Where another process keeps a core busy,
two spinning threads still lose (decode 20 tok/s beside a 2-thread training loop, against 95 with PASSIVE);
there `ThreadGovernor` drops the scheduler to one thread, which measured 102 tok/s beside the same loop,
the loop itself going faster too (91 against 62 steps/s). An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
"""
from __future__ import annotations

import ctypes
import os
import time

RUNTIME_ENV = {"GOMP_SPINCOUNT": "10000"}


def apply_runtime_env() -> dict[str, str]:
    """Set the defaults unless the environment already says how OpenMP threads wait; what is in force."""
    if "OMP_WAIT_POLICY" not in os.environ:
        for k, v in RUNTIME_ENV.items():
            os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in ("OMP_WAIT_POLICY", *RUNTIME_ENV) if k in os.environ}


def exit_process(code: int | None) -> None:
    """End a command-line run that has done its work: atexit handlers (the compute thread's join among them),
    stdio flushed, then os._exit, skipping the interpreter's module teardown. Why: torch's tensors freed during
    that teardown can reach a noexcept C++ destructor and abort the process ("terminate called without an
    active exception", pytorch/pytorch#176747); backend.evals exited -6 so once in CI after printing its card."""
    import atexit
    import sys
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to tell
            pass
    os._exit(code if isinstance(code, int) else 0)


_LIBC: list = []  # [the C library handle, or None where it has no malloc_trim], looked up once


def release_free_memory() -> bool:
    """Hand the memory the process has freed back to the OS: glibc's malloc_trim(0) returns the free pages of
    every heap arena (a prefill's activations and a finished batch's KV cache are freed to the allocator,
    which otherwise keeps them, counted in the process's RSS). True when memory was released; False when
    none was, or off glibc. Costs ~1 ms; the compute thread calls it once each time it goes idle."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            libc = None
        _LIBC.append(libc)
    return bool(_LIBC[0] is not None and _LIBC[0].malloc_trim(0))


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadGovernor:
    """Intra-op threads for the next step: `threads` while the rest of the machine is quiet, one while other
    processes keep more than `busy_cores` cores busy (measured over the last `every` seconds, from
    /proc/stat less this process's own CPU time). Call `threads_now()` before each step from the thread that
    runs the model; it sets torch's thread count when the answer changes. Off Linux it keeps `threads`."""

    def __init__(self, threads: int, busy_cores: float = 0.75, quiet_cores: float = 0.4, every: float = 0.25):
        self.max_threads, self.busy_cores, self.quiet_cores, self.every = threads, busy_cores, quiet_cores, every
        self.current = threads
        self.others = 0.0  # cores other processes used over the last window
        self._mark = self._sample()
        self._applied: int | None = None

    @staticmethod
    def _sample():
        return time.monotonic(), _machine_busy_seconds(), _own_seconds()

    def reset(self) -> None:
        """A new thread runs the steps: set its thread count at the next call."""
        self._applied = None

    def threads_now(self) -> int:
        now = time.monotonic()
        if self.max_threads > 1 and now - self._mark[0] >= self.every:  # /proc/stat once a window, not every step
            sample = (now, _machine_busy_seconds(), _own_seconds())
            if sample[1] is not None and self._mark[1] is not None:
                self.others = max(0.0, ((sample[1] - self._mark[1]) - (sample[2] - self._mark[2])) / (now - self._mark[0]))
                if self.others > self.busy_cores:
                    self.current = 1
                elif self.others < self.quiet_cores:
                    self.current = self.max_threads
            self._mark = sample
        if self.current != self._applied:
            import torch
            torch.set_num_threads(self.current)
            self._applied = self.current
        return self.current
