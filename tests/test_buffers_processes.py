"""Big values out of band over real Foolscap, and processes killed in the
middle of a big transfer: no task is lost, no partial value is delivered.

Real engine processes (and one client process); kept short: 32 MB values.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy
from twisted.internet import defer, reactor

from taskfarm.task import MapTask, Task
from taskfarm.testing.cluster import ClusterTestCase, RealCluster
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import sleep

MB = 1_000_000
N = 32 * MB // 8

#: An engine that SIGKILLs itself just after its task returned, while the
#: big result is being pickled and sent, the first time only.
_DIE_WHILE_SENDING = """
import os, signal, threading, numpy
r = numpy.arange(%d, dtype=numpy.float64)
if not os.path.exists(marker):
    open(marker, "w").close()
    threading.Timer(0.03, os.kill, (os.getpid(), signal.SIGKILL)).start()
""" % N


def _within(d, seconds: float = 60.0):
    return d.addTimeout(seconds, reactor)


class BigValuesTests(ClusterTestCase):
    folder_prefix = "taskfarm-buffers-"

    @run
    async def test_every_path_over_foolscap(self):
        """A 32 MB array as a MapTask result, pushed and pulled by a
        MultiEngine client, and Fortran-ordered through a Task's push and
        pull: each comes back equal, with its dtype, shape and order."""
        tc = await self.start_cluster(1)
        array = numpy.arange(N, dtype=numpy.float64)
        value = await _within(tc.get_task_result(
            await tc.run(MapTask(numpy.copy, args=(array,))), block=True))
        self.assertTrue(numpy.array_equal(value, array))
        self.assertTrue(value.flags.writeable)
        mec = self.cluster.multiengine_client()
        await _within(mec.push({"a": array}, targets=0, block=True))
        (pulled,) = await _within(mec.pull("a", targets=0, block=True))
        self.assertTrue(numpy.array_equal(pulled, array))
        fortran = numpy.asfortranarray(array.reshape(1000, -1))
        taskid = await tc.run(Task("b = a", push={"a": fortran}, pull="b"))
        result = await _within(tc.get_task_result(taskid, block=True))
        self.assertTrue(numpy.array_equal(result.ns.b, fortran))
        self.assertTrue(result.ns.b.flags.f_contiguous)

    @run
    async def test_engine_killed_while_sending_a_big_result(self):
        """The engine dies while its 32 MB result is on the way: the task is
        not lost (its retry runs on the other engine) and the client gets
        the whole value, never a part of it."""
        tc = await self.start_cluster(2)
        marker = str(self.tmp / "died-once")
        taskid = await tc.run(Task(_DIE_WHILE_SENDING, push={"marker": marker}, pull="r",
                                   retries=1))
        result = await _within(tc.get_task_result(taskid, block=True), 90)
        self.assertTrue(os.path.exists(marker))
        self.assertIsNone(result.failure)
        self.assertTrue(numpy.array_equal(result.ns.r, numpy.arange(N, dtype=numpy.float64)))
        self.assertEqual(result.attempts, 2)

    @run
    async def test_client_killed_while_receiving_a_big_result(self):
        """A client process killed while it fetches a 32 MB result: the
        controller keeps the result, and the next client gets all of it."""
        tc = await self.start_cluster(1)
        taskid = await tc.run(Task("r = b'r' * %d" % (32 * MB), pull="r"))
        await _within(tc.barrier([taskid]))
        code = (
            "import sys; from taskfarm import client\n"
            "tc = client.TaskClient(sys.argv[1], connect_timeout=30)\n"
            "print('asking', flush=True)\n"
            "tc.get_task_result(int(sys.argv[2]), block=True)\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(self.cluster.profile.root), str(taskid)],
            stdout=subprocess.PIPE, env=env,
        )
        try:
            line = await _within(defer.Deferred.fromCoroutine(_readline(child)), 60)
            self.assertEqual(line.strip(), b"asking")
            await sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            child.stdout.close()
        result = await _within(tc.get_task_result(taskid, block=True))
        self.assertEqual(len(result.ns.r), 32 * MB)
        self.assertEqual(result.ns.r, b"r" * (32 * MB))


    @run
    async def test_a_big_result_survives_a_controller_restart(self):
        """A result kept as frames (an array and big bytes) is journaled in
        its file and comes back whole from the controller that restarts on
        the same profile."""
        tc = await self.start_cluster(1)
        taskid = await tc.run(Task(
            "import numpy; a = numpy.arange(%d, dtype=numpy.int32); b = b'b' * %d" % (MB, MB),
            pull=["a", "b"]))
        first = await _within(tc.get_task_result(taskid, block=True))
        await self.cluster.stop()
        again = RealCluster(reactor, profile_root=str(self.cluster.profile.root))
        self.cluster = again  # the cleanup stops this one now
        await again.start(0)
        result = await _within(again.task_client().get_task_result(taskid, block=True))
        self.assertTrue(numpy.array_equal(result.ns.a, first.ns.a))
        self.assertEqual(result.ns.b, b"b" * MB)


async def _readline(child) -> bytes:
    from twisted.internet import threads

    return await threads.deferToThread(child.stdout.readline)
