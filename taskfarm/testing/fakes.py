"""In-process fakes for testing controller logic without sockets or processes:
engine channels and a depend-predicate evaluator."""

from __future__ import annotations

import pickle
import time

from twisted.internet import defer
from zope.interface import implementer

from taskfarm import wire
from taskfarm.controller.depend_child import ReadRecorder, describe
from taskfarm.controller.predicates import Verdict
from taskfarm.engine.namespace import Namespace
from taskfarm.errors import TaskAborted, to_wire
from taskfarm.interfaces import IEngineChannel, IPredicateEvaluator


@implementer(IEngineChannel)
class ScriptedChannel:
    """Records commands; the test answers them with `reply` / `fail`."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []
        #: Each `commands` message as sent (a list of commands).
        self.messages: list[list] = []
        self.interrupted: list[int] = []
        self.cancelled: list[int] = []
        self.disconnected = False
        self.pings = 0
        self.properties_sent: list[bytes] = []
        #: Set False to play a hung engine.
        self.answers_pings = True
        self.engine = None  # the registry handle (`registered` sets it)

    @classmethod
    def registered(cls, registry, properties: dict | None = None) -> ScriptedChannel:
        """A new channel, registered with `registry` as an engine with these
        properties; its handle is `channel.engine`."""
        channel = cls()
        channel.engine = registry.register(channel, dict(properties or {}))
        return channel

    def send(self, commands: list, packed: bytes | None = None) -> None:
        self.messages.append(list(commands))
        self.sent.extend(commands)

    def interrupt(self, seq: int) -> None:
        self.interrupted.append(seq)

    def cancel(self, seqs: list[int]) -> None:
        self.cancelled.extend(seqs)

    def set_properties(self, blob: bytes) -> None:
        self.properties_sent.append(blob)

    def ping(self, on_answer) -> None:
        self.pings += 1
        if self.answers_pings:
            on_answer()

    def disconnect(self) -> None:
        self.disconnected = True

    def pending(self) -> list[tuple]:
        """Commands sent and not yet answered."""
        return [c for c in self.sent if c[0] in self.engine.inflight]

    def reply(self, seq: int, ok: bool = True, data: object = b"", started=0.0, finished=1.0):
        """Answer command `seq` through the registry, as an engine would."""
        self.engine._registry.replies(self.engine, [(seq, ok, data, started, finished)])

    def fail(self, seq: int, error: BaseException):
        self.reply(seq, False, to_wire(error))


def run_commands(namespace: Namespace, commands: list, aborted: set[int]) -> list[tuple]:
    """The replies of an engine that runs `commands` at once on `namespace`;
    those whose seq is in `aborted` are answered as aborted, unrun."""
    replies = []
    for seq, op, args, *_ in commands:  # a timeout (version 4) is not kept here
        if seq in aborted:
            replies.append((seq, False, to_wire(TaskAborted("aborted")), None, time.time()))
            continue
        started = time.time()
        ok, data = namespace.run(op, args)
        output = namespace.take_output()
        replies.append(
            wire.Reply(seq, ok, data, started, time.time(), *(output or (None, None))).plain()
        )
    return replies


@implementer(IEngineChannel)
class InProcessChannel:
    """Runs each command at once on a `Namespace`; replies on the next turn.

    `hold()` keeps the commands sent from then on, unanswered, until
    `release()` runs them (a busy engine).
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self.namespace = Namespace()
        self.engine = None
        self._cancelled: set[int] = set()
        self._held: list | None = None

    def hold(self) -> None:
        """Keep the commands sent from now on until `release`."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Run the held commands, in order, and stop holding."""
        held, self._held = self._held, None
        if held:
            self.send(held)

    def send(self, commands: list, packed: bytes | None = None) -> None:
        if self._held is not None:
            self._held.extend(commands)
            return
        replies = run_commands(self.namespace, commands, self._cancelled)
        self._clock.callLater(0, self.engine._registry.replies, self.engine, replies)

    def interrupt(self, seq: int) -> None:
        self._cancelled.add(seq)

    def cancel(self, seqs: list[int]) -> None:
        self._cancelled.update(seqs)

    def set_properties(self, blob: bytes) -> None:
        from taskfarm import serialization

        self.namespace.set_properties(serialization.unpack(blob))

    def ping(self, on_answer) -> None:
        self._clock.callLater(0, on_answer)

    def disconnect(self) -> None:
        self._clock.callLater(0, self.engine._registry.engine_lost, self.engine, "disconnected")


