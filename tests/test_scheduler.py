"""Unit tests of the schedulers, with small fake task records and engine
handles, and depend predicates run by an `InProcessEvaluator` on a Clock."""

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from taskfarm.controller.scheduler import FIFOScheduler, PriorityScheduler
from taskfarm.interfaces import IScheduler
from taskfarm.testing import InProcessEvaluator


class FakeSpec:
    def __init__(self, depend=None, priority=0):
        self.depend = depend
        self.priority = priority


class FakeTask:
    """What a scheduler reads of a task record."""

    def __init__(self, taskid, depend=None, priority=0):
        self.taskid = taskid
        self.spec = FakeSpec(depend, priority)
        self.queued = True
        self.group = None

    @property
    def is_queued(self):
        return self.queued

    def __repr__(self):
        return "<task %d>" % self.taskid


class CountingTask(FakeTask):
    """Counts how often the scheduler looks at it."""

    looks = 0

    @property
    def is_queued(self):
        CountingTask.looks += 1
        return self.queued


class FakeEngine:
    """What a scheduler reads of an engine handle."""

    def __init__(self, engine_id, task_slots=1, properties=None):
        self.engine_id = engine_id
        self.task_slots = task_slots
        self.properties = properties or {}
        self.properties_version = 0

    def set_properties(self, properties):
        self.properties = properties
        self.properties_version += 1


def named(**predicates):
    """An evaluator whose depend keys name these predicates (b"big" -> big)."""
    clock = Clock()
    evaluator = InProcessEvaluator(clock, load=lambda key: predicates[key.decode()])
    evaluator.start()
    return evaluator, clock


def settle(scheduler, clock):
    """Ask every verdict the scheduler lacks, and let the answers arrive."""
    scheduler.unmet_groups()
    clock.advance(0)


def _ids(assignments):
    return [(engine.engine_id, task.taskid) for engine, task in assignments]


def _start(assignments):
    """What the controller does with an assignment: the task stops being queued."""
    for _, task in assignments:
        task.queued = False
    return assignments


class SchedulerInterfaceTests(unittest.TestCase):
    """Both schedulers implement IScheduler."""

    def test_verify(self):
        """verifyObject passes for FIFOScheduler and PriorityScheduler."""
        verifyObject(IScheduler, FIFOScheduler())
        verifyObject(IScheduler, PriorityScheduler())


