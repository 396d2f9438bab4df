"""The MultiEngine interface end to end, and the Task interface beside it.

A real controller runs in the test's reactor and real engine processes
register with it over Foolscap on 127.0.0.1; the tests talk to it through
the Deferred client (`taskfarm.asyncclient.MultiEngineClient`).  Trial wants
a clean reactor after every test, so each test starts its own small cluster
and its cleanup ends every engine process by PID.

Nothing sleeps for a fixed time: commands that must stay busy wait for a
"gate" file the test creates, and waits poll a condition under a deadline.
"""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from taskfarm.errors import (
    CompositeError,
    EngineLost,
    InvalidEngineID,
    InvalidProperty,
    InvalidResultID,
    NoEnginesRegistered,
    NotAPendingResult,
    QueueCleared,
    RemoteTaskError,
    SerializationError,
)
from taskfarm.properties import FACT_KEYS
from taskfarm.results import PendingResult, ResultList
from taskfarm.task import MapTask, Task
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import assert_composite, wait_until
from taskfarm.testing.helpers import async_test as run


def gated(marker: Path, gate: Path, then: str = "") -> str:
    """Code that touches `marker`, then waits (at most 30 s) until `gate`
    exists, then runs `then`: a command that stays running until the test
    lets it finish."""
    return (
        "import os, time\n"
        "open(%r, 'w').close()\n"
        "_started = time.monotonic()\n"
        "while not os.path.exists(%r) and time.monotonic() - _started < 30:\n"
        "    time.sleep(0.005)\n" % (str(marker), str(gate))
    ) + then


async def failure_of(d, *error_types):
    """The exception `d` fails with; an AssertionError if it succeeds or
    fails with another type."""
    try:
        value = await d
    except error_types as e:
        return e
    raise AssertionError("expected %s, got the value %r" % (error_types, value))


class _ClusterTestCase(ClusterTestCase):
    """Starts a cluster per test (MultiEngine client); the cleanup stops it
    and removes its files."""

    folder_prefix = "taskfarm-me-"

    async def start_cluster(self, n: int = 2, **controller_options):
        return await super().start_cluster(n, **controller_options)

    def client(self):
        return self.cluster.multiengine_client()

    def slot_of(self, engine_id: int):
        """The `ProcessSlot` running engine `engine_id` (ids follow the
        order of registration, not of start)."""
        pid = self.cluster.engine_pid(engine_id)
        (slot,) = [s for s in self.cluster.engines if s.pid == pid]
        return slot

    async def engine_received_everything(self, engine_id: int) -> None:
        """An ordering barrier: a ping answered by the engine's reactor
        after every message the controller sent it before (Foolscap keeps
        the order of one connection), e.g. a `cancel`."""
        channel = self.cluster.controller.registry.engines[engine_id].channel
        await channel._rref.callRemote("ping")

    def assert_composite(self, error: CompositeError, method: str, expected: dict) -> None:
        assert_composite(self, error, method, expected)