@implementer(IPredicateEvaluator)
class InProcessEvaluator:
    """Runs `depend` predicates in this process: for tests on a `task.Clock` only.

    It answers like `taskfarm.controller.predicates.PredicatePool` (the
    same verdicts and reasons, on the clock's next turn, never at once),
    without processes, so it has no timeout.  `load` turns a key into the
    predicate (default: unpickle it); `calls` and `loads` count per key.
    """

    def __init__(self, clock, load=None) -> None:
        self._clock = clock
        self._load = load or pickle.loads
        self.running = False
        #: key -> how often its predicate ran / was loaded.
        self.calls: dict[bytes, int] = {}
        self.loads: dict[bytes, int] = {}
        #: key -> (predicate, None) or (None, why it cannot be loaded).
        self._loaded: dict[bytes, tuple] = {}

    def start(self) -> None:
        self.running = True

    def stop(self) -> defer.Deferred:
        self.running = False
        return defer.succeed(None)

    def evaluate(self, key: bytes, properties: dict, trace: bool = False) -> defer.Deferred:
        if self.running:
            verdict = self._verdict(key, dict(properties), trace)
        else:
            verdict = Verdict(False, "the depend evaluator is not running")
        d: defer.Deferred = defer.Deferred()
        self._clock.callLater(0, d.callback, verdict)
        return d

    def _verdict(self, key: bytes, properties: dict, trace: bool = False) -> Verdict:
        if key not in self._loaded:
            self.loads[key] = self.loads.get(key, 0) + 1
            try:
                predicate = self._load(key)
            except BaseException as e:
                self._loaded[key] = (None, "cannot load: " + describe(e))
            else:
                self._loaded[key] = (predicate, None) if callable(predicate) else (
                    None,
                    "cannot load: the depend is a %s, not a function" % type(predicate).__name__,
                )
        predicate, why = self._loaded[key]
        if predicate is None:
            return Verdict(False, why, False)
        self.calls[key] = self.calls.get(key, 0) + 1
        recorder = ReadRecorder(properties) if trace else None
        read = None
        try:
            accepted = bool(predicate(properties if recorder is None else recorder))
            reason = None
        except BaseException as e:
            accepted, reason = False, "raised " + describe(e)
        if recorder is not None:
            read = tuple(recorder.names())
        return Verdict(accepted, reason, True, read)


class RecordingWorker:
    """Stands in for an engine's `CommandWorker` (no thread): records what
    the engine's link asks of it; `reply` answers through the current
    session's sink, as the worker does once a command has run."""

    def __init__(self) -> None:
        self.namespace = Namespace()
        self.received: list[tuple] = []
        self.interrupted: list[int] = []
        self.cancelled: list[int] = []
        #: (engine id) per `begin_session`, and how many sessions ended.
        self.sessions: list[int] = []
        self.ended = 0
        self.sink = None

    def begin_session(self, engine_id: int, sink) -> None:
        self.end_session()
        self.sink = sink
        self.sessions.append(engine_id)
        self.namespace.set_engine_id(engine_id)

    def end_session(self) -> None:
        if self.sink is not None:
            self.ended += 1
        self.sink = None

    def receive(self, commands: list) -> None:
        self.received.extend(commands)

    def interrupt(self, seq: int) -> None:
        self.interrupted.append(seq)

    def cancel(self, seqs: list[int]) -> None:
        self.cancelled.extend(seqs)

    def reply(self, replies: list) -> None:
        self.sink(replies)
