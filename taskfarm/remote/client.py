"""A client's Foolscap transport to one controller interface.

`FoolscapDialer` connects to a furl and gives an `IControllerReference`
that says hello, calls, and turns every Foolscap failure into a typed
error: `ControllerUnreachable` when nothing answers in time,
`ConnectionLost` when the link breaks mid-call, `MessageTooLarge` or
`BadRequest` when the controller refuses a call, and the controller's own
errors (sent back as data) re-raised as their `taskfarm.errors` classes.
No retries here: `taskfarm.connection.ControllerConnection` holds that
policy.  Furls are secrets: errors show only their location, never the
whole furl.
"""

from __future__ import annotations

import warnings
import weakref

from foolscap.api import DeadReferenceError
from foolscap.furl import decode_furl
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.python.failure import Failure
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.errors import (
    BadRequest,
    ConnectionLost,
    ControllerUnreachable,
    FurlError,
    MessageTooLarge,
    StaleFurl,
    TaskfarmError,
    from_wire,
)
from taskfarm.interfaces import IControllerDialer, IControllerReference
from taskfarm.remote import schemas, sweeper
from taskfarm.remote.tub import new_tub

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


def is_lost(e: BaseException) -> bool:
    """Whether `e` is Foolscap's (or Twisted's) word for a broken connection."""
    return isinstance(e, _LOST)


class SharedLinks:
    """Which references of this process use each connection of one Tub.

    A Tub holds one connection (broker) per peer Tub, shared by every
    reference to that peer, so one client's `disconnect` must not drop it
    while another client still uses it.  A reference counts as a user of
    its connection from its `add` until it leaves or the connection broke;
    and while a `getReference` to the peer is in flight (`join`), no
    connection to that peer is dropped.  A connection is dropped when its
    last user leaves, and a `join` waits until a drop is complete, so a new
    reference never lands on a dying connection.
    """

    #: Seconds a drop may take before the connection is aborted.
    DROP_TIMEOUT = 5.0

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        #: broker -> the references using it now.
        self._users: dict = {}
        #: peer key -> how many `getReference`s to it are in flight.
        self._joining: dict[tuple, int] = {}
        #: peer key -> (fires once its dropped connection is gone, its transport).
        self._dropping: dict[tuple, tuple] = {}

    def users(self, rref) -> int:
        """How many references use `rref`'s connection now."""
        return len(self._users.get(_broker(rref), ()))

    async def join(self, key: tuple, get_reference):
        """`await get_reference()` for the peer `key`, counted as joining."""
        while key in self._dropping:
            dropped, transport = self._dropping[key]
            try:
                # Bounded: a peer that never closes its side is cut off.
                await _observe(dropped).addTimeout(self.DROP_TIMEOUT, self._reactor)
            except defer.TimeoutError:
                _abort(transport)
                if self._dropping.get(key, (None,))[0] is dropped:
                    del self._dropping[key]
        self._joining[key] = self._joining.get(key, 0) + 1
        try:
            return await get_reference()
        finally:
            self._joining[key] -= 1
            if not self._joining[key]:
                del self._joining[key]

    def add(self, reference, rref) -> None:
        self._users.setdefault(_broker(rref), set()).add(reference)

    def gone(self, reference, rref) -> None:
        """`reference` no longer uses `rref`'s connection."""
        broker = _broker(rref)
        users = self._users.get(broker)
        if users is not None:
            users.discard(reference)
            if not users:
                del self._users[broker]

    def leave(self, key: tuple, reference, rref) -> None:
        """`reference` is done; drop the connection if nobody else uses it."""
        self.gone(reference, rref)
        if self.users(rref) or self._joining.get(key) or key in self._dropping:
            return
        transport = _transport(rref)
        if transport is None:
            return
        dropped: defer.Deferred = defer.Deferred()
        self._dropping[key] = (dropped, transport)

        def done(*_):
            if self._dropping.get(key, (None,))[0] is dropped:
                del self._dropping[key]
            if not dropped.called:
                dropped.callback(None)

        rref.notifyOnDisconnect(done)
        transport.loseConnection()


def _broker(rref):
    return getattr(getattr(rref, "tracker", None), "broker", None) or rref


def _abort(transport) -> None:
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()


def _transport(rref):
    broker = getattr(getattr(rref, "tracker", None), "broker", None)
    return getattr(broker, "transport", None)


def _observe(d: defer.Deferred) -> defer.Deferred:
    """A fresh Deferred firing (with None) when `d` does; cancelling it
    leaves `d` alone."""
    fresh: defer.Deferred = defer.Deferred()
    d.addBoth(lambda result: (None if fresh.called else fresh.callback(None), result)[1])
    return fresh


