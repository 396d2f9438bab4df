"""The MultiEngine interface on a `task.Clock`: the real client
(`asyncclient.MultiEngineClient`, its connection), the real Referenceable
and the controller's `MultiEngine`, with in-process engines
(`InProcessChannel`), through the in-process transport (`LocalGrid`).
No sockets, no sleeps, no processes.

tests/test_multiengine.py runs the same interface against real engine
processes; it stays for what only they show (output capture in a real
engine, kill, files, numpy, a real task farm beside a session).
"""

from __future__ import annotations

import threading

from twisted.internet import defer
from twisted.trial import unittest

# Imports gathered here, so that moved modules are repointed in one place.
from taskfarm.errors import (
    CompositeError,
    EngineLost,
    InvalidEngineID,
    InvalidProperty,
    InvalidResultID,
    NoEnginesRegistered,
    NotAPendingResult,
    QueueCleared,
)
from taskfarm.results import PendingResult, ResultList
from taskfarm.testing.grid import LocalGrid
from taskfarm.testing.helpers import assert_composite


class MultiEngineTestCase(unittest.SynchronousTestCase):
    engines = 3

    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.channels = [self.grid.add_engine({"n": i}) for i in range(self.engines)]
        self.mec = self.grid.multiengine_client()

    def value(self, d: defer.Deferred):
        """What `d` fires with, once the clock let everything through."""
        self.settle(d)
        return self.successResultOf(d)

    def error(self, d: defer.Deferred, *types):
        self.settle(d)
        return self.failureResultOf(d, *types).value

    def settle(self, d: defer.Deferred) -> None:
        for _ in range(200):
            if d.called:
                return
            self.grid.clock.advance(0.001)

    def assert_composite(self, error: CompositeError, method: str, expected: dict) -> None:
        assert_composite(self, error, method, expected)


class ExecuteTests(MultiEngineTestCase):
    def test_execute_in_target_order(self):
        """execute answers one result per target in target order, for
        'all', an int and a list; each engine numbers its own commands; a
        raising command gives a CompositeError naming each engine."""
        results = self.value(self.mec.execute("a = id * 2"))
        self.assertIsInstance(results, ResultList)
        self.assertEqual([(r["id"], r["number"]) for r in results], [(0, 1), (1, 1), (2, 1)])
        one = self.value(self.mec.execute("a = 1", targets=1))
        self.assertEqual([(r["id"], r["number"]) for r in one], [(1, 2)])
        some = self.value(self.mec.execute("b = 2", targets=[2, 0]))
        self.assertEqual([(r["id"], r["number"]) for r in some], [(2, 2), (0, 2)])
        self.assertEqual(self.value(self.mec.pull("a")), [0, 1, 4])
        error = self.error(self.mec.execute("x = 1\n1 / 0", targets=[0, 1]), CompositeError)
        self.assert_composite(error, "execute", {0: "ZeroDivisionError", 1: "ZeroDivisionError"})
        self.assertIn("[0:execute]: ZeroDivisionError: division by zero", str(error))
        self.error(self.mec.execute(b"print(1)"), TypeError)

    def test_get_result_reset_keys(self):
        """get_result gives the last execute result; keys lists the user
        names; reset empties a namespace but keeps `id`."""
        self.value(self.mec.execute("a = 1"))
        self.value(self.mec.execute("b = 2", targets=0))
        (last,) = self.value(self.mec.get_result(targets=0))
        self.assertEqual(last["input"]["raw"], "b = 2")
        self.assertEqual(self.value(self.mec.keys(targets=[0, 1])), [["a", "b", "id"], ["a", "id"]])
        self.value(self.mec.reset(targets=0))
        self.assertEqual(self.value(self.mec.keys(targets=[0, 1])), [["id"], ["a", "id"]])
        error = self.error(self.mec.get_result(7, targets=1), CompositeError)
        self.assert_composite(error, "get_result", {1: "IndexError"})


