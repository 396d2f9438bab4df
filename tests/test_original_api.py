"""The original IPython.kernel client API where taskfarm kept or restored
it (issue 11, items 3 and 5): `get_multiengine_client` / `get_task_client`,
deferred ids with `get_pending_deferred` / `clear_pending_deferreds`, and
the small mismatches (`clear_queue`, mapper settings, `run(block=True)`,
`zip_pull` tuples, `tr.ns` of a failed task, keyword arguments for `map`).

All on a `task.Clock` through `LocalGrid`: the real Deferred clients, their
connection, the real Referenceables and controller, in-process engines.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm import client
from taskfarm.asyncclient import (
    MultiEngineClient,
    TaskClient,
    get_multiengine_client,
    get_task_client,
)
from taskfarm.errors import (
    AbortedPendingDeferredError,
    CompositeError,
    ControllerUnreachable,
    FurlError,
    InvalidDeferredID,
    InvalidResultID,
    ProfileError,
    RemoteTaskError,
    ResultNotCompleted,
    WrongInterface,
)
from taskfarm.profile import MULTIENGINE, TASK
from taskfarm.results import PendingResult
from taskfarm.task import MapTask, Task, TaskResult
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.grid import LocalGrid
from taskfarm.testing.helpers import assert_composite, async_test


class GridTestCase(unittest.SynchronousTestCase):
    engines = 2

    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.channels = [self.grid.add_engine() for _ in range(self.engines)]

    def settle(self, d: defer.Deferred) -> None:
        for _ in range(2000):
            # Called and not waiting on a Deferred it was chained to.
            if d.called and not isinstance(d.result, defer.Deferred):
                return
            self.grid.clock.advance(0.001)

    def value(self, d: defer.Deferred):
        self.settle(d)
        return self.successResultOf(d)

    def error(self, d: defer.Deferred, *types):
        self.settle(d)
        return self.failureResultOf(d, *types).value

    def tmp(self, name: str) -> Path:
        """A path `name` in a folder of this test's own, removed after it."""
        folder = tempfile.TemporaryDirectory(prefix="taskfarm-api-")
        self.addCleanup(folder.cleanup)
        return Path(folder.name) / name

    def connect(self, getter, furl_or_file, **options):
        return getter(furl_or_file, self.grid.clock, tub=self.grid.tub, **options)


class GetClientTests(GridTestCase):
    def test_get_multiengine_client_with_a_furl(self):
        """get_multiengine_client(furl) fires with a connected Deferred
        MultiEngineClient (hello answered before it fires) that hands out
        deferred ids."""
        d = self.connect(get_multiengine_client, self.grid.furls[MULTIENGINE])
        mec = self.value(d)
        self.assertIsInstance(mec, MultiEngineClient)
        self.assertTrue(mec._connection.ever_connected)
        self.assertEqual(self.value(mec.pull("id")), [0, 1])
        self.assertIsInstance(self.value(mec.pull("id", block=False)), int)

    def test_get_task_client_with_a_furl_file(self):
        """get_task_client(path of a furl file) fires with a connected
        TaskClient that runs tasks."""
        path = self.tmp("task.furl")
        path.write_text(self.grid.furls[TASK] + "\n")
        tc = self.value(self.connect(get_task_client, str(path)))
        self.assertIsInstance(tc, TaskClient)
        self.assertTrue(tc._connection.ever_connected)
        result = self.value(tc.run(Task("a = 6 * 7", pull="a"), block=True))
        self.assertEqual(result.ns.a, 42)

    def test_default_profile_and_profile_folder(self):
        """None and '' mean the default profile (TASKFARM_PROFILE), a
        folder is a profile: both read PROFILE/security/<interface>.furl."""
        root = self.tmp("profile")
        (root / "security").mkdir(parents=True)
        (root / "security" / "multiengine.furl").write_text(self.grid.furls[MULTIENGINE])
        (root / "security" / "task.furl").write_text(self.grid.furls[TASK])
        old = os.environ.get("TASKFARM_PROFILE")
        os.environ["TASKFARM_PROFILE"] = str(root)
        self.addCleanup(
            lambda: os.environ.pop("TASKFARM_PROFILE")
            if old is None else os.environ.__setitem__("TASKFARM_PROFILE", old)
        )
        for argument in (None, "", str(root)):
            mec = self.value(self.connect(get_multiengine_client, argument))
            self.assertEqual(self.value(mec.get_ids()), [0, 1])
            tc = self.value(self.connect(get_task_client, argument))
            self.assertEqual(self.value(tc.queue_status())["pending"], 0)

    def test_bad_furls_fail_with_typed_errors(self):
        """Each bad furl fails the Deferred (never raises, never hangs) with
        the connection's typed error."""
        missing = str(self.tmp("nothing.furl"))
        garbage = self.tmp("garbage.furl")
        garbage.write_text("not a furl\n")
        self.assertIn("does not exist", str(self.error(
            self.connect(get_multiengine_client, missing), ProfileError)))
        self.assertIn("does not hold a furl", str(self.error(
            self.connect(get_task_client, str(garbage)), ProfileError)))
        self.error(self.connect(get_multiengine_client, "pb://"), FurlError)
        self.assertIn("(host, port)", str(self.error(
            self.connect(get_task_client, ("127.0.0.1", 10105)), FurlError)))
        self.error(self.connect(get_multiengine_client, 42), FurlError)
        # The task furl given to a MultiEngine client: the hello says so.
        error = self.error(
            self.connect(get_multiengine_client, self.grid.furls[TASK]), WrongInterface
        )
        self.assertIn("'task' interface", str(error))
        # A furl nobody serves.
        nowhere = self.grid.furls[TASK].replace("/task", "/gone")
        self.error(self.connect(get_task_client, nowhere, connect_timeout=1.0), ControllerUnreachable)