class FIFOSchedulerTests(unittest.TestCase):
    """First in, first out, spread round robin over engines."""

    scheduler_class = FIFOScheduler

    def setUp(self):
        self.evaluator, self.clock = named(
            big=lambda p: p.get("RAM", 0) >= 8,
            gpu=lambda p: p["gpu"],
            broken=lambda p: 1 / 0,
            exits=lambda p: exit(3),
        )
        self.scheduler = self.scheduler_class(evaluator=self.evaluator)
        self.kicks = 0
        self.scheduler.watch(self.kicked)

    def kicked(self):
        self.kicks += 1

    def settle(self):
        settle(self.scheduler, self.clock)

    def add(self, *tasks):
        for t in tasks:
            self.scheduler.add_task(t)
        return tasks

    def test_nothing_to_do(self):
        """No tasks or no engines: schedule() assigns nothing."""
        self.assertEqual(self.scheduler.schedule(), [])
        self.add(FakeTask(0))
        self.assertEqual(self.scheduler.schedule(), [])
        self.assertEqual(self.scheduler.ntasks, 1)

    def test_burst_spreads_over_engines_with_different_windows(self):
        """Engines that learned different slot counts still share a burst
        evenly: each task goes to the engine with the fewest in flight."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=256))
        self.scheduler.add_engine(FakeEngine(1, task_slots=100))
        self.scheduler.add_engine(FakeEngine(2, task_slots=3))
        self.add(*[FakeTask(i) for i in range(9)])
        counts = {}
        for engine, _ in self.scheduler.schedule():
            counts[engine.engine_id] = counts.get(engine.engine_id, 0) + 1
        self.assertEqual(counts, {0: 3, 1: 3, 2: 3})

    def test_fifo_order(self):
        """Tasks go out in the order they were queued."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=1))
        self.add(*[FakeTask(i) for i in range(5)])
        order = []
        for _ in range(5):
            assignments = _start(self.scheduler.schedule())
            self.assertEqual(len(assignments), 1)
            order.append(assignments[0][1].taskid)
            self.scheduler.release(0)
        self.assertEqual(order, [0, 1, 2, 3, 4])
        self.assertEqual(self.scheduler.ntasks, 0)

    def test_respects_task_slots(self):
        """An engine gets at most task_slots tasks until it releases one."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=3))
        self.add(*[FakeTask(i) for i in range(10)])
        self.assertEqual(_ids(_start(self.scheduler.schedule())), [(0, 0), (0, 1), (0, 2)])
        self.assertEqual(self.scheduler.schedule(), [])
        self.scheduler.release(0)
        self.assertEqual(_ids(_start(self.scheduler.schedule())), [(0, 3)])
        self.assertEqual(self.scheduler.ntasks, 6)

    def test_round_robin(self):
        """A burst spreads over engines one slot at a time, not filling one engine first."""
        for eid in range(3):
            self.scheduler.add_engine(FakeEngine(eid, task_slots=2))
        self.add(*[FakeTask(i) for i in range(5)])
        self.assertEqual(
            _ids(self.scheduler.schedule()),
            [(0, 0), (1, 1), (2, 2), (0, 3), (1, 4)],
        )

    def test_release_unknown_engine_ignored(self):
        """release() of an engine the scheduler does not know is harmless."""
        self.scheduler.release(99)
        self.scheduler.add_engine(FakeEngine(0))
        self.scheduler.remove_engine(0)
        self.scheduler.release(0)
        self.add(FakeTask(0))
        self.assertEqual(self.scheduler.schedule(), [])

    def test_remove_engine(self):
        """A removed engine gets no more tasks."""
        self.scheduler.add_engine(FakeEngine(0))
        self.scheduler.add_engine(FakeEngine(1))
        self.scheduler.remove_engine(0)
        self.add(FakeTask(0), FakeTask(1))
        self.assertEqual(_ids(self.scheduler.schedule()), [(1, 0)])
        self.assertEqual(self.scheduler.nengines, 1)

    def test_remove_task(self):
        """A removed (aborted) task is skipped and no longer counted."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=5))
        t0, t1, t2 = self.add(FakeTask(0), FakeTask(1), FakeTask(2))
        t1.queued = False
        self.scheduler.remove_task(t1)
        self.assertEqual(self.scheduler.ntasks, 2)
        self.assertIsNone(t1.group)
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 0), (0, 2)])
        self.assertEqual(self.scheduler.ntasks, 0)

    def test_remove_task_twice(self):
        """Removing a task that is not queued any more does not corrupt the count."""
        t0, t1 = self.add(FakeTask(0), FakeTask(1))
        t0.queued = False
        self.scheduler.remove_task(t0)
        self.scheduler.remove_task(t0)
        self.assertEqual(self.scheduler.ntasks, 1)

    def test_requeued_task_goes_to_the_back(self):
        """A task queued again (a retry) runs after those already waiting."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=1))
        (t0,) = self.add(FakeTask(0))
        _start(self.scheduler.schedule())
        self.add(FakeTask(1))
        t0.queued = True
        self.scheduler.release(0)
        self.add(t0)
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 1)])

    def test_depend_filters_engines(self):
        """A task with depend only goes to engines whose properties satisfy it."""
        self.scheduler.add_engine(FakeEngine(0, properties={"RAM": 2}))
        self.scheduler.add_engine(FakeEngine(1, properties={"RAM": 16}))
        self.add(FakeTask(0, depend=b"big"), FakeTask(1, depend=b"big"))
        self.settle()
        self.assertEqual(_ids(self.scheduler.schedule()), [(1, 0)])

    def test_depend_keeps_fifo_across_groups(self):
        """Across depend groups the oldest task an engine accepts goes first."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=4, properties={"RAM": 16}))
        self.add(FakeTask(0, depend=b"big"), FakeTask(1), FakeTask(2, depend=b"big"), FakeTask(3))
        self.settle()
        self.assertEqual([t for _, t in _ids(self.scheduler.schedule())], [0, 1, 2, 3])

    def test_blocked_depend_does_not_block_others(self):
        """Tasks behind one whose depend is unmet still run."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=2, properties={"RAM": 1}))
        self.add(FakeTask(0, depend=b"big"), FakeTask(1))
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 1)])
        self.assertEqual(self.scheduler.ntasks, 1)

    def test_depend_that_raises_counts_as_false(self):
        """A depend predicate that raises (SystemExit too) never matches, does
        not break scheduling, and the reason is kept per engine."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=3))
        self.add(
            FakeTask(0, depend=b"broken"),
            FakeTask(1, depend=b"gpu"),
            FakeTask(2, depend=b"exits"),
            FakeTask(3),
        )
        self.settle()
        # "gpu" raises KeyError on these properties, "broken" ZeroDivisionError.
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 3)])
        self.assertEqual(self.scheduler.depend_verdicts(b"exits"), {0: (False, "raised SystemExit: 3")})
        self.assertEqual(
            self.scheduler.depend_verdicts(b"broken"),
            {0: (False, "raised ZeroDivisionError: division by zero")},
        )
        self.assertEqual(len(self.scheduler.unmet_groups()), 3)

    def test_unknown_verdict_is_not_yet(self):
        """Before its verdict arrives a group is neither served nor unmet; the
        verdict's arrival calls the watch callback, and the next pass serves it."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=2, properties={"RAM": 16}))
        self.add(FakeTask(0, depend=b"big"), FakeTask(1, depend=b"gpu"))
        self.assertEqual(self.scheduler.schedule(), [])
        self.assertEqual(self.scheduler.unmet_groups(), [])
        self.assertEqual(self.scheduler.depend_verdicts(b"big"), {0: (None, None)})
        self.assertEqual(self.kicks, 0)
        self.clock.advance(0)
        self.assertEqual(self.kicks, 2)
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 0)])
        self.assertEqual([key for key, _ in self.scheduler.unmet_groups()], [b"gpu"])

    def test_one_request_per_engine_version(self):
        """Passes made while a verdict is on its way do not ask again."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=1))
        self.add(FakeTask(0, depend=b"big"))
        for _ in range(5):
            self.scheduler.schedule()
            self.scheduler.unmet_groups()
        self.clock.advance(0)
        self.assertEqual(self.evaluator.calls[b"big"], 1)

    def test_unmet_needs_every_verdict(self):
        """A group is unmet only once every engine's verdict is known and False."""
        self.scheduler.add_engine(FakeEngine(0, properties={"RAM": 1}))
        self.add(FakeTask(0, depend=b"big"))
        self.settle()
        self.assertEqual(len(self.scheduler.unmet_groups()), 1)
        self.scheduler.add_engine(FakeEngine(1, properties={"RAM": 2}))
        self.assertEqual(self.scheduler.unmet_groups(), [])
        self.clock.advance(0)
        self.assertEqual(len(self.scheduler.unmet_groups()), 1)

    def test_unloadable_depend_is_broken(self):
        """A predicate that cannot be loaded is listed by broken_groups with
        its reason, never served, never unmet; other groups are untouched,
        and a later task with that depend is broken at once."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=2, properties={"RAM": 16}))
        t0, t1, t2 = self.add(FakeTask(0, depend=b"missing"), FakeTask(1, depend=b"big"), FakeTask(2, depend=b"missing"))
        self.settle()
        self.assertEqual(
            self.scheduler.broken_groups(),
            [(b"missing", "cannot load: KeyError: 'missing'", [t0, t2])],
        )
        self.assertEqual(self.scheduler.unmet_groups(), [])
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 1)])
        for t in (t0, t2):
            t.queued = False
            self.scheduler.remove_task(t)
        self.assertEqual(self.scheduler.broken_groups(), [])
        (t3,) = self.add(FakeTask(3, depend=b"missing"))
        self.assertEqual(self.scheduler.broken_groups(), [(b"missing", "cannot load: KeyError: 'missing'", [t3])])
        self.assertEqual(self.evaluator.loads[b"missing"], 1)

    def test_without_evaluator_depend_is_broken(self):
        """A scheduler without an evaluator runs no predicate: such tasks are broken."""
        scheduler = self.scheduler_class()
        scheduler.add_engine(FakeEngine(0))
        t0, t1 = FakeTask(0, depend=b"big"), FakeTask(1)
        scheduler.add_task(t0)
        scheduler.add_task(t1)
        self.assertEqual(scheduler.broken_groups(), [(b"big", "this scheduler has no depend evaluator", [t0])])
        self.assertEqual(_ids(scheduler.schedule()), [(0, 1)])

    def test_late_verdict_for_a_replaced_engine_is_dropped(self):
        """An engine id reused by a new engine does not inherit the old
        engine's verdict, even one that arrives after the change."""
        self.scheduler.add_engine(FakeEngine(0, properties={"RAM": 16}))
        self.add(FakeTask(0, depend=b"big"))
        self.assertEqual(self.scheduler.schedule(), [])
        self.scheduler.remove_engine(0)
        self.scheduler.add_engine(FakeEngine(0, properties={"RAM": 1}))
        self.clock.advance(0)  # the old engine's True arrives now
        self.assertEqual(self.scheduler.schedule(), [])
        self.clock.advance(0)
        self.assertEqual(self.scheduler.schedule(), [])
        self.assertEqual(len(self.scheduler.unmet_groups()), 1)

    def test_verdicts_outlive_their_group(self):
        """A depend whose tasks all left keeps its verdicts for the next batch."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=1, properties={"RAM": 16}))
        self.add(FakeTask(0, depend=b"big"))
        self.settle()
        _start(self.scheduler.schedule())
        self.scheduler.release(0)
        self.add(FakeTask(1, depend=b"big"))
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 1)])
        self.assertEqual(self.evaluator.calls[b"big"], 1)

    def test_depend_cached_per_properties_version(self):
        """A predicate runs once per engine and properties version, however many tasks it has."""
        engine = FakeEngine(0, task_slots=1, properties={"RAM": 1})
        self.scheduler.add_engine(engine)
        self.add(*[FakeTask(i, depend=b"big") for i in range(50)])
        for _ in range(5):
            self.assertEqual(self.scheduler.schedule(), [])
            self.clock.advance(0)
        self.assertEqual(self.scheduler.unmet_groups()[0][0], b"big")
        self.assertEqual(self.evaluator.calls[b"big"], 1)
        self.assertEqual(self.evaluator.loads[b"big"], 1)

    def test_depend_reevaluated_after_properties_change(self):
        """When an engine's properties_version changes the predicate runs again."""
        engine = FakeEngine(0, task_slots=1, properties={"RAM": 1})
        self.scheduler.add_engine(engine)
        self.add(FakeTask(0, depend=b"big"))
        self.settle()
        self.assertEqual(self.scheduler.schedule(), [])
        engine.set_properties({"RAM": 32})
        self.settle()
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 0)])
        self.assertEqual(self.evaluator.calls[b"big"], 2)

    def test_raising_depend_reevaluated_after_properties_change(self):
        """A predicate that raised is tried again once the properties change."""
        engine = FakeEngine(0, task_slots=1, properties={})
        self.scheduler.add_engine(engine)
        self.add(FakeTask(0, depend=b"gpu"))
        self.settle()
        self.assertEqual(self.scheduler.schedule(), [])
        self.assertEqual(self.scheduler.schedule(), [])
        self.assertEqual(self.evaluator.calls[b"gpu"], 1)
        engine.set_properties({"gpu": True})
        self.settle()
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 0)])

    def test_predicate_gets_a_copy(self):
        """A predicate that changes the properties it is given cannot change the engine's."""
        evaluator, clock = named(meddle=lambda p: p.update(RAM=0) or True)
        scheduler = self.scheduler_class(evaluator=evaluator)
        engine = FakeEngine(0, properties={"RAM": 64})
        scheduler.add_engine(engine)
        scheduler.add_task(FakeTask(0, depend=b"meddle"))
        settle(scheduler, clock)
        self.assertEqual(len(scheduler.schedule()), 1)
        self.assertEqual(engine.properties, {"RAM": 64})

    def test_unmet_groups(self):
        """unmet_groups lists depend groups no engine accepts, with their queued tasks."""
        self.scheduler.add_engine(FakeEngine(0, properties={"RAM": 16}))
        t0, t1, t2, t3 = self.add(
            FakeTask(0, depend=b"gpu"),
            FakeTask(1, depend=b"big"),
            FakeTask(2, depend=b"gpu"),
            FakeTask(3),
        )
        self.settle()
        self.assertEqual(self.scheduler.unmet_groups(), [(b"gpu", [t0, t2])])

    def test_unmet_groups_skips_removed_tasks(self):
        """A removed task is not listed as unmet; a group emptied by removal vanishes."""
        self.scheduler.add_engine(FakeEngine(0))
        t0, t1 = self.add(FakeTask(0, depend=b"gpu"), FakeTask(1, depend=b"gpu"))
        self.settle()
        t0.queued = False
        self.scheduler.remove_task(t0)
        self.assertEqual(self.scheduler.unmet_groups(), [(b"gpu", [t1])])
        t1.queued = False
        self.scheduler.remove_task(t1)
        self.assertEqual(self.scheduler.unmet_groups(), [])

    def test_unmet_groups_without_engines(self):
        """With no engines at all nothing counts as unmet (engines may still come)."""
        self.add(FakeTask(0, depend=b"gpu"))
        self.assertEqual(self.scheduler.unmet_groups(), [])

    def test_unmet_group_met_by_new_engine(self):
        """A group stops being unmet when an engine that accepts it arrives."""
        self.scheduler.add_engine(FakeEngine(0, properties={"RAM": 1}))
        self.add(FakeTask(0, depend=b"big"))
        self.settle()
        self.assertEqual(len(self.scheduler.unmet_groups()), 1)
        self.scheduler.add_engine(FakeEngine(1, properties={"RAM": 9}))
        self.settle()
        self.assertEqual(self.scheduler.unmet_groups(), [])
        self.assertEqual(_ids(self.scheduler.schedule()), [(1, 0)])


