"""The controller's Referenceables: thin adapters from Foolscap to services.

Each remote method unpacks its arguments, calls the service, and answers a
reply envelope (`taskfarm.remote.answers`).  Nothing a client or engine
sends can stop the controller: malformed input becomes `BadRequest`.  Each
Referenceable carries the controller's message limit (`max_message_size`,
see `schemas.BoundedReferenceable`).
"""

from __future__ import annotations

import zlib

from foolscap.api import DeadReferenceError
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.batching import pickled_size
from taskfarm.bulk import channel
from taskfarm.bulk.policy import BulkPolicy
from taskfarm.errors import BadRequest, MessageTooLarge, ProtocolVersionError, to_wire
from taskfarm.interfaces import IEngineChannel
from taskfarm.profile import ENGINE, MULTIENGINE, TASK
from taskfarm.remote import schemas, sweeper
from taskfarm.remote import tub as tubs
from taskfarm.remote.answers import hello_blob, reply, reply_in_parts
from taskfarm.remote.multiengine import RemoteMultiEngine
from taskfarm.remote.schemas import BoundedReferenceable

_log = Logger()


def _unpack_ids(blob: bytes, limit: int, allow_none: bool = False):
    return wire.TaskIds.parse(serialization.unpack(blob, limit), allow_none)


def _digest(batch) -> str:
    """Length and CRC-32 of a submission's bytes (one string or its parts)."""
    if isinstance(batch, bytes):
        return "%d:%08x" % (len(batch), zlib.crc32(batch))
    crc = 0
    for part in batch:
        crc = zlib.crc32(part, crc)
    return "%d:%08x" % (serialization.message_size(batch), crc)


#: Seconds a blocking `wait` or `results` is held before it answers
#: `schemas.NOT_YET` (and releases its waiter); the client asks again.
WAIT_BOUND = 30.0


@implementer(schemas.RITaskController)
class RemoteTaskController(BoundedReferenceable):
    """The Task interface, served to clients holding the task furl."""

    def __init__(
        self,
        controller,
        clock=None,
        wait_bound: float | None = None,
        max_message_size: int = serialization.DEFAULT_MAX_MESSAGE_SIZE,
        bulk=None,
    ) -> None:
        super().__init__(max_message_size)
        self._controller = controller
        #: The bulk-data channel's policy (`taskfarm.bulk.policy`), or None.
        self.bulk = bulk
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
        return hello_blob(
            "task", self._controller.incarnation, max_message_size=self.max_message_size,
            bulk=None if self.bulk is None else self.bulk.location,
        )

    def remote_submit(self, batch):
        def submit():
            token, envelopes, ids = wire.Submission.parse(
                serialization.unpack(batch, self.max_message_size)
            )
            # A resend carries the very same bytes; a replayed token with
            # other tasks does not.
            digest = _digest(batch)
            return defer.Deferred.fromCoroutine(
                self._controller.submit_durably(envelopes, token, ids, digest)
            )

        return sweeper.once_answered(reply(submit), batch)

    def remote_reserve(self, count):
        return reply(lambda: defer.Deferred.fromCoroutine(self._controller.reserve_durably(count)))

    def remote_results(self, taskids, block):
        def results():
            d = self._controller.results(_unpack_ids(taskids, self.max_message_size), block)
            if block:
                d = self._bounded(d)
            d.addCallback(_fit_unless_not_yet, self.max_message_size)
            return d

        return reply_in_parts(results)

    def remote_results_bulk(self, taskids, block):
        """`remote_results`, big results' frames moved to the bulk-data
        channel: answers a `wire.BulkResults` (or `NOT_YET`)."""

        def offered(envelopes):
            if envelopes is schemas.NOT_YET:
                return envelopes
            if self.bulk is None:
                return wire.BulkResults(envelopes, None, [], []).plain()
            return self.bulk.results_answer(envelopes)

        def results():
            d = self._controller.results(_unpack_ids(taskids, self.max_message_size), block)
            if block:
                d = self._bounded(d)
            d.addCallback(_fit_unless_not_yet, self.max_message_size)
            d.addCallback(offered)
            return d

        return reply_in_parts(results)

    def remote_wait(self, taskids):
        def wait():
            ids = _unpack_ids(taskids, self.max_message_size)
            return self._bounded(self._controller.wait(ids))

        return reply(wait)

    def remote_abort(self, taskid):
        return reply(self._controller.abort, taskid)

    def remote_queue_status(self, verbose):
        return reply(self._controller.queue_status, verbose)

    def remote_why(self, taskid):
        return reply(self._controller.why, taskid)

    def remote_clear(self, taskids):
        return reply(
            lambda: self._controller.clear(_unpack_ids(taskids, self.max_message_size, True))
        )

    def remote_spin(self):
        return reply(self._controller.spin)

    def remote_engine_ids(self):
        return reply(self._controller.engine_ids)

    def remote_status(self):
        return reply(self._controller.status)


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
    envelope = wire.ResultEnvelope.parse(envelope)
    error = MessageTooLarge(
        "the result of task %d (%d bytes) exceeds the controller's message limit "
        "of %d bytes (--max-message-size)" % (envelope.taskid, size, limit)
    )
    return envelope._replace(ok=False, data=to_wire(error)).plain()


