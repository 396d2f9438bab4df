"""Clients over real Foolscap on 127.0.0.1 (issue 14, items 1, 2 and 7).

A controller in the test's process (`ClusterTestCase`, no engines: every
call here is answered by the controller alone), its clients sharing one
client Tub, hence one connection, as clients of one process do:

* one client closing while another's calls are in flight, 50 times, in one
  thread and in two threads: no call of the other fails;
* a furl whose controller identity changed: `StaleFurl` (a `FurlError`)
  naming the fresh furl file;
* the blocking client in a child process: ``with``, timeouts that leave it
  usable, tracebacks that start at the public method, two threads.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading

from foolscap.furl import decode_furl
from twisted.internet import defer, reactor, threads, utils

from taskfarm.asyncclient import TaskClient
from taskfarm.errors import FurlError, StaleFurl, UnknownTask
from taskfarm.profile import TASK
from taskfarm.remote.tub import new_tub
from taskfarm.testing.cluster import ClusterTestCase

ROUNDS = 50


class SharedConnectionTests(ClusterTestCase):
    timeout = 90

    async def test_close_while_another_calls(self):
        """One thread: b's calls are in flight when a closes; 50 rounds."""
        await self.start_cluster(0)
        failures = []
        for _ in range(ROUNDS):
            a, b = self.cluster.task_client(), self.cluster.task_client()
            await defer.gatherResults([a.connect(), b.connect()])
            # Calls that are not retried (a clear, an abort) as well as
            # ones that are: a dropped connection would fail the former.
            unknown = b.abort(10**9)
            calls = [b.queue_status(), b.clear([]), b.engine_ids(), b.clear([])]
            closed = a.close()
            outcomes = await defer.DeferredList(calls + [closed], consumeErrors=True)
            failures += [result for ok, result in outcomes if not ok]
            try:
                await unknown
            except UnknownTask:
                pass  # the controller's own answer: the call went through
            except Exception as e:
                failures.append(e)
            # b still calls after a left.
            self.assertEqual(await b.engine_ids(), [])
            await b.close()
        self.assertEqual(failures, [])

    async def test_two_threads(self):
        """Two threads, each its own client, one closing and reopening
        while the other calls; 50 rounds each, 0 failures."""
        await self.start_cluster(0)
        steady = self.cluster.task_client()
        await steady.connect()
        failures: list = []
        stop = threading.Event()

        def churn():
            for _ in range(ROUNDS):
                try:
                    client = threads.blockingCallFromThread(reactor, self.cluster.task_client)
                    threads.blockingCallFromThread(reactor, client.queue_status)
                    threads.blockingCallFromThread(reactor, client.close)
                except Exception as e:
                    failures.append(("churn", e))
            stop.set()

        def call():
            rounds = 0
            while not stop.is_set() or rounds < ROUNDS:
                try:
                    threads.blockingCallFromThread(reactor, steady.queue_status)
                    # Not retried: a dropped connection would fail it.
                    threads.blockingCallFromThread(reactor, steady.clear, [])
                except Exception as e:
                    failures.append(("steady", e))
                rounds += 1
                if rounds > 20 * ROUNDS:
                    break
            return rounds

        results = await defer.gatherResults([threads.deferToThread(churn), threads.deferToThread(call)])
        self.assertGreaterEqual(results[1], ROUNDS)
        self.assertEqual(failures, [])


class StaleFurlTests(ClusterTestCase):
    timeout = 60

    async def test_a_changed_identity_is_stale_furl(self):
        """The controller at the furl's address has another TubID: the
        client says its identity changed and where the fresh furl is."""
        await self.start_cluster(0)
        furl = self.cluster.profile.furl_file(TASK).read_text().strip()
        _, hints, name = decode_furl(furl)
        other = new_tub().getTubID()
        old = self.tmp / "old-task.furl"
        old.write_text("pb://%s@%s/%s\n" % (other, ",".join(hints), name))
        client = TaskClient(old, reactor, connect_timeout=10, tub=self.cluster._tub())
        with self.assertRaises(StaleFurl) as caught:
            await client.connect()
        self.assertIsInstance(caught.exception, FurlError)
        text = str(caught.exception)
        self.assertIn("new identity", text)
        self.assertIn(str(old), text)
        self.assertNotIn(name, text)  # the furl's secret is never shown


