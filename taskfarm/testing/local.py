"""An in-process transport: Foolscap's semantics without sockets, on a clock.

`LocalConnection` stands in for one Foolscap connection between two sides
of one process, and `LocalReference` for a RemoteReference over it.  A call
``ref.callRemote(name, *args)`` reaches the real Referenceable's
``remote_<name>`` on a later turn of the injected clock (a `task.Clock` in
tests), and its answer comes back on a later turn still, as over a socket:

* arguments and answers are checked against the target's RemoteInterface,
  as Foolscap checks them (a `Violation`), and then carried across as
  Foolscap would carry them: plain data is copied (bytes stay bytes, tuples
  stay tuples), a Referenceable becomes a `LocalReference` over the same
  connection (the same one each time), a reference sent back to the side
  that owns its object becomes that object again, and anything else is
  refused;
* a remote method that raises fails the caller's Deferred with
  `RemoteException`, as taskfarm's Tubs (which do not expose remote
  exception types) do;
* `notifyOnDisconnect` / `dontNotifyOnDisconnect` behave like Foolscap's.

Switches play a network in trouble.  `disconnect()` breaks the
connection: calls waiting for an answer fail with `DeadReferenceError`
("Connection was lost"), later calls with `DeadReferenceError` at once,
`callRemoteOnly` is dropped silently, and disconnect notifications fire, all
as Foolscap does.  `hang()` holds every message in both directions until
`release()` (a stopped peer, a partition that heals); `hang_answers()` holds
only the answers (the request arrived, its answer is lost with the link).

`LocalTub` stands in for a client's or an engine's Tub: `getReference(furl)`
opens a fresh `LocalConnection` to the object served under that furl.
"""

from __future__ import annotations

import enum
import itertools

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure

from taskfarm.remote.local import (
    DeadReferenceError,
    Violation,
    check_answer,
    check_arguments,
    is_referenceable,
    remote_failure,
)


class LinkState(enum.Enum):
    UP = "up"
    HUNG = "hung"
    BROKEN = "broken"


_PLAIN = (type(None), bool, int, float, str, bytes)


class _Watcher:
    """One `notifyOnDisconnect` registration (its marker)."""

    def __init__(self, callback, args, kwargs) -> None:
        self.callback, self.args, self.kwargs = callback, args, kwargs


