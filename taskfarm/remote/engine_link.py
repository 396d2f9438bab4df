"""An engine's link to its controller: register, serve commands, come back.

`EngineLink` is a Twisted service.  It reads the engine furl (again on each
attempt, since a restarted controller may have a new one), registers with
the engine's properties (the namespace keeps the latest), and feeds commands to the `CommandWorker`.  When
the link breaks it ends the worker's session and tries again with back-off,
asking for the same engine id.
"""

from __future__ import annotations

from collections.abc import Callable

from foolscap.api import DeadReferenceError, Referenceable
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.batching import pickled_size, split_by_size
from taskfarm.engine.worker import CommandWorker
from taskfarm.errors import MessageTooLarge, to_wire
from taskfarm.remote import schemas, sweeper
from taskfarm.remote.client import describe_error, furl_location
from taskfarm.remote.tub import new_tub


@implementer(schemas.RIEngine)
class _EngineReferenceable(Referenceable):
    """What the controller calls on this engine."""

    def __init__(self, worker: CommandWorker) -> None:
        self._worker = worker

    def remote_commands(self, batch):
        sweeper.received(batch)
        self._worker.receive(serialization.unpack(batch))

    def remote_interrupt(self, seq):
        self._worker.interrupt(seq)

    def remote_cancel(self, seqs):
        self._worker.cancel(seqs)

    def remote_set_properties(self, properties):
        props = serialization.unpack(properties)
        if isinstance(props, dict):
            self._worker.namespace.set_properties(props)

    def remote_ping(self):
        return None


class EngineLink(service.Service):
    """Keeps one engine registered with its controller."""

    _log = Logger()

    def __init__(
        self,
        read_furl: Callable[[], str],
        worker: CommandWorker,
        reactor,
        retry_delays: tuple[float, float] = (0.2, 5.0),
        tub=None,
    ) -> None:
        self._read_furl = read_furl
        #: The Tub to connect through; None makes a fresh one at each start.
        self._given_tub = tub
        self._worker = worker
        self._reactor = reactor
        self._first_delay, self._max_delay = retry_delays
        self._tub = None
        self._loop: defer.Deferred | None = None
        self._rref = None
        self._lost: defer.Deferred | None = None
        self._stopping = False
        self.engine_id: int | None = None
        #: How many times this engine has registered (1 + reconnections).
        self.registrations = 0
        #: Fires each time the engine registers, with its id (for tests).
        self.on_registered: list[Callable[[int], None]] = []

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._tub = self._given_tub or new_tub()
        self._tub.startService()
        sweeper.process_sweeper().start()
        self._loop = defer.Deferred.fromCoroutine(self._keep_registered())

    async def stopService(self) -> None:
        self._stopping = True
        super().stopService()
        sweeper.process_sweeper().stop()
        if self._lost is not None and not self._lost.called:
            self._lost.callback(None)
        self._worker.end_session()
        if self._loop is not None:
            self._loop.cancel()
            try:
                await self._loop
            except defer.CancelledError:
                pass
        await self._tub.stopService()

    async def _keep_registered(self) -> None:
        delay = self._first_delay
        while not self._stopping:
            try:
                await self._register_once()
                delay = self._first_delay
                self._lost = defer.Deferred()
                await self._lost
                if self._stopping:
                    return
                self._log.warn("lost the controller; reconnecting")
            except defer.CancelledError:
                return
            except Exception as e:
                self._log.warn(
                    "cannot register with the controller ({error}); retrying in "
                    "{delay:.1f} s",
                    error=describe_error(e),
                    delay=delay,
                )
            self._worker.end_session()
            await task.deferLater(self._reactor, delay, lambda: None)
            delay = min(delay * 2, self._max_delay)

    async def _register_once(self) -> None:
        furl = self._read_furl()
        rref = await self._tub.getReference(furl).addTimeout(10, self._reactor)
        hello = wire.Hello.parse(serialization.unpack(await rref.callRemote("hello")))
        if hello.interface != "engine":
            raise ValueError(
                "the furl for %s is not the engine furl (security/engine.furl)"
                % furl_location(furl)
            )
        # Commands may be as big as the controller accepts; replies may not
        # be bigger (see `_sender`).
        limit = hello.max_message_size
        schemas.set_message_limit(limit)
        engine_id, session = await rref.callRemote(
            "register",
            _EngineReferenceable(self._worker),
            # The controller's latest view, so a re-registration keeps it.
            serialization.pack(self._worker.namespace.properties),
            self.engine_id,
        )
        self.engine_id = engine_id
        self.registrations += 1
        self._rref = rref
        self._worker.begin_session(engine_id, self._sender(session, limit))
        rref.notifyOnDisconnect(self._disconnected)
        self._log.info(
            "registered with the controller at {location} as engine {engine_id}",
            location=furl_location(furl),
            engine_id=engine_id,
        )
        for callback in self.on_registered:
            callback(engine_id)

    def _sender(self, session, limit: int) -> Callable[[list], None]:
        # The controller's limit is at least 1024 bytes (--max-message-size).
        room = max(limit - REPLY_OVERHEAD, 512)
        # Big replies leave in messages of about REPLY_BATCH_BYTES, so the
        # controller reads one while the next is sent; none exceeds `limit`.
        batch_bytes = min(room, REPLY_BATCH_BYTES)

        def send(replies: list) -> None:
            # Packed once: usually they fit in one message, which this is.
            packed = serialization.pack(replies)
            if len(packed) <= batch_bytes:
                messages = [packed]
            else:
                messages = map(serialization.pack, fit_replies(replies, room, batch_bytes))
            for message in messages:
                try:
                    session.callRemoteOnly("replies", message)
                except DeadReferenceError:
                    return

        return send

    def _disconnected(self) -> None:
        self._rref = None
        self._worker.end_session()
        if self._lost is not None and not self._lost.called:
            self._lost.callback(None)


