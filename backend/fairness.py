"""Per-caller fairness at the door: how many expensive requests one caller may have in flight at once.

The engine's queue and the sandbox's slots are shared by everyone; without this one script could fill
them and every other user would wait behind it. A caller is a user (by id) or, when anonymous, a client
address. Over the limit the door answers 429 at once; nothing is queued for the caller.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager


class TooManyInFlight(Exception):
    def __init__(self, pool: str, limit: int):
        super().__init__(f"you already have {limit} {pool} request(s) running; wait for one to finish")
        self.pool, self.limit = pool, limit


class Fairness:
    def __init__(self, limits: dict[str, int]):
        self.limits = dict(limits)  # pool name -> in-flight requests per caller
        self._held: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, pool: str, caller: str):
        """Hold one of `caller`'s slots in `pool` for the block; TooManyInFlight when all are taken."""
        key, limit = (pool, caller), self.limits[pool]
        with self._lock:
            if self._held.get(key, 0) >= limit:
                raise TooManyInFlight(pool, limit)
            self._held[key] = self._held.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._held[key] - 1
                if left:
                    self._held[key] = left
                else:
                    del self._held[key]

    def in_flight(self, pool: str, caller: str) -> int:
        return self._held.get((pool, caller), 0)