class ExecuteTests(_ClusterTestCase):
    @run
    async def test_execute_results_and_their_repr(self):
        """execute answers one result dict per target (id, number, input,
        stdout, stderr), in target order, for 'all', an int and a list; each
        engine numbers its own commands; the ResultList repr shows
        `[id] In [n]:` and `[id] Out[n]:` lines; a raising command gives a
        CompositeError with the remote traceback text."""
        mec = await self.start_cluster(3)
        code = "import sys\nprint(id * 2)\nsys.stderr.write('e%d' % id)"
        results = await mec.execute(code)
        self.assertIsInstance(results, ResultList)
        self.assertEqual(
            list(results),
            [
                {
                    "id": i,
                    "number": 1,
                    "input": {"raw": code, "translated": code},
                    "stdout": "%d\n" % (2 * i),
                    "stderr": "e%d" % i,
                }
                for i in range(3)
            ],
        )
        text = repr(results)
        self.assertEqual(text.splitlines()[0], "<Results List>")
        for i in range(3):
            self.assertIn("[%d] In [1]: import sys\n.... print(id * 2)" % i, text)
            self.assertIn("[%d] Out[1]: %d\ne%d" % (i, 2 * i, i), text)
        self.assertEqual(str(results), text)

        one = await mec.execute("a = 1", targets=1)
        self.assertEqual([(r["id"], r["number"]) for r in one], [(1, 2)])
        self.assertEqual(one[0]["stdout"], "")
        self.assertIn("[1] In [2]: a = 1", repr(one))
        self.assertNotIn("Out[2]", repr(one))
        some = await mec.execute("a = 2", targets=[2, 0])
        self.assertEqual([(r["id"], r["number"]) for r in some], [(2, 2), (0, 2)])
        again = await mec.execute("print(a)")
        self.assertEqual([(r["id"], r["number"]) for r in again], [(0, 3), (1, 3), (2, 3)])
        self.assertEqual([r["stdout"] for r in again], ["2\n", "1\n", "2\n"])

        error = await failure_of(mec.execute("x = 1\n1 / 0", targets=[0, 1]), CompositeError)
        self.assert_composite(error, "execute", {0: "ZeroDivisionError", 1: "ZeroDivisionError"})
        self.assertIn('File "<engine 1>", line 2', error.elist[1][2].traceback)
        self.assertIn("[0:execute]: ZeroDivisionError: division by zero", str(error))
        await failure_of(mec.execute(b"print(1)"), TypeError)

    @run
    async def test_get_result_reset_keys(self):
        """get_result gives the last or a numbered execute result per
        target (IndexError inside a CompositeError for a number not kept);
        keys lists the user names; reset empties a namespace but keeps `id`."""
        mec = await self.start_cluster(2)
        error = await failure_of(mec.get_result(), CompositeError)
        self.assert_composite(error, "get_result", {0: "IndexError", 1: "IndexError"})

        await mec.execute("a = 1")
        await mec.execute("print('two')")
        await mec.execute("b = 3", targets=1)
        last = await mec.get_result()
        self.assertEqual(
            [(r["id"], r["number"], r["input"]["raw"]) for r in last],
            [(0, 2, "print('two')"), (1, 3, "b = 3")],
        )
        second = await mec.get_result(2)
        self.assertEqual([(r["id"], r["stdout"]) for r in second], [(0, "two\n"), (1, "two\n")])
        self.assertEqual([r["number"] for r in await mec.get_result(1, targets=1)], [1])
        error = await failure_of(mec.get_result(99, targets=[1]), CompositeError)
        self.assert_composite(error, "get_result", {1: "IndexError"})

        self.assertEqual(await mec.keys(), [["a", "id"], ["a", "b", "id"]])
        self.assertEqual(await mec.keys(targets=1), [["a", "b", "id"]])
        self.assertEqual(await mec.reset(targets=0), [None])
        self.assertEqual(await mec.keys(), [["id"], ["a", "b", "id"]])
        self.assertEqual(await mec.pull("id", targets=0), [0])
        self.assertEqual(await mec.reset(), [None, None])
        self.assertEqual(await mec.keys(), [["id"], ["id"]])
        error = await failure_of(mec.pull("b", targets=1), CompositeError)
        self.assert_composite(error, "pull", {1: "NameError"})

    @run
    async def test_run_file(self):
        """run reads and compiles a file here and executes it on the
        targets; a missing file or a syntax error fails here, before
        anything is sent."""
        mec = await self.start_cluster(2)
        script = self.tmp / "script.py"
        script.write_text("import math\nroot = math.sqrt(16) + id\nprint('ran on', id)\n")
        results = await mec.run(str(script))
        self.assertEqual([r["stdout"] for r in results], ["ran on 0\n", "ran on 1\n"])
        self.assertEqual(await mec.pull("root"), [4.0, 5.0])
        script.write_text("root = -1\n")
        self.assertEqual([r["id"] for r in await mec.run(script, targets=1)], [1])
        self.assertEqual(await mec.pull("root"), [4.0, -1])
        await failure_of(mec.run(self.tmp / "missing.py"), FileNotFoundError)
        bad = self.tmp / "bad.py"
        bad.write_text("root = (\n")
        await failure_of(mec.run(bad), SyntaxError)
        self.assertEqual(await mec.pull("root"), [4.0, -1])