class PendingDeferredTests(GridTestCase):
    def setUp(self):
        super().setUp()
        self.mec = self.value(self.connect(get_multiengine_client, self.grid.furls[MULTIENGINE]))

    def test_ids_and_taking_a_result_once(self):
        """block=False fires with a deferred id (an int, counting up); a
        result is handed out once: taking it again, or an id never handed
        out, is InvalidDeferredID (a KeyError) with a message that says
        which; a failed call's CompositeError comes out of
        get_pending_deferred."""
        first = self.value(self.mec.execute("a = id + 10", block=False))
        second = self.value(self.mec.pull("a", block=False))
        self.assertEqual((first, second), (0, 1))
        self.assertEqual(self.value(self.mec.get_pending_deferred(second, block=True)), [10, 11])
        results = self.value(self.mec.get_pending_deferred(first, True))
        self.assertEqual([r["input"]["raw"] for r in results], ["a = id + 10"] * 2)
        taken = self.error(self.mec.get_pending_deferred(first, True), InvalidDeferredID)
        self.assertIsInstance(taken, InvalidResultID)
        self.assertIsInstance(taken, KeyError)
        self.assertIn("deferred id 0", str(taken))
        self.assertIn("already taken", str(taken))
        unknown = self.error(self.mec.get_pending_deferred(99, False), InvalidDeferredID)
        self.assertIn("never handed it out", str(unknown))
        self.error(self.mec.get_pending_deferred("0", True), TypeError)
        failed = self.value(self.mec.execute("1 / 0", targets=1, block=False))
        error = self.error(self.mec.get_pending_deferred(failed, True), CompositeError)
        assert_composite(self, error, "execute", {1: "ZeroDivisionError"})

    def test_not_ready(self):
        """Not ready: block=False fails with ResultNotCompleted and the
        result stays; block=True fires once it arrives; a second waiter on
        the same id is InvalidDeferredID."""
        self.channels[0].hold()
        busy = self.value(self.mec.execute("b = 2", targets=0, block=False))
        error = self.error(self.mec.get_pending_deferred(busy, False), ResultNotCompleted)
        self.assertIn("deferred id %d is not ready" % busy, str(error))
        waiting = self.mec.get_pending_deferred(busy, True)
        self.grid.settle(0.05)
        self.assertNoResult(waiting)
        second = self.error(self.mec.get_pending_deferred(busy, True), InvalidDeferredID)
        self.assertIn("already waited for", str(second))
        self.channels[0].release()
        (result,) = self.value(waiting)
        self.assertEqual((result["id"], result["input"]["raw"]), (0, "b = 2"))
        self.error(self.mec.get_pending_deferred(busy, False), InvalidDeferredID)

    def test_clear_pending_deferreds(self):
        """clear_pending_deferreds drops every result not taken (their ids
        become InvalidDeferredID) and fails a waiting get_pending_deferred
        with AbortedPendingDeferredError; later ids work as before."""
        done = self.value(self.mec.pull("id", block=False))
        self.settle(self.mec.get_ids())
        self.channels[1].hold()
        waited = self.value(self.mec.execute("c = 3", targets=1, block=False))
        waiting = self.mec.get_pending_deferred(waited, True)
        unwaited = self.value(self.mec.execute("d = 4", targets=1, block=False))
        self.assertIsNone(self.value(self.mec.clear_pending_deferreds()))
        self.assertIn("cleared", str(self.error(waiting, AbortedPendingDeferredError)))
        for deferred_id in (done, waited, unwaited):
            self.error(self.mec.get_pending_deferred(deferred_id, True), InvalidDeferredID)
        self.channels[1].release()
        later = self.value(self.mec.pull("c", targets=1, block=False))
        self.assertEqual(self.value(self.mec.get_pending_deferred(later, True)), [3])
        flushed = self.value(self.mec.pull("c", targets=1, block=False))
        self.channels[1].hold()
        busy = self.value(self.mec.execute("e = 5", targets=1, block=False))
        waiting = self.mec.get_pending_deferred(busy, True)
        self.value(self.mec.flush())
        self.error(waiting, AbortedPendingDeferredError)
        self.error(self.mec.get_pending_deferred(flushed, True), InvalidDeferredID)
        self.channels[1].release()

    def test_execute_keeps_empty_output_keys(self):
        """A documented difference: an execute result has stdout and
        stderr even when empty."""
        (result,) = self.value(self.mec.execute("quiet = 1", targets=0))
        self.assertEqual((result["stdout"], result["stderr"]), ("", ""))

    def test_the_default_client_still_hands_out_pending_results(self):
        """MultiEngineClient() without deferred_ids, and so the blocking
        client over it, keeps PendingResult for block=False."""
        mec = self.grid.multiengine_client()
        pending = self.value(mec.pull("id", block=False))
        self.assertIsInstance(pending, PendingResult)
        self.assertEqual(self.value(pending.get_result()), [0, 1])