_BLOCKING = textwrap.dedent(
    """
    import json, sys, threading, traceback, warnings
    from taskfarm import client
    from taskfarm.errors import ClientClosed, UnknownTask, WaitTimeout, NoEnginesWarning

    profile = sys.argv[1]
    out = {}
    warnings.simplefilter("always", NoEnginesWarning)
    with client.TaskClient(profile) as tc:
        taskid = tc.run(client.Task("a = 1"))
        try:
            tc.barrier([taskid], timeout=0.3)
        except WaitTimeout as e:
            out["barrier"] = str(e)
        try:
            tc.get_task_result(taskid, block=True, timeout=0.2)
        except TimeoutError as e:
            out["get_task_result"] = type(e).__name__
        out["after"] = tc.queue_status()["scheduled"]
        try:
            tc.abort(10 ** 9)
        except UnknownTask as e:
            out["frames"] = [f.name for f in traceback.extract_tb(e.__traceback__)]
            out["files"] = [f.filename for f in traceback.extract_tb(e.__traceback__)]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", NoEnginesWarning)
            try:
                tc.map(abs, [1, 2], timeout=3.0)
            except WaitTimeout as e:
                out["map"] = str(e)
        out["warned"] = [str(w.message) for w in seen if w.category is NoEnginesWarning]
        inner = tc
    out["closed"] = inner._async._connection._rref is None

    with client.MultiEngineClient(profile) as mec:
        try:
            mec.wait_for_engines(1, timeout=0.3)
        except WaitTimeout as e:
            out["engines"] = str(e)
        out["ids"] = mec.get_ids()

    # Two threads, each its own blocking client: one keeps closing.
    failures = []
    done = threading.Event()
    steady = client.TaskClient(profile)

    def churn():
        for _ in range(%(rounds)d):
            try:
                with client.TaskClient(profile) as c:
                    c.engine_ids()
            except Exception as e:
                failures.append(repr(e))
        done.set()

    def calls():
        n = 0
        while not done.is_set() and n < 100000:
            try:
                steady.queue_status()
                steady.clear([])  # not retried: a dropped connection fails it
            except Exception as e:
                failures.append(repr(e))
            n += 1
        out["steady_calls"] = n

    workers = [threading.Thread(target=churn), threading.Thread(target=calls)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    out["threads_failures"] = failures
    steady.close()
    print("RESULT " + json.dumps(out))
    """
) % {"rounds": ROUNDS}


class BlockingClientTests(ClusterTestCase):
    timeout = 120

    async def test_blocking_client(self):
        await self.start_cluster(0)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-c", _BLOCKING, str(self.cluster.profile.root)], env=env
        )
        text = out.decode()
        self.assertEqual(code, 0, err.decode()[-3000:])
        (line,) = [line for line in text.splitlines() if line.startswith("RESULT ")]
        result = json.loads(line[len("RESULT "):])
        self.assertIn("waited 0.3 s for 1 tasks to finish", result["barrier"])
        self.assertEqual(result["get_task_result"], "WaitTimeout")
        self.assertEqual(result["after"], 1)  # usable after the timeouts
        # The traceback: the caller's frame and the public method, no more.
        self.assertEqual(result["frames"], ["<module>", "abort"])
        self.assertEqual(result["files"][0], "<string>")
        self.assertTrue(result["files"][1].endswith(os.path.join("taskfarm", "client.py")))
        self.assertIn("map of abs", result["map"])
        self.assertEqual(len(result["warned"]), 1)
        self.assertIn(str(self.cluster.profile.root), result["warned"][0])
        self.assertTrue(result["closed"])
        self.assertIn("1 engine to register", result["engines"])
        self.assertEqual(result["ids"], [])
        self.assertEqual(result["threads_failures"], [])
        self.assertGreater(result["steady_calls"], 0)
