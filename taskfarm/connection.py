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
    ClientClosed,
    ConnectionLost,
    ControllerUnreachable,
    MessageTooLarge,
    ProfileError,
    ProtocolVersionError,
    StaleFurl,
    WrongInterface,
)
from taskfarm.interfaces import IControllerDialer, IControllerReference
from taskfarm.profile import INTERFACES
from taskfarm.remote.client import (
    FoolscapDialer,
    describe_error,
    furl_location,
    is_lost,
    peer_key,
)

#: Seconds a connection attempt may take before `ControllerUnreachable`.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: Seconds an idempotent call keeps reconnecting after the link broke
#: (a controller restart, say) before it gives up.
DEFAULT_RECONNECT_TIMEOUT = 120.0

#: Seconds between reconnection attempts: the first, and the most (doubling).
RETRY_DELAYS = (0.1, 2.0)

#: Seconds between looks for a controller that is still starting
#: (`wait_for_controller`): the first, and the most (doubling).
STARTING_DELAYS = (0.1, 1.0)


class ControllerConnection:
    """Calls methods of one controller interface; making one does no I/O.

    `dialer` (an `IControllerDialer`) is the transport; by default Foolscap
    through `tub` (or the process's shared client Tub), whose connection
    to the controller other clients may share: `disconnect` ends only this
    one's use of it.  `reactor` is the clock of every timeout and back-off.

    `furl` is the furl, or a function giving it (reading the furl file;
    it raises `ProfileError` while there is none).  With
    `wait_for_controller`, connecting waits up to `connect_timeout` for a
    controller that is still starting: for its furl file to appear and for
    it to answer.  `furl_file` (where the furl came from) is named when the
    furl turns out stale.
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
        wait_for_controller: bool = False,
        furl_file=None,
    ) -> None:
        if interface not in INTERFACES:
            raise ValueError("unknown interface %r" % (interface,))
        self.furl: str | None = None
        self.location = "(not located yet)"
        self._furl_source = None
        if callable(furl):
            self._furl_source = furl
        else:
            self._use_furl(furl)
        self.furl_file = furl_file
        self._wait_for_controller = bool(wait_for_controller)
        self.interface = interface
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._dialer = dialer if dialer is not None else FoolscapDialer(reactor, tub)
        self._rref: IControllerReference | None = None
        self._waiters: list[defer.Deferred] = []
        #: Calls waiting for their answer; `disconnect` fails them.
        self._in_flight: set[defer.Deferred] = set()
        #: How many times `disconnect` ran (a call started before one is
        #: failed with `ClientClosed`, not retried).
        self._closes = 0
        #: Whether this connection ever reached the controller.
        self.ever_connected = False
        #: The controller's identity at the last `hello`; when it changes, it
        #: restarted without a journal and `on_new_incarnation` callbacks run.
        self.incarnation: str | None = None
        self.on_new_incarnation: list = []
        #: The controller's largest accepted message, learnt at `hello`.
        self.max_message_size = serialization.DEFAULT_MAX_MESSAGE_SIZE
        #: HOST:PORT of the controller's bulk-data channel, learnt at
        #: `hello` (None: it has none).
        self.bulk_location: str | None = None

    def _use_furl(self, furl: str) -> None:
        self.location = furl_location(furl)
        self.furl = furl

    def _resolve_furl(self) -> None:
        if self.furl is None:
            self._use_furl(self._furl_source())

    @property
    def tubid(self) -> str:
        """The controller's tubid, as its furl names it: what the bulk-data
        channel's certificate must match."""
        self._resolve_furl()
        return peer_key(self.furl)[0]

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
        closes = self._closes
        if self._wait_for_controller:
            rref = await self._dial_starting()
        else:
            self._resolve_furl()
            rref = await self._dial(self._connect_timeout)
        try:
            await self._greet(rref)
        except BaseException:
            # Not ours to keep: a reference counted as a user of a shared
            # connection must leave it.
            rref.disconnect()
            raise
        if closes != self._closes:
            rref.disconnect()
            raise ClientClosed("the client was closed while it connected to %s" % self.location)
        rref.notify_on_disconnect(lambda: self._disconnected(rref))
        self._rref = rref
        self.ever_connected = True

    async def _greet(self, rref) -> None:
        """Say hello: check the interface and the wire version, learn the
        limit and the controller's incarnation."""
        try:
            hello = await rref.hello()
        except ProtocolVersionError as e:
            raise ProtocolVersionError("the controller at %s: %s" % (self.location, e)) from None
        except defer.CancelledError:
            raise
        except Exception as e:
            if is_lost(e):
                raise ControllerUnreachable(
                    "lost the connection to the controller at %s while connecting: %s"
                    % (self.location, describe_error(e))
                ) from None
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
        self.bulk_location = hello.bulk
        incarnation = hello.incarnation
        if self.incarnation is not None and incarnation != self.incarnation:
            self._log.warn(
                "the controller at {location} restarted without its journal", location=self.location
            )
            for callback in self.on_new_incarnation:
                callback()
        self.incarnation = incarnation

    async def _dial(self, timeout: float):
        try:
            return await self._dialer.connect(self.furl, timeout)
        except StaleFurl as e:
            where = self.furl_file or "the profile's security/%s.furl" % self.interface
            raise StaleFurl(
                "%s; the controller wrote a fresh furl file: read the furl from %s again "
                "(make a new client)" % (e, where)
            ) from None

    async def _dial_starting(self):
        """Dial a controller that may still be starting: until its furl
        file appears and it answers, for up to the connect timeout."""
        start = self._reactor.seconds()
        deadline = start + self._connect_timeout
        backoff = Backoff(*STARTING_DELAYS)
        while True:
            try:
                self._resolve_furl()
                left = max(deadline - self._reactor.seconds(), 0.001)
                return await self._dial(min(self._connect_timeout, left))
            except (ProfileError, ControllerUnreachable) as e:
                if self._reactor.seconds() + backoff.peek() > deadline:
                    raise ControllerUnreachable(
                        "waited %g s for the controller to start and it is not reachable: %s"
                        % (self._connect_timeout, e)
                    ) from None
                self._log.debug("controller not up yet ({error})", error=e)
                await backoff.wait(self._reactor)

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
            except ClientClosed:
                raise
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
        closes = self._closes
        d = rref.call(method, *args)
        self._in_flight.add(d)
        try:
            return await d
        except ConnectionLost:
            if self._rref is rref:
                self._rref = None
            raise
        except defer.CancelledError:
            if closes != self._closes:
                raise ClientClosed(
                    "the client was closed while %s waited for the controller at %s"
                    % (method, self.location)
                ) from None
            raise
        finally:
            self._in_flight.discard(d)

    def disconnect(self) -> None:
        """End this client's use of the connection: its calls still waiting
        fail with `ClientClosed`; other clients sharing the connection are
        not touched (it is dropped when its last user leaves).  A later
        call connects again."""
        self._closes += 1
        rref, self._rref = self._rref, None
        for d in list(self._in_flight):
            d.cancel()
        if rref is not None:
            rref.disconnect()
