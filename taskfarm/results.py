"""Client-side result types of the MultiEngine interface, and partitioning.

A non-blocking call answers a `PendingResult` at once; its value stays in
the client (the controller keeps nothing), is freed once fetched, and
`flush()` drops the rest.
"""

from __future__ import annotations

import itertools
import weakref

from twisted.internet import defer
from twisted.python.failure import Failure

from taskfarm.errors import InvalidResultID, NotAPendingResult
from taskfarm.waiting import check_timeout, within


class ResultList(list):
    """The results of `execute`, one dict per engine, printed readably."""

    def __repr__(self) -> str:
        lines = ["<Results List>"]
        for result in self:
            if not isinstance(result, dict) or "number" not in result:
                lines.append(repr(result))
                continue
            engine, number = result.get("id"), result["number"]
            code = result["input"]["raw"].rstrip("\n")
            lines.append("[%s] In [%s]: %s" % (engine, number, code.replace("\n", "\n.... ")))
            out = (result.get("stdout") or "") + (result.get("stderr") or "")
            if out:
                lines.append("[%s] Out[%s]: %s" % (engine, number, out.rstrip("\n")))
        return "\n".join(lines)

    __str__ = __repr__


class PendingResult:
    """The future answer of a non-blocking MultiEngine call (Deferred API).

    `get_result(default=None, block=True, timeout=None)` returns a
    Deferred: the value (or the error, raised), or `default` when it is not
    ready and not `block`; `WaitTimeout` after `timeout` seconds of waiting.
    """

    def __init__(self, registry: PendingResults, result_id: int, deferred: defer.Deferred):
        self.result_id = result_id
        self._registry = registry
        self._callbacks: list = []
        self._outcome = None
        self._waiters: list[defer.Deferred] = []
        self._flushed = False
        deferred.addBoth(self._arrived)

    def _arrived(self, outcome) -> None:
        for function, args, kwargs in self._callbacks:
            if isinstance(outcome, Failure):
                break
            try:
                outcome = function(outcome, *args, **kwargs)
            except Exception:
                outcome = Failure()
        self._outcome = (outcome,)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._deliver(waiter)

    @property
    def done(self) -> bool:
        """Whether the answer has arrived."""
        return self._outcome is not None

    def get_result(self, default=None, block: bool = True, timeout=None) -> defer.Deferred:
        """A Deferred of the value (an error is raised by it); with `block`,
        `WaitTimeout` after `timeout` seconds (None: no limit), and the
        result can still be fetched later."""
        if self._flushed:
            return defer.fail(
                InvalidResultID("result %d was flushed before it was fetched" % self.result_id)
            )
        try:
            seconds = check_timeout(timeout)
        except (TypeError, ValueError) as e:
            return defer.fail(e)

        def given_up(waiter):
            if waiter in self._waiters:
                self._waiters.remove(waiter)

        waiter: defer.Deferred = defer.Deferred(given_up)
        if self._outcome is not None:
            self._deliver(waiter)
        elif not block:
            waiter.callback(default)
        else:
            self._waiters.append(waiter)
            if seconds is not None:
                reactor = self._registry.reactor
                if reactor is None:
                    from twisted.internet import reactor
                return within(waiter, seconds, reactor, "pending result %d" % self.result_id)
        return waiter

    @property
    def r(self) -> defer.Deferred:
        """``get_result(block=True)``."""
        return self.get_result(block=True)

    def add_callback(self, function, *args, **kwargs) -> PendingResult:
        """Apply ``function(result, *args, **kwargs)`` to the result when it arrives."""
        if self._outcome is not None:
            raise ValueError("the result has already arrived; call get_result instead")
        self._callbacks.append((function, args, kwargs))
        return self

    def _deliver(self, waiter: defer.Deferred) -> None:
        (outcome,) = self._outcome
        self._registry.fetched(self)
        if isinstance(outcome, Failure):
            waiter.errback(outcome)
        else:
            waiter.callback(outcome)

    def _flush(self) -> None:
        self._flushed = True
        self._outcome = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(InvalidResultID("result %d was flushed" % self.result_id))

    def __repr__(self) -> str:
        return "<PendingResult %d %s>" % (self.result_id, "done" if self.done else "pending")


class PendingResults:
    """The pending results a client has handed out and not yet seen fetched.

    Held weakly: a `PendingResult` the user dropped is freed with its value.
    """

    def __init__(self, reactor=None) -> None:
        #: The clock of `get_result`'s timeout.
        self.reactor = reactor
        self._ids = itertools.count()
        self._handed_out = 0
        self._pending: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def new(self, deferred: defer.Deferred) -> PendingResult:
        result = PendingResult(self, next(self._ids), deferred)
        self._handed_out = result.result_id + 1
        self._pending[result.result_id] = result
        return result

    @property
    def handed_out(self) -> int:
        """How many results were handed out (their ids are 0 .. this - 1)."""
        return self._handed_out

    def fetched(self, result: PendingResult) -> None:
        self._pending.pop(result.result_id, None)

    def flush(self) -> None:
        """Drop every result not fetched yet."""
        for result in list(self._pending.values()):
            result._flush()
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


def barrier(results) -> defer.Deferred:
    """Wait for all `results` (errors are swallowed); fires with None."""
    results = list(results)
    for result in results:
        if not isinstance(result, PendingResult):
            raise NotAPendingResult("barrier takes PendingResults, not %r" % (result,))
    waits = [r.get_result(block=True) for r in sorted(results, key=lambda r: r.result_id)]
    d = defer.DeferredList(waits, consumeErrors=True)
    d.addCallback(lambda _: None)
    return d


# -- scatter and gather ----------------------------------------------------------


def partition(length: int, n: int) -> list[tuple[int, int]]:
    """`n` contiguous (start, stop) blocks; the first ``length % n`` get one more."""
    quotient, remainder = divmod(length, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + quotient + (1 if i < remainder else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def join_blocks(blocks: list):
    """Put gathered blocks back together: NumPy arrays are concatenated,
    lists and tuples joined, anything else returned as a list."""
    if blocks and all(type(b).__name__ == "ndarray" for b in blocks):
        import numpy

        return numpy.concatenate(blocks)
    joined: list = []
    for block in blocks:
        if isinstance(block, (list, tuple)):
            joined.extend(block)
        else:
            joined.append(block)
    return joined