class DataTests(_ClusterTestCase):
    @run
    async def test_push_pull_zip_pull(self):
        """push puts names on each target; pull of a str gives one value per
        target, of a list one list per target; int, list and 'all' targets
        answer in target order; zip_pull transposes."""
        mec = await self.start_cluster(3)
        self.assertEqual(await mec.push({"a": 1, "b": [1, 2]}), [None, None, None])
        self.assertEqual(await mec.pull("a"), [1, 1, 1])
        self.assertEqual(await mec.pull(["a", "b"]), [[1, [1, 2]]] * 3)
        self.assertEqual(await mec.pull("a", targets=0), [1])
        self.assertEqual(await mec.pull(("a", "id"), targets=[2, 1]), [[1, 2], [1, 1]])
        self.assertEqual(await mec.push({"a": 10}, targets=1), [None])
        self.assertEqual(await mec.push({"c": "x"}, targets=[0, 2]), [None, None])
        self.assertEqual(await mec.pull("a"), [1, 10, 1])
        self.assertEqual(await mec.pull("c", targets=[2, 0]), ["x", "x"])
        self.assertEqual(await mec.zip_pull(["a", "id"]), [(1, 10, 1), (0, 1, 2)])
        self.assertEqual(await mec.zip_pull(["id", "b"], targets=[1]), [(1,), ([1, 2],)])
        self.assertEqual(
            await mec.keys(), [["a", "b", "c", "id"], ["a", "b", "id"], ["a", "b", "c", "id"]]
        )
        await failure_of(mec.push([("a", 1)]), TypeError)
        await failure_of(mec.pull(["a", 3]), TypeError)

    @run
    async def test_push_and_pull_functions(self):
        """push_function sends a closure with defaults that code on the
        engines can call; pull_function brings it back working."""
        mec = await self.start_cluster(2)

        def make_scaler(k):
            def scale(x, offset=1, *, power=1):
                return k * x**power + offset

            return scale

        self.assertEqual(await mec.push_function({"scale": make_scaler(3)}), [None, None])
        await mec.execute("r = scale(2) + scale(2, 0, power=2) + id")
        self.assertEqual(await mec.pull("r"), [19, 20])
        (scale,) = await mec.pull_function("scale", targets=1)
        self.assertEqual((scale(5), scale(5, 0), scale.__defaults__), (16, 15, (1,)))
        (both,) = await mec.pull_function(["scale", "r"], targets=[0])
        self.assertEqual((both[0](1, power=3), both[1]), (4, 19))

    @run
    async def test_scatter_gather(self):
        """scatter splits a sequence into contiguous blocks (the first
        len % n targets get one more); gather joins them back; flatten=True
        stores one-element blocks bare; tuples and explicit targets work;
        only dist='b' is accepted."""
        mec = await self.start_cluster(4)
        self.assertEqual(await mec.scatter("chunk", list(range(10))), [None] * 4)
        self.assertEqual(await mec.pull("chunk"), [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]])
        self.assertEqual(await mec.gather("chunk"), list(range(10)))
        self.assertEqual(await mec.gather("chunk", targets=[3, 0]), [8, 9, 0, 1, 2])

        await mec.scatter("t", tuple(range(5)), targets=[1, 3])
        self.assertEqual(await mec.pull("t", targets=[1, 3]), [(0, 1, 2), (3, 4)])
        self.assertEqual(await mec.gather("t", targets=[1, 3]), [0, 1, 2, 3, 4])

        await mec.scatter("f", [7, 8, 9, 10], flatten=True)
        self.assertEqual(await mec.pull("f"), [7, 8, 9, 10])
        self.assertEqual(await mec.gather("f"), [7, 8, 9, 10])
        await mec.scatter("f", [7, 8, 9, 10])
        self.assertEqual(await mec.pull("f"), [[7], [8], [9], [10]])
        await mec.scatter("g", ["a", "b", "c"], flatten=True)
        self.assertEqual(await mec.pull("g"), ["a", "b", "c", []])
        self.assertEqual(await mec.gather("g"), ["a", "b", "c"])
        # Scalars come back as a list.
        self.assertEqual(await mec.gather("id"), [0, 1, 2, 3])

        await failure_of(mec.scatter("x", [1, 2], dist="r"), ValueError)
        await failure_of(mec.gather("x", dist="r"), ValueError)

    @run
    async def test_scatter_gather_numpy_arrays(self):
        """NumPy arrays scatter as array blocks and gather concatenated."""
        try:
            import numpy
        except ImportError:
            raise unittest.SkipTest(
                "numpy is not installed in this environment; gather's "
                "concatenation of arrays cannot be checked"
            ) from None
        mec = await self.start_cluster(3)
        await mec.scatter("arr", numpy.arange(10))
        blocks = await mec.pull("arr")
        self.assertEqual([b.tolist() for b in blocks], [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]])
        joined = await mec.gather("arr")
        self.assertIsInstance(joined, numpy.ndarray)
        self.assertEqual(joined.tolist(), list(range(10)))

    @run
    async def test_map_mapper_parallel(self):
        """map runs a function over sequences in contiguous blocks, one per
        target (direct, not load-balanced), and keeps the order; mapper and
        the parallel decorator do the same over chosen targets; names set
        up on the engines are visible to the function; unequal lengths give
        ValueError; a raising function gives a CompositeError."""
        mec = await self.start_cluster(3)
        self.assertEqual(await mec.map(lambda v: v * v, range(32)), [v * v for v in range(32)])
        # `id` is the engine's: the blocks are 3, 3 and 2 long.
        self.assertEqual(await mec.map(lambda v: id, range(8)), [0, 0, 0, 1, 1, 1, 2, 2])
        self.assertEqual(await mec.map(lambda a, b: a + b, [1, 2, 3], [10, 20, 30]), [11, 22, 33])
        self.assertEqual(
            await mec.map(lambda v: (v, id), range(3), targets=[2]), [(0, 2), (1, 2), (2, 2)]
        )
        self.assertEqual(await mec.map(lambda v: v, []), [])

        mapper = mec.mapper(targets=[0, 1])
        self.assertEqual(
            await mapper.map(lambda v: (v, id), range(4)), [(0, 0), (1, 0), (2, 1), (3, 1)]
        )
        pending = await mec.mapper(targets=2, block=False).map(lambda v: -v, [1, 2])
        self.assertIsInstance(pending, PendingResult)
        self.assertEqual(await pending.get_result(), [-1, -2])

        @mec.parallel(targets=[1, 2])
        def double(v):
            return (2 * v, id)

        self.assertEqual(await double(range(4)), [(0, 1), (2, 1), (4, 2), (6, 2)])
        self.assertEqual(double.__name__, "double")

        await mec.execute("import fractions\nscale = 3")
        fractions_back = await mec.map(lambda v: fractions.Fraction(v, scale), range(4))  # noqa: F821
        self.assertEqual(
            [(f.numerator, f.denominator) for f in fractions_back], [(0, 1), (1, 3), (2, 3), (1, 1)]
        )

        await failure_of(mec.map(lambda a, b: a, [1, 2], [1]), ValueError)
        error = await failure_of(mec.map(lambda v: 1 / v, [1, 0, 2]), CompositeError)
        self.assert_composite(error, "map", {1: "ZeroDivisionError"})


