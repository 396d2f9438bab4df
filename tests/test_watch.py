"""The watcher behind futures, ``as_completed`` and progress bars, the
Deferred ``as_completed``, and progress bars of barrier and map (tqdm's
text written to a StringIO), on a `task.Clock` through `LocalGrid`; and
the `taskfarm.aio` mode checks that need no reactor thread."""

from __future__ import annotations

import asyncio
import io
import os

from twisted.internet import defer
from twisted.trial import unittest

from taskfarm import progress
from taskfarm.aioclient import _Bridge
from taskfarm.errors import ConnectionLost, RemoteTaskError, WaitTimeout
from taskfarm.task import MapTask, TaskResult
from taskfarm.testing.grid import LocalGrid
from taskfarm.watch import Watcher


def fail_on_odd(v):
    if v % 2:
        raise ValueError("odd %d" % v)
    return v


class GridCase(unittest.SynchronousTestCase):
    engines = 2

    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.channels = [self.grid.add_engine() for _ in range(self.engines)]
        self.tc = self.grid.task_client()
        self.calls: list[tuple[str, int]] = []
        call = self.tc._connection.call

        def counting(method, *args, **kwargs):
            if method in ("results", "wait"):
                from taskfarm import serialization

                self.calls.append((method, len(serialization.unpack(args[0]))))
            return call(method, *args, **kwargs)

        self.tc._connection.call = counting

    def settle(self, d: defer.Deferred | None = None, seconds: float = 2.0) -> None:
        self.grid.settle(seconds, 0.002, until=d)

    def value(self, d):
        self.settle(d)
        return self.successResultOf(d)

    def submit(self, tasks) -> list[int]:
        return self.value(self.tc.run_many(tasks))


