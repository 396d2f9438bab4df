"""In-process engine channels for testing controller logic without sockets."""

from __future__ import annotations

import time

from zope.interface import implementer

from taskfarm.engine.namespace import Namespace
from taskfarm.errors import TaskAborted, to_wire
from taskfarm.interfaces import IEngineChannel


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
        self.engine = None  # the registry handle, set by the test

    def send(self, commands: list) -> None:
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


@implementer(IEngineChannel)
class InProcessChannel:
    """Runs each command at once on a `Namespace`; replies on the next turn."""

    def __init__(self, clock) -> None:
        self._clock = clock
        self.namespace = Namespace()
        self.engine = None
        self._cancelled: set[int] = set()

    def send(self, commands: list) -> None:
        replies = []
        for seq, op, args in commands:
            if seq in self._cancelled:
                replies.append((seq, False, to_wire(TaskAborted("aborted")), None, time.time()))
                continue
            started = time.time()
            ok, data = self.namespace.run(op, args)
            replies.append((seq, ok, data, started, time.time()))
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
