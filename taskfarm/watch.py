"""Learning which of many tasks have finished, in batches: the one loop
behind futures, ``as_completed`` and progress bars.

A `Watcher` belongs to one Deferred `TaskClient` and runs in its reactor.
It asks the controller for the result envelopes of every task it still
watches in one ``results`` request per message-sized slice (unfinished
tasks answer None), never one request per task.  Between rounds it pauses,
from `MIN_PAUSE` doubling up to `MAX_PAUSE` while nothing finishes; a
blocking ``wait`` on the oldest watched task (tasks mostly finish in
submission order) ends a pause early, so the common case is seen at once
and a task finishing out of order within `MAX_PAUSE`.  A round asks about
the oldest `WINDOW` watched tasks only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from taskfarm import serialization, wire
from taskfarm.clientbase import gather

#: Seconds between rounds: the first pause, and the longest.
MIN_PAUSE = 0.01
MAX_PAUSE = 0.25

#: The most ids one round asks about: the oldest watched.  A task further
#: on that finishes early is seen once the tasks before it have finished
#: (tasks mostly finish in submission order), and a round stays small.
WINDOW = 10_000


class Watcher:
    """Watches task ids of one client; calls ``on_finished(envelope)`` (a
    `wire.ResultEnvelope`) once per task as it finishes, and
    ``on_error(error)`` if the controller cannot be asked (the watched ids
    are dropped then).  With `clear`, delivered tasks are cleared on the
    controller.  States: idle (nothing watched), polling, stopped."""

    _log = Logger()

    def __init__(
        self,
        client,
        on_finished: Callable[[wire.ResultEnvelope], None],
        on_error: Callable[[BaseException], None] | None = None,
        clear: bool = False,
        min_pause: float = MIN_PAUSE,
        max_pause: float = MAX_PAUSE,
        window: int = WINDOW,
    ) -> None:
        self._client = client
        self._clock = client._reactor
        self._on_finished = on_finished
        self._on_error = on_error
        self._clear = clear
        self._min_pause = min_pause
        self._max_pause = max_pause
        self._window = window
        self._watched: set[int] = set()
        self.state = "idle"
        #: The round in progress (a Deferred), while polling.
        self._loop: defer.Deferred | None = None
        #: The pause's end: fired by its timer, a new id, `stop` or the oldest task.
        self._wake: defer.Deferred | None = None
        self._timer = None
        #: The blocking ``wait`` on the oldest watched task, and that task.
        self._held: defer.Deferred | None = None
        self._held_id: int | None = None

    @property
    def watched(self) -> frozenset[int]:
        """The ids still watched."""
        return frozenset(self._watched)

    def add(self, taskids: Iterable[int]) -> None:
        """Watch these ids too (each is reported once, when final)."""
        if self.state == "stopped":
            raise RuntimeError("this watcher is stopped")
        self._watched.update(taskids)
        if self.state == "idle" and self._watched:
            self.state = "polling"
            self._loop = defer.Deferred.fromCoroutine(self._run())
            self._loop.addErrback(self._crashed)
        else:
            self._end_pause()

    def discard(self, taskids: Iterable[int]) -> None:
        """Stop watching these ids (they are not reported)."""
        self._watched.difference_update(taskids)

    def stop(self) -> None:
        """Stop for good: nothing more is reported."""
        self.state = "stopped"
        self._watched.clear()
        self._end_pause()
        held, self._held = self._held, None
        if held is not None:
            held.cancel()

    async def _run(self) -> None:
        pause = self._min_pause
        while self._watched and self.state == "polling":
            try:
                finished = await self._round(sorted(self._watched)[: self._window])
            except Exception as e:
                if self.state != "polling":
                    return
                self._fail(e)
                return
            if self.state != "polling":
                return
            pause = self._min_pause if finished else min(pause * 2, self._max_pause)
            if self._watched:
                await self._pause(pause)
        if self.state == "polling":
            self.state = "idle"

    async def _round(self, taskids: list[int]) -> int:
        """Ask about every id once; report the finished ones; how many."""
        client = self._client
        answers = await gather(client._fetch(part) for part in client._id_slices(taskids))
        finished = [
            env for answer in answers for env in answer
            if env is not None and env.taskid in self._watched
        ]
        # Found in one round: in the order the engines finished them.
        finished.sort(key=_finishing_order)
        delivered = []
        for envelope in finished:
            if envelope.taskid not in self._watched:
                continue  # discarded (or the watcher stopped) by a listener
            self._watched.discard(envelope.taskid)
            delivered.append(envelope.taskid)
            try:
                self._on_finished(envelope)
            except Exception:
                self._log.failure("a watcher's listener failed on task {taskid}", taskid=envelope.taskid)
        if delivered and self._clear:
            # Not awaited: the next round asks only about other ids.
            defer.Deferred.fromCoroutine(client._clear_fetched(delivered))
        return len(delivered)

    def _pause(self, seconds: float) -> defer.Deferred:
        # Kept here too: the held wait may answer (and end the pause) at once.
        wake = self._wake = defer.Deferred()
        self._timer = self._clock.callLater(seconds, self._end_pause)
        oldest = min(self._watched)
        if self._held is None or self._held_id not in self._watched:
            if self._held is not None:
                self._held.cancel()
            self._held_id = oldest
            self._held = defer.Deferred.fromCoroutine(
                self._client._ask_until_answered([oldest], "wait", serialization.pack([oldest]))
            )
            self._held.addBoth(self._held_answered, self._held)
        return wake

    def _held_answered(self, result, held: defer.Deferred):
        if self._held is held:
            self._held = None
            self._end_pause()
        # An error (the id was cleared, the link broke) shows in the next round.
        return None

    def _end_pause(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.callback(None)

    def _fail(self, error: BaseException) -> None:
        self._watched.clear()
        self.state = "idle"
        if self._on_error is not None:
            self._on_error(error)
        else:
            self._log.warn("a watcher stopped: {error}", error=error)

    def _crashed(self, failure):
        self._log.failure("a watcher crashed", failure)
        self.state = "idle"


def _finishing_order(envelope: wire.ResultEnvelope) -> tuple:
    # A task that never ran (aborted while queued) has no completion time.
    return (envelope.completed if envelope.completed is not None else float("-inf"), envelope.taskid)


async def watch_all(client, taskids: list[int], on_finished=None) -> dict[int, wire.ResultEnvelope]:
    """Wait until every task in `taskids` is final; their envelopes by id.
    `on_finished(envelope)` is called for each as it comes.  Cancelling
    stops the watching."""
    envelopes: dict[int, wire.ResultEnvelope] = {}
    if not taskids:
        return envelopes
    done: defer.Deferred = defer.Deferred(lambda _d: watcher.stop())

    def finished(envelope) -> None:
        envelopes[envelope.taskid] = envelope
        if on_finished is not None:
            on_finished(envelope)
        if not watcher.watched and not done.called:
            done.callback(envelopes)

    def failed(error: BaseException) -> None:
        if not done.called:
            done.errback(error)

    watcher = Watcher(client, finished, failed)
    watcher.add(taskids)
    try:
        return await done
    finally:
        watcher.stop()

