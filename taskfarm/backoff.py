"""One back-off schedule for every loop that tries again.

The engine link, the client connection and the launcher all wait longer
after each failure, up to a ceiling, and start over once they succeed.
The schedule itself is Twisted's `backoffPolicy` (without jitter, so the
delays are exact and tests can name them); `Backoff` only counts attempts.
"""

from __future__ import annotations

from twisted.application.internet import backoffPolicy
from twisted.internet import defer, task


def _no_jitter() -> float:
    return 0.0


class Backoff:
    """Delays of ``first * factor ** n`` seconds, at most `most`, for the
    n-th failure in a row; `reset` after a success."""

    def __init__(self, first: float, most: float, factor: float = 2.0) -> None:
        self.first = first
        self.most = most
        self._policy = backoffPolicy(first, most, factor, jitter=_no_jitter)
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
        """A success: the next failure waits `first` again."""
        self.attempts = 0

    def wait(self, clock) -> defer.Deferred:
        """Count one failure and return a Deferred that fires after its delay
        on `clock` (cancelling it cancels the wait)."""
        return task.deferLater(clock, self.next(), lambda: None)