class LocalConnection:
    """One in-process connection; every reference over it shares its fate."""

    def __init__(self, clock) -> None:
        self._clock = clock
        self.state = LinkState.UP
        #: call number -> the caller's Deferred, until answered or broken.
        self._pending: dict[int, defer.Deferred] = {}
        self._numbers = itertools.count()
        #: Deliveries held while the connection hangs, in order.
        self._held: list = []
        self._watchers: list[_Watcher] = []
        #: Whether answers are held while calls still arrive (`hang_answers`).
        self._answers_held = False
        #: id(object) -> (object, its reference), so one object has one reference.
        self._references: dict[int, tuple] = {}
        #: Every call made over the connection, as ``(method, args)`` (for tests).
        self.calls: list[tuple[str, tuple]] = []
        #: What ``rref.tracker.broker`` is for every reference over it.
        self.broker = _Broker(self)

    # -- references ---------------------------------------------------------------

    def reference(self, target) -> LocalReference:
        """The reference, over this connection, to the Referenceable `target`."""
        known = self._references.get(id(target))
        if known is None:
            known = self._references[id(target)] = (target, LocalReference(self, target))
        return known[1]

    def _carry(self, value):
        """`value` as the other side receives it."""
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, list):
            return [self._carry(item) for item in value]
        if isinstance(value, tuple):
            return tuple(self._carry(item) for item in value)
        if isinstance(value, dict):
            return {self._carry(k): self._carry(v) for k, v in value.items()}
        if isinstance(value, (set, frozenset)):
            return type(value)(self._carry(item) for item in value)
        if isinstance(value, LocalReference):
            if value._connection is not self:
                raise Violation("cannot pass on a reference to another connection (a gift)")
            # A reference sent back to the side that owns its object.
            return value._target
        if is_referenceable(value):
            return self.reference(value)
        raise Violation(
            "cannot send a %s: only plain data and Referenceables travel"
            % type(value).__name__
        )

    # -- calls ------------------------------------------------------------------------

    def call(self, target, method: str, args: tuple, answer: bool = True):
        """Send a call of `method` on `target`; a Deferred of its answer, or
        None for a call that wants none (`callRemoteOnly`)."""
        if self.state is LinkState.BROKEN:
            return defer.fail(DeadReferenceError("Calling Stale Broker")) if answer else None
        try:
            check_arguments(target, method, args)
            carried = self._carry(args)
        except Violation as e:
            return defer.fail(e) if answer else None
        self.calls.append((method, carried))
        number = next(self._numbers)
        d = None
        if answer:
            d = self._pending[number] = defer.Deferred()
        self._send(lambda: self._deliver(number, target, method, carried, answer))
        return d

    def _send(self, delivery, answer: bool = False) -> None:
        self._clock.callLater(0, self._arrive, delivery, answer)

    def _arrive(self, delivery, answer: bool = False) -> None:
        if self.state is LinkState.HUNG or (answer and self._answers_held):
            self._held.append((delivery, answer))
        elif self.state is LinkState.UP:
            delivery()

    def _deliver(self, number: int, target, method: str, args: tuple, answer: bool) -> None:
        function = getattr(target, "remote_" + method, None)
        if function is None:
            d = defer.fail(Violation("%r has no remote method %r" % (target, method)))
        else:
            d = defer.maybeDeferred(function, *args)

        def answered(value):
            check_answer(target, method, value)
            return self._carry(value)

        d.addCallback(answered)
        if answer:
            d.addBoth(lambda outcome: self._send(lambda: self._answer(number, outcome), True))
        else:
            d.addErrback(lambda _: None)  # nobody waits for this answer

    def _answer(self, number: int, outcome) -> None:
        d = self._pending.pop(number, None)
        if d is None:
            return
        if isinstance(outcome, Failure):
            d.errback(remote_failure(outcome))
        else:
            d.callback(outcome)

    @property
    def pending(self) -> int:
        """How many calls wait for their answer."""
        return len(self._pending)

    # -- the switches -------------------------------------------------------------------

    def disconnect(self) -> None:
        """Break the connection, as a lost TCP connection does."""
        if self.state is LinkState.BROKEN:
            return
        self.state = LinkState.BROKEN
        self._held.clear()
        pending, self._pending = self._pending, {}
        for d in pending.values():
            error = DeadReferenceError("Connection was lost")
            self._clock.callLater(0, d.errback, Failure(error))
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            self._clock.callLater(0, watcher.callback, *watcher.args, **watcher.kwargs)

    def hang(self) -> None:
        """Hold every message, both ways, until `release`."""
        if self.state is LinkState.UP:
            self.state = LinkState.HUNG

    def hang_answers(self) -> None:
        """Hold the answers only, until `release`: calls still arrive and
        run, as when a link breaks after a request was taken."""
        if self.state is not LinkState.BROKEN:
            self._answers_held = True

    def release(self) -> None:
        """Deliver what `hang` or `hang_answers` held, in order, and carry on."""
        if self.state is LinkState.BROKEN:
            return
        self.state = LinkState.UP
        self._answers_held = False
        held, self._held = self._held, []
        for delivery, answer in held:
            self._send(delivery, answer)

    # -- disconnect notifications ------------------------------------------------------

    def notify_on_disconnect(self, callback, args, kwargs) -> _Watcher:
        watcher = _Watcher(callback, args, kwargs)
        if self.state is LinkState.BROKEN:
            self._clock.callLater(0, callback, *args, **kwargs)
        else:
            self._watchers.append(watcher)
        return watcher

    def dont_notify_on_disconnect(self, watcher: _Watcher) -> None:
        # Tolerant, like Foolscap: a marker that already fired is ignored.
        if watcher in self._watchers:
            self._watchers.remove(watcher)