class PrioritySchedulerAsFIFOTests(FIFOSchedulerTests):
    """The same IScheduler behaviour from the other implementation: with
    equal priorities a PriorityScheduler is first in, first out."""

    scheduler_class = PriorityScheduler


class SchedulingCostTests(unittest.TestCase):
    """One scheduling decision looks at O(1) tasks, never at the whole queue."""

    N = 100_000

    def test_one_free_slot_touches_few_tasks(self):
        """With 100,000 queued tasks, filling one free slot looks at a handful of them."""
        scheduler = FIFOScheduler()
        for i in range(self.N):
            scheduler.add_task(CountingTask(i))
        engine = FakeEngine(0, task_slots=1)
        scheduler.add_engine(engine)
        CountingTask.looks = 0
        for expected in range(10):
            assignments = _start(scheduler.schedule())
            self.assertEqual(_ids(assignments), [(0, expected)])
            scheduler.release(0)
        # Each decision may peek at the head a few times, never at the queue.
        self.assertLess(CountingTask.looks, 10 * 5)
        self.assertEqual(scheduler.ntasks, self.N - 10)

    def test_depend_predicate_runs_once_for_many_tasks(self):
        """100,000 tasks sharing one depend cost one predicate call per engine version."""
        evaluator, clock = named(ok=lambda p: True)
        scheduler = FIFOScheduler(evaluator=evaluator)
        for i in range(self.N):
            scheduler.add_task(FakeTask(i, depend=b"ok"))
        engines = [FakeEngine(eid, task_slots=2) for eid in range(4)]
        for engine in engines:
            scheduler.add_engine(engine)
        self.assertEqual(scheduler.schedule(), [])
        clock.advance(0)
        assignments = _start(scheduler.schedule())
        self.assertEqual(len(assignments), 8)
        for engine in engines:
            scheduler.release(engine.engine_id)
        _start(scheduler.schedule())
        self.assertEqual(evaluator.calls[b"ok"], 4)
        self.assertEqual(evaluator.loads[b"ok"], 1)

    def test_aborted_tasks_skipped_lazily(self):
        """Removed tasks cost O(1) each; the next schedule skips their entries once, then never again."""
        scheduler = FIFOScheduler()
        tasks = [CountingTask(i) for i in range(1000)]
        for t in tasks:
            scheduler.add_task(t)
        for t in tasks[:-1]:
            t.queued = False
            scheduler.remove_task(t)
        scheduler.add_engine(FakeEngine(0))
        CountingTask.looks = 0
        self.assertEqual(_ids(scheduler.schedule()), [(0, 999)])
        looks_first = CountingTask.looks
        self.assertLessEqual(looks_first, 1000 + 5)
        # The dead entries are gone for good: the next pass does not see them.
        scheduler.release(0)
        scheduler.add_task(CountingTask(1000))
        CountingTask.looks = 0
        scheduler.schedule()
        self.assertLess(CountingTask.looks, 5)


