"""How a client sends tasks: pipelined, batched, confirmed.

`run` should not cost a network round trip.  The controller sets aside a
block of task ids for the client (a *lease*, `reserve`); while the lease
lasts, `run` takes the next id, queues the task and answers at once.
A task leaves at once when no batch is on its way to the controller;
otherwise queued tasks leave together, within `FLUSH_DELAY` or before the
client's next call, whichever comes first, so the controller always sees a
task before any question about it.  Each batch is acknowledged once the
controller has journaled it; `confirm()` waits for that.  A batch that fails
for good (not merely a lost connection, which is retried) makes the next
`confirm()` raise, and every later question about its ids raises too.

Tasks arrive here sized (`pack_envelope`), so each one's size is known:
batches are built under the controller's message limit, and a task that
alone exceeds it is refused at its own `run` with `MessageTooLarge`, before
it takes an id, leaving the tasks beside it alone.  A batch is pickled as
one message, so a function that its map tasks share travels once.
"""

from __future__ import annotations

import collections
import threading
import uuid

from twisted.internet import defer
from twisted.logger import Logger

from taskfarm import serialization, wire
from taskfarm.batching import pickled_size, pickled_size_bound, split_by_size
from taskfarm.errors import ConnectionLost, MessageTooLarge, SerializationError
from taskfarm.wire import MAX_RECOVERY_CHAIN

#: Ids reserved at first, and at most, per `reserve` call.
FIRST_LEASE = 64
MAX_LEASE = 8192

#: The most ids asked for in one `reserve` call (the controller allows up
#: to 100,000); a bigger `run_many` takes several leases.
MAX_RESERVE = 65_536

#: Bytes of a submission beyond its packed tasks: the token and the list
#: around them (`SUBMIT_OVERHEAD`), and per task its id and framing.
SUBMIT_OVERHEAD = 512
PER_TASK_OVERHEAD = 24

#: Queued tasks leave within this many seconds, or once this many are
#: queued, or at once when the client asks anything else: a loop of `run`
#: calls then costs one message per batch, and a question never waits.
FLUSH_DELAY = 0.002
MAX_BATCH = 1000

#: How many failed task ids are remembered for later questions.
MAX_REMEMBERED_FAILURES = 100_000


