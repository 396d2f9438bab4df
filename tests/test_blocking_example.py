"""The blocking client's example session, run as a user would run it.

The blocking client starts its own reactor thread, so it must never run
inside the trial process (whose reactor runs the controller).  The example
runs in a child Python process instead, against a `RealCluster` of four
engines that this test starts; the child finds the cluster through
``TASKFARM_PROFILE`` and prints each answer as one ``name=<json>`` line.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import temp_dir
from taskfarm.testing.processes import run_python

#: The example from the issue, with `import math` in place of numpy (numpy
#: is not a dependency); each answer is printed for the test to check.
EXAMPLE = r"""
import json
from taskfarm import client

def show(name, value):
    print(name + "=" + json.dumps(value), flush=True)

mec = client.MultiEngineClient()
show("ids", mec.get_ids())
show("len", len(mec))
show("execute", [(r["id"], r["number"]) for r in mec.execute("import math; x = id * 10")])
show("x", mec.pull("x"))
show("push", mec.push(dict(a=5), targets=[0, 2]))
show("a", mec.pull("a", targets=[0, 2]))
show("keys", mec.keys(targets=3))
mec.scatter("chunk", list(range(10)))
show("chunks", mec.pull("chunk"))
show("gather", mec.gather("chunk"))
show("set_properties", mec.set_properties({"RAM": 2**33}, targets=1))
show("RAM", mec.has_properties("RAM"))
show("squares", mec.map(lambda v: v * v, range(32)))
pr = mec.execute("import time; time.sleep(1)", block=False)
show("not_ready", pr.get_result("not yet", block=False))
show("pending", [(r["id"], r["input"]["raw"]) for r in pr.get_result()])
mec["a"] = [1, 2]
show("item", mec["a"])
pr2 = mec.pull("x", block=False)
mec.barrier([pr2])
show("barrier", pr2.r)
try:
    mec.barrier([pr2, "x"])
except client.NotAPendingResult:
    show("not_pending", True)

@mec.parallel(targets=[0, 1])
def triple(v):
    return 3 * v

show("parallel", triple(range(4)))
show("mapper", mec.mapper(targets=3).map(abs, [-1, -2]))
tc = client.TaskClient()
show("tc_map", tc.map(lambda v: v + 1, range(1000)))
t = client.MapTask(pow, (2, 10), retries=1, depend=lambda p: p["RAM"] > 2**32)
show("pow", tc.get_task_result(tc.run(t), block=True))
ids = tc.mapper(block=False).map(abs, [-1, -2])
tc.barrier(ids)
show("tc_mapper", tc.get_task_results(ids))
tc.close()
mec.close()
show("done", True)
"""


class BlockingExampleTests(unittest.TestCase):
    timeout = 120

    async def _run_example(self) -> tuple[int, dict, str]:
        root = str(temp_dir(self, "taskfarm-blocking-"))
        cluster = RealCluster(reactor, profile_root=root)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cluster.stop()))
        await cluster.start(4)

        return await run_python(EXAMPLE, root)

    def test_blocking_example(self):
        """The example session of the blocking MultiEngine and Task clients
        gives the documented answers, in a process of its own."""

        async def go():
            code, answers, err = await self._run_example()
            self.assertEqual(code, 0, "the example failed:\n%s" % err[-4000:])
            self.assertEqual(answers["ids"], [0, 1, 2, 3])
            self.assertEqual(answers["len"], 4)
            self.assertEqual(answers["execute"], [[0, 1], [1, 1], [2, 1], [3, 1]])
            self.assertEqual(answers["x"], [0, 10, 20, 30])
            self.assertEqual(answers["push"], [None, None])
            self.assertEqual(answers["a"], [5, 5])
            self.assertEqual(answers["keys"], [["id", "math", "x"]])
            self.assertEqual(answers["chunks"], [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]])
            self.assertEqual(answers["gather"], list(range(10)))
            self.assertEqual(answers["set_properties"], [None])
            self.assertEqual(answers["RAM"], [False, True, False, False])
            self.assertEqual(answers["squares"], [v * v for v in range(32)])
            self.assertEqual(answers["not_ready"], "not yet")
            self.assertEqual(
                answers["pending"], [[i, "import time; time.sleep(1)"] for i in range(4)]
            )
            self.assertEqual(answers["item"], [[1, 2]] * 4)
            self.assertEqual(answers["barrier"], [0, 10, 20, 30])
            self.assertIs(answers["not_pending"], True)
            self.assertEqual(answers["parallel"], [0, 3, 6, 9])
            self.assertEqual(answers["mapper"], [1, 2])
            self.assertEqual(answers["tc_map"], list(range(1, 1001)))
            self.assertEqual(answers["tc_mapper"], [1, 2])
            self.assertEqual(answers["pow"], 1024)
            self.assertIs(answers["done"], True)

        return defer.Deferred.fromCoroutine(go())