@implementer(IEngineChannel)
class RemoteEngineChannel:
    """The controller's link to one engine, over its RemoteReference; what
it sends is checked against the engine's limit, the controller's own."""

    def __init__(self, rref, max_message_size: int = serialization.DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._rref = rref
        self._limit = max_message_size

    def send(self, commands: list, packed: bytes | None = None) -> None:
        self._call("commands", serialization.pack_message(commands) if packed is None else packed)

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
            self._rref.callRemoteOnly(
                method, *args, **schemas.bounded_call(self._rref, method, self._limit)
            )
        except DeadReferenceError:
            pass


@implementer(schemas.RIEngineSession)
class RemoteEngineSession(BoundedReferenceable):
    """Where one registered engine sends its replies."""

    def __init__(
        self,
        registry,
        handle,
        channel: RemoteEngineChannel,
        max_message_size: int = serialization.DEFAULT_MAX_MESSAGE_SIZE,
        bulk=None,
    ) -> None:
        super().__init__(max_message_size)
        self._registry = registry
        self._handle = handle
        self._channel = channel
        self._bulk = bulk

    def remote_upload(self, seq, sizes):
        """A capability to upload the frames (of the pickled list of
        `sizes`) of the reply to command `seq` over the bulk-data channel,
        or None: reply over Foolscap (version 5)."""

        def capability():
            if self._bulk is None:
                raise BadRequest("this controller has no bulk-data channel")
            def op_of(number):
                entry = self._handle.inflight.get(number)
                return None if entry is None else entry[0]

            return self._bulk.upload_capability_for(
                op_of, seq, serialization.unpack(sizes, self.max_message_size),
                self.max_message_size,
            )

        return reply(capability)

    def remote_replies(self, batch):
        sweeper.received(batch)
        try:
            replies = wire.parse_list(
                serialization.unpack(batch, self.max_message_size), "replies"
            )
            replies = list(map(wire.Reply.parse, replies))
            if any(r.upload is not None for r in replies):
                if self._bulk is None:
                    raise BadRequest("a reply names an upload, but there is no bulk channel")
                replies = self._bulk.resolve_uploads(replies)
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
class RemoteEngineRegistrar(BoundedReferenceable):
    """The engine furl's object: registration, and nothing more."""

    def __init__(
        self, registry, max_message_size: int = serialization.DEFAULT_MAX_MESSAGE_SIZE,
        bulk=None,
    ) -> None:
        super().__init__(max_message_size)
        self._registry = registry
        self._bulk = bulk

    def remote_hello(self):
        return hello_blob(
            "engine", max_message_size=self.max_message_size,
            bulk=None if self._bulk is None else self._bulk.location,
        )

    def remote_register(self, engine, properties, requested_id):
        props = serialization.unpack(properties, self.max_message_size)
        channel = RemoteEngineChannel(engine, self.max_message_size)
        handle = self._registry.register(channel, props, requested_id)
        engine.notifyOnDisconnect(
            self._registry.engine_lost, handle, "its connection closed"
        )
        session = RemoteEngineSession(
            self._registry, handle, channel, self.max_message_size, self._bulk
        )
        return handle.engine_id, session


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
        bulk_listen: str | None = None,
    ) -> None:
        self._profile = profile
        #: Where the bulk-data channel listens: a tcp endpoint, None for a
        #: free port on the Tub's interface, "none" for no channel.
        self._bulk_listen = bulk_listen
        #: The bulk-data channel (`taskfarm.bulk.channel.BulkServer`), or None.
        self.bulk_server = None
        self.bulk = None
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
        super().startService()
        self._profile.ensure()
        cert = tubs.load_or_create_cert(self._profile)
        self.tub = tubs.new_tub(cert)
        listen = self._listen or tubs.default_listen(self._profile)
        self.location = tubs.listen_and_locate(
            self.tub, listen, self._location, self._reactor
        )
        self._start_bulk(cert, listen)
        self.tub.startService()
        limit = self._max_message_size
        referenceables = {
            ENGINE: RemoteEngineRegistrar(self._registry, limit, bulk=self.bulk),
            TASK: RemoteTaskController(
                self._services[TASK], self._reactor, max_message_size=limit, bulk=self.bulk
            ),
            MULTIENGINE: RemoteMultiEngine(self._services[MULTIENGINE], limit, bulk=self.bulk),
        }
        self._referenceables = referenceables
        for interface, ref in referenceables.items():
            self.furls[interface] = tubs.register(self.tub, self._profile, interface, ref)
        sweeper.process_sweeper().start()

    def _start_bulk(self, cert: bytes, listen: str) -> None:
        """Listen for the bulk-data channel with the Tub's certificate, on
        the Tub's interface unless told (`taskfarm.bulk`)."""
        if self._bulk_listen == "none":
            return
        interface, port = tubs.parse_listen(self._bulk_listen or listen)
        if self._bulk_listen is None:
            port = 0
        offers = channel.Offers(self._reactor)
        self.bulk_server = channel.BulkServer(self._reactor, offers, cert, interface, port)
        self.bulk_server.start()
        location = self.location[4:] if self.location.startswith("tcp:") else self.location
        host = location.rsplit(":", 1)[0]
        self.bulk = BulkPolicy(offers, "%s:%d" % (host, self.bulk_server.port))

    async def stopService(self) -> None:
        super().stopService()
        sweeper.process_sweeper().stop()
        if self.bulk_server is not None:
            server, self.bulk_server = self.bulk_server, None
            server.stop()
        if self.tub is not None:
            self._referenceables[TASK].release_held()
            await self.tub.stopService()
