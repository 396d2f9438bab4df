"""An engine's link to its controller: register, serve commands, come back.

`EngineLink` is a Twisted service.  It reads the engine furl (again on each
attempt, since a restarted controller may have a new one), registers with
the engine's properties (the namespace keeps the latest), and feeds
commands to the `CommandWorker`.  When the link breaks it ends the worker's
session and tries again with back-off (`taskfarm.backoff`), asking for the
same engine id.  Its lifecycle is one explicit state table (`EngineLinkState`).

The transport is an `IControllerLink` (Foolscap: `taskfarm.remote.engine`);
the policy (retries, back-off, batching replies under the limit) is here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm import serialization
from taskfarm.backoff import Backoff
from taskfarm.batching import pickled_size, split_by_size
from taskfarm.bulk import policy as bulk_policy
from taskfarm.engine.worker import CommandWorker
from taskfarm.errors import MessageTooLarge, to_wire
from taskfarm.interfaces import IControllerLink, IEngineCommands, IEngineSession
from taskfarm.remote.client import describe_error
from taskfarm.remote.engine import FoolscapControllerLink
from taskfarm.states import InvalidTransition

#: Seconds before the first retry and the most between two (doubling).
RETRY_DELAYS = (0.2, 5.0)


class EngineLinkState(enum.Enum):
    """Where an `EngineLink` is in its life."""

    STOPPED = "stopped"
    #: An attempt to connect and register is under way.
    CONNECTING = "connecting"
    #: Registered: commands come in, replies go out.
    REGISTERED = "registered"
    #: The attempt failed or the link broke: backing off before the next.
    WAITING = "waiting"
    #: `stopService` was called; nothing new starts.
    STOPPING = "stopping"


_TRANSITIONS: dict[EngineLinkState, frozenset[EngineLinkState]] = {
    EngineLinkState.STOPPED: frozenset({EngineLinkState.CONNECTING}),
    EngineLinkState.CONNECTING: frozenset(
        {EngineLinkState.REGISTERED, EngineLinkState.WAITING, EngineLinkState.STOPPING}
    ),
    EngineLinkState.REGISTERED: frozenset({EngineLinkState.WAITING, EngineLinkState.STOPPING}),
    EngineLinkState.WAITING: frozenset({EngineLinkState.CONNECTING, EngineLinkState.STOPPING}),
    EngineLinkState.STOPPING: frozenset({EngineLinkState.STOPPED}),
}


@implementer(IEngineCommands)
class WorkerCommands:
    """What the controller sends, delivered to a `CommandWorker`."""

    def __init__(self, worker: CommandWorker) -> None:
        self._worker = worker

    def receive(self, commands) -> None:
        self._worker.receive(commands)

    def interrupt(self, seq) -> None:
        self._worker.interrupt(seq)

    def cancel(self, seqs) -> None:
        self._worker.cancel(seqs)

    def set_properties(self, properties: dict) -> None:
        self._worker.namespace.set_properties(properties)


class EngineLink(service.Service):
    """Keeps one engine registered with its controller."""

    _log = Logger()

    def __init__(
        self,
        read_furl: Callable[[], str],
        worker: CommandWorker,
        reactor,
        retry_delays: tuple[float, float] = RETRY_DELAYS,
        tub=None,
        transport: IControllerLink | None = None,
        requested_id: int | None = None,
    ) -> None:
        self._read_furl = read_furl
        self._worker = worker
        self._reactor = reactor
        self._backoff = Backoff(*retry_delays)
        # The transport; by default Foolscap, through `tub` when one is
        # given (a test's in-process Tub), else a fresh Tub at each start.
        if transport is None:
            transport = FoolscapControllerLink(reactor, tub=tub)
        self._transport = transport
        self._loop: defer.Deferred | None = None
        self._lost: defer.Deferred | None = None
        #: Where the link is (`EngineLinkState`).
        self.state = EngineLinkState.STOPPED
        #: The id asked for at each registration: `requested_id` (an MPI
        #: rank) at first, then the one the controller gave.
        self.engine_id: int | None = requested_id
        #: How many times this engine has registered (1 + reconnections).
        self.registrations = 0
        #: Fires each time the engine registers, with its id (for tests).
        self.on_registered: list[Callable[[int], None]] = []
        #: Called with (old, new) at each change of `state` (for tests).
        self.on_state: list[Callable[[EngineLinkState, EngineLinkState], None]] = []

    def _enter(self, new: EngineLinkState) -> None:
        old = self.state
        if new not in _TRANSITIONS[old]:
            raise InvalidTransition("engine link: no transition from %s to %s" % (old, new))
        self.state = new
        for callback in self.on_state:
            callback(old, new)

    def startService(self) -> None:
        super().startService()
        self._transport.start()
        self._loop = defer.Deferred.fromCoroutine(self._keep_registered())

    async def stopService(self) -> None:
        if self.state is not EngineLinkState.STOPPED:
            self._enter(EngineLinkState.STOPPING)
        super().stopService()
        self._fire_lost()
        self._worker.end_session()
        if self._loop is not None:
            self._loop.cancel()
            try:
                await self._loop
            except defer.CancelledError:
                pass
        await self._transport.stop()
        if self.state is EngineLinkState.STOPPING:
            self._enter(EngineLinkState.STOPPED)

    async def _keep_registered(self) -> None:
        while self.state is not EngineLinkState.STOPPING:
            self._enter(EngineLinkState.CONNECTING)
            try:
                await self._register_once()
            except defer.CancelledError:
                return
            except Exception as e:
                if self.state is EngineLinkState.STOPPING:
                    return
                self._log.warn(
                    "cannot register with the controller ({error}); retrying in {delay:.1f} s",
                    error=describe_error(e),
                    delay=self._backoff.peek(),
                )
            else:
                self._backoff.reset()
                self._lost = defer.Deferred()
                await self._lost
                if self.state is EngineLinkState.STOPPING:
                    return
                self._log.warn("lost the controller; reconnecting")
            self._worker.end_session()
            self._enter(EngineLinkState.WAITING)
            await self._backoff.wait(self._reactor)

    async def _register_once(self) -> None:
        session: IEngineSession = await self._transport.register(
            self._read_furl(),
            WorkerCommands(self._worker),
            # The controller's latest view, so a re-registration keeps it.
            self._worker.namespace.properties,
            self.engine_id,
        )
        self.engine_id = session.engine_id
        self.registrations += 1
        self._enter(EngineLinkState.REGISTERED)
        self._worker.begin_session(session.engine_id, self._sender(session))
        session.notify_on_disconnect(self._disconnected)
        self._log.info(
            "registered with the controller at {location} as engine {engine_id}",
            location=session.location,
            engine_id=session.engine_id,
        )
        for callback in self.on_registered:
            callback(session.engine_id)

    def _sender(self, session: IEngineSession) -> Callable[[list], None]:
        limit = session.max_message_size
        # The controller's limit is at least 1024 bytes (--max-message-size).
        room = max(limit - REPLY_OVERHEAD, 512)
        # Big replies leave in messages of about REPLY_BATCH_BYTES, so the
        # controller reads one while the next is sent; none exceeds `limit`.
        batch_bytes = min(room, REPLY_BATCH_BYTES)

        bulk = getattr(session, "bulk_location", None) is not None

        def send(replies: list) -> None:
            if bulk and self.use_bulk:
                # The batch's total decides: its big replies go in one upload.
                big = bulk_policy.big_replies(replies)
                if big:
                    defer.Deferred.fromCoroutine(upload_then_send(big))
                    moved = {id(r) for r in big}
                    replies = [r for r in replies if id(r) not in moved]
                    if not replies:
                        return
            send_over_foolscap(replies)

        async def upload_then_send(big: list) -> None:
            # Uploaded first, then named by the Foolscap replies; an upload
            # that fails sends the replies over Foolscap instead.
            try:
                named = await bulk_policy.upload_replies(self._reactor, session, big)
            except Exception as e:
                self._log.warn("bulk upload failed ({error}); replying over Foolscap",
                               error=describe_error(e))
                send_over_foolscap(big)
                return
            if named is None:
                send_over_foolscap(big)  # the controller wants them over Foolscap
                return
            session.send_replies(serialization.pack_message(named))

        def send_over_foolscap(replies: list) -> None:
            # Packed once: usually they fit in one message, which this is.
            # Big results' buffers are not copied into it (out of band).
            packed = serialization.pack_message(replies)
            if serialization.message_size(packed) <= batch_bytes:
                messages = [packed]
            else:
                messages = map(serialization.pack_message, fit_replies(replies, room, batch_bytes))
            for message in messages:
                if not session.send_replies(message):
                    return

        return send

    #: Whether big replies may be uploaded over the controller's bulk-data
    #: channel (`taskfarm.bulk`); False: everything over Foolscap.
    use_bulk = True

    def _disconnected(self) -> None:
        self._worker.end_session()
        self._fire_lost()

    def _fire_lost(self) -> None:
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
        if size > room and len(reply) == 8:
            # A task's output made it too big: the output goes, the result stays.
            reply = _without_output(reply)
            size = pickled_size(reply, room)
        if size > room:
            reply = _too_large(reply, size, room)
            size = serialization.packed_size(reply)
        fitted.append(reply)
        sizes.append(size)
    return split_by_size(fitted, sizes, room if batch_bytes is None else batch_bytes)


def _without_output(reply: tuple) -> tuple:
    """A version-4 reply whose stdout and stderr only say how much was cut."""
    notices = tuple(
        "[... %d bytes cut: over the controller's message limit]\n"
        % len(text.encode("utf-8", "surrogatepass"))
        if text else ""
        for text in reply[6:8]
    )
    return tuple(reply[:6]) + notices


def _too_large(reply: tuple, size: int, room: int) -> tuple:
    """A `MessageTooLarge` failure in place of `reply`; a failure keeps its
    exception's type name and the start of its message and traceback."""
    seq, ok, data, started, finished = reply[:5]
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
            "bytes (--max-message-size); it was %s: %s" % (size, limit, ename, _clip(evalue, keep))
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