class PropertiesTests(_ClusterTestCase):
    @run
    async def test_get_set_has_del_clear(self):
        """Properties start as the engine's machine facts; set, get (all,
        one key, several), has, del and clear work per target; clear keeps
        the machine facts; a value that is not plain data is refused."""
        mec = await self.start_cluster(2)
        props = await mec.get_properties()
        self.assertEqual(len(props), 2)
        for engine_id, p in enumerate(props):
            self.assertLessEqual(set(FACT_KEYS), set(p))
            self.assertEqual(p["pid"], self.cluster.engine_pid(engine_id))
        self.assertEqual(
            await mec.set_properties({"RAM": 2**33, "tags": ["big"]}, targets=1), [None]
        )
        self.assertEqual(await mec.get_properties("RAM", targets=1), [2**33])
        self.assertEqual(
            await mec.get_properties(["RAM", "tags"], targets=[1]),
            [{"RAM": 2**33, "tags": ["big"]}],
        )
        self.assertEqual(await mec.has_properties("RAM"), [False, True])
        self.assertEqual(await mec.has_properties(["RAM", "pid"]), [[False, True], [True, True]])
        error = await failure_of(mec.get_properties("RAM"), CompositeError)
        self.assert_composite(error, "get_properties", {0: KeyError})
        self.assertIn("[0:get_properties]: KeyError: ", str(error))
        self.assertIn("engine 0 has no property 'RAM'", str(error))

        self.assertEqual(await mec.del_properties("RAM", targets=1), [None])
        self.assertEqual(await mec.has_properties(["RAM", "tags"], targets=1), [[False, True]])
        await mec.set_properties({"colour": "red"})
        self.assertEqual(await mec.get_properties("colour"), ["red", "red"])
        self.assertEqual(await mec.clear_properties(targets=[0, 1]), [None, None])
        after = await mec.get_properties()
        for engine_id, p in enumerate(after):
            self.assertEqual(set(p), set(FACT_KEYS))
            self.assertEqual({k: props[engine_id][k] for k in FACT_KEYS}, p)

        for bad in ({"lock": threading.Lock()}, {"f": lambda: 1}, {"o": object()}, {1: "x"}, ["x"]):
            await failure_of(mec.set_properties(bad), InvalidProperty)
        self.assertEqual(await mec.get_properties(), after)


