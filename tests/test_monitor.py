"""The controller's monitor (issue 13 items 1, 2 and 6): counters, rates,
per-engine runs, failures and the task page's data, on a `task.Clock`
with scripted engines; ``/metrics`` parsed by prometheus_client; the wire
form of ``status``; `taskfarm status`'s summary through the real clients
of an in-process grid."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.trial import unittest

from taskfarm import serialization, wire
from taskfarm.controller.monitor import (
    RECENT_FAILURES,
    RUNS_PER_ENGINE,
    Histogram,
)
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.dashboard import metrics
from taskfarm.errors import BadRequest, RemoteTaskError
from taskfarm.task import Task
from taskfarm.testing.fakes import ScriptedChannel
from taskfarm.testing.grid import LocalGrid


def _error(text="boom"):
    return RemoteTaskError(
        "ValueError", text, 'Traceback (most recent call last):\n  File "job.py"\nValueError: %s\n' % text, 0
    )


class MonitorTestCase(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000.0)
        self.registry = EngineRegistry(self.clock, task_slots=1, heartbeat_period=None)
        self.controller = TaskController(
            self.registry, FIFOScheduler(), self.clock, unmet_timeout=None,
            retention=None, prefetch=None, retry_delay=0.0, failure_penalty=0.0,
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.addCleanup(self.registry.stop)
        self.monitor = self.controller.monitor

    def engine(self, **properties):
        return ScriptedChannel.registered(self.registry, {"hostname": "node1", "pid": 42, **properties})

    def submit(self, *tasks):
        ids = self.controller.submit([t.to_envelope() for t in tasks])
        self.clock.advance(0)
        return ids

    def succeed(self, channel, seconds=0.5):
        ((seq, _, _),) = channel.pending()
        self.clock.advance(seconds)
        channel.reply(seq, True, serialization.dumps({}), 0.0, seconds)
        self.clock.advance(0)

    def fail(self, channel, text="boom"):
        ((seq, _, _),) = channel.pending()
        channel.fail(seq, _error(text))
        self.clock.advance(0)


class CounterTests(MonitorTestCase):
    def test_counts_and_engine_rows(self):
        """Successes, failures and retries are counted; the engine row says
        host, pid, properties, current task and tasks done."""
        a = self.engine(gpu=True)
        ok, bad = self.submit(Task("x"), Task("y", retries=1))
        (row,) = self.monitor.engines()
        self.assertEqual((row["host"], row["pid"], row["state"]), ("node1", 42, "busy"))
        self.assertEqual(row["properties"], {"gpu": "True"})
        self.assertEqual(row["current_task"], ok)
        self.succeed(a)
        self.assertEqual(self.monitor.engines()[0]["current_task"], bad)
        self.fail(a)  # retried
        self.fail(a)  # for good
        summary = self.monitor.summary()
        self.assertEqual(
            (summary["succeeded_total"], summary["failed_total"], summary["retried_total"]), (1, 1, 1)
        )
        self.assertEqual(summary["queue"]["failed"], 1)
        self.assertEqual(summary["engines"], 1)
        (row,) = self.monitor.engines()
        self.assertEqual((row["tasks_done"], row["current_task"], row["state"]), (3, None, "idle"))

    def test_rates_over_the_window(self):
        """tasks/s and failures/s count what finished since the oldest
        counter sample inside the window; with nothing finishing they fall
        to 0.  No timer is set for them."""
        a = self.engine()
        self.clock.advance(1.0)  # the sample taken at start: none done
        for _ in range(4):
            self.submit(Task("x"))
            self.succeed(a, 0.25)  # 4 tasks in the next second
        self.submit(Task("y"))
        self.fail(a)
        tasks_rate, failures_rate = self.monitor.rates()
        self.assertAlmostEqual(tasks_rate, 5 / 2.0)
        self.assertAlmostEqual(failures_rate, 1 / 2.0)
        # 9 s later the start sample is out of the window; the one the
        # first finished task took (at 1.25 s, none done yet) is the oldest.
        self.clock.advance(9.0)
        self.assertAlmostEqual(self.monitor.rates()[0], 5 / 9.75)
        self.clock.advance(11.0)
        self.assertEqual(self.monitor.rates(), (0.0, 0.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeline_runs_per_engine(self):
        """Each engine's lane holds its recent runs with how they ended, and
        the running task with no end, relative to now."""
        a = self.engine()
        ok, bad, running = self.submit(Task("x"), Task("y"), Task("z"))
        self.succeed(a, 0.5)
        self.fail(a)
        lanes = self.monitor.timeline(window=30.0)["lanes"]
        runs = lanes[str(a.engine.engine_id)]
        self.assertEqual([(r[0], r[3]) for r in runs], [(bad, "failed"), (ok, "ok"), (running, "running")])
        taskid, start, end, _ = runs[1]
        self.assertAlmostEqual(end - start, 0.5)
        self.assertIsNone(runs[2][2])
        self.clock.advance(60.0)
        lanes = self.monitor.timeline(window=30.0)["lanes"]
        self.assertEqual([r[3] for r in lanes[str(a.engine.engine_id)]], ["running"])

    def test_buffers_are_bounded(self):
        """Runs per engine and recent failures keep only their newest entries."""
        a = self.engine()
        count = max(RUNS_PER_ENGINE, RECENT_FAILURES) + 20
        for i in range(count):
            self.submit(Task("x%d" % i))
            self.fail(a, "n%d" % i)
        self.assertEqual(len(self.monitor._lanes[a.engine.engine_id].runs), RUNS_PER_ENGINE)
        self.assertEqual(len(self.monitor._failures), RECENT_FAILURES)
        newest = self.monitor.failures(limit=1)[0]
        self.assertEqual(newest["message"], "n%d" % (count - 1))

    def test_failure_and_task_page_data(self):
        """A failed task's page data: its attempts with engines and errors,
        its final error with the remote traceback."""
        a = self.engine()
        b = self.engine()
        (tid,) = self.submit(Task("y", retries=1))
        engines = []
        for text in ("first", "second"):
            channel = a if a.pending() else b
            engines.append(channel.engine.engine_id)
            self.fail(channel, text)
        info = self.monitor.task(tid)
        self.assertEqual(info["state"], "failed")
        self.assertEqual(info["attempts"], 2)
        self.assertEqual(
            [(x["attempt"], x["engine_id"], x["message"]) for x in info["failed_attempts"]],
            [(1, engines[0], "first"), (2, engines[1], "second")],
        )
        self.assertEqual(info["error"]["error"], "ValueError")
        self.assertIn("ValueError: second", info["error"]["traceback"])
        (failure,) = self.monitor.failures()
        self.assertEqual((failure["taskid"], failure["engine_id"]), (tid, engines[1]))
        self.assertIsNone(self.monitor.task(tid + 100))

    def test_dispatch_latency(self):
        """Seconds from submission to first dispatch land in the histogram."""
        self.submit(Task("x"))
        self.clock.advance(0.3)
        self.engine()
        self.clock.advance(0)
        buckets, total, count = self.monitor.dispatch_latency.snapshot()
        self.assertEqual(count, 1)
        self.assertAlmostEqual(total, 0.3)
        self.assertEqual(dict(buckets)[0.25], 0)
        self.assertEqual(dict(buckets)[0.5], 1)

    def test_engine_id_reused_starts_fresh(self):
        """A new engine under a lost engine's id has no runs of the old one."""
        a = self.engine()
        self.submit(Task("x"))
        self.succeed(a)
        self.registry.engine_lost(a.engine, "test")
        b = self.engine()
        self.assertEqual(b.engine.engine_id, a.engine.engine_id)
        self.assertEqual(self.monitor.engines()[0]["tasks_done"], 0)