class Submitter:
    """Sends one client's tasks through a `ControllerConnection`."""

    _log = Logger()

    def __init__(self, connection, reactor) -> None:
        self._connection = connection
        self._reactor = reactor
        #: Queued (envelope, id), sent at the end of the turn.
        self._queue: list[tuple] = []
        self._queued_bytes = 0
        #: Submissions waiting for ids: (envelopes, waiter, whole batch?).
        self._waiting: collections.deque = collections.deque()
        self._flush_call = None
        self._leases: collections.deque = collections.deque()
        #: Guards `_leases`: `run_from_thread` takes ids in a caller's thread.
        self._lease_lock = threading.Lock()
        #: Counts the controller's forgetting (`_controller_forgot`): an id
        #: taken in another thread before it means nothing after it.
        self._lease_epoch = 0
        self._lease_size = FIRST_LEASE
        self._reserving = False
        self._in_flight: set[defer.Deferred] = set()
        self._error: BaseException | None = None
        self._failed: collections.OrderedDict[int, BaseException] = collections.OrderedDict()
        connection.on_new_incarnation.append(self._controller_forgot)

    # -- submitting ---------------------------------------------------------------

    def run(self, envelope: PackedTask) -> defer.Deferred:
        """Queue one packed task; fires with its id (at once while a lease
        lasts), or fails with `MessageTooLarge` if it can never be sent."""
        if not self._waiting and self._available() >= 1:
            error = self._too_large([envelope])
            if error is not None:
                return defer.fail(error)
            taskid = self._take(1)[0]
            self._enqueue((envelope, taskid))
            self._top_up()
            return defer.succeed(taskid)
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append(([envelope], waiter, False))
        self._top_up()
        return waiter

    def run_from_thread(self, envelope: PackedTask) -> int | None:
        """`run` for a thread other than the reactor's (the blocking
        client): while a lease lasts, take the task's id here and hand the
        task to the reactor without waiting for it (one thread hop, not a
        round trip).  Returns the id, or None when `run` must decide (no
        lease, submissions waiting for ids, or a task near the size limit).

        The reactor's thread queue keeps order: the task is queued before
        any call this thread makes next, so the controller sees it first.
        """
        if len(envelope) > self._room() - PER_TASK_OVERHEAD:
            return None  # `run` measures it and may refuse it
        with self._lease_lock:
            if self._waiting or not self._leases:
                return None
            lease = self._leases[0]
            taskid = lease[0]
            lease[0] += 1
            if lease[0] >= lease[1]:
                self._leases.popleft()
            epoch = self._lease_epoch
        self._reactor.callFromThread(self._queue_taken, envelope, taskid, epoch)
        return taskid

    def _queue_taken(self, envelope: PackedTask, taskid: int, epoch: int) -> None:
        if epoch != self._lease_epoch:
            # Its id was leased by a controller that has since forgotten it.
            self._lost([taskid])
            return
        self._enqueue((envelope, taskid))
        self._top_up()

    def run_many(self, envelopes: list[PackedTask]) -> defer.Deferred:
        """Send packed tasks now; fires with their ids once all are accepted.

        They leave in as many messages as the limit needs.  If one task
        alone exceeds it, none is sent and this fails with `MessageTooLarge`.
        """
        waiter: defer.Deferred = defer.Deferred()
        if not envelopes:
            waiter.callback([])
            return waiter
        self._waiting.append((list(envelopes), waiter, True))
        self._serve_waiting()
        self._top_up()
        return waiter

    def _room(self) -> int:
        """Bytes of packed tasks one submission may carry."""
        return self._connection.max_message_size - SUBMIT_OVERHEAD

    def _too_large(self, envelopes: list[PackedTask]) -> MessageTooLarge | None:
        """The error for the first task too big for any submission, if any.
        Only asked once ids are leased, so the limit is the controller's."""
        room = self._room() - PER_TASK_OVERHEAD
        for index, task in enumerate(envelopes):
            # The bound first; the exact size only near the limit.
            if len(task) > room and pickled_size(task.envelope, room) > room:
                which = "a task" if len(envelopes) == 1 else "task %d of the batch" % index
                return MessageTooLarge(
                    "a submit request for %s of %d bytes exceeds the controller's "
                    "limit of %d bytes (--max-message-size); nothing was sent"
                    % (which, serialization.packed_size(task.envelope), self._connection.max_message_size)
                )
        return None

    # Ids come from leases only, taken in increasing order, so a client's
    # task ids grow in the order it submits them.

    def _available(self) -> int:
        with self._lease_lock:
            return sum(end - start for start, end in self._leases)

    def _take(self, count: int) -> list[int]:
        ids: list[int] = []
        with self._lease_lock:
            while len(ids) < count:
                lease = self._leases[0]
                n = min(count - len(ids), lease[1] - lease[0])
                ids.extend(range(lease[0], lease[0] + n))
                lease[0] += n
                if lease[0] >= lease[1]:
                    self._leases.popleft()
        return ids

    def _serve_waiting(self) -> None:
        while self._waiting and self._available() >= len(self._waiting[0][0]):
            envelopes, waiter, whole_batch = self._waiting.popleft()
            error = self._too_large(envelopes)
            if error is not None:
                waiter.errback(error)
                continue
            ids = self._take(len(envelopes))
            if whole_batch:
                self.flush()
                # Its caller hears of a failure; nobody else needs to.
                self._send_all(envelopes, ids).chainDeferred(waiter)
            else:
                self._enqueue((envelopes[0], ids[0]))
                waiter.callback(ids[0])

    def _send_all(self, envelopes: list[PackedTask], ids: list[int]) -> defer.Deferred:
        """Send a `run_many` batch in messages that fit; fires with all ids."""
        sizes = [len(e) + PER_TASK_OVERHEAD for e in envelopes]
        parts = [
            self._send([e for e, _ in run], [i for _, i in run], remember=False)
            for run in split_by_size(list(zip(envelopes, ids, strict=True)), sizes, self._room())
        ]
        d = defer.gatherResults(parts, consumeErrors=True)
        d.addCallbacks(lambda answers: [i for answer in answers for i in answer],
                       lambda failure: failure.value.subFailure)
        return d

    def _top_up(self) -> None:
        """Reserve more ids when the leases run low or someone waits."""
        needed = sum(len(envelopes) for envelopes, _, _ in self._waiting)
        if self._reserving or self._available() - needed >= self._lease_size // 4:
            return
        self._reserving = True
        # Several leases serve a batch bigger than one reserve call allows.
        size = min(max(self._lease_size, needed - self._available()), MAX_RESERVE)
        self._lease_size = min(self._lease_size * 2, MAX_LEASE)
        d = defer.Deferred.fromCoroutine(self._connection.call("reserve", size, retry=True))

        def leased(first: int) -> None:
            self._reserving = False
            with self._lease_lock:
                self._leases.append([first, first + size])
            self._serve_waiting()
            self._top_up()

        def refused(failure) -> None:
            self._reserving = False
            waiting, self._waiting = self._waiting, collections.deque()
            for _, waiter, _ in waiting:
                waiter.errback(failure)

        d.addCallbacks(leased, refused)

    def _enqueue(self, entry: tuple) -> None:
        size = len(entry[0]) + PER_TASK_OVERHEAD
        if self._queue and self._queued_bytes + size > self._room():
            self.flush()  # this one would not fit in the same message
        self._queue.append(entry)
        self._queued_bytes += size
        if len(self._queue) >= MAX_BATCH or not self._in_flight:
            # Nothing on its way: a lone task leaves at once.  While a batch
            # is in flight the next ones gather for FLUSH_DELAY, so a loop
            # of `run` still costs one message per batch.
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._reactor.callLater(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Send every queued task now (before any other call leaves)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        queue, self._queue = self._queue, []
        self._queued_bytes = 0
        if queue:
            sent = self._send([entry[0] for entry in queue], [entry[1] for entry in queue])
            # A failure reaches `confirm` and `check`.
            sent.addErrback(lambda _: None)

    def _send(self, envelopes: list[PackedTask], ids: list[int], remember: bool = True) -> defer.Deferred:
        """Submit one message; whatever fails in it (here or on the
        controller) fails exactly its tasks, never silently."""
        d = defer.Deferred.fromCoroutine(self._submit(envelopes, ids))
        self._in_flight.add(d)
        answer: defer.Deferred = defer.Deferred()

        def accepted(got_ids):
            self._in_flight.discard(d)
            answer.callback(got_ids)

        def refused(failure):
            self._in_flight.discard(d)
            if remember:
                self._error = self._error or failure.value
                for taskid in ids:
                    self._failed[taskid] = failure.value
                while len(self._failed) > MAX_REMEMBERED_FAILURES:
                    self._failed.popitem(last=False)
            answer.errback(failure)

        d.addCallbacks(accepted, refused)
        return answer

    async def _submit(self, envelopes: list[PackedTask], ids: list[int]) -> list[int]:
        # The token makes a resubmission after a lost connection harmless.
        envelopes = [task.envelope for task in envelopes]
        request = serialization.pack_message(wire.Submission(uuid.uuid4().hex, envelopes, ids).plain())
        return await self._connection.call("submit", request, retry=True)

    def _controller_forgot(self) -> None:
        """The controller restarted without its journal: ids reserved before
        mean nothing now, and batches not yet acknowledged are lost."""
        with self._lease_lock:
            self._leases.clear()
            self._lease_epoch += 1
        self._queue, queued = [], self._queue
        self._queued_bytes = 0
        self._lost([taskid for _, taskid in queued])

    def _lost(self, taskids: list[int]) -> None:
        lost = ConnectionLost(
            "the controller restarted without a journal (--no-journal): tasks "
            "sent to it before are lost"
        )
        self._error = self._error or lost
        for taskid in taskids:
            self._failed[taskid] = lost

    # -- confirmation ----------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether some task is queued or not yet acknowledged."""
        return bool(self._queue or self._in_flight)

    async def confirm(self) -> None:
        """Wait until every task sent so far is accepted; raise (once) the
        error of a batch that was refused."""
        self.flush()
        while self._in_flight:
            waits = [_observe(d) for d in list(self._in_flight)]
            await defer.DeferredList(waits, consumeErrors=True)
        error, self._error = self._error, None
        if error is not None:
            raise error

    def check(self, taskids: list[int]) -> None:
        """Raise the submission error of any of `taskids` that was refused."""
        if self._failed:
            for taskid in taskids:
                error = self._failed.get(taskid)
                if error is not None:
                    if error is self._error:
                        self._error = None  # told now; `confirm` need not repeat it
                    raise error


class PackedTask:
    """A task envelope checked for sending, with a bound of its packed
    size as its `len` (what batching needs, without pickling it here)."""

    __slots__ = ("envelope", "size")

    def __init__(self, envelope: tuple, size: int) -> None:
        self.envelope = envelope
        self.size = size

    def __len__(self) -> int:
        return self.size


def pack_envelope(envelope: tuple) -> PackedTask:
    """A task envelope ready for a submission; `SerializationError` if
    pickle could not carry it (too deeply nested, say)."""
    try:
        return PackedTask(envelope, pickled_size_bound(envelope))
    except RecursionError:
        raise SerializationError(
            "the task is nested too deeply to pickle (a recovery chain of %d "
            "tasks at most is allowed)" % MAX_RECOVERY_CHAIN
        ) from None
    except Exception as e:
        raise SerializationError(
            "cannot pack the task: %s: %s" % (type(e).__name__, e)
        ) from None


def _observe(d: defer.Deferred) -> defer.Deferred:
    """A fresh Deferred that fires when `d` does (never hand one to two)."""
    fresh: defer.Deferred = defer.Deferred()

    def relay(result):
        fresh.callback(None)
        return result

    d.addBoth(relay)
    return fresh
