"""The controller's Referenceables: thin adapters from Foolscap to services.

Each remote method unpacks its arguments, calls the service, and answers a
reply envelope: ``(True, value)`` or ``(False, wire_error)``.  Errors are
data, so a client awaits them like any value (see foolscap-notes: raised
remote exceptions break ``await``).  Nothing a client or engine sends can
stop the controller: malformed input becomes `BadRequest`.
"""

from __future__ import annotations

import zlib

from foolscap.api import DeadReferenceError, Referenceable
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.batching import pickled_size
from taskfarm.errors import (
    BadRequest,
    MessageTooLarge,
    ProtocolVersionError,
    TaskfarmError,
    to_wire,
)
from taskfarm.interfaces import IEngineChannel
from taskfarm.profile import ENGINE, MULTIENGINE, TASK
from taskfarm.remote import schemas, sweeper

_log = Logger()


def _answer(value) -> bytes:
    return serialization.pack(wire.Answer(True, value).plain())


def _refuse(failure) -> bytes:
    error = failure.value
    if isinstance(error, RecursionError):
        # Data nested too deeply to check or describe (it unpickles
        # without recursion, but repr, hash or a recovery chain recurse).
        error = BadRequest("the request is nested too deeply")
    if not isinstance(error, (TaskfarmError, TypeError, ValueError, KeyError)):
        _log.failure("unexpected error in a remote call", failure)
        error = TaskfarmError(
            "internal controller error: %s: %s" % (type(error).__name__, error)
        )
    return serialization.pack(wire.Answer(False, to_wire(error)).plain())


def reply(function, *args) -> defer.Deferred:
    """Run `function(*args)` (value or Deferred) and answer an envelope."""
    d = defer.maybeDeferred(function, *args)
    d.addCallbacks(_answer, _refuse)
    return d


def _unpack_ids(blob: bytes, allow_none: bool = False):
    return wire.TaskIds.parse(serialization.unpack(blob, schemas.message_limit()), allow_none)


def hello_blob(interface: str, incarnation: str | None = None) -> bytes:
    """What `hello` answers: which interface this is, the wire's limits and
    (for the Task interface) the controller's incarnation."""
    return serialization.pack(
        wire.Hello(interface, wire.WIRE_VERSION, schemas.message_limit(), incarnation).plain()
    )


#: Seconds a blocking `wait` or `results` is held before it answers
#: `schemas.NOT_YET` (and releases its waiter); the client asks again.
WAIT_BOUND = 30.0


@implementer(schemas.RITaskController)
class RemoteTaskController(Referenceable):
    """The Task interface, served to clients holding the task furl."""

    def __init__(self, controller, clock=None, wait_bound: float | None = None) -> None:
        self._controller = controller
        self._clock = controller.clock if clock is None else clock
        self._wait_bound = WAIT_BOUND if wait_bound is None else wait_bound
        #: Blocking calls not answered yet.
        self._held: set[defer.Deferred] = set()

    def _bounded(self, d: defer.Deferred) -> defer.Deferred:
        """`d`, or `NOT_YET` once the bound passed or `release_held` ran
        (either cancels `d`, which releases the controller's waiter)."""
        self._held.add(d)
        d.addTimeout(self._wait_bound, self._clock, onTimeoutCancel=_not_yet)
        d.addErrback(_not_yet_if_cancelled)
        d.addBoth(self._unhold, d)
        return d

    def _unhold(self, result, d: defer.Deferred):
        self._held.discard(d)
        return result

    def release_held(self) -> None:
        """Answer every blocking call now with `NOT_YET` (the server stops:
        no timer of a bound outlives it)."""
        for d in list(self._held):
            d.cancel()

    def remote_hello(self):
        return hello_blob("task", self._controller.incarnation)

    def remote_submit(self, batch):
        def submit():
            token, envelopes, ids = wire.Submission.parse(
                serialization.unpack(batch, schemas.message_limit())
            )
            # A resend carries the very same bytes; a replayed token with
            # other tasks does not.
            digest = "%d:%08x" % (len(batch), zlib.crc32(batch))
            return defer.Deferred.fromCoroutine(
                self._controller.submit_durably(envelopes, token, ids, digest)
            )

        return sweeper.once_answered(reply(submit), batch)

    def remote_reserve(self, count):
        return reply(lambda: defer.Deferred.fromCoroutine(self._controller.reserve_durably(count)))

    def remote_results(self, taskids, block):
        def results():
            d = self._controller.results(_unpack_ids(taskids), block)
            if block:
                d = self._bounded(d)
            d.addCallback(_fit_unless_not_yet, schemas.message_limit())
            return d

        return reply(results)

    def remote_wait(self, taskids):
        return reply(lambda: self._bounded(self._controller.wait(_unpack_ids(taskids))))

    def remote_abort(self, taskid):
        return reply(self._controller.abort, taskid)

    def remote_queue_status(self, verbose):
        return reply(self._controller.queue_status, verbose)

    def remote_clear(self, taskids):
        return reply(lambda: self._controller.clear(_unpack_ids(taskids, True)))

    def remote_spin(self):
        return reply(self._controller.spin)

    def remote_engine_ids(self):
        return reply(self._controller.engine_ids)


def _not_yet(_result, _timeout) -> str:
    return schemas.NOT_YET


def _not_yet_if_cancelled(failure) -> str:
    failure.trap(defer.CancelledError)
    return schemas.NOT_YET


def _fit_unless_not_yet(envelopes, limit: int):
    return envelopes if envelopes is schemas.NOT_YET else fit_results(envelopes, limit)


#: Bytes of a `results` answer beyond its result envelopes.
RESULTS_OVERHEAD = 512