class HistogramTests(unittest.SynchronousTestCase):
    def test_cumulative_buckets(self):
        """Buckets are cumulative and end with +Inf holding every observation."""
        h = Histogram((0.1, 1.0))
        for value in (0.05, 0.1, 0.5, 3.0):
            h.observe(value)
        buckets, total, count = h.snapshot()
        self.assertEqual(buckets, [(0.1, 2), (1.0, 3), (float("inf"), 4)])
        self.assertAlmostEqual(total, 3.65)
        self.assertEqual(count, 4)


class MetricsTests(MonitorTestCase):
    def test_prometheus_parser_reads_it(self):
        """prometheus_client's parser reads /metrics: queue depths by state,
        the counters, engines and both histograms."""
        a = self.engine()
        self.submit(Task("x"), Task("y", retries=1), Task("z"))
        self.succeed(a)
        self.fail(a)
        self.controller.monitor.journal_committed(0.002, 10)
        families = {f.name: f for f in text_string_to_metric_families(metrics.render(self.monitor).decode())}
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families.values() for s in f.samples
        }
        self.assertEqual(samples[("taskfarm_engines", ())], 1)
        self.assertEqual(samples[("taskfarm_tasks", (("state", "pending"),))], 1)
        self.assertEqual(samples[("taskfarm_tasks", (("state", "succeeded"),))], 1)
        self.assertEqual(samples[("taskfarm_tasks_succeeded_total", ())], 1)
        self.assertEqual(samples[("taskfarm_tasks_retried_total", ())], 1)
        self.assertEqual(samples[("taskfarm_tasks_failed_total", ())], 0)
        self.assertEqual(families["taskfarm_dispatch_latency_seconds"].type, "histogram")
        self.assertEqual(samples[("taskfarm_dispatch_latency_seconds_count", ())], 3)
        self.assertEqual(samples[("taskfarm_dispatch_latency_seconds_bucket", (("le", "+Inf"),))], 3)
        self.assertEqual(samples[("taskfarm_journal_commit_seconds_count", ())], 1)
        self.assertEqual(samples[("taskfarm_journal_commit_seconds_bucket", (("le", "0.001"),))], 0)
        self.assertEqual(samples[("taskfarm_journal_commit_seconds_bucket", (("le", "0.0025"),))], 1)