class DataTests(MultiEngineTestCase):
    def test_push_pull_zip_pull(self):
        """push puts names on each target; pull of a str gives one value per
        target, of a list one list per target; zip_pull transposes."""
        self.assertEqual(self.value(self.mec.push({"a": 1, "b": [1, 2]})), [None] * 3)
        self.assertEqual(self.value(self.mec.pull("a")), [1, 1, 1])
        self.assertEqual(self.value(self.mec.pull(["a", "b"])), [[1, [1, 2]]] * 3)
        self.assertEqual(self.value(self.mec.pull(("a", "id"), targets=[2, 1])), [[1, 2], [1, 1]])
        self.value(self.mec.push({"a": 10}, targets=1))
        self.assertEqual(self.value(self.mec.zip_pull(["a", "id"])), [(1, 10, 1), (0, 1, 2)])
        self.error(self.mec.push([("a", 1)]), TypeError)
        self.error(self.mec.pull(["a", 3]), TypeError)

    def test_scatter_gather_map(self):
        """scatter splits into contiguous blocks (the first len % n targets
        get one more), gather joins them back, map keeps the order."""
        self.value(self.mec.scatter("s", list(range(8))))
        self.assertEqual(self.value(self.mec.pull("s")), [[0, 1, 2], [3, 4, 5], [6, 7]])
        self.assertEqual(self.value(self.mec.gather("s")), list(range(8)))
        self.assertEqual(self.value(self.mec.map(abs, [-1, -2, 3, -4])), [1, 2, 3, 4])
        self.assertEqual(
            self.value(self.mec.map(lambda x, y: x * y, [1, 2, 3], [4, 5, 6], targets=[2, 0])),
            [4, 10, 18],
        )


class PropertiesTests(MultiEngineTestCase):
    def test_get_set_has_del_clear(self):
        """set, get (all, one key, several), has, del and clear work per
        target; a set reaches the engine too; a value that is not plain data
        is refused and changes nothing."""
        self.assertEqual(self.value(self.mec.get_properties()), [{"n": i} for i in range(3)])
        self.assertEqual(
            self.value(self.mec.set_properties({"RAM": 2**33, "tags": ["big"]}, targets=1)), [None]
        )
        self.assertEqual(self.value(self.mec.get_properties("RAM", targets=1)), [2**33])
        self.assertEqual(self.channels[1].namespace.properties, {"n": 1, "RAM": 2**33, "tags": ["big"]})
        self.assertEqual(self.value(self.mec.has_properties("RAM", targets=[0, 1])), [False, True])
        error = self.error(self.mec.get_properties("RAM", targets=[0, 1]), CompositeError)
        self.assert_composite(error, "get_properties", {0: KeyError})
        self.assertIn("engine 0 has no property 'RAM'", str(error))
        self.value(self.mec.del_properties("RAM", targets=1))
        self.assertEqual(self.value(self.mec.get_properties(targets=1)), [{"n": 1, "tags": ["big"]}])
        self.value(self.mec.clear_properties())
        self.assertEqual(self.value(self.mec.get_properties()), [{}, {}, {}])
        for bad in ({"lock": threading.Lock()}, {"o": object()}, {1: "x"}, ["x"]):
            self.error(self.mec.set_properties(bad), InvalidProperty)
        self.assertEqual(self.value(self.mec.get_properties()), [{}, {}, {}])


class QueueTests(MultiEngineTestCase):
    engines = 2

    def test_queue_status_and_clear_queue(self):
        """Behind a busy command, queue_status shows what waits;
        clear_queue fails the queued MultiEngine commands with QueueCleared
        and they never run; the busy one finishes."""
        self.assertEqual(
            self.value(self.mec.queue_status()),
            [(i, {"pending": None, "queue": []}) for i in range(2)],
        )
        self.channels[0].hold()
        busy = self.value(self.mec.execute("busy = 1", targets=0, block=False))
        queued = [self.value(self.mec.execute("q = %d" % k, targets=0, block=False))
                  for k in range(2)]
        queued.append(self.value(self.mec.push({"z": 1}, targets=[0], block=False)))
        self.assertEqual(
            self.value(self.mec.queue_status(targets=[0])),
            [(0, {"pending": "execute", "queue": ["execute", "execute", "push"]})],
        )
        self.value(self.mec.clear_queue(targets=0))
        self.assertEqual(
            self.value(self.mec.queue_status(targets=0)), [(0, {"pending": "execute", "queue": []})]
        )
        for pending, method in zip(queued, ["execute", "execute", "push"], strict=True):
            self.assert_composite(self.error(pending.get_result(), CompositeError), method,
                                  {0: QueueCleared})
        self.assertFalse(busy.done)
        self.channels[0].release()
        (result,) = self.value(busy.get_result())
        self.assertEqual(result["id"], 0)
        self.assertEqual(self.value(self.mec.keys(targets=0)), [["busy", "id"]])