class EngineControlTests(_ClusterTestCase):
    @run
    async def test_get_ids_queue_status_and_kill(self):
        """get_ids lists the engines; queue_status shows idle engines;
        kill(targets=[i]) stops that engine's process and it leaves the
        registry while the others keep working."""
        mec = await self.start_cluster(3)
        self.assertEqual(await mec.get_ids(), [0, 1, 2])
        self.assertEqual(
            await mec.queue_status(),
            [(i, {"pending": None, "queue": []}) for i in range(3)],
        )
        self.assertEqual(
            await mec.queue_status(targets=[2, 0]),
            [(2, {"pending": None, "queue": []}), (0, {"pending": None, "queue": []})],
        )
        slot = self.slot_of(2)
        await mec.kill(targets=[2])
        await wait_until(lambda: slot.child.ended.called, "engine 2's process to end")
        await self.cluster.wait_for_engines(2)
        self.assertEqual(await mec.get_ids(), [0, 1])
        await failure_of(mec.execute("a = 1", targets=2), InvalidEngineID)
        self.assertEqual([r["stdout"] for r in await mec.execute("print(id)")], ["0\n", "1\n"])
        slot = self.slot_of(0)
        pending = await mec.kill(targets=0, block=False)
        await pending.get_result()
        await wait_until(lambda: slot.child.ended.called, "engine 0's process to end")
        await self.cluster.wait_for_engines(1)
        self.assertEqual(await mec.get_ids(), [1])

    @run
    async def test_clear_queue(self):
        """clear_queue fails the MultiEngine commands queued behind a
        running one with QueueCleared (inside a CompositeError) and they
        never run; the running command finishes, and a Task queued on that
        engine is not dropped; queue_status shows all of it."""
        mec = await self.start_cluster(2)
        tc = self.cluster.task_client()
        marker, gate = self.tmp / "running", self.tmp / "gate"
        busy = await mec.execute(gated(marker, gate, "print('finished')"), targets=0, block=False)
        await wait_until(marker.exists, "the busy command to start")
        queued = [await mec.execute("q = %d" % k, targets=0, block=False) for k in range(3)] + [
            await mec.push({"z": 1}, targets=[0], block=False)
        ]
        pid = self.cluster.engine_pid(0)
        taskid = await tc.run(Task("t = id", pull="t", depend=lambda p: p["pid"] == pid))
        expected_queue = ["execute", "execute", "execute", "push", "task"]

        async def all_queued():
            ((_, status),) = await mec.queue_status(targets=0)
            return status == {"pending": "execute", "queue": expected_queue}

        await wait_until(all_queued, "the commands and the task to queue on engine 0")
        self.assertEqual(await mec.queue_status(targets=1), [(1, {"pending": None, "queue": []})])

        await mec.clear_queue(targets=0)
        await mec.clear_queue(targets=[1])
        self.assertEqual(
            await mec.queue_status(targets=[0]), [(0, {"pending": "execute", "queue": ["task"]})]
        )
        for pending, method in zip(queued, ["execute"] * 3 + ["push"], strict=True):
            error = await failure_of(pending.get_result(), CompositeError)
            self.assert_composite(error, method, {0: QueueCleared})
        self.assertFalse(busy.done)

        await self.engine_received_everything(0)
        gate.touch()
        (result,) = await busy.get_result()
        self.assertEqual((result["id"], result["stdout"]), (0, "finished\n"))
        tr = await tc.get_task_result(taskid, block=True)
        self.assertIsNone(tr.failure)
        self.assertEqual((tr.engineid, tr.ns.t), (0, 0))
        # The cleared commands never ran.
        error = await failure_of(mec.pull("q", targets=0), CompositeError)
        self.assert_composite(error, "pull", {0: "NameError"})
        self.assertEqual(await mec.keys(targets=0), [["_started", "id", "os", "t", "time"]])
        self.assertEqual(await mec.queue_status(targets=0), [(0, {"pending": None, "queue": []})])


class PendingResultTests(_ClusterTestCase):
    @run
    async def test_pending_results(self):
        """block=False answers a PendingResult at once: get_result(default,
        block=False) gives the default until the answer is there, then the
        value (kept for later calls); add_callback transforms it; barrier
        waits for several, swallowing their errors, and refuses anything
        that is not a PendingResult; after flush() an unfetched result
        raises InvalidResultID; the client's block and targets attributes
        are the defaults."""
        mec = await self.start_cluster(2)
        marker, gate = self.tmp / "running", self.tmp / "gate"
        busy = await mec.execute(gated(marker, gate), targets=0, block=False)
        self.assertIsInstance(busy, PendingResult)
        await wait_until(marker.exists, "the busy command to start")
        self.assertEqual(await busy.get_result("not yet", block=False), "not yet")
        self.assertFalse(busy.done)
        ids = await mec.pull("id", block=False)
        self.assertIs(ids.add_callback(lambda values, extra: [v + extra for v in values], 100), ids)
        missing = await mec.pull("missing", targets=1, block=False)
        scattered = await mec.scatter("s", [1, 2, 3], block=False)
        self.assertIsNone(await ids.get_result(block=False))

        gate.touch()
        self.assertIsNone(await mec.barrier([busy, ids, missing, scattered]))
        self.assertTrue(all(p.done for p in (busy, ids, missing, scattered)))
        (result,) = await busy.get_result()
        self.assertEqual(result["id"], 0)
        self.assertEqual(await ids.get_result(block=False), [100, 101])
        self.assertEqual(await ids.r, [100, 101])
        self.assertRaises(ValueError, ids.add_callback, lambda v: v)
        error = await failure_of(missing.get_result(), CompositeError)
        self.assert_composite(error, "pull", {1: "NameError"})
        self.assertEqual(await scattered.get_result(), [None, None])
        self.assertEqual(await mec.pull("s"), [[1, 2], [3]])

        await failure_of(mec.barrier([busy, "not a result"]), NotAPendingResult)

        unfetched = await mec.execute("c = 1", block=False)
        waiting = await mec.pull("c", targets=0, block=False)
        waiter = waiting.get_result()
        self.assertIs(type(mec).clear_pending_results, type(mec).flush)
        await mec.clear_pending_results()
        await failure_of(unfetched.get_result(), InvalidResultID)
        await failure_of(waiter, InvalidResultID)
        # Results fetched before the flush stay readable.
        self.assertEqual(await ids.get_result(), [100, 101])

        mec.block = False
        mec.targets = [1]
        pending = await mec.execute("print(id)")
        self.assertIsInstance(pending, PendingResult)
        self.assertEqual([r["stdout"] for r in await pending.get_result()], ["1\n"])
        self.assertEqual(await (await mec.pull("id", targets="all")).get_result(), [0, 1])
        self.assertEqual(await mec.pull("id", block=True), [1])