class PrioritySchedulerTests(unittest.TestCase):
    """Highest priority first, FIFO among equals."""

    def setUp(self):
        self.evaluator, self.clock = named(big=lambda p: p.get("RAM", 0) >= 8)
        self.scheduler = PriorityScheduler(evaluator=self.evaluator)

    def test_priority_order(self):
        """Higher priority runs first; equal priorities keep arrival order."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=10))
        for taskid, priority in enumerate([0, 5, -1, 5, 10, 0]):
            self.scheduler.add_task(FakeTask(taskid, priority=priority))
        order = [t for _, t in _ids(self.scheduler.schedule())]
        self.assertEqual(order, [4, 1, 3, 0, 5, 2])

    def test_priority_across_depend_groups(self):
        """Priority decides across depend groups too."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=10, properties={"RAM": 64}))
        self.scheduler.add_task(FakeTask(0, priority=1))
        self.scheduler.add_task(FakeTask(1, depend=b"big", priority=3))
        self.scheduler.add_task(FakeTask(2, priority=2))
        settle(self.scheduler, self.clock)
        self.assertEqual([t for _, t in _ids(self.scheduler.schedule())], [1, 2, 0])

    def test_one_at_a_time(self):
        """With one slot, each release runs the best task still queued, new ones included."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=1))
        self.scheduler.add_task(FakeTask(0, priority=1))
        self.scheduler.add_task(FakeTask(1, priority=2))
        self.assertEqual(_ids(_start(self.scheduler.schedule())), [(0, 1)])
        self.scheduler.add_task(FakeTask(2, priority=9))
        self.scheduler.release(0)
        self.assertEqual(_ids(_start(self.scheduler.schedule())), [(0, 2)])
        self.scheduler.release(0)
        self.assertEqual(_ids(_start(self.scheduler.schedule())), [(0, 0)])

    def test_removed_task_skipped(self):
        """A removed task is skipped by the priority queue too."""
        self.scheduler.add_engine(FakeEngine(0, task_slots=10))
        t0, t1 = FakeTask(0, priority=5), FakeTask(1)
        self.scheduler.add_task(t0)
        self.scheduler.add_task(t1)
        t0.queued = False
        self.scheduler.remove_task(t0)
        self.assertEqual(_ids(self.scheduler.schedule()), [(0, 1)])

    def test_unmet_groups_in_priority_order(self):
        """unmet_groups lists a group's tasks best first."""
        self.scheduler.add_engine(FakeEngine(0))
        low, high = FakeTask(0, depend=b"big", priority=0), FakeTask(1, depend=b"big", priority=4)
        self.scheduler.add_task(low)
        self.scheduler.add_task(high)
        settle(self.scheduler, self.clock)
        self.assertEqual(self.scheduler.unmet_groups(), [(b"big", [high, low])])