#: Bytes of a replies message beyond its replies' own pickles (the list
#: around them, pickle framing), kept free under the limit.
REPLY_OVERHEAD = 512

#: Replies leave in messages of about this many bytes at most.
REPLY_BATCH_BYTES = 8 * 1024 * 1024

#: How much of an oversized failure's message and traceback is kept.
FAILURE_EXCERPT = 2000


def fit_replies(replies: list, room: int, batch_bytes: int | None = None) -> list[list]:
    """`replies` in batches of at most `batch_bytes` (default `room`) bytes,
    each reply measured by a bound of its pickle, failures as much as results.  A
    reply bigger than `room` alone is replaced by a `MessageTooLarge`
    failure of its command, so its task fails instead of waiting forever."""
    fitted, sizes = [], []
    for reply in replies:
        # Mostly a bound, not a pickle: a big result is not copied again.
        size = pickled_size(reply, room)
        if size > room:
            reply = _too_large(reply, size, room)
            size = len(serialization.pack(reply))
        fitted.append(reply)
        sizes.append(size)
    return split_by_size(fitted, sizes, room if batch_bytes is None else batch_bytes)


def _too_large(reply: tuple, size: int, room: int) -> tuple:
    """A `MessageTooLarge` failure in place of `reply`; a failure keeps its
    exception's type name and the start of its message and traceback."""
    seq, ok, data, started, finished = reply
    limit = room + REPLY_OVERHEAD
    if ok:
        text = (
            "the result of %d bytes exceeds the controller's message limit of %d "
            "bytes (--max-message-size)" % (size, limit)
        )
    else:
        ename, evalue, traceback = _failure_parts(data)
        # At most 4 bytes a character: the excerpts stay well inside `room`.
        keep = max(0, min(FAILURE_EXCERPT, (room - 400) // 8))
        text = (
            "the failure of %d bytes exceeds the controller's message limit of %d "
            "bytes (--max-message-size); it was %s: %s"
            % (size, limit, ename, _clip(evalue, keep))
        )
        if traceback and keep:
            text += "\nend of the remote traceback:\n" + traceback[-keep:]
    return (seq, False, to_wire(MessageTooLarge(text)), started, finished)


def _failure_parts(data) -> tuple[str, str, str]:
    """(type name, message, traceback) of a wire error."""
    try:
        name, detail = data
        if name == "RemoteTaskError":
            return str(detail[0]), str(detail[1]), str(detail[2] or "")
        return str(name), str(detail), ""
    except (TypeError, ValueError, IndexError):
        return "an error", "", ""


def _clip(text: str, keep: int) -> str:
    if len(text) <= keep:
        return text
    return "%s... (%d characters in all)" % (text[:keep], len(text))
