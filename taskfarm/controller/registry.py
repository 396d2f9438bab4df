"""The engines the controller knows, and the ordered command stream to each.

Every command for an engine (a task, or a MultiEngine call) gets the next
sequence number of that engine and runs there in that order.  Commands sent
during one reactor turn leave together, in as few messages per engine as the
message limit allows; a command that alone exceeds it is answered with
`MessageTooLarge` instead of being sent.  Replies come back in batches too.  When an engine is lost, each of its unanswered
commands is answered with `EngineLost`, so no caller waits forever.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from functools import partial

from twisted.internet import task
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.batching import pickled_size, split_by_size
from taskfarm.errors import EngineLost, InvalidProperty, MessageTooLarge, TaskTimeout, to_wire
from taskfarm.interfaces import IEngineSink

#: The largest engine id handed out, plus one.
MAX_ENGINES = 4096

#: Seconds between pings of each engine, and of silence before it is lost.
DEFAULT_HEARTBEAT_PERIOD = 1.0
DEFAULT_HEARTBEAT_TIMEOUT = 10.0

#: Seconds past a command's time limit that the controller waits for its
#: engine's own answer (the engine interrupts at the limit and gives up 5 s
#: later) before it fails the command itself.
DEFAULT_TIMEOUT_GRACE = 10.0
#: Bytes of a `commands` message beyond its commands' own pickles (the
#: list around them, pickle framing), kept free under the limit.
COMMANDS_OVERHEAD = 512

#: ``on_reply(seq, ok, data, started, finished)``
ReplyCallback = Callable[[int, bool, object, "float | None", float], None]


class EngineState(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    LOST = "lost"


class EngineHandle:
    """The controller's view of one engine."""

    def __init__(
        self,
        registry: EngineRegistry,
        engine_id: int,
        channel,
        properties: dict,
        task_slots: int,
    ) -> None:
        self._registry = registry
        self.engine_id = engine_id
        self.channel = channel
        self.properties = properties
        #: Bumped on every change of `properties`; schedulers cache by it.
        self.properties_version = 0
        #: How many tasks may be sent ahead to this engine at once.
        self.task_slots = task_slots
        #: Moving average of this engine's task run time, in seconds.
        self.mean_duration: float | None = None
        #: seq -> (op, on_reply) of every unanswered command, oldest first.
        self.inflight: dict[int, tuple[str, ReplyCallback]] = {}
        #: seq -> (time limit, on_overdue) of the commands that have one.
        self.time_limits: dict[int, tuple[float, Callable[[int], None]]] = {}
        #: Commands past their limit and grace: failed by the controller, but
        #: their slots stay taken until the engine answers or is lost.
        self.overdue: set[int] = set()
        #: The command the engine is running as far as the controller can
        #: tell (the oldest unanswered one not overdue), and, if it has a
        #: time limit, since when.
        self.head: int | None = None
        self.head_since = 0.0
        self._head_timer = None
        #: When the engine last answered anything (a reply or a ping).
        self.last_heard = 0.0
        #: Seconds of the controller's own running time the engine has been
        #: silent for (a stall of the controller does not count).
        self.silence = 0.0
        self._outbox: list = []
        self._next_seq = 0
        self._lost = False

    @property
    def state(self) -> EngineState:
        if self._lost:
            return EngineState.LOST
        return EngineState.BUSY if self.inflight else EngineState.IDLE

    def send(
        self,
        op: str,
        args: tuple,
        on_reply: ReplyCallback,
        time_limit: float | None = None,
        on_overdue: Callable[[int], None] | None = None,
        engine_timeout: float | None = None,
    ) -> int:
        """Queue one command; it leaves at the end of this reactor turn.

        With `time_limit`, the controller enforces it itself: once the
        command has been the engine's current one for `time_limit` plus the
        grace and no answer came, `on_overdue(seq)` is called.  Its reply, if
        one ever comes, still goes to `on_reply`.  With `engine_timeout`,
        the command carries it (`wire.Command` version 4) and the engine
        interrupts it after that many seconds (a task's is in its args).
        """
        if self._lost:
            raise EngineLost("engine %d is gone" % self.engine_id)
        seq = self._next_seq
        self._next_seq += 1
        self.inflight[seq] = (op, on_reply)
        if time_limit is not None and on_overdue is not None:
            self.time_limits[seq] = (time_limit, on_overdue)
        if engine_timeout is None:
            self._outbox.append((seq, op, args))
        else:
            self._outbox.append((seq, op, args, 4, engine_timeout))
        self._registry._wants_flush(self)
        if self.head is None:
            self._follow_head()  # the stream was idle: this one runs first
        return seq

    def _answered(self, seq: int):
        """Take an answered command off the stream; returns its entry."""
        entry = self.inflight.pop(seq, None)
        self.time_limits.pop(seq, None)
        self.overdue.discard(seq)
        if seq == self.head:
            self._follow_head()
        return entry

    def _follow_head(self) -> None:
        # Commands run in order, so the oldest unanswered one that is not
        # written off is running: its time limit counts from when it became
        # the head here, which is never earlier than it started there.
        # (This runs once per reply: the common case, nothing overdue and
        # no time limits, costs a dict lookup or two.)
        if self.overdue:
            head = next((seq for seq in self.inflight if seq not in self.overdue), None)
        else:
            head = next(iter(self.inflight), None)
        if head == self.head:
            return
        self.head = head
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None
        limit = self.time_limits.get(head) if self.time_limits else None
        if limit is not None:
            clock = self._registry._clock
            self.head_since = clock.seconds()
            delay = limit[0] + self._registry.timeout_grace
            self._head_timer = clock.callLater(delay, self._head_overdue, head)

    def _head_overdue(self, seq: int) -> None:
        self._head_timer = None
        if self._lost or seq not in self.inflight:
            return
        _, on_overdue = self.time_limits.pop(seq)
        self.overdue.add(seq)
        self._registry._log.warn(
            "engine {engine_id} did not answer command {seq} within its time "
            "limit and {grace} s of grace; failing it, and its slot stays taken",
            engine_id=self.engine_id,
            seq=seq,
            grace=self._registry.timeout_grace,
        )
        self._follow_head()
        on_overdue(seq)

    def past_limit(self, seq: int, now: float) -> bool:
        """Whether command `seq` has run past its time limit by `now`."""
        limit = self.time_limits.get(seq)
        return limit is not None and seq == self.head and now - self.head_since > limit[0]

    def _stop_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def interrupt(self, seq: int) -> None:
        """Ask the engine to stop command `seq`; its reply still comes."""
        if not self._lost and seq in self.inflight:
            self.channel.interrupt(seq)

    def cancel(self, seqs: list[int], error: tuple) -> None:
        """Answer queued commands `seqs` with `error` now, and tell the
        engine to drop them if it has not started them."""
        now = self._registry._clock.seconds()
        cancelled = [seq for seq in seqs if seq in self.inflight]
        for seq in cancelled:
            _, callback = self._answered(seq)
            callback(seq, False, error, None, now)
        if cancelled and not self._lost:
            self.channel.cancel(cancelled)

    def observe(self, duration: float, prefetch: float, max_slots: int) -> int | None:
        """Learn from one task's run time; returns a new slot count when the
        engine should hold more or fewer tasks to keep about `prefetch`
        seconds of work queued, else None."""
        mean = self.mean_duration
        mean = duration if mean is None else 0.8 * mean + 0.2 * duration
        self.mean_duration = mean
        wanted = max(1, min(max_slots, math.ceil(prefetch / max(mean, 1e-6))))
        current = self.task_slots
        if wanted != current and (wanted == 1 or not 0.8 * current <= wanted <= 1.25 * current):
            self.task_slots = wanted
            return wanted
        return None

    def update_properties(self, properties: dict) -> None:
        """Replace the properties mirror and tell the schedulers."""
        self.properties = properties
        self.properties_version += 1
        self._registry._properties_changed(self)

    def _flush(self) -> None:
        if self._outbox and not self._lost:
            batch, self._outbox = self._outbox, []
            # Packed once: usually it fits, and that is the message.
            packed = serialization.pack_message(batch)
            if serialization.message_size(packed) <= self._registry.max_message_size:
                self.channel.send(batch, packed)
                return
            for message in self._fit(batch):
                self.channel.send(message)

    def _fit(self, commands: list) -> list[list]:
        """`commands` in messages under the limit: each command's pickle is
        bounded from above, and measured exactly near the limit (a list
        pickles to at most the sum of its items plus `COMMANDS_OVERHEAD`).  One too big alone is not sent: it is answered
        with `MessageTooLarge` on a later turn, so its caller hears of it."""
        room = self._registry.max_message_size - COMMANDS_OVERHEAD
        sent, sizes = [], []
        for command in commands:
            size = pickled_size(command, room)
            if size > room:
                self._refuse(command, size)
            else:
                sent.append(command)
                sizes.append(size)
        return split_by_size(sent, sizes, room)

    def _refuse(self, command: tuple, size: int) -> None:
        seq, op = command[0], command[1]
        entry = self._answered(seq)
        if entry is None:
            return
        limit = self._registry.max_message_size
        self._registry._log.warn(
            "a {op} command of {size} bytes for engine {engine_id} exceeds the "
            "message limit of {limit} bytes; failing it",
            op=op, size=size, engine_id=self.engine_id, limit=limit,
        )
        error = to_wire(
            MessageTooLarge(
                "the %s command of %d bytes exceeds the controller's message limit of "
                "%d bytes (--max-message-size)" % (op, size, limit)
            )
        )
        clock = self._registry._clock
        clock.callLater(0, entry[1], seq, False, error, None, clock.seconds())

    def __repr__(self) -> str:
        return "<engine %d %s>" % (self.engine_id, self.state.value)