class PendingResultTests(MultiEngineTestCase):
    engines = 2

    def test_pending_results(self):
        """block=False answers a PendingResult at once; get_result(default,
        block=False) gives the default until the answer is there; barrier
        waits for several and refuses what is not a PendingResult; after
        flush() an unfetched result raises InvalidResultID."""
        self.channels[0].hold()
        busy = self.value(self.mec.execute("a = 1", targets=0, block=False))
        self.assertIsInstance(busy, PendingResult)
        self.assertEqual(self.value(busy.get_result("not yet", block=False)), "not yet")
        ids = self.value(self.mec.pull("id", targets=1, block=False))
        ids.add_callback(lambda values, extra: [v + extra for v in values], 100)
        self.channels[0].release()
        self.assertIsNone(self.value(self.mec.barrier([busy, ids])))
        self.assertEqual(self.value(ids.get_result(block=False)), [101])
        self.error(self.mec.barrier([busy, "not a result"]), NotAPendingResult)
        self.channels[1].hold()
        unfetched = self.value(self.mec.execute("c = 1", targets=1, block=False))
        self.value(self.mec.clear_pending_results())
        self.error(unfetched.get_result(), InvalidResultID)
        self.assertEqual(self.value(ids.get_result()), [101])


class ErrorTests(MultiEngineTestCase):
    engines = 2

    def test_unknown_and_malformed_targets(self):
        """A target that names no engine gives InvalidEngineID and nothing
        runs anywhere; a malformed target gives TypeError."""
        calls = [
            lambda t: self.mec.execute("a = 1", targets=t),
            lambda t: self.mec.push({"a": 1}, targets=t),
            lambda t: self.mec.pull("a", targets=t),
            lambda t: self.mec.scatter("a", [1, 2], targets=t),
            lambda t: self.mec.map(abs, [1], targets=t),
            lambda t: self.mec.get_properties(targets=t),
            lambda t: self.mec.set_properties({"a": 1}, targets=t),
            lambda t: self.mec.queue_status(targets=t),
            lambda t: self.mec.clear_queue(targets=t),
        ]
        for call in calls:
            for targets in (5, [0, 5]):
                self.assertIn("no engine with id 5", str(self.error(call(targets), InvalidEngineID)))
        self.error(self.mec.execute("a = 1", targets="some"), TypeError)
        self.error(self.mec.pull("a", targets=[0, True]), TypeError)
        self.assertEqual(self.value(self.mec.keys()), [["id"], ["id"]])

    def test_no_engines(self):
        """With no engine registered, 'all' gives NoEnginesRegistered."""
        for channel in self.channels:
            self.grid.registry.engine_lost(channel.engine, "gone")
        self.assertEqual(self.value(self.mec.get_ids()), [])
        for d in (self.mec.execute("a = 1"), self.mec.pull("a"), self.mec.get_properties(),
                  self.mec.queue_status(), self.mec.clear_queue()):
            self.error(d, NoEnginesRegistered)

    def test_engine_lost_during_execute(self):
        """An engine lost while it runs a command gives EngineLost for that
        engine inside the CompositeError; the other engine answered."""
        self.channels[0].hold()
        d = self.mec.execute("a = 1")
        for _ in range(5):
            self.grid.clock.advance(0.001)
        self.grid.registry.engine_lost(self.channels[0].engine, "its connection closed")
        error = self.error(d, CompositeError)
        self.assert_composite(error, "execute", {0: EngineLost})
        self.assertEqual(self.value(self.mec.get_ids()), [1])