class ErrorTests(_ClusterTestCase):
    @run
    async def test_unknown_targets(self):
        """A target that names no engine gives InvalidEngineID for every
        method; a malformed target gives TypeError."""
        mec = await self.start_cluster(2)
        calls = [
            lambda t: mec.execute("a = 1", targets=t),
            lambda t: mec.push({"a": 1}, targets=t),
            lambda t: mec.pull("a", targets=t),
            lambda t: mec.zip_pull(["a"], targets=t),
            lambda t: mec.get_result(targets=t),
            lambda t: mec.reset(targets=t),
            lambda t: mec.keys(targets=t),
            lambda t: mec.kill(targets=t),
            lambda t: mec.scatter("a", [1, 2], targets=t),
            lambda t: mec.gather("a", targets=t),
            lambda t: mec.map(abs, [1], targets=t),
            lambda t: mec.get_properties(targets=t),
            lambda t: mec.set_properties({"a": 1}, targets=t),
            lambda t: mec.has_properties("a", targets=t),
            lambda t: mec.del_properties("a", targets=t),
            lambda t: mec.clear_properties(targets=t),
            lambda t: mec.queue_status(targets=t),
            lambda t: mec.clear_queue(targets=t),
        ]
        for call in calls:
            for targets in (5, [0, 5]):
                error = await failure_of(call(targets), InvalidEngineID)
                self.assertIn("no engine with id 5", str(error))
        await failure_of(mec.execute("a = 1", targets="some"), TypeError)
        await failure_of(mec.pull("a", targets=[0, True]), TypeError)
        # Nothing ran anywhere.
        self.assertEqual(await mec.keys(), [["id"], ["id"]])
        self.assertEqual(await mec.get_ids(), [0, 1])

    @run
    async def test_no_engines(self):
        """With no engine registered, 'all' gives NoEnginesRegistered."""
        mec = await self.start_cluster(0)
        self.assertEqual(await mec.get_ids(), [])
        calls = [
            mec.execute("a = 1"),
            mec.push({"a": 1}),
            mec.pull("a"),
            mec.keys(),
            mec.scatter("a", [1, 2]),
            mec.gather("a"),
            mec.map(abs, [1, 2]),
            mec.get_properties(),
            mec.queue_status(),
            mec.clear_queue(),
        ]
        for call in calls:
            await failure_of(call, NoEnginesRegistered)

    @run
    async def test_missing_name_composite_error(self):
        """Pulling a name an engine lacks gives one CompositeError with a
        `[engine_id:pull]: NameError: ...` line per such engine;
        raise_exception and print_tracebacks give the remote errors."""
        mec = await self.start_cluster(3)
        error = await failure_of(mec.pull("nope"), CompositeError)
        self.assert_composite(error, "pull", {0: "NameError", 1: "NameError", 2: "NameError"})
        lines = str(error).splitlines()
        self.assertEqual(lines[0], "one or more exceptions from call to method: pull")
        self.assertEqual(
            lines[1:],
            [
                "[%d:pull]: NameError: name 'nope' is not defined on engine %d" % (i, i)
                for i in range(3)
            ],
        )
        with self.assertRaises(RemoteTaskError) as raised:
            error.raise_exception()
        self.assertEqual((raised.exception.ename, raised.exception.engine_id), ("NameError", 0))
        with self.assertRaises(RemoteTaskError) as raised:
            error.raise_exception(2)
        self.assertEqual(raised.exception.engine_id, 2)
        self.assertRaises(IndexError, error.raise_exception, 3)

        await mec.push({"a": 5}, targets=[0, 2])
        error = await failure_of(mec.pull(["a", "id"]), CompositeError)
        self.assertEqual(
            str(error).splitlines()[1:],
            ["[1:pull]: NameError: name 'a' is not defined on engine 1"],
        )

        error = await failure_of(
            mec.execute("x = 1\nraise ValueError('bad %d' % id)"), CompositeError
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            error.print_tracebacks(1)
        text = out.getvalue()
        self.assertIn("[1:execute]: ValueError: bad 1", text)
        self.assertIn('File "<engine 1>", line 2', text)
        self.assertNotIn("engine 0", text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            error.print_tracebacks()
        self.assertEqual(out.getvalue().count("Traceback"), 3)

    @run
    async def test_serialization_errors(self):
        """An unpicklable value in push fails at the client with
        SerializationError and reaches no engine; an unpicklable value on
        an engine comes back from pull as a remote SerializationError."""
        mec = await self.start_cluster(2)
        error = await failure_of(mec.push({"lock": threading.Lock()}), SerializationError)
        self.assertIn("pushed namespace", str(error))
        await failure_of(mec.scatter("locks", [threading.Lock()] * 2), SerializationError)
        self.assertEqual(await mec.keys(), [["id"], ["id"]])
        await mec.execute("import threading\nlk = threading.Lock()", targets=1)
        error = await failure_of(mec.pull("lk", targets=[1]), CompositeError)
        self.assert_composite(error, "pull", {1: "SerializationError"})
        self.assertIn("'lk'", str(error))

    @run
    async def test_engine_dies_during_execute(self):
        """An engine that dies while executing gives EngineLost for that
        engine inside the CompositeError; the other engines answered and
        keep working."""
        mec = await self.start_cluster(3)
        slot = self.slot_of(1)
        code = "import os\nif id == 1:\n    os.kill(os.getpid(), 9)\nsurvived = True"
        error = await failure_of(mec.execute(code), CompositeError)
        self.assert_composite(error, "execute", {1: EngineLost})
        self.assertIn("[1:execute]: EngineLost: engine 1 was lost", str(error))
        await wait_until(lambda: slot.child.ended.called, "engine 1's process to end")
        await self.cluster.wait_for_engines(2)
        self.assertEqual(await mec.get_ids(), [0, 2])
        self.assertEqual(await mec.pull("survived"), [True, True])
        self.assertEqual([r["number"] for r in await mec.execute("print(id)")], [2, 2])


class BothInterfacesTests(_ClusterTestCase):
    @run
    async def test_multiengine_session_beside_task_farm(self):
        """MultiEngine commands queued behind tasks that clear the namespace
        afterwards or fail all run, in order, with the right values; then a
        MultiEngine session interleaved with a farm of 300 tasks (some
        clear_after, some failing) gets correct results on both sides."""
        mec = await self.start_cluster(3)
        tc = self.cluster.task_client()
        gate = self.tmp / "gate"
        markers = [self.tmp / ("blocker-%d" % i) for i in range(3)]

        def on_engine(engine_id):
            pid = self.cluster.engine_pid(engine_id)
            return lambda p: p["pid"] == pid

        blockers = [
            Task(
                gated(markers[0], gate, "left = 'x'"),
                pull="left",
                clear_after=True,
                depend=on_engine(0),
            ),
            Task(
                gated(markers[1], gate, "raise RuntimeError('after the gate')"), depend=on_engine(1)
            ),
            Task(
                gated(markers[2], gate, "raise RuntimeError('after the gate')"),
                clear_after=True,
                depend=on_engine(2),
            ),
        ]
        blocker_ids = await tc.run_many(blockers)
        await wait_until(lambda: all(m.exists() for m in markers), "the blocking tasks to start")
        pushed = mec.push({"a": 5})
        executed = mec.execute("b = a * id\nprint(b)")
        pulled = mec.pull(["a", "b"])

        async def all_queued():
            status = await mec.queue_status()
            return all(
                s == {"pending": "task", "queue": ["push", "execute", "pull"]} for _, s in status
            )

        await wait_until(all_queued, "the MultiEngine commands to queue behind the tasks")
        gate.touch()
        self.assertEqual(await pushed, [None, None, None])
        self.assertEqual([r["stdout"] for r in await executed], ["0\n", "5\n", "10\n"])
        self.assertEqual(await pulled, [[5, 0], [5, 5], [5, 10]])
        await tc.barrier(blocker_ids)
        left, failed1, failed2 = await tc.get_task_results(blocker_ids)
        self.assertEqual((left.failure, left.ns.left, left.engineid), (None, "x", 0))
        for tr, engine_id in ((failed1, 1), (failed2, 2)):
            self.assertIsInstance(tr.failure, RemoteTaskError)
            self.assertEqual((tr.failure.ename, tr.engineid), ("RuntimeError", engine_id))
        # clear_after emptied engines 0 and 2 before the MultiEngine commands ran.
        self.assertEqual(
            await mec.keys(),
            [["a", "b", "id"], ["_started", "a", "b", "id", "os", "time"], ["a", "b", "id"]],
        )

        # The farm, with a MultiEngine session interleaved.
        def farm_task(n):
            if n % 7 == 3:
                return Task("raise ValueError(%d)" % n)
            return Task("r = a + 1", push={"a": n}, pull="r", clear_after=(n % 5 == 0))

        task_ids, sessions = [], []
        for k in range(10):
            task_ids += await tc.run_many([farm_task(30 * k + i) for i in range(30)])
            sessions.append(
                (
                    k,
                    mec.execute("print(%d * 100 + id)" % k),
                    mec.push({"k": k}),
                    mec.pull("id"),
                    mec.map(lambda v, k=k: (v + k, id), range(6)),
                )
            )
        for k, executed, pushed, pulled, mapped in sessions:
            self.assertEqual(
                [r["stdout"] for r in await executed], ["%d\n" % (k * 100 + i) for i in range(3)]
            )
            self.assertEqual(await pushed, [None, None, None])
            self.assertEqual(await pulled, [0, 1, 2])
            self.assertEqual(await mapped, [(v + k, v // 2) for v in range(6)])
        await tc.barrier(task_ids)
        results = await tc.get_task_results(task_ids)
        failures = 0
        for n, tr in enumerate(results):
            if n % 7 == 3:
                failures += 1
                self.assertIsInstance(tr.failure, RemoteTaskError)
                self.assertEqual((tr.failure.ename, tr.failure.evalue), ("ValueError", str(n)))
            else:
                self.assertIsNone(tr.failure)
                self.assertEqual(tr.ns.r, n + 1)
        self.assertEqual({tr.engineid for tr in results}, {0, 1, 2})
        status = await tc.queue_status()
        self.assertEqual(
            (status["succeeded"], status["failed"], status["scheduled"], status["pending"]),
            (1 + 300 - failures, 2 + failures, 0, 0),
        )
        self.assertEqual(
            await mec.queue_status(), [(i, {"pending": None, "queue": []}) for i in range(3)]
        )

    @run
    async def test_set_properties_unblocks_a_waiting_task(self):
        """A MapTask whose depend no engine meets waits; set_properties
        through the MultiEngine interface lets it run at once, without a
        spin, on the engine that now qualifies."""
        mec = await self.start_cluster(2)
        tc = self.cluster.task_client()
        t = MapTask(pow, (2, 10), retries=1, depend=lambda p: p["RAM"] > 2**32)
        taskid = await tc.run(t)
        # A later task without depend finishing shows the first was passed over.
        self.assertEqual(await tc.get_task_result(await tc.run(MapTask(abs, (-3,))), block=True), 3)
        self.assertIsNone(await tc.get_task_result(taskid))
        self.assertEqual((await tc.queue_status())["scheduled"], 1)

        started = reactor.seconds()
        await mec.set_properties({"RAM": 2**33}, targets=1)
        value = await tc.get_task_result(taskid, block=True)
        elapsed = reactor.seconds() - started
        self.assertEqual(value, 1024)
        # Nothing else would dispatch it: the unmet-depend check runs every 15 s
        # and only times tasks out.
        self.assertLess(elapsed, 10.0)
        # The controller is in this process: its record says where it ran.
        self.assertEqual(self.cluster.controller.tasks._tasks[taskid].engine_id, 1)

    @run
    async def test_task_map_and_engine_names(self):
        """TaskClient.map gives ordered results for 1000 elements; mapper
        and parallel do the same; unequal sequence lengths give ValueError;
        a function task sees names set up on the engines with execute."""
        mec = await self.start_cluster(3)
        tc = self.cluster.task_client()
        self.assertEqual(await tc.map(lambda v: v + 1, range(1000)), list(range(1, 1001)))
        self.assertEqual(await tc.map(pow, [2, 3], [5, 2]), [32, 9])
        await failure_of(tc.map(pow, [2, 3], [5]), ValueError)
        await failure_of(mec.map(pow, [2, 3], [5]), ValueError)

        await mec.execute("import fractions\nscale = 3")
        values = await tc.map(lambda v: fractions.Fraction(v, scale), range(4))  # noqa: F821
        self.assertEqual(
            [(f.numerator, f.denominator) for f in values], [(0, 1), (1, 3), (2, 3), (1, 1)]
        )
        one = await tc.run(MapTask(lambda: (fractions.Fraction(1, scale), id)))  # noqa: F821
        fraction, engine_id = await tc.get_task_result(one, block=True)
        self.assertEqual((fraction.numerator, fraction.denominator), (1, 3))
        self.assertIn(engine_id, [0, 1, 2])

        ids = await tc.mapper(block=False).map(lambda v: v * 3, range(5))
        await tc.barrier(ids)
        self.assertEqual(await tc.get_task_results(ids), [0, 3, 6, 9, 12])

        @tc.parallel(retries=1)
        def negate(v):
            return -v

        self.assertEqual(await negate(range(6)), [0, -1, -2, -3, -4, -5])
        error = await failure_of(tc.map(lambda v: 1 / v, [1, 0]), RemoteTaskError)
        self.assertEqual(error.ename, "ZeroDivisionError")
