"""The `taskfarm.aio` clients: the methods of `taskfarm.asyncclient`'s
clients as coroutines, over a `_Bridge` (see `taskfarm.aio` for the modes).
"""

from __future__ import annotations

import asyncio
import functools
import inspect

from twisted.internet import defer
from twisted.python.failure import Failure

from taskfarm import asyncclient, results
from taskfarm.aioreactor import reactor_on
from taskfarm.connection import DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_TIMEOUT

#: The values of ``mode=``.
MODES = ("auto", "thread", "loop")


class _Bridge:
    """How one client's calls reach Twisted and come back to its loop."""

    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError("mode is one of %s, not %r" % (", ".join(MODES), mode))
        self.requested = mode
        self.mode: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reactor = None

    def start(self) -> None:
        """Choose the mode on the running loop (once)."""
        loop = asyncio.get_running_loop()
        if self.loop is not None:
            if loop is not self.loop:
                raise RuntimeError(
                    "this taskfarm.aio client belongs to another event loop; make one per loop"
                )
            return
        on_loop = reactor_on(loop)
        if self.requested == "loop" and on_loop is None:
            raise RuntimeError(
                "mode='loop' needs Twisted's asyncio reactor on this event loop: call "
                "`taskfarm.aio.install_reactor()` first in the program (before anything "
                "imports twisted.internet.reactor), or use mode='thread'"
            )
        if self.requested == "thread" and on_loop is not None:
            raise RuntimeError(
                "mode='thread' cannot be used while Twisted's reactor runs on this event "
                "loop (its thread would block the loop); use mode='loop' or 'auto'"
            )
        if on_loop is not None:
            self.mode, self.reactor = "loop", on_loop
        else:
            from taskfarm import reactorthread

            self.mode, self.reactor = "thread", reactorthread.ensure_running()
        self.loop = loop

    async def call(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` in the reactor; its (Deferred's) value."""
        self.start()
        if self.mode == "loop":
            d = defer.maybeDeferred(function, *args, **kwargs)
            return await d.asFuture(self.loop)
        loop, reactor = self.loop, self.reactor
        future = loop.create_future()
        started: list[defer.Deferred] = []

        def settle(outcome) -> None:
            if future.done():
                return
            if isinstance(outcome, Failure):
                future.set_exception(outcome.value)
            else:
                future.set_result(outcome)

        def answer(outcome) -> None:
            try:
                loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more
            return None

        def begin() -> None:
            d = defer.maybeDeferred(function, *args, **kwargs)
            started.append(d)
            d.addBoth(answer)

        reactor.callFromThread(begin)
        try:
            return await future
        except asyncio.CancelledError:
            # After `begin` in the reactor's queue, so `started` is filled.
            reactor.callFromThread(lambda: started and started[0].cancel())
            raise


def _coroutine(method_name: str, async_method):
    @functools.wraps(async_method)
    async def method(self, *args, **kwargs):
        value = await self._bridge.call(
            lambda: getattr(self._async_client(), method_name)(*args, **kwargs)
        )
        if isinstance(value, results.PendingResult):
            return PendingResult(self._bridge, value)
        return value

    return method


def coroutine_facade(cls):
    """Give `cls` a coroutine of every public method of its `async_class`
    that it does not define itself (and that is not in `cls.skip`)."""
    for name, member in inspect.getmembers(cls.async_class, inspect.isfunction):
        if not name.startswith("_") and name not in cls.__dict__ and name not in cls.skip:
            setattr(cls, name, _coroutine(name, member))
    return cls


class _AioClient:
    async_class: type
    #: Deferred-client methods with no coroutine form here.
    skip = frozenset({"connect", "disconnect", "mapper", "parallel"})

    def __init__(
        self,
        furl_or_file=None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        mode: str = "auto",
    ) -> None:
        """A client of the controller (the default profile if no furl,
        furl file or profile folder is given).  It connects on
        ``await tc.connect()``, ``async with``, or its first call; `mode`
        is ``"auto"``, ``"thread"`` or ``"loop"`` (see `taskfarm.aio`)."""
        self._bridge = _Bridge(mode)
        self._arguments = (furl_or_file, connect_timeout, reconnect_timeout)
        self._client = None

    @property
    def mode(self) -> str | None:
        """``"thread"`` or ``"loop"`` once the client has run (None before)."""
        return self._bridge.mode

    def _async_client(self):
        # Called in the reactor's thread (both modes): the Deferred client
        # is made where it runs.
        if self._client is None:
            furl_or_file, connect_timeout, reconnect_timeout = self._arguments
            self._client = self.async_class(
                furl_or_file, self._bridge.reactor, connect_timeout,
                reconnect_timeout=reconnect_timeout,
            )
        return self._client

    async def connect(self):
        """Connect now; returns the client."""
        await self._bridge.call(lambda: self._async_client().connect())
        return self

    async def close(self) -> None:
        """Close the connection (a Task client first waits until the
        controller has accepted what it sent)."""
        if self._client is not None:
            await self._bridge.call(self._client.disconnect)

    async def __aenter__(self):
        return await self.connect()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


@coroutine_facade
class TaskClient(_AioClient):
    """The load-balanced Task interface, as coroutines."""

    async_class = asyncclient.TaskClient
    skip = _AioClient.skip | {"as_completed"}

    async def as_completed(self, taskids, timeout: float | None = None):
        """An async iterator of `TaskResult`s, in the order the tasks finish;
        `WaitTimeout` past `timeout` seconds."""
        slots = await self._bridge.call(
            lambda: defer.succeed(self._async_client().as_completed(taskids, timeout))
        )
        try:
            for slot in slots:
                yield await self._bridge.call(lambda slot=slot: slot)
        finally:
            # Left early (break, an error): cancelling the rest stops the watcher.
            await self._bridge.call(_cancel_unfired, slots)


@coroutine_facade
class MultiEngineClient(_AioClient):
    """The MultiEngine interface, as coroutines (`targets` and `block` as
    on the other clients)."""

    async_class = asyncclient.MultiEngineClient

    def __init__(self, *args, targets="all", block: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._defaults = {"targets": targets, "block": block}

    def _async_client(self):
        fresh = self._client is None
        client = super()._async_client()
        if fresh:
            client.targets = self._defaults["targets"]
            client.block = self._defaults["block"]
        return client

    @property
    def targets(self):
        """The default targets of every method (``'all'`` at first)."""
        return self._client.targets if self._client is not None else self._defaults["targets"]

    @targets.setter
    def targets(self, value) -> None:
        self._defaults["targets"] = value
        if self._client is not None:
            self._client.targets = value

    @property
    def block(self) -> bool:
        """The default `block` of every method (True at first)."""
        return self._client.block if self._client is not None else self._defaults["block"]

    @block.setter
    def block(self, value: bool) -> None:
        self._defaults["block"] = value
        if self._client is not None:
            self._client.block = value


def _cancel_unfired(slots: list) -> None:
    for slot in slots:
        if not slot.called:
            slot.cancel()
            slot.addErrback(lambda failure: failure.trap(defer.CancelledError))


class PendingResult:
    """The future answer of a non-blocking MultiEngine call, awaitable."""

    def __init__(self, bridge: _Bridge, pending: results.PendingResult) -> None:
        self._bridge = bridge
        self._pending = pending

    @property
    def result_id(self) -> int:
        return self._pending.result_id

    async def get_result(self, default=None, block: bool = True):
        """The value (an error is raised); `default` if not ready and not `block`."""
        return await self._bridge.call(self._pending.get_result, default, block)

    def __await__(self):
        return self.get_result().__await__()

    def __repr__(self) -> str:
        return repr(self._pending)
