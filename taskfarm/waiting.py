"""Client-side time limits: `within` bounds a Deferred by `timeout=` seconds.

Every client call that can wait takes ``timeout=`` (None: no limit).  Past
it the waiting Deferred is cancelled and fails with `WaitTimeout`, which
names what was waited for and for how long.  The clock is the client's
injected reactor (a `task.Clock` in tests).  Cancelling only stops this
side's wait: the controller bounds its own waiters (``NOT_YET`` after its
wait bound), so nothing is left holding there for long, and the client can
be used again at once.
"""

from __future__ import annotations

import math

from twisted.internet import defer

from taskfarm.errors import WaitTimeout


def check_timeout(timeout) -> float | None:
    """`timeout` as seconds (None: no limit); a bad one is a `ValueError`
    or `TypeError` naming it."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout is a number of seconds or None, not %r" % (timeout,))
    if math.isnan(timeout) or timeout < 0:
        raise ValueError("timeout must be zero or more seconds, not %r" % (timeout,))
    return float(timeout)


def within(d: defer.Deferred, timeout: float | None, reactor, what: str) -> defer.Deferred:
    """`d`, or a `WaitTimeout` ("waited N s for WHAT") once `timeout`
    seconds of `reactor` time have passed; `d` is cancelled then."""
    if timeout is None or math.isinf(timeout):
        return d

    def timed_out(result, seconds):
        # Whatever the cancelled wait turned the cancellation into (some
        # layers wrap errors), the caller sees one typed error.
        raise WaitTimeout("waited %g s for %s; it did not finish in that time" % (seconds, what))

    return d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)


def bounded(coroutine, timeout, reactor, what: str) -> defer.Deferred:
    """A Deferred running `coroutine`, bounded by `within` (`timeout` is
    checked first: a bad one fails the Deferred, and the coroutine never runs)."""
    try:
        seconds = check_timeout(timeout)
    except (TypeError, ValueError) as e:
        coroutine.close()
        return defer.fail(e)
    return within(defer.Deferred.fromCoroutine(coroutine), seconds, reactor, what)