class WatcherTests(GridCase):
    def test_reports_each_task_once_in_batches(self):
        """Twenty tasks finishing: each is reported once, and every
        ``results`` request the watcher made asked about several tasks at
        once (the first about all twenty): no request per task."""
        for channel in self.channels:
            channel.hold()
        ids = self.submit([MapTask(abs, (-i,)) for i in range(20)])
        seen = []
        watcher = Watcher(self.tc, seen.append)
        self.calls.clear()
        watcher.add(ids)
        self.settle(seconds=0.1)
        self.assertEqual(seen, [])
        for channel in self.channels:
            channel.release()
        self.settle(seconds=1.0)
        self.assertEqual(sorted(env.taskid for env in seen), ids)
        self.assertTrue(all(env.ok for env in seen))
        self.assertEqual(watcher.state, "idle")
        rounds = [n for method, n in self.calls if method == "results"]
        self.assertEqual(rounds[0], 20)
        self.assertLess(len(rounds), 20)
        # The oldest task's blocking wait is the only single-id request.
        self.assertTrue(all(n == 1 for method, n in self.calls if method == "wait"))

    def test_a_round_asks_about_the_oldest_window(self):
        """With a window of 5, each round asks about at most 5 tasks, the
        oldest unfinished; all 12 are still reported."""
        for channel in self.channels:
            channel.hold()
        ids = self.submit([MapTask(abs, (-i,)) for i in range(12)])
        seen = []
        watcher = Watcher(self.tc, seen.append, window=5)
        self.calls.clear()
        watcher.add(ids)
        self.settle(seconds=0.1)
        for channel in self.channels:
            channel.release()
        self.settle(seconds=1.0)
        self.assertEqual(sorted(env.taskid for env in seen), ids)
        rounds = [n for method, n in self.calls if method == "results"]
        self.assertEqual(max(rounds), 5)

    def test_one_round_reports_in_finishing_order(self):
        """Tasks found finished in the same round are reported in the order
        the engines finished them, not by id."""
        self.channels[0].hold()
        self.channels[1].hold()
        ids = self.submit([MapTask(abs, (-i,)) for i in range(4)])
        self.settle(seconds=0.05)
        on = {engine: [t for t in ids if self.grid.controller.store.records([t])[0].engine_id == engine]
              for engine in (0, 1)}
        self.channels[1].release()  # engine 1's tasks finish first ...
        self.settle(seconds=0.05)
        self.channels[0].release()
        self.settle(seconds=0.05)
        seen = []
        watcher = Watcher(self.tc, seen.append)  # ... but all are seen in one round
        watcher.add(ids)
        self.settle(seconds=0.2)
        order = [env.taskid for env in seen]
        self.assertEqual(sorted(order), ids)
        self.assertEqual(set(order[: len(on[1])]), set(on[1]))
        self.assertEqual([env.completed for env in seen], sorted(env.completed for env in seen))

    def test_pauses_back_off_while_nothing_finishes(self):
        """While nothing finishes the rounds thin out (the pause doubles up
        to MAX_PAUSE): 2 s of a held task cost fewer than 20 rounds."""
        self.channels[0].hold()
        self.channels[1].hold()
        ids = self.submit([MapTask(abs, (-1,))])
        watcher = Watcher(self.tc, lambda env: None)
        self.calls.clear()
        watcher.add(ids)
        self.settle(seconds=2.0)
        rounds = [n for method, n in self.calls if method == "results"]
        self.assertGreater(len(rounds), 3)
        self.assertLess(len(rounds), 20)
        watcher.stop()
        self.assertEqual(watcher.state, "stopped")

    def test_clear_forgets_delivered_tasks(self):
        """With `clear`, delivered tasks are cleared on the controller."""
        ids = self.submit([MapTask(abs, (-i,)) for i in range(3)])
        seen = []
        watcher = Watcher(self.tc, seen.append, clear=True)
        watcher.add(ids)
        self.settle(seconds=0.5)
        self.assertEqual(len(seen), 3)
        self.assertEqual(self.value(self.tc.queue_status())["succeeded"], 0)


    def test_a_controller_lost_fails_the_watched(self):
        """When the controller comes back without its journal (the tasks are
        gone), `on_error` gets the typed error once, and nothing is left
        watched: every watched task ends, none hangs."""
        for channel in self.channels:
            channel.hold()
        ids = self.submit([MapTask(abs, (-1,)), MapTask(abs, (-2,))])
        errors, seen = [], []
        watcher = Watcher(self.tc, seen.append, errors.append)
        watcher.add(ids)
        self.settle(seconds=0.1)
        self.grid.restart()
        self.settle(seconds=1.0)
        self.assertEqual(seen, [])
        self.assertEqual([type(e).__name__ for e in errors], ["ConnectionLost"])
        self.assertIn("restarted without a journal", str(errors[0]))
        self.assertEqual(watcher.watched, frozenset())
        self.assertEqual(watcher.state, "idle")


