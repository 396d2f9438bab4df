"""A client's link to one controller interface: the policy over the transport.

`ControllerConnection` connects lazily (or at `connect()`), checks that the
furl names the interface the client expects and speaks our wire version,
notices a controller that restarted without its journal (a new
incarnation), and mends a broken link for calls that are safe to repeat,
backing off as `taskfarm.backoff` says.  The transport is an
`IControllerDialer` (Foolscap: `taskfarm.remote.client.FoolscapDialer`),
which turns every failure into a typed error.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskfarm import serialization
from taskfarm.backoff import Backoff
from taskfarm.errors import (
    ConnectionLost,
    ControllerUnreachable,
    MessageTooLarge,
    ProtocolVersionError,
    WrongInterface,
)
from taskfarm.interfaces import IControllerDialer, IControllerReference
from taskfarm.profile import INTERFACES
from taskfarm.remote.client import FoolscapDialer, describe_error, furl_location

#: Seconds a connection attempt may take before `ControllerUnreachable`.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: Seconds an idempotent call keeps reconnecting after the link broke
#: (a controller restart, say) before it gives up.
DEFAULT_RECONNECT_TIMEOUT = 120.0

#: Seconds between reconnection attempts: the first, and the most (doubling).
RETRY_DELAYS = (0.1, 2.0)


class ControllerConnection:
    """Calls methods of one controller interface; making one does no I/O.

    `dialer` (an `IControllerDialer`) is the transport; by default Foolscap
    through `tub` (or the process's shared client Tub).  `reactor` is the
    clock of every timeout and back-off.
    """

    _log = Logger()

    def __init__(
        self,
        furl: str,
        interface: str,
        reactor,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tub=None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        dialer: IControllerDialer | None = None,
    ) -> None:
        if interface not in INTERFACES:
            raise ValueError("unknown interface %r" % (interface,))
        self.furl = furl
        self.location = furl_location(furl)
        self.interface = interface
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._dialer = dialer if dialer is not None else FoolscapDialer(reactor, tub)
        self._rref: IControllerReference | None = None
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
        rref = await self._dialer.connect(self.furl, self._connect_timeout)
        try:
            hello = await rref.hello()
        except ProtocolVersionError as e:
            raise ProtocolVersionError("the controller at %s: %s" % (self.location, e)) from None
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
            self._log.warn(
                "the controller at {location} restarted without its journal", location=self.location
            )
            for callback in self.on_new_incarnation:
                callback()
        self.incarnation = incarnation
        rref.notify_on_disconnect(lambda: self._disconnected(rref))
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
        backoff = Backoff(*RETRY_DELAYS)
        incarnation = self.incarnation
        while True:
            try:
                if self._rref is None:
                    await self.connect()
                    # Mended: a later break gets a window of its own.
                    deadline = None
                    backoff.reset()
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
                if self.incarnation != incarnation or now + backoff.peek() > deadline:
                    raise
                self._log.info(
                    "{method}: {error}; trying again in {delay:.1f} s",
                    method=method,
                    error=e,
                    delay=backoff.peek(),
                )
                await backoff.wait(self._reactor)

    async def _call_once(self, method: str, args: tuple):
        # Connect first: the controller's limit is learnt at hello.
        if self._rref is None:
            await self.connect()
        for arg in args:
            # A message is one byte string, or a list of them (in parts):
            # all its parts count.
            if isinstance(arg, (bytes, list)):
                size = serialization.message_size(arg)
                if size > self.max_message_size:
                    raise MessageTooLarge(
                        "a %s request of %d bytes exceeds the controller's limit of "
                        "%d bytes" % (method, size, self.max_message_size)
                    )
        rref = self._rref
        try:
            return await rref.call(method, *args)
        except ConnectionLost:
            if self._rref is rref:
                self._rref = None
            raise

    def disconnect(self) -> None:
        """Close this interface's reference (the shared Tub stays)."""
        rref, self._rref = self._rref, None
        if rref is not None:
            rref.disconnect()
