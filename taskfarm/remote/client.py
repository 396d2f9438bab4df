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

from foolscap.api import DeadReferenceError
from foolscap.furl import decode_furl
from twisted.internet import defer
from twisted.internet import error as internet_error
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.errors import (
    BadRequest,
    ConnectionLost,
    ControllerUnreachable,
    FurlError,
    MessageTooLarge,
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


@implementer(IControllerDialer)
class FoolscapDialer:
    """Connects through `tub` (default: this process's shared client Tub)."""

    def __init__(self, reactor, tub=None) -> None:
        self._reactor = reactor
        self._tub = tub

    def connect(self, furl: str, timeout: float) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connect(furl, timeout))

    async def _connect(self, furl: str, timeout: float) -> FoolscapControllerReference:
        location = furl_location(furl)
        tub = self._tub or shared_client_tub()
        d = tub.getReference(furl)
        d.addTimeout(timeout, self._reactor)
        try:
            rref = await d
        except defer.TimeoutError:
            raise ControllerUnreachable(
                "no answer from the controller at %s within %g s" % (location, timeout)
            ) from None
        except Exception as e:
            raise ControllerUnreachable(
                "cannot reach the controller at %s: %s" % (location, describe_error(e))
            ) from None
        return FoolscapControllerReference(rref, location)


@implementer(IControllerReference)
class FoolscapControllerReference:
    """One live reference to a controller interface.  Once `hello` told the
    controller's limit, calls (and their answers) are checked against it."""

    def __init__(self, rref, location: str) -> None:
        self._rref = rref
        self.location = location
        self._limit: int | None = None

    def hello(self) -> defer.Deferred:
        return self._rref.callRemote("hello").addCallback(self._hello)

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
            answer = await self._rref.callRemote(method, *args, **bounded)
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
        tracker = getattr(self._rref, "tracker", None)
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
