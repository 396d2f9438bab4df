"""The pieces of a service tree: ordered children, parts, threads joined
off the reactor.

`OrderedServices` is a `MultiService` whose children start in the order
they were added and stop one at a time in the reverse order, each stop
awaited before the next begins (Twisted's own `MultiService` stops them
all at once).  `Part` makes a collaborator with plain ``start()`` and
``stop()`` methods (the registry, the task controller, the journal...) a
child service, without changing the collaborator.  `join_thread` waits for
a thread to end in the reactor's thread pool, so a stopping service never
blocks the reactor on ``Thread.join``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger


class OrderedServices(service.MultiService):
    """Children start in the order added; they stop in the reverse order,
    one after the other, each waited for (a failing stop is logged and the
    next one still runs)."""

    _log = Logger()

    def stopService(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                self._log.failure("stopping {name} failed", name=child.name)


class Part(service.Service):
    """A collaborator's ``start``/``stop`` as a child service named `name`.

    `stop` may return a Deferred (or a coroutine); the parent waits for it.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[], object] | None = None,
        stop: Callable[[], object] | None = None,
    ) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        if self._start is not None:
            self._start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._stop is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self._stop)


def join_thread(reactor, thread: threading.Thread | None, timeout: float) -> defer.Deferred:
    """Wait up to `timeout` seconds for `thread` to end, in `reactor`'s
    thread pool (never on the reactor thread); fires True if it ended."""
    if thread is None or not thread.is_alive():
        return defer.succeed(True)
    d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), thread.join, timeout)
    d.addCallback(lambda _: not thread.is_alive())
    return d