class AsCompletedTests(GridCase):
    def test_in_finishing_order(self):
        """The Deferreds fire in the order the tasks finish: those of the
        free engine first, those of the held engine once it is released;
        each with the task's `TaskResult`."""
        self.channels[0].hold()
        ids = self.submit([MapTask(abs, (-i,)) for i in range(4)])
        self.settle(seconds=0.1)
        held = {
            taskid for taskid in ids
            if self.grid.controller.store.records([taskid])[0].engine_id == 0
        }
        self.assertTrue(held and held != set(ids))
        slots = self.tc.as_completed(ids + ids[:1])  # a repeated id counts once
        self.assertEqual(len(slots), 4)
        self.settle(seconds=0.5)
        fired = [d for d in slots if d.called]
        self.assertEqual(slots[: len(fired)], fired)  # fired from the first on
        first = [self.successResultOf(d) for d in fired]
        self.assertEqual({tr.taskid for tr in first}, set(ids) - held)
        self.channels[0].release()
        self.settle(seconds=0.5)
        results = first + [self.successResultOf(d) for d in slots[len(fired):]]
        self.assertEqual({type(tr) for tr in results}, {TaskResult})
        self.assertEqual(sorted(tr.taskid for tr in results), ids)
        self.assertEqual({tr.taskid: tr.value for tr in results}, {t: i for i, t in enumerate(ids)})

    def test_timeout(self):
        """Past `timeout` the unfired Deferreds fail with `WaitTimeout`
        (a TimeoutError) saying how many were unfinished; the fired keep
        their results."""
        self.channels[0].hold()
        self.channels[1].hold()
        ids = self.submit([MapTask(abs, (-1,)), MapTask(abs, (-2,))])
        slots = self.tc.as_completed(ids, timeout=1.0)
        self.settle(seconds=1.5)
        for slot in slots:
            error = self.failureResultOf(slot, WaitTimeout).value
            self.assertIsInstance(error, TimeoutError)
            self.assertIn("2 of 2 tasks were unfinished after 1 s", str(error))

    def test_a_controller_lost_fails_every_slot(self):
        """A lost controller fails every unfired Deferred with its error."""
        for channel in self.channels:
            channel.hold()
        ids = self.submit([MapTask(abs, (-1,)), MapTask(abs, (-2,))])
        slots = self.tc.as_completed(ids)
        self.settle(seconds=0.1)
        self.grid.restart()
        self.settle(seconds=1.0)
        for slot in slots:
            self.failureResultOf(slot, ConnectionLost)

    def test_cancelling_every_slot_stops_the_watcher(self):
        """Once every unfired Deferred is cancelled, nothing more is asked."""
        for channel in self.channels:
            channel.hold()
        ids = self.submit([MapTask(abs, (-1,)), MapTask(abs, (-2,))])
        slots = self.tc.as_completed(ids)
        self.settle(seconds=0.1)
        slots[0].cancel()
        self.calls.clear()
        self.settle(seconds=0.5)
        self.assertNotEqual([c for c in self.calls if c[0] == "results"], [])  # one still waited on
        slots[1].cancel()
        self.settle(seconds=0.3)
        self.calls.clear()
        self.settle(seconds=1.0)
        self.assertEqual([c for c in self.calls if c[0] == "results"], [])
        for slot in slots:
            self.failureResultOf(slot, defer.CancelledError)

    def test_failures_are_results(self):
        """A failed MapTask gives a `TaskResult` whose `.failure` is the error."""
        ids = self.submit([MapTask(fail_on_odd, (1,))])
        (slot,) = self.tc.as_completed(ids)
        self.settle(slot)
        tr = self.successResultOf(slot)
        self.assertIsInstance(tr.failure, RemoteTaskError)
        self.assertIn("odd 1", str(tr.failure))