def _detached(d: defer.Deferred) -> defer.Deferred:
    """A fresh Deferred with `d`'s outcome; cancelling it (a client-side
    timeout) fails it at once and leaves `d`, a Foolscap call still in
    flight, to finish unobserved."""
    fresh: defer.Deferred = defer.Deferred()

    def relay(result):
        if not fresh.called:
            if isinstance(result, Failure):
                fresh.errback(result)
            else:
                fresh.callback(result)
        return None

    d.addBoth(relay)
    return fresh


#: Tub -> its `SharedLinks` (the shared client Tub and any a caller passes).
_links: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def links_of(tub, reactor) -> SharedLinks:
    """The `SharedLinks` of `tub` (made on first use)."""
    links = _links.get(tub)
    if links is None:
        links = _links[tub] = SharedLinks(reactor)
    return links


@implementer(IControllerDialer)
class FoolscapDialer:
    """Connects through `tub` (default: this process's shared client Tub);
    the references it gives share the Tub's connection to the controller,
    counted in `SharedLinks`, so disconnecting one leaves the others up."""

    def __init__(self, reactor, tub=None) -> None:
        self._reactor = reactor
        self._tub = tub

    def connect(self, furl: str, timeout: float) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connect(furl, timeout))

    async def _connect(self, furl: str, timeout: float) -> FoolscapControllerReference:
        location = furl_location(furl)
        tub = self._tub or shared_client_tub()
        links = links_of(tub, self._reactor)
        key = peer_key(furl)

        def get_reference():
            d = _detached(tub.getReference(furl))
            d.addTimeout(timeout, self._reactor)
            return d

        try:
            rref = await links.join(key, get_reference)
        except defer.TimeoutError:
            raise ControllerUnreachable(
                "no answer from the controller at %s within %g s" % (location, timeout)
            ) from None
        except defer.CancelledError:
            raise
        except Exception as e:
            text = describe_error(e)
            if "unknown TubID" in text:
                raise StaleFurl(
                    "the controller at %s has a new identity (its security folder was "
                    "renewed), so this furl is stale" % (location,)
                ) from None
            raise ControllerUnreachable(
                "cannot reach the controller at %s: %s" % (location, text)
            ) from None
        return FoolscapControllerReference(rref, location, links, key)


def peer_key(furl: str) -> tuple:
    """What identifies the peer Tub a furl leads to (its TubID)."""
    try:
        tubid, _, _ = decode_furl(furl)
    except ValueError:
        raise FurlError("not a valid furl (it should start with pb://)") from None
    return (tubid,)


@implementer(IControllerReference)
class FoolscapControllerReference:
    """One live reference to a controller interface.  Once `hello` told the
    controller's limit, calls (and their answers) are checked against it.

    `links` (with `key`) counts it among the users of its connection; its
    `disconnect` drops the connection only when it is the last user.
    """

    def __init__(self, rref, location: str, links: SharedLinks | None = None, key=None) -> None:
        self._rref = rref
        self.location = location
        self._limit: int | None = None
        self._links = links
        self._key = key
        self._left = False
        notify = getattr(rref, "notifyOnDisconnect", None)
        if links is not None and notify is not None:
            links.add(self, rref)
            notify(links.gone, self, rref)
        else:
            self._links = None

    def hello(self) -> defer.Deferred:
        return self.call_raw("hello").addCallback(self._hello)

    def call_raw(self, method: str, *args, **kwargs) -> defer.Deferred:
        try:
            return _detached(self._rref.callRemote(method, *args, **kwargs))
        except Exception:
            return defer.fail()

    def _hello(self, blob: bytes) -> wire.Hello:
        hello = wire.Hello.parse(serialization.unpack(blob))
        self._limit = hello.max_message_size
        return hello

    def call(self, method: str, *args) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._call(method, args))

    async def _call(self, method: str, args: tuple):
        bounded = (
            {} if self._limit is None else schemas.bounded_call(self._rref, method, self._limit)
        )
        try:
            answer = await self.call_raw(method, *args, **bounded)
        except defer.CancelledError:
            raise
        except _LOST as e:
            raise ConnectionLost(
                "lost the connection to the controller at %s during %s: %s"
                % (self.location, method, describe_error(e))
            ) from None
        except Exception as e:
            text = describe_error(e)
            if "too long" in text:
                raise MessageTooLarge(
                    "the controller refused a %s request as too large: %s" % (method, text)
                ) from None
            raise BadRequest("the controller refused %s: %s" % (method, text)) from None
        sweeper.received(answer)
        ok, value = wire.Answer.parse(serialization.unpack(answer, self._limit))
        if not ok:
            raise from_wire(value)
        return value

    def notify_on_disconnect(self, callback) -> None:
        self._rref.notifyOnDisconnect(callback)

    def disconnect(self) -> None:
        if self._left:
            return
        self._left = True
        if self._links is None:
            transport = _transport(self._rref)
            if transport is not None:
                transport.loseConnection()
            return
        self._links.leave(self._key, self, self._rref)


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
