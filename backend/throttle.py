"""Failed sign-ins, throttled: per account and per client address, for passwords and API keys alike.

Only failures count. Once a bucket is full the caller gets 429 with Retry-After before any password
hash or key lookup runs, so guessing costs the server nothing. Moving windows from the `limits`
library (in memory: one server process; several processes would point it at Redis by URL).
"""
from __future__ import annotations

import math
import time

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class Throttled(Exception):
    def __init__(self, what: str, retry_after: int):
        super().__init__(f"too many failed sign-ins for this {what}; try again in {retry_after} s")
        self.retry_after = retry_after


# bucket -> (what the message calls it, default limit); AppConfig.sign_in_limits overrides the limits.
BUCKETS = {
    "password-account": ("account", "5/minute"),         # wrong passwords for one name, from anywhere
    "password-address": ("client address", "20/minute"),  # wrong passwords from one address, any names
    "key-address": ("client address", "60/minute"),       # wrong API keys from one address
}


class LoginThrottle:
    def __init__(self, limits: dict[str, str] | None = None):
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._rules = {b: parse((limits or {}).get(b, default)) for b, (_, default) in BUCKETS.items()}

    def check(self, **keys: str | None) -> None:
        """Raise Throttled if a named bucket is full (call before the expensive check), e.g.
        check(password_account=name, password_address=addr)."""
        for bucket, key in self._buckets(keys):
            rule = self._rules[bucket]
            if not self._limiter.test(rule, bucket, key):
                reset = self._limiter.get_window_stats(rule, bucket, key).reset_time
                raise Throttled(BUCKETS[bucket][0], max(1, math.ceil(reset - time.time())))

    def failed(self, **keys: str | None) -> None:
        for bucket, key in self._buckets(keys):
            self._limiter.hit(self._rules[bucket], bucket, key)

    @staticmethod
    def _buckets(keys: dict):
        for arg, key in keys.items():
            if key:
                yield arg.replace("_", "-"), key.strip().lower()