def fit_results(envelopes: list, limit: int) -> list:
    """The longest prefix of `envelopes` (at least one) whose answer stays
    under `limit`; the client asks again for the rest.  A result that alone
    exceeds it (possible only if the limit shrank since it was stored) is
    answered as a `MessageTooLarge` failure of that task."""
    room = limit - RESULTS_OVERHEAD
    fitted: list = []
    used = 0
    for envelope in envelopes:
        size = pickled_size(envelope, room)  # the same sizing as every batch
        if size > room and not fitted:
            fitted.append(_too_large(envelope, size, limit))
            break
        if used + size > room:
            break
        fitted.append(envelope)
        used += size
    return fitted


def _too_large(envelope: tuple, size: int, limit: int) -> tuple:
    envelope = wire.ResultEnvelope._make(envelope)
    error = MessageTooLarge(
        "the result of task %d (%d bytes) exceeds the controller's message limit "
        "of %d bytes (--max-message-size)" % (envelope.taskid, size, limit)
    )
    return envelope._replace(ok=False, data=to_wire(error)).plain()


@implementer(IEngineChannel)
class RemoteEngineChannel:
    """The controller's link to one engine, over its RemoteReference."""

    def __init__(self, rref) -> None:
        self._rref = rref

    def send(self, commands: list, packed: bytes | None = None) -> None:
        self._call("commands", serialization.pack(commands) if packed is None else packed)

    def interrupt(self, seq: int) -> None:
        self._call("interrupt", seq)

    def cancel(self, seqs: list[int]) -> None:
        self._call("cancel", seqs)

    def set_properties(self, blob: bytes) -> None:
        self._call("set_properties", blob)

    def ping(self, on_answer) -> None:
        try:
            d = self._rref.callRemote("ping")
        except DeadReferenceError:
            return
        d.addCallbacks(lambda _: on_answer(), lambda _: None)

    def disconnect(self) -> None:
        tracker = getattr(self._rref, "tracker", None)
        broker = getattr(tracker, "broker", None)
        transport = getattr(broker, "transport", None)
        if transport is not None:
            # abort, not lose: a stopped peer never drains our buffer.
            getattr(transport, "abortConnection", transport.loseConnection)()

    def _call(self, method: str, *args) -> None:
        # Replies come back through the engine's session, so the answer to
        # this call carries nothing; a dead link is noticed by the
        # disconnect notification.
        try:
            self._rref.callRemoteOnly(method, *args)
        except DeadReferenceError:
            pass


@implementer(schemas.RIEngineSession)
class RemoteEngineSession(Referenceable):
    """Where one registered engine sends its replies."""

    def __init__(self, registry, handle, channel: RemoteEngineChannel) -> None:
        self._registry = registry
        self._handle = handle
        self._channel = channel

    def remote_replies(self, batch):
        sweeper.received(batch)
        try:
            replies = wire.parse_list(
                serialization.unpack(batch, schemas.message_limit()), "replies"
            )
            replies = list(map(wire.Reply.parse, replies))
        except (BadRequest, ProtocolVersionError) as e:
            _log.warn(
                "engine {engine_id} sent replies this controller cannot read "
                "({error}); dropping them",
                engine_id=self._handle.engine_id,
                error=e,
            )
            self._channel.disconnect()
            return None
        self._registry.replies(self._handle, replies)
        return None


@implementer(schemas.RIEngineRegistrar)
class RemoteEngineRegistrar(Referenceable):
    """The engine furl's object: registration, and nothing more."""

    def __init__(self, registry) -> None:
        self._registry = registry

    def remote_hello(self):
        return hello_blob("engine")

    def remote_register(self, engine, properties, requested_id):
        props = serialization.unpack(properties, schemas.message_limit())
        channel = RemoteEngineChannel(engine)
        handle = self._registry.register(channel, props, requested_id)
        engine.notifyOnDisconnect(
            self._registry.engine_lost, handle, "its connection closed"
        )
        return handle.engine_id, RemoteEngineSession(self._registry, handle, channel)


class ControllerServer(Service):
    """The controller's Tub: listens, registers each interface, writes furls."""

    def __init__(
        self,
        profile,
        reactor,
        registry,
        services: dict,
        listen: str | None = None,
        location: str | None = None,
        max_message_size: int = serialization.DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._profile = profile
        self._reactor = reactor
        self._registry = registry
        self._services = services
        self._listen = listen
        self._location = location
        self._max_message_size = max_message_size
        self.tub = None
        self.location: str | None = None
        self.furls: dict[str, str] = {}

    def startService(self) -> None:
        from taskfarm.remote import tub as tubs

        super().startService()
        schemas.set_message_limit(self._max_message_size)
        self._profile.ensure()
        self.tub = tubs.new_tub(tubs.load_or_create_cert(self._profile))
        listen = self._listen or tubs.default_listen(self._profile)
        self.location = tubs.listen_and_locate(
            self.tub, listen, self._location, self._reactor
        )
        self.tub.startService()
        referenceables = {
            ENGINE: RemoteEngineRegistrar(self._registry),
            TASK: RemoteTaskController(self._services[TASK], self._reactor),
            MULTIENGINE: self._multiengine(),
        }
        self._referenceables = referenceables
        for interface, ref in referenceables.items():
            self.furls[interface] = tubs.register(self.tub, self._profile, interface, ref)
        sweeper.process_sweeper().start()

    def _multiengine(self):
        from taskfarm.remote.multiengine import RemoteMultiEngine

        return RemoteMultiEngine(self._services[MULTIENGINE])

    async def stopService(self) -> None:
        super().stopService()
        sweeper.process_sweeper().stop()
        if self.tub is not None:
            self._referenceables[TASK].release_held()
            await self.tub.stopService()
