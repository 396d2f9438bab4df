"""A client's link to one controller interface.

`ControllerConnection` connects lazily (or at `connect()`), checks that the
furl names the interface the client expects, and turns every failure into a
typed error: `ControllerUnreachable` when nothing answers in time,
`ConnectionLost` when the link breaks mid-call, and the controller's own
errors (sent back as data) re-raised as their `taskfarm.errors` classes.
Furls are secrets: errors show only their location, never the whole furl.
"""

from __future__ import annotations

import warnings

from foolscap.api import DeadReferenceError
from foolscap.furl import decode_furl
from twisted.internet import defer, task
from twisted.internet import error as internet_error
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskfarm import serialization, wire
from taskfarm.errors import (
    BadRequest,
    ConnectionLost,
    ControllerUnreachable,
    FurlError,
    MessageTooLarge,
    ProtocolVersionError,
    TaskfarmError,
    WrongInterface,
    from_wire,
)
from taskfarm.profile import INTERFACES
from taskfarm.remote import sweeper
from taskfarm.remote.tub import new_tub

#: Seconds a connection attempt may take before `ControllerUnreachable`.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: Seconds an idempotent call keeps reconnecting after the link broke
#: (a controller restart, say) before it gives up.
DEFAULT_RECONNECT_TIMEOUT = 120.0

_shared_tub = None


def shared_client_tub():
    """The one client Tub of this process, started on first use."""
    global _shared_tub
    if _shared_tub is None:
        _shared_tub = new_tub()
        _shared_tub.startService()
    return _shared_tub


def furl_location(furl: str) -> str:
    """The host:port part of a furl, safe to print."""
    try:
        _, hints, _ = decode_furl(furl)
    except ValueError:
        raise FurlError("not a valid furl (it should start with pb://)") from None
    return ",".join(hints) or "(no location)"


_LOST = (
    DeadReferenceError,
    internet_error.ConnectionLost,
    internet_error.ConnectionDone,
)


