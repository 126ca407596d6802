"""ComputeThread: the one thread that runs the steps of every loaded model, one scheduler iteration each in
turn (the schedulers alternate step by step, as they did behind a shared FIFO lock).

Why one thread and not one per model: torch's CPU build runs its ops on GNU libgomp, and libgomp gives every
thread that starts a parallel region a thread pool of its own, kept until that thread exits. Once the pools'
threads outnumber the CPUs, every waiting thread spins 100 times instead of GOMP_SPINCOUNT before it sleeps
(libgomp's "throttled" spin count), which costs what OMP_WAIT_POLICY=PASSIVE costs: the bundled model's
decode step took 15 ms instead of 5 ms once a second thread had run a torch op (backend/runtime.py). So the
steps of all models run on this thread, and what else computes in the app process (model loads, reward
scoring) runs on short-lived threads (`run_in_short_thread`) whose pools go away with them.

There is one per process (`shared_compute`), used by every engine unless it is given another. The thread
starts with the first scheduler or call and exits when no scheduler is left, so a process with nothing
loaded holds no OpenMP pool either.

Each time its queue empties (no call waiting, no scheduler with work) the thread hands the memory freed
meanwhile back to the OS before it sleeps (backend/runtime.py release_free_memory, once per idle period):
glibc keeps a freed prefill's activations and a finished batch's KV cache otherwise, and an idle server's
RSS would stay at its busiest.
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque

import torch

from backend.runtime import ThreadGovernor, release_free_memory

log = logging.getLogger(__name__)


def run_in_short_thread(fn, name: str = "compute-once"):
    """fn() on a new thread that exits when fn returns (its OpenMP pool with it); fn's result or exception."""
    box: list = []

    def run():
        try:
            box.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box.append((False, e))

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


class ComputeThread:
    def __init__(self, name: str = "compute"):
        self.name = name
        self.cond = threading.Condition()  # shared with the schedulers: their submits wake this thread
        self.schedulers: list = []
        self._calls: deque = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.trims = 0  # idle periods that began with release_free_memory()
        # one thread while other processes keep a core busy (backend/runtime.py); the count in force when
        # the pool was made is the most the steps use
        self.governor = ThreadGovernor(torch.get_num_threads())
        _LIVE.add(self)

    # -- the callers' side --------------------------------------------------------------------------
    def add(self, scheduler) -> None:
        with self.cond:
            self.schedulers.append(scheduler)
            self._ensure_running()
            self.cond.notify()

    def call(self, fn, inference: bool = True):
        """fn() on this thread between two scheduler iterations (exclusive use of every model here)."""
        if threading.current_thread() is self._thread:
            return _run(fn, inference)
        done = threading.Event()
        box: list = []

        def run():
            try:
                box.append((True, _run(fn, inference)))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box.append((False, e))
            done.set()

        with self.cond:
            self._calls.append(run)
            self._ensure_running()
            self.cond.notify()
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def use_threads(self, n: int) -> None:
        """At most n intra-op threads from the next step on (a pool made with another --threads)."""
        with self.cond:
            self.governor.max_threads = self.governor.current = max(1, n)
            self.governor.reset()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def stop(self, wait: float = 5) -> None:
        """Close every scheduler here and let the thread finish its current step (at interpreter exit)."""
        with self.cond:
            for s in list(self.schedulers):
                s.close()  # the scheduler's own close (self.cond is re-entrant)
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(wait)

    # -- the loop -----------------------------------------------------------------------------------
    def _ensure_running(self) -> None:  # holding self.cond
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name=self.name)
            self._thread.start()

    def _idle(self) -> bool:  # holding self.cond
        return not (self._calls or any(s.has_work() for s in self.schedulers))

    def _loop(self) -> None:
        self.governor.reset()
        trimmed = True  # nothing computed yet: nothing to give back
        while True:
            with self.cond:
                if self._idle() and not trimmed:
                    trim = True  # the queue just emptied: give the freed memory back (below, not holding the lock)
                else:
                    trim = False
                    while self._idle():
                        if not self.schedulers:  # nothing loaded: exit, and the OpenMP pool with the thread
                            self._thread = None
                            return
                        self.cond.wait()
                    calls = list(self._calls)
                    self._calls.clear()
                    busy = [s for s in self.schedulers if s.has_work()]
            if trim:  # once per idle period: a prefill's activations, a finished batch's KV cache
                release_free_memory()
                self.trims += 1
                trimmed = True
                continue
            trimmed = False
            self.governor.threads_now()
            for run in calls:
                run()
            for s in busy:
                if s.run_once():  # closed: its requests failed, it leaves the rotation
                    with self.cond:
                        self.schedulers.remove(s)

    def stats(self) -> dict:
        return {"threads": self.governor.current, "other_cores_busy": round(self.governor.others, 2),
                "memory_trims": self.trims}


_SHARED: ComputeThread | None = None
_SHARED_LOCK = threading.Lock()


def shared_compute() -> ComputeThread:
    """The process's compute thread, which every engine uses unless given another: one OpenMP pool for all."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = ComputeThread("models")
        return _SHARED


def _run(fn, inference: bool):
    if not inference:
        return fn()
    with torch.inference_mode():
        return fn()


_LIVE: "weakref.WeakSet[ComputeThread]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """A thread still inside a torch op when the interpreter exits aborts the process: stop them first."""
    for c in list(_LIVE):
        c.stop(wait=5)
