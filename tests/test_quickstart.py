"""The original quick-start, against a real controller and real engines."""

from twisted.internet import defer

from taskfarm.task import Task
from taskfarm.testing.cluster import ClusterTestCase


class QuickStartTests(ClusterTestCase):
    timeout = 120
    folder_prefix = "taskfarm-quickstart-"

    async def _setup(self, n=4, **options):
        return await self.start_cluster(n, **options)

    def test_quickstart(self):
        """1000 tasks pulled back by name arrive with metadata and values."""

        async def go():
            tc = await self._setup()
            ids = [await tc.run(Task("a = %i" % n, pull="a")) for n in range(1000)]
            await tc.barrier(ids)
            results = await tc.get_task_results(ids)
            tr = results[73]
            self.assertEqual(repr(tr), "TaskResult[ID:%d]:{'a': 73}" % ids[73])
            self.assertEqual(tr.results["a"], 73)
            self.assertEqual(tr.ns.a, 73)
            self.assertIn(tr.engineid, [0, 1, 2, 3])
            self.assertRegex(tr.submitted, r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d$")
            self.assertIsInstance(tr.duration, float)
            self.assertEqual([r.ns.a for r in results], list(range(1000)))
            status = await tc.queue_status()
            self.assertEqual(status["succeeded"], 1000)
            self.assertEqual((status["scheduled"], status["pending"], status["failed"]), (0, 0, 0))
            self.assertEqual({r.engineid for r in results}, {0, 1, 2, 3})

        return defer.Deferred.fromCoroutine(go())