class ProgressTests(GridCase):
    def final_line(self, buf: io.StringIO) -> str:
        return buf.getvalue().replace("\r", "\n").strip().splitlines()[-1]

    def test_barrier_bar_totals(self):
        """`barrier(progress=...)` draws a bar whose last line says all 6
        tasks done and the 3 that failed."""
        ids = self.submit([MapTask(fail_on_odd, (i,)) for i in range(6)])
        buf = io.StringIO()
        self.assertIsNone(self.value(self.tc.barrier(ids, progress={"file": buf})))
        line = self.final_line(buf)
        self.assertIn("barrier: 100%", line)
        self.assertIn("6/6", line)
        self.assertIn("failed=3", line)

    def test_map_bar_totals_and_results(self):
        """`map(progress=...)` gives its results in order, and the bar's last
        line says 8/8 with no failure; a failing map's bar counts them."""
        buf = io.StringIO()
        self.assertEqual(
            self.value(self.tc.map(abs, [-i for i in range(8)], progress={"file": buf})), list(range(8))
        )
        line = self.final_line(buf)
        self.assertIn("8/8", line)
        self.assertIn("failed=0", line)
        self.assertEqual(self.value(self.tc.queue_status())["succeeded"], 0)  # cleared
        buf = io.StringIO()
        d = self.tc.map(fail_on_odd, range(4), progress={"file": buf, "desc": "odd"})
        self.settle(d)
        self.failureResultOf(d, RemoteTaskError)
        line = self.final_line(buf)
        self.assertIn("odd: 100%", line)
        self.assertIn("4/4", line)
        self.assertIn("failed=2", line)

    def test_mapper_passes_progress(self):
        """A mapper's map takes `progress` too (not given to the function)."""
        buf = io.StringIO()
        mapper = self.tc.mapper(retries=1)
        self.assertEqual(self.value(mapper.map(abs, [-1, -2], progress={"file": buf})), [1, 2])
        self.assertIn("2/2", self.final_line(buf))

    def test_multiengine_map_bar(self):
        """`mec.map(progress=...)` counts each engine's block as it answers:
        10/10 at the end, with the values in order."""
        mec = self.grid.multiengine_client()
        buf = io.StringIO()
        d = mec.map(lambda v: v * 2, range(10), progress={"file": buf})
        self.assertEqual(self.value(d), [v * 2 for v in range(10)])
        line = self.final_line(buf)
        self.assertIn("10/10", line)
        self.assertIn("failed=0", line)

    def test_cancel_stops_bar_and_client_stays_usable(self):
        """Cancelling a barrier with a bar (what Ctrl-C does in the blocking
        client) ends the bar at what was done and the watching; the client
        then waits on the same tasks as before."""
        for channel in self.channels:
            channel.hold()
        ids = self.submit([MapTask(abs, (-i,)) for i in range(4)])
        buf = io.StringIO()
        d = self.tc.barrier(ids, progress={"file": buf})
        self.settle(seconds=0.2)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertIn("0/4", self.final_line(buf))
        self.calls.clear()
        self.settle(seconds=1.0)
        self.assertEqual([c for c in self.calls if c[0] == "results"], [])  # no watcher left
        for channel in self.channels:
            channel.release()
        self.assertIsNone(self.value(self.tc.barrier(ids)))

    def test_wanted(self):
        """None follows TASKFARM_PROGRESS; True, False and dicts are taken
        as they are; anything else is a TypeError."""
        old = os.environ.pop(progress.ENVIRONMENT, None)
        self.addCleanup(lambda: os.environ.__setitem__(progress.ENVIRONMENT, old) if old is not None
                        else os.environ.pop(progress.ENVIRONMENT, None))
        self.assertFalse(progress.wanted(None))
        os.environ[progress.ENVIRONMENT] = "1"
        self.assertTrue(progress.wanted(None))
        os.environ[progress.ENVIRONMENT] = "0"
        self.assertFalse(progress.wanted(None))
        self.assertTrue(progress.wanted(True))
        self.assertTrue(progress.wanted({}))
        self.assertFalse(progress.wanted(False))
        with self.assertRaises(TypeError):
            progress.wanted("yes")


class AioModeTests(unittest.SynchronousTestCase):
    """Mode choices of `taskfarm.aio` that are errors, said at once."""

    def test_loop_mode_without_asyncio_reactor(self):
        """mode='loop' when the installed reactor is not Twisted's asyncio
        reactor on the running loop is a RuntimeError naming install_reactor
        (the 20-second hang of asFuture on another reactor, made an error)."""

        async def go():
            _Bridge("loop").start()

        with self.assertRaises(RuntimeError) as caught:
            asyncio.run(go())
        self.assertIn("taskfarm.aio.install_reactor()", str(caught.exception))

    def test_bad_mode(self):
        with self.assertRaises(ValueError) as caught:
            _Bridge("fast")
        self.assertIn("auto, thread, loop", str(caught.exception))

    def test_install_reactor_refuses_another_reactor(self):
        """With another reactor installed (the tests' own), install_reactor
        says so instead of failing later."""
        from taskfarm.aio import install_reactor

        async def go():
            install_reactor()

        with self.assertRaises(RuntimeError) as caught:
            asyncio.run(go())
        self.assertIn("is installed already", str(caught.exception))
