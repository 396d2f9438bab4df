"""One back-off for everything that tries again: a delay per attempt.

Built on `twisted.application.internet.backoffPolicy`; attempt 0 waits
`initial` seconds and each further attempt `factor` times longer, up to
`maximum`.  Jitter is off by default, so delays are exact on a
`task.Clock` in tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.internet import backoffPolicy
from twisted.internet import defer, task


def policy(
    initial: float, maximum: float, factor: float = 2.0, jitter: bool = False
) -> Callable[[int], float]:
    """The delay, in seconds, before attempt `n` (0, 1, ...): ``initial *
    factor ** n``, at most `maximum`; with `jitter`, up to a second more."""
    if not 0 <= initial <= maximum:
        raise ValueError(
            "a back-off needs 0 <= initial <= maximum, not %r and %r" % (initial, maximum)
        )
    return backoffPolicy(
        initialDelay=initial,
        maxDelay=maximum,
        factor=factor,
        jitter=random.random if jitter else (lambda: 0.0),
    )


class Backoff:
    """A `policy` with its count of failures in a row: the engine link and
    the client connection wait `next()` after each failure and `reset()`
    after a success."""

    def __init__(self, first: float, most: float, factor: float = 2.0) -> None:
        self._policy = policy(first, most, factor)
        #: Failures in a row since the last `reset`.
        self.attempts = 0

    def peek(self) -> float:
        """The delay `next` would give, without counting a failure."""
        return self._policy(self.attempts)

    def next(self) -> float:
        """Count one failure; the delay to wait before the next attempt."""
        delay = self._policy(self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """A success: the next failure waits the first delay again."""
        self.attempts = 0

    def wait(self, clock) -> defer.Deferred:
        """Count one failure and return a Deferred that fires after its delay
        on `clock` (cancelling it cancels the wait)."""
        return task.deferLater(clock, self.next(), lambda: None)