class MismatchTests(GridTestCase):
    def setUp(self):
        super().setUp()
        self.mec = self.grid.multiengine_client()
        self.tc = self.grid.task_client()

    def test_clear_queue_answers_one_entry_per_target(self):
        """clear_queue fires with one None per target, as the original."""
        self.assertEqual(self.value(self.mec.clear_queue()), [None, None])
        self.assertEqual(self.value(self.mec.clear_queue(targets=1)), [None])
        self.assertEqual(self.value(self.mec.clear_queue(targets=[1, 0])), [None, None])

    def test_zip_pull_answers_tuples(self):
        """zip_pull transposes into one tuple per key, as zip does."""
        self.value(self.mec.execute("a = id * 10"))
        self.assertEqual(self.value(self.mec.zip_pull(["id", "a"])), [(0, 1), (0, 10)])
        self.assertEqual(self.value(self.mec.zip_pull("a", targets=1)), [(10,)])

    def test_mapper_settings(self):
        """A task mapper's settings are attributes (given, else the task
        default); an unknown option is refused when the mapper is made; a
        MultiEngine mapper has dist, targets and block."""
        mapper = self.tc.mapper(retries=2, clear_after=True)
        self.assertEqual((mapper.retries, mapper.clear_after, mapper.block), (2, True, True))
        self.assertEqual((mapper.clear_before, mapper.recovery_task, mapper.depend), (False, None, None))
        self.assertFalse(self.tc.mapper(block=False).block)
        self.assertRaises(AttributeError, getattr, mapper, "nonsense")
        self.assertIn("retires", str(self.assertRaises(TypeError, self.tc.mapper, retires=2)))
        self.assertEqual(self.value(mapper.map(abs, [-1, -2])), [1, 2])
        me = self.mec.mapper(targets=[1], block=False)
        self.assertEqual((me.dist, me.targets, me.block), ("b", [1], False))
        self.assertEqual(self.mec.mapper().dist, "b")
        self.assertRaises(ValueError, self.mec.mapper, dist="r")

    def test_run_with_block(self):
        """run(task, block=True) fires with the TaskResult (for a MapTask,
        its value; a failure raised); run(task) still fires with the id."""
        result = self.value(self.tc.run(Task("x = 5", pull="x"), block=True))
        self.assertIsInstance(result, TaskResult)
        self.assertEqual(result.ns.x, 5)
        self.assertEqual(self.value(self.tc.run(MapTask(pow, (2, 5)), block=True)), 32)
        self.error(self.tc.run(MapTask(divmod, (1, 0)), block=True), RemoteTaskError)
        self.assertIsInstance(self.value(self.tc.run(Task("y = 1"))), int)
        # The blocking client is made from the Deferred one: same signature.
        self.assertIn("block", inspect.signature(client.TaskClient.run).parameters)

    def test_ns_of_a_failed_task_raises(self):
        """tr.ns of a failed task raises the task's failure (the one
        raise_exception() raises); tr['x'] too; a good task's ns works."""
        taskid = self.value(self.tc.run(Task("x = 1\n1 / 0", pull="x")))
        result = self.value(self.tc.get_task_result(taskid, block=True))
        self.assertIsNotNone(result.failure)
        caught = self.assertRaises(RemoteTaskError, getattr, result, "ns")
        self.assertIs(caught, result.failure)
        raised = self.assertRaises(RemoteTaskError, result.raise_exception)
        self.assertIs(raised, caught)
        self.assertRaises(RemoteTaskError, result.__getitem__, "x")
        self.assertEqual(result.results, {})

    def test_id_is_the_engine_id(self):
        """`id` in an engine's namespace is the engine id, hiding the
        builtin; builtins.id is still there."""
        self.value(self.mec.execute("import builtins\nhidden = id is not builtins.id"))
        self.assertEqual(self.value(self.mec.pull(["id", "hidden"])), [[0, True], [1, True]])
        ran_on = self.value(self.tc.map(lambda _: id, range(4)))
        self.assertTrue(set(ran_on) <= {0, 1}, ran_on)

    def test_map_keyword_arguments(self):
        """tc.map and mec.map (and their mappers) give keywords that are no
        task option to the function, in every call; task options still
        work beside them."""

        def scaled(x, scale=1, offset=0):
            return x * scale + offset

        self.assertEqual(self.value(self.tc.map(scaled, [1, 2, 3], scale=10)), [10, 20, 30])
        self.assertEqual(
            self.value(self.tc.map(scaled, [1, 2], scale=2, offset=1, retries=1)), [3, 5]
        )
        mapper = self.tc.mapper(retries=1)
        self.assertEqual(self.value(mapper.map(scaled, [1, 2], offset=3)), [4, 5])
        ids = self.value(self.tc.mapper(block=False).map(scaled, [7], scale=2))
        self.assertEqual(self.value(self.tc.get_task_result(ids[0], block=True)), 14)
        self.assertRaises(TypeError, mapper.map, scaled, [1], retries=2)
        self.assertEqual(self.value(self.mec.map(scaled, [1, 2, 3], scale=10)), [10, 20, 30])
        self.assertEqual(
            self.value(self.mec.mapper(targets=[1]).map(scaled, [1, 2], offset=5)), [6, 7]
        )
        self.assertEqual(self.value(self.mec.map(scaled, [4])), [4])