class RegistryListener:
    """What the registry tells its listeners; subclass and override."""

    def engine_added(self, engine: EngineHandle) -> None:
        """A new engine can take commands."""

    def engine_removed(self, engine: EngineHandle) -> None:
        """An engine is gone; its unanswered commands fail right after."""

    def properties_changed(self, engine: EngineHandle) -> None:
        """An engine's properties changed."""


@implementer(IEngineSink)
class EngineRegistry:
    """Engine ids, handles and the plumbing of commands and replies."""

    _log = Logger()

    def __init__(
        self,
        clock,
        task_slots: int = 2,
        heartbeat_period: float | None = DEFAULT_HEARTBEAT_PERIOD,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        timeout_grace: float = DEFAULT_TIMEOUT_GRACE,
        max_message_size: int = serialization.DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._clock = clock
        #: Seconds past a command's time limit before the controller fails it.
        self.timeout_grace = timeout_grace
        self.task_slots = task_slots
        #: The largest message an engine accepts (it learns the controller's
        #: limit at hello); every `commands` message is built under it.
        self.max_message_size = max_message_size
        self.engines: dict[int, EngineHandle] = {}
        self._listeners: list[RegistryListener] = []
        self._dirty: dict[int, EngineHandle] = {}
        self._flush_call = None
        self._heartbeat_period = heartbeat_period
        self._heartbeat_timeout = heartbeat_timeout
        self._heartbeat: task.LoopingCall | None = None
        self._last_beat = 0.0

    def add_listener(self, listener: RegistryListener) -> None:
        self._listeners.append(listener)

    def ids(self) -> list[int]:
        return sorted(self.engines)

    def register(
        self, channel, properties: dict, requested_id: int | None = None
    ) -> EngineHandle:
        """Give a new engine an id (the requested one when it is free)."""
        if not isinstance(properties, dict) or not all(
            isinstance(k, str) for k in properties
        ):
            raise InvalidProperty("engine properties must be a dict with str keys")
        if (
            isinstance(requested_id, int)
            and 0 <= requested_id < MAX_ENGINES
            and requested_id not in self.engines
        ):
            engine_id = requested_id
        else:
            engine_id = next(i for i in range(MAX_ENGINES + 1) if i not in self.engines)
            if engine_id == MAX_ENGINES:
                raise InvalidProperty("too many engines (%d)" % MAX_ENGINES)
        engine = EngineHandle(self, engine_id, channel, properties, self.task_slots)
        engine.last_heard = self._clock.seconds()
        self.engines[engine_id] = engine
        self._log.info(
            "engine {engine_id} registered from {host} pid {pid}",
            engine_id=engine_id,
            host=properties.get("hostname"),
            pid=properties.get("pid"),
        )
        for listener in self._listeners:
            listener.engine_added(engine)
        return engine

    # -- IEngineSink ----------------------------------------------------------------

    def replies(self, engine: EngineHandle, replies: list) -> None:
        if self.engines.get(engine.engine_id) is not engine:
            return
        self._heard(engine)
        for reply in replies:
            seq, ok, data, started, finished = reply[:5]
            entry = engine._answered(seq)
            if entry is None:
                continue
            output = _output_of(reply)
            if output is not None:
                # A task's output (`wire.Reply` version 4): only task
                # commands have it, so only their callbacks take it.
                entry[1](seq, ok, data, started, finished, output)
            else:
                entry[1](seq, ok, data, started, finished)

    def engine_lost(self, engine: EngineHandle, reason: str) -> None:
        engine_id = engine.engine_id
        if self.engines.get(engine_id) is not engine:
            return
        del self.engines[engine_id]
        engine._lost = True
        engine._stop_timer()
        self._dirty.pop(engine_id, None)
        self._log.warn(
            "engine {engine_id} lost: {reason}", engine_id=engine_id, reason=reason
        )
        for listener in self._listeners:
            listener.engine_removed(engine)
        error = to_wire(EngineLost("engine %d was lost: %s" % (engine_id, reason)))
        now = self._clock.seconds()
        pending, engine.inflight = engine.inflight, {}
        for seq, (_, callback) in pending.items():
            if engine.past_limit(seq, now):
                # It ran past its own limit before the engine went silent:
                # that is the task's timeout, whatever became of the engine.
                limit = engine.time_limits[seq][0]
                timed_out = TaskTimeout(
                    "the task ran past its timeout of %g s on engine %d, which "
                    "then stopped answering (%s)" % (limit, engine_id, reason)
                )
                callback(seq, False, to_wire(timed_out), engine.head_since, now)
            else:
                callback(seq, False, error, None, now)
        engine.time_limits.clear()
        engine.overdue.clear()

    # -- batching -------------------------------------------------------------------

    def _wants_flush(self, engine: EngineHandle) -> None:
        self._dirty[engine.engine_id] = engine
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send every queued command now."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        dirty, self._dirty = self._dirty, {}
        for engine in dirty.values():
            engine._flush()

    def _properties_changed(self, engine: EngineHandle) -> None:
        for listener in self._listeners:
            listener.properties_changed(engine)

    # -- liveness -----------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat: ping every engine, drop the silent ones."""
        if self._heartbeat_period:
            self._last_beat = self._clock.seconds()
            self._heartbeat = task.LoopingCall(self._beat)
            self._heartbeat.clock = self._clock
            self._heartbeat.start(self._heartbeat_period, now=False)

    def _beat(self) -> None:
        # Silence is counted in the controller's own running time: a beat
        # that comes late (the controller was paused, or busy) adds at most
        # one period, so a stall of ours never passes for the engines' loss.
        now = self._clock.seconds()
        elapsed = min(now - self._last_beat, self._heartbeat_period)
        since, self._last_beat = self._last_beat, now
        for engine in list(self.engines.values()):
            if engine.last_heard >= since:
                engine.silence = min(now - engine.last_heard, elapsed)
            else:
                engine.silence += elapsed
            if engine.silence > self._heartbeat_timeout:
                self.engine_lost(
                    engine,
                    "no answer for %.1f s (hung, stopped or unreachable)" % engine.silence,
                )
                engine.channel.disconnect()
            else:
                engine.channel.ping(partial(self._heard, engine))

    def _heard(self, engine: EngineHandle) -> None:
        engine.last_heard = self._clock.seconds()
        engine.silence = 0.0

    def stop(self) -> None:
        """Cancel the heartbeat and pending flush; used when the controller stops."""
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        for engine in self.engines.values():
            engine._stop_timer()


def _output_of(reply: tuple) -> tuple[str, str] | None:
    """``(stdout, stderr)`` of a reply, parsed (`wire.Reply`) or plain
    (version 4: the five fields, 4, stdout, stderr); None without output."""
    if isinstance(reply, wire.Reply):
        if reply.stdout is None and reply.stderr is None:
            return None
        return (reply.stdout or "", reply.stderr or "")
    if len(reply) == 8:
        return (reply[6], reply[7])
    return None
