"""Which queued task goes to which engine: the FIFO scheduler and a subclass.

Queued tasks are grouped by their `depend` predicate (tasks without one form
the ``None`` group).  Each group keeps its own queue.  Whether a group's
predicate accepts an engine is asked of an `IPredicateEvaluator` (child
processes: the predicate is user code and never runs here) once per engine
properties version and cached, so scheduling costs O(groups) per decision,
never O(tasks).  Without `depend` there is one group and each task costs O(1).

Decisions stay synchronous: a verdict not known yet is asked for and counts
as "not yet" (the group is neither served nor unmet); when verdicts arrive
the scheduler calls its `watch` callback, and the controller runs a pass.

A task that just failed on an engine may name it in ``avoid_engine`` (the
failure penalty, set and cleared by the dispatcher): the scheduler does not
give it to that engine while another engine that accepts it has a free
slot; when none has, the avoided engine takes it after all.

To write another policy, subclass `FIFOScheduler` and override
`new_queue` (and, for a different order, `order_key`); see
`PriorityScheduler`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable

from twisted.logger import Logger
from zope.interface import implementer

from taskfarm.controller.predicates import Verdict
from taskfarm.interfaces import IScheduler

#: Depend keys whose verdicts are kept after their last task left.
MAX_REMEMBERED = 1024


class FifoQueue:
    """First in, first out; entries are ``(order_key, task)``."""

    def __init__(self) -> None:
        self._items: deque = deque()

    def push(self, key, task) -> None:
        self._items.append((key, task))

    def peek(self):
        """The first live entry, or None."""
        items = self._items
        while items and not items[0][1].is_queued:
            items.popleft()
        return items[0] if items else None

    def pop(self):
        entry = self.peek()
        self._items.popleft()
        return entry

    def live_tasks(self) -> list:
        return [task for _, task in self._items if task.is_queued]


class HeapQueue(FifoQueue):
    """Smallest `order_key` first."""

    def __init__(self) -> None:
        self._items: list = []

    def push(self, key, task) -> None:
        heapq.heappush(self._items, (key, id(task), task))

    def peek(self):
        items = self._items
        while items and not items[0][2].is_queued:
            heapq.heappop(items)
        return (items[0][0], items[0][2]) if items else None

    def pop(self):
        entry = self.peek()
        heapq.heappop(self._items)
        return entry

    def live_tasks(self) -> list:
        return [task for _, _, task in sorted(self._items) if task.is_queued]


class Verdicts:
    """What is known of one predicate: a verdict per engine, the requests in
    flight, and why it cannot be loaded (if so)."""

    __slots__ = ("matches", "pending", "broken", "warned")

    def __init__(self) -> None:
        #: engine_id -> (properties_version, accepted, reason)
        self.matches: dict[int, tuple[int, bool, str | None]] = {}
        #: engine_id -> properties_version asked for
        self.pending: dict[int, int] = {}
        #: Why the predicate cannot be loaded; None while it can.
        self.broken: str | None = None
        self.warned = False


class DependGroup:
    """Queued tasks that share one `depend` predicate (or none)."""

    __slots__ = ("key", "queue", "size", "verdicts")

    def __init__(self, key: bytes | None, queue, verdicts: Verdicts) -> None:
        self.key = key
        self.queue = queue
        self.size = 0
        self.verdicts = verdicts


@implementer(IScheduler)
class FIFOScheduler:
    """Runs tasks in the order they were queued, on any engine that accepts them.

    Engines are served round robin, one slot at a time, so a burst of tasks
    spreads evenly.  `depend` predicates are evaluated by `evaluator` (an
    `IPredicateEvaluator`); one that fails (raises, times out, cannot be
    loaded) counts as False.  Without an evaluator, tasks with a depend
    cannot be placed and are listed by `broken_groups`.
    """

    _log = Logger()

    def __init__(self, evaluator=None):
        self._evaluator = evaluator
        self._groups: dict[bytes | None, DependGroup] = {}
        #: Verdicts of keys without queued tasks now, newest last.
        self._remembered: OrderedDict[bytes, Verdicts] = OrderedDict()
        #: Keys of live groups whose predicate cannot be loaded.
        self._broken: set[bytes] = set()
        self._engines: dict[int, object] = {}
        self._free: dict[int, int] = {}
        #: Slots each engine may hold now (free ones are in `_free`).
        self._slots: dict[int, int] = {}
        self._arrivals = itertools.count()
        self._changed: Callable[[], None] = lambda: None
        self.ntasks = 0
        self._passed_over = False

    # -- the policy hooks -------------------------------------------------------

    def new_queue(self):
        """The queue each depend group keeps its tasks in."""
        return FifoQueue()

    def order_key(self, task, arrival: int):
        """Smaller runs first among groups; FIFO uses arrival order."""
        return arrival

    # -- IScheduler ---------------------------------------------------------------

    @property
    def nengines(self) -> int:
        return len(self._engines)

    @property
    def evaluator(self):
        """The `IPredicateEvaluator` depend predicates run in (or None)."""
        return self._evaluator

    def free_slots(self, engine_id: int) -> int:
        """How many more tasks engine `engine_id` may take now (0 if unknown)."""
        return self._free.get(engine_id, 0)

    def slots(self, engine_id: int) -> int:
        """How many tasks engine `engine_id` may hold at once (0 if unknown)."""
        return self._slots.get(engine_id, 0)

    def add_task(self, task) -> None:
        key = task.spec.depend
        group = self._groups.get(key)
        if group is None:
            verdicts = self._remembered.pop(key, None) or Verdicts()
            group = self._groups[key] = DependGroup(key, self.new_queue(), verdicts)
            if key is not None and self._evaluator is None:
                verdicts.broken = "this scheduler has no depend evaluator"
            if verdicts.broken is not None:
                self._broken.add(key)
        group.queue.push(self.order_key(task, next(self._arrivals)), task)
        group.size += 1
        self.ntasks += 1
        task.group = group

    def remove_task(self, task) -> None:
        # The entry stays in its queue and is skipped once the task is not
        # queued any more; only the counts change here.
        group = task.group
        if group is not None:
            group.size -= 1
            self.ntasks -= 1
            task.group = None
            self._forget_if_empty(group)

    def add_engine(self, engine) -> None:
        self._engines[engine.engine_id] = engine
        self._free[engine.engine_id] = engine.task_slots
        self._slots[engine.engine_id] = engine.task_slots

    def remove_engine(self, engine_id: int) -> None:
        self._engines.pop(engine_id, None)
        self._free.pop(engine_id, None)
        self._slots.pop(engine_id, None)
        # Ids are reused by new engines, whose versions start again.
        for group in self._groups.values():
            group.verdicts.matches.pop(engine_id, None)
            group.verdicts.pending.pop(engine_id, None)
        for verdicts in self._remembered.values():
            verdicts.matches.pop(engine_id, None)
            verdicts.pending.pop(engine_id, None)

    def resize(self, engine_id: int, slots: int) -> None:
        if engine_id in self._free:
            self._free[engine_id] += slots - self._slots[engine_id]
            self._slots[engine_id] = slots

    def release(self, engine_id: int) -> None:
        if engine_id in self._free:
            self._free[engine_id] += 1

    def schedule(self) -> list:
        assignments = []
        if not self.ntasks:
            return assignments
        # Each task goes to the engine with the fewest tasks in flight that
        # has a free slot (ties: lowest id).  Engines learn different slot
        # counts, so "most free slots" would let a big window soak up a
        # burst; fewest in flight spreads it evenly, and a task sent ahead
        # never waits behind a busy engine while another sits idle.
        heap = [
            (self._slots[eid] - free, eid)
            for eid, free in self._free.items()
            if free > 0
        ]
        heapq.heapify(heap)
        #: Engines passed over for a penalized head task: they may take the
        #: next task once that one went elsewhere.
        passed: list = []
        while heap and self.ntasks:
            inflight, engine_id = heapq.heappop(heap)
            engine = self._engines[engine_id]
            self._passed_over = False
            task = self._take_for(engine)
            if task is None:
                if self._passed_over:
                    passed.append((inflight, engine_id))
                continue  # nothing queued suits this engine now
            assignments.append((engine, task))
            self._free[engine_id] -= 1
            if self._free[engine_id] > 0:
                heapq.heappush(heap, (inflight + 1, engine_id))
            for entry in passed:
                heapq.heappush(heap, entry)
            passed.clear()
        return assignments

    def unmet_groups(self) -> list:
        if not self._engines:
            return []
        unmet = []
        for group in self._groups.values():
            if group.key is None or not group.size or group.verdicts.broken is not None:
                continue
            # Unmet only when every engine's verdict is known and False; an
            # unknown one (asked for now) may still say yes.
            # (Every engine is asked, not only up to the first unknown.)
            verdicts = [self._accepts(group, e) for e in self._engines.values()]
            if not any(v is not False for v in verdicts):
                unmet.append((group.key, group.queue.live_tasks()))
        return unmet

    def broken_groups(self) -> list:
        broken = []
        for key in self._broken:
            group = self._groups[key]
            broken.append((key, group.verdicts.broken, group.queue.live_tasks()))
        return broken

    def watch(self, callback: Callable[[], None]) -> None:
        self._changed = callback

    def depend_verdicts(self, key: bytes) -> dict[int, tuple[bool | None, str | None]]:
        """What is known of predicate `key` per engine now:
        ``{engine_id: (accepted or None if not known yet, reason)}``.

        The reason says why a failed predicate counts as False ("raised
        SystemExit: 3", "timed out after 5 s", "cannot load: ...").
        """
        group = self._groups.get(key)
        verdicts = group.verdicts if group is not None else self._remembered.get(key)
        out: dict[int, tuple[bool | None, str | None]] = {}
        for engine_id, engine in self._engines.items():
            if verdicts is not None and verdicts.broken is not None:
                out[engine_id] = (False, verdicts.broken)
                continue
            cached = None if verdicts is None else verdicts.matches.get(engine_id)
            if cached is not None and cached[0] == engine.properties_version:
                out[engine_id] = (cached[1], cached[2])
            else:
                out[engine_id] = (None, None)
        return out

    # -- inside ---------------------------------------------------------------------

    def _take_for(self, engine):
        best = None
        for group in self._groups.values():
            if not group.size or not self._accepts(group, engine):
                continue  # False, or not known yet
            head = group.queue.peek()
            if head is None or (best is not None and head[0] >= best[0][0]):
                continue
            if getattr(head[1], "avoid_engine", None) == engine.engine_id and self._free_elsewhere(
                group, engine.engine_id
            ):
                self._passed_over = True
                continue  # the failure penalty: another engine takes it
            best = (head, group)
        if best is None:
            return None
        group = best[1]
        _, task = group.queue.pop()
        group.size -= 1
        self.ntasks -= 1
        task.group = None
        self._forget_if_empty(group)
        return task

    def _free_elsewhere(self, group: DependGroup, engine_id: int) -> bool:
        """Whether an engine other than `engine_id` with a free slot accepts `group`."""
        return any(
            free > 0 and eid != engine_id and self._accepts(group, self._engines[eid]) is True
            for eid, free in self._free.items()
        )

    def _accepts(self, group: DependGroup, engine) -> bool | None:
        """True or False once known; None while the verdict is asked for."""
        if group.key is None:
            return True
        verdicts = group.verdicts
        cached = verdicts.matches.get(engine.engine_id)
        version = engine.properties_version
        if cached is not None and cached[0] == version:
            return cached[1]
        if verdicts.broken is not None:
            return False
        if verdicts.pending.get(engine.engine_id) != version:
            verdicts.pending[engine.engine_id] = version
            d = self._evaluator.evaluate(group.key, dict(engine.properties))
            d.addCallback(self._verdict_arrived, group.key, verdicts, engine, version)
        return None

    def _verdict_arrived(
        self, verdict: Verdict, key: bytes, verdicts: Verdicts, engine, version: int
    ) -> None:
        engine_id = engine.engine_id
        if verdicts.pending.get(engine_id) == version:
            del verdicts.pending[engine_id]
        if self._engines.get(engine_id) is not engine:
            return  # gone, or its id now names another engine
        if not verdict.loadable:
            if verdicts.broken is None:
                verdicts.broken = verdict.reason
                self._log.warn(
                    "a depend function cannot be loaded: {reason}", reason=verdict.reason
                )
            if key in self._groups:
                self._broken.add(key)
        else:
            verdicts.matches[engine_id] = (version, verdict.accepted, verdict.reason)
            if verdict.reason is not None and not verdicts.warned:
                verdicts.warned = True
                self._log.warn(
                    "a depend function counts as False on engine {engine_id}: {reason}",
                    engine_id=engine_id,
                    reason=verdict.reason,
                )
        self._changed()

    def _forget_if_empty(self, group: DependGroup) -> None:
        if group.size == 0 and group.key is not None:
            self._groups.pop(group.key, None)
            self._broken.discard(group.key)
            # Keep its verdicts a while: the next batch with this depend
            # need not ask again.
            self._remembered[group.key] = group.verdicts
            while len(self._remembered) > MAX_REMEMBERED:
                self._remembered.popitem(last=False)


class PriorityScheduler(FIFOScheduler):
    """Runs the task with the highest `priority` first; FIFO among equals."""

    def new_queue(self):
        return HeapQueue()

    def order_key(self, task, arrival: int):
        return (-task.spec.priority, arrival)