class RealEnginesTests(ClusterTestCase):
    """The same ways in and the deferred-id protocol against a real
    controller and engine processes, over Foolscap."""

    folder_prefix = "taskfarm-api-"

    @async_test
    async def test_original_api_on_real_engines(self):
        """get_multiengine_client(furl file) and get_task_client(furl) fire
        with connected clients; deferred ids, a taken id and a real
        engine's error through get_pending_deferred; run(block=True), tr.ns
        of a failed task, map keywords; the task furl file given to a
        MultiEngine client is WrongInterface."""
        await self.start_cluster(2)
        profile = self.cluster.profile
        tub = self.cluster._tub()
        mec = await get_multiengine_client(
            str(profile.furl_file(MULTIENGINE)), reactor, tub=tub
        )
        self.addCleanup(mec.disconnect)
        first = await mec.execute("a = id + 1", block=False)
        failing = await mec.execute("1 / 0", targets=1, block=False)
        self.assertEqual((first, failing), (0, 1))
        results = await mec.get_pending_deferred(first, True)
        self.assertEqual([r["id"] for r in results], [0, 1])
        try:
            await mec.get_pending_deferred(first, True)
        except InvalidDeferredID as e:
            self.assertIn("already taken", str(e))
        else:
            self.fail("a taken result was handed out again")
        try:
            await mec.get_pending_deferred(failing, True)
        except CompositeError as e:
            assert_composite(self, e, "execute", {1: "ZeroDivisionError"})
        else:
            self.fail("the failed execute gave no CompositeError")
        self.assertEqual(await mec.zip_pull(["id", "a"]), [(0, 1), (1, 2)])
        self.assertEqual(await mec.clear_queue(), [None, None])

        furl = profile.furl_file(TASK).read_text().strip()
        tc = await get_task_client(furl, reactor, tub=tub)
        self.addCleanup(tc.disconnect)
        result = await tc.run(Task("b = 2 ** 10", pull="b"), block=True)
        self.assertEqual(result.ns.b, 1024)
        failed = await tc.run(Task("c = 1 / 0", pull="c"), block=True)
        self.assertRaises(RemoteTaskError, getattr, failed, "ns")
        self.assertEqual(await tc.map(pow, [2, 3], [3, 3]), [8, 27])
        self.assertEqual(await tc.map(lambda x, k=0: x + k, [1, 2], k=10), [11, 12])
        try:
            await get_multiengine_client(str(profile.furl_file(TASK)), reactor, tub=tub)
        except WrongInterface as e:
            self.assertIn("'task' interface", str(e))
        else:
            self.fail("the task furl made a MultiEngine client")