class SummaryWireTests(unittest.SynchronousTestCase):
    def test_round_trip_and_refusals(self):
        """A `ClusterSummary` parses from its plain form; a bad field is a
        `BadRequest` naming it."""
        summary = wire.ClusterSummary(4, {"scheduled": 3}, 1.5, 0.0, 10, 1, 0, 2)
        self.assertEqual(wire.ClusterSummary.parse(serialization.unpack(serialization.pack(summary.plain()))), summary)
        with self.assertRaises(BadRequest) as caught:
            wire.ClusterSummary.parse((4, {"scheduled": "x"}, 1.5, 0.0, 10, 1, 0, 2))
        self.assertIn("queue", str(caught.exception))
        with self.assertRaises(BadRequest) as caught:
            wire.ClusterSummary.parse((-1, {}, 1.5, 0.0, 10, 1, 0, 2))
        self.assertIn("engines", str(caught.exception))


class StatusOverTheWireTests(unittest.SynchronousTestCase):
    def test_task_client_status(self):
        """`TaskClient.status` answers the same summary as the dashboard's,
        through the real client and Referenceable."""
        grid = LocalGrid()
        self.addCleanup(grid.stop)
        grid.add_engine()
        grid.add_engine()
        tc = grid.task_client()
        d = tc.run(Task("x = 1"))
        d.addCallback(tc.barrier)
        grid.clock.pump([0.01] * 50)
        self.successResultOf(d)
        d = tc.status()
        grid.clock.pump([0.01] * 10)
        summary = self.successResultOf(d)
        self.assertIsInstance(summary, wire.ClusterSummary)
        self.assertEqual(summary.engines, 2)
        self.assertEqual(summary.succeeded_total, 1)
        self.assertEqual(summary.queue["succeeded"], 1)
        tc.disconnect()
        grid.clock.pump([0.01] * 10)


class StatusLinesTests(unittest.SynchronousTestCase):
    def test_summary_lines(self):
        """``taskfarm status`` prints the dashboard's summary: counts by
        state, rates, totals, and where the dashboard is (or that it is off)."""
        from taskfarm.cluster.manage import summary_lines

        summary = wire.ClusterSummary(4, {"scheduled": 7, "succeeded": 3}, 12.25, 0.5, 3, 1, 0, 2)
        lines = summary_lines(summary, None)
        self.assertEqual(lines[0], "tasks:      scheduled 7, succeeded 3")
        self.assertEqual(lines[1], "rates:      12.2 tasks/s, 0.5 failures/s (last 10 s)")
        self.assertIn("3 succeeded, 1 failed, 0 aborted, 2 attempts retried", lines[2])
        self.assertIn("dashboard:  off", lines[3])
        self.assertEqual(summary_lines(summary, "http://127.0.0.1:1/?token=t")[3], "dashboard:  http://127.0.0.1:1/?token=t")


class JournalCommitTests(unittest.TestCase):
    """The journal's writer thread feeds the commit histogram (real reactor)."""

    timeout = 30

    def test_commits_are_timed(self):
        """Each group commit of a real journal lands in the histogram that
        /metrics shows as taskfarm_journal_commit_seconds."""
        from twisted.internet import defer, reactor

        from taskfarm.controller.journal import Journal
        from taskfarm.testing.helpers import temp_dir

        journal = Journal(temp_dir(self) / "journal.sqlite", reactor)
        journal.open()
        self.addCleanup(journal.close)
        registry = EngineRegistry(reactor, heartbeat_period=None)
        controller = TaskController(
            registry, FIFOScheduler(), reactor, unmet_timeout=None, retention=None, journal=journal
        )

        async def run():
            await controller.submit_durably([Task("x").to_envelope(), Task("y").to_envelope()])
            buckets, total, count = controller.monitor.journal_commit.snapshot()
            self.assertGreaterEqual(count, 1)
            self.assertGreater(total, 0.0)
            self.assertEqual(buckets[-1], (float("inf"), count))

        return defer.Deferred.fromCoroutine(run())