class _Transport:
    """What code that drops a Foolscap connection reaches for
    (``rref.tracker.broker.transport``): both calls break the connection."""

    def __init__(self, connection: LocalConnection) -> None:
        self._connection = connection

    def loseConnection(self) -> None:
        self._connection.disconnect()

    abortConnection = loseConnection


class _Broker:
    def __init__(self, connection: LocalConnection) -> None:
        self.transport = _Transport(connection)


class _Tracker:
    def __init__(self, connection: LocalConnection) -> None:
        # One broker per connection, shared by its references, as Foolscap's.
        self.broker = connection.broker


class LocalReference:
    """A RemoteReference to `target` over a `LocalConnection`."""

    def __init__(self, connection: LocalConnection, target) -> None:
        self._connection = connection
        self._target = target
        self.tracker = _Tracker(connection)

    @property
    def connection(self) -> LocalConnection:
        """The connection this reference travels over (its switches)."""
        return self._connection

    def callRemote(self, _name: str, *args) -> defer.Deferred:
        """Call ``remote_<_name>`` on the target on a later turn."""
        return self._connection.call(self._target, _name, args)

    def callRemoteOnly(self, _name: str, *args) -> None:
        """Call without waiting for an answer; errors are dropped."""
        self._connection.call(self._target, _name, args, answer=False)

    def notifyOnDisconnect(self, callback, *args, **kwargs):
        """Call ``callback(*args, **kwargs)`` once the connection breaks; a marker."""
        return self._connection.notify_on_disconnect(callback, args, kwargs)

    def dontNotifyOnDisconnect(self, marker) -> None:
        """Cancel the notification `notifyOnDisconnect` returned `marker` for."""
        self._connection.dont_notify_on_disconnect(marker)

    def __repr__(self) -> str:
        return "<LocalReference to %r (%s)>" % (self._target, self._connection.state.value)


class LocalTub:
    """Stands in for a connecting Tub: `getReference(furl)` opens a fresh
    `LocalConnection` (on a later turn) to the object `serve` put there.

    Switches: `reachable` False refuses connections
    (`ConnectionRefusedError`), `answering` False leaves them unanswered
    (the caller's own timeout ends the wait), `share` True makes every
    reference travel over one live connection.
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self._served: dict[str, object] = {}
        #: Every connection opened, oldest first.
        self.connections: list[LocalConnection] = []
        self.reachable = True
        self.answering = True
        self.running = False
        #: Whether references share one live connection (as a Foolscap Tub
        #: shares one per peer Tub) instead of one connection each.
        self.share = False

    def serve(self, target, name: str) -> str:
        """Serve the Referenceable `target` (in place of any before it) under
        `name`; returns its furl."""
        furl = "pb://localtub@tcp:127.0.0.1:9/%s" % name
        self._served[furl] = target
        return furl

    def getReference(self, furl: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._clock.callLater(0, self._connect, furl, d)
        return d

    def _connect(self, furl: str, d: defer.Deferred) -> None:
        if d.called or not self.answering:
            return
        target = self._served.get(furl)
        if not self.reachable or target is None:
            d.errback(ConnectionRefusedError("nothing is served there"))
            return
        live = [c for c in self.connections if c.state is not LinkState.BROKEN]
        if self.share and live:
            # One connection per peer, shared, as a Foolscap Tub keeps.
            d.callback(live[-1].reference(target))
            return
        connection = LocalConnection(self._clock)
        self.connections.append(connection)
        d.callback(connection.reference(target))

    @property
    def connection(self) -> LocalConnection:
        """The latest connection."""
        return self.connections[-1]

    def disconnect_all(self) -> None:
        """Break every connection (the other side went away)."""
        for connection in self.connections:
            connection.disconnect()

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> defer.Deferred:
        self.running = False
        self.disconnect_all()
        return defer.succeed(None)