class ControllerConnection:
    """Calls methods of one controller interface; making one does no I/O."""

    _log = Logger()

    def __init__(
        self,
        furl: str,
        interface: str,
        reactor,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tub=None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        if interface not in INTERFACES:
            raise ValueError("unknown interface %r" % (interface,))
        self.furl = furl
        self.location = furl_location(furl)
        self.interface = interface
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._tub = tub
        self._rref = None
        self._waiters: list[defer.Deferred] = []
        #: Whether this connection ever reached the controller.
        self.ever_connected = False
        #: The controller's identity at the last `hello`; when it changes, it
        #: restarted without a journal and `on_new_incarnation` callbacks run.
        self.incarnation: str | None = None
        self.on_new_incarnation: list = []
        #: The controller's largest accepted message, learnt at `hello`.
        self.max_message_size = serialization.DEFAULT_MAX_MESSAGE_SIZE

    def connect(self) -> defer.Deferred:
        """Connect (once); fires when the interface answered `hello`."""
        if self._rref is not None:
            return defer.succeed(None)
        # A fresh Deferred per waiter: never hand one Deferred to two.
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            defer.Deferred.fromCoroutine(self._connect()).addBoth(self._connected)
        return waiter

    def _connected(self, result) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _connect(self) -> None:
        tub = self._tub or shared_client_tub()
        d = tub.getReference(self.furl)
        d.addTimeout(self._connect_timeout, self._reactor)
        try:
            rref = await d
        except defer.TimeoutError:
            raise ControllerUnreachable(
                "no answer from the controller at %s within %g s"
                % (self.location, self._connect_timeout)
            ) from None
        except Exception as e:
            raise ControllerUnreachable(
                "cannot reach the controller at %s: %s"
                % (self.location, describe_error(e))
            ) from None
        try:
            hello = wire.Hello.parse(serialization.unpack(await rref.callRemote("hello")))
        except ProtocolVersionError as e:
            raise ProtocolVersionError(
                "the controller at %s: %s" % (self.location, e)
            ) from None
        except Exception as e:
            raise WrongInterface(
                "the furl for %s does not lead to a taskfarm %s interface (%s)"
                % (self.location, self.interface, describe_error(e))
            ) from None
        if hello.interface != self.interface:
            raise WrongInterface(
                "this furl is for the controller's %r interface, but a %s client "
                "needs the %s furl (security/%s.furl in the profile)"
                % (hello.interface, self.interface, self.interface, self.interface)
            )
        self.max_message_size = hello.max_message_size
        incarnation = hello.incarnation
        if self.incarnation is not None and incarnation != self.incarnation:
            self._log.warn("the controller at {location} restarted without its journal",
                           location=self.location)
            for callback in self.on_new_incarnation:
                callback()
        self.incarnation = incarnation
        rref.notifyOnDisconnect(self._disconnected, rref)
        self._rref = rref
        self.ever_connected = True

    def _disconnected(self, rref) -> None:
        if self._rref is rref:
            self._rref = None

    async def call(self, method: str, *args, retry: bool = False):
        """Call `method`; returns its value or raises its typed error.

        With `retry` (for calls that are safe to repeat), a broken link is
        mended: the call reconnects, with back-off, and is made again, for
        up to the reconnect timeout after the link broke.  The window opens
        at each break, not when the call began, so a `wait` that has been
        waiting for an hour still rides out a controller restart.
        """
        if not retry or not self.ever_connected:
            # A controller never reached fails fast: that is a set-up error.
            return await self._call_once(method, args)
        deadline = None
        delay = 0.1
        incarnation = self.incarnation
        while True:
            try:
                if self._rref is None:
                    await self.connect()
                    # Mended: a later break gets a window of its own.
                    deadline, delay = None, 0.1
                if self.incarnation != incarnation:
                    # What this call refers to died with the old controller.
                    raise ConnectionLost(
                        "the controller at %s restarted without a journal during %s; "
                        "what was sent before is lost" % (self.location, method)
                    )
                return await self._call_once(method, args)
            except (ConnectionLost, ControllerUnreachable) as e:
                now = self._reactor.seconds()
                if deadline is None:
                    deadline = now + self._reconnect_timeout
                if self.incarnation != incarnation or now + delay > deadline:
                    raise
                self._log.info(
                    "{method}: {error}; trying again in {delay:.1f} s",
                    method=method,
                    error=e,
                    delay=delay,
                )
                await task.deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, 2.0)

    async def _call_once(self, method: str, args: tuple):
        # Connect first: the controller's limit is learnt at hello.
        if self._rref is None:
            await self.connect()
        for arg in args:
            if isinstance(arg, bytes) and len(arg) > self.max_message_size:
                raise MessageTooLarge(
                    "a %s request of %d bytes exceeds the controller's limit of "
                    "%d bytes" % (method, len(arg), self.max_message_size)
                )
        try:
            answer = await self._rref.callRemote(method, *args)
        except _LOST as e:
            self._rref = None
            raise ConnectionLost(
                "lost the connection to the controller at %s during %s: %s"
                % (self.location, method, describe_error(e))
            ) from None
        except Exception as e:
            text = describe_error(e)
            if "too long" in text:
                raise MessageTooLarge(
                    "the controller refused a %s request as too large: %s"
                    % (method, text)
                ) from None
            raise BadRequest("the controller refused %s: %s" % (method, text)) from None
        sweeper.received(answer)
        ok, value = wire.Answer.parse(serialization.unpack(answer))
        if not ok:
            raise from_wire(value)
        return value

    def disconnect(self) -> None:
        """Close this interface's reference (the shared Tub stays)."""
        rref, self._rref = self._rref, None
        if rref is not None:
            tracker = getattr(rref, "tracker", None)
            broker = getattr(tracker, "broker", None)
            if broker is not None and broker.transport is not None:
                broker.transport.loseConnection()


def describe_error(e: BaseException) -> str:
    """A one-line account of a connection or remote error, without the furl."""
    if isinstance(e, TaskfarmError):
        return str(e)
    value = getattr(e, "value", None)
    if value is not None and not isinstance(e, internet_error.ConnectError):
        return "%s" % (value,)
    return "%s: %s" % (type(e).__name__, e)


# Foolscap warns once per received remote failure about Failure.stack.
warnings.filterwarnings("ignore", message=".*Failure.stack.*", category=DeprecationWarning)
