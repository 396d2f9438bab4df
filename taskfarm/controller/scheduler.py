"""Which queued task goes to which engine: the FIFO scheduler and a subclass.

Queued tasks are grouped by their `depend` predicate (tasks without one form
the ``None`` group).  Each group keeps its own queue.  Whether a group's
predicate accepts an engine is computed once per engine properties version
and cached, so scheduling costs O(groups) per decision, never O(tasks).
Without `depend` there is one group and each task costs O(1).

To write another policy, subclass `FIFOScheduler` and override
`new_queue` (and, for a different order, `order_key`); see
`PriorityScheduler`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable

from twisted.logger import Logger
from zope.interface import implementer

from taskfarm import serialization
from taskfarm.interfaces import IScheduler


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


class DependGroup:
    """Queued tasks that share one `depend` predicate (or none)."""

    __slots__ = ("key", "predicate", "queue", "size", "matches", "failed_once")

    def __init__(self, key: bytes | None, predicate: Callable | None, queue) -> None:
        self.key = key
        self.predicate = predicate
        self.queue = queue
        self.size = 0
        #: engine_id -> (properties_version, accepted)
        self.matches: dict[int, tuple[int, bool]] = {}
        self.failed_once = False


@implementer(IScheduler)
class FIFOScheduler:
    """Runs tasks in the order they were queued, on any engine that accepts them.

    Engines are served round robin, one slot at a time, so a burst of tasks
    spreads evenly.  A `depend` predicate that raises counts as False.
    """

    _log = Logger()

    def __init__(self, load_predicate: Callable[[bytes], Callable] | None = None):
        self._load_predicate = load_predicate or (
            lambda blob: serialization.loads(blob, "the depend function")
        )
        self._groups: dict[bytes | None, DependGroup] = {}
        self._engines: dict[int, object] = {}
        self._free: dict[int, int] = {}
        #: Slots each engine may hold now (free ones are in `_free`).
        self._slots: dict[int, int] = {}
        self._arrivals = itertools.count()
        self.ntasks = 0

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

    def add_task(self, task) -> None:
        key = task.spec.depend
        group = self._groups.get(key)
        if group is None:
            predicate = None if key is None else self._load_predicate(key)
            group = self._groups[key] = DependGroup(key, predicate, self.new_queue())
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
        for group in self._groups.values():
            group.matches.pop(engine_id, None)

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
        while heap and self.ntasks:
            inflight, engine_id = heapq.heappop(heap)
            engine = self._engines[engine_id]
            task = self._take_for(engine)
            if task is None:
                continue  # nothing queued suits this engine now
            assignments.append((engine, task))
            self._free[engine_id] -= 1
            if self._free[engine_id] > 0:
                heapq.heappush(heap, (inflight + 1, engine_id))
        return assignments

    def unmet_groups(self) -> list:
        if not self._engines:
            return []
        unmet = []
        for group in self._groups.values():
            if group.key is None or not group.size:
                continue
            if not any(self._accepts(group, e) for e in self._engines.values()):
                unmet.append((group.key, group.queue.live_tasks()))
        return unmet

    # -- inside ---------------------------------------------------------------------

    def _take_for(self, engine):
        best = None
        for group in self._groups.values():
            if not group.size or not self._accepts(group, engine):
                continue
            head = group.queue.peek()
            if head is not None and (best is None or head[0] < best[0][0]):
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

    def _accepts(self, group: DependGroup, engine) -> bool:
        if group.predicate is None:
            return True
        cached = group.matches.get(engine.engine_id)
        if cached is not None and cached[0] == engine.properties_version:
            return cached[1]
        try:
            accepted = bool(group.predicate(dict(engine.properties)))
        except Exception as e:
            accepted = False
            if not group.failed_once:
                group.failed_once = True
                self._log.warn(
                    "a depend function raised {error!r}; it counts as False",
                    error=e,
                )
        group.matches[engine.engine_id] = (engine.properties_version, accepted)
        return accepted

    def _forget_if_empty(self, group: DependGroup) -> None:
        if group.size == 0 and group.key is not None:
            self._groups.pop(group.key, None)


class PriorityScheduler(FIFOScheduler):
    """Runs the task with the highest `priority` first; FIFO among equals."""

    def new_queue(self):
        return HeapQueue()

    def order_key(self, task, arrival: int):
        return (-task.spec.priority, arrival)
