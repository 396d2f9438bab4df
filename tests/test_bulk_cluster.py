"""Big results over the bulk-data channel of a real cluster (a controller
in this process, engine processes): the whole path, the fallback to
Foolscap, and a controller without a channel."""

from __future__ import annotations

import numpy
from twisted.internet import reactor

from taskfarm.bulk import channel
from taskfarm.bulk.policy import BULK_MIN, UPLOAD_MIN
from taskfarm.task import MapTask, Task
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import async_test as run

MB = 1_000_000


def _within(d, seconds: float = 60.0):
    return d.addTimeout(seconds, reactor)


def _hold_the_reactor(n: int) -> bytes:
    """In an engine: let the tasks queued behind this one arrive, then
    keep the engine's reactor busy while they run, so their replies leave
    in one batch."""
    import time

    from twisted.internet import reactor

    time.sleep(0.5)
    reactor.callFromThread(time.sleep, 1.0)
    return bytes(n)


class BulkResultsTests(ClusterTestCase):
    folder_prefix = "taskfarm-bulk-"

    def bulk(self):
        return self.cluster.controller.server.bulk

    @run
    async def test_big_results_come_over_the_bulk_channel(self):
        """A big array and a Task's big bytes travel over the channel and
        come back equal (the array writable and without a copy of its own:
        it keeps the received buffer); a small result stays on Foolscap;
        no capability is left behind."""
        tc = await self.start_cluster(1)
        array = numpy.arange(BULK_MIN // 8 + 1024, dtype=numpy.float64)
        value = await _within(tc.get_task_result(
            await tc.run(MapTask(numpy.copy, args=(array,))), block=True))
        self.assertTrue(numpy.array_equal(value, array))
        self.assertTrue(value.flags.writeable)
        self.assertEqual(self.bulk().offered, 1)
        ids = [await tc.run(Task("b = b'x' * %d" % BULK_MIN, pull="b")) for _ in range(3)]
        results = await _within(tc.get_task_results(ids, block=True))
        self.assertEqual([r.ns.b for r in results], [b"x" * BULK_MIN] * 3)
        self.assertEqual(self.bulk().offered, 2)  # one answer, one capability
        small = await _within(tc.get_task_result(
            await tc.run(MapTask(len, args=(b"s" * (BULK_MIN // 2),))), block=True))
        self.assertEqual(small, BULK_MIN // 2)
        self.assertEqual(self.bulk().offered, 2)
        self.assertEqual(len(self.bulk().offers), 0)

    @run
    async def test_many_small_results_ride_one_transfer(self):
        """Six 1 MiB results (each below the threshold, their total above
        it) come in one answer over the channel: one capability; three
        (below in total) stay on Foolscap."""
        tc = await self.start_cluster(1)
        mib = 1 << 20
        ids = [await tc.run(MapTask(bytes, args=(mib,))) for _ in range(6)]
        values = await _within(tc.get_task_results(ids, block=True))
        self.assertEqual(values, [bytes(mib)] * 6)
        self.assertEqual(self.bulk().offered, 1)
        ids = [await tc.run(MapTask(bytes, args=(mib,))) for _ in range(3)]
        values = await _within(tc.get_task_results(ids, block=True))
        self.assertEqual(values, [bytes(mib)] * 3)
        self.assertEqual(self.bulk().offered, 1)
        self.assertEqual(len(self.bulk().offers), 0)

    @run
    async def test_a_client_without_the_channel_gets_results_over_foolscap(self):
        tc = await self.start_cluster(1)
        tc.use_bulk = False
        value = await _within(tc.get_task_result(
            await tc.run(MapTask(bytes, args=(BULK_MIN + MB,))), block=True))
        self.assertEqual(value, bytes(BULK_MIN + MB))
        self.assertEqual(self.bulk().offered, 0)

    @run
    async def test_a_refused_transfer_falls_back_to_foolscap(self):
        """The channel the client dials has another certificate than the
        furl's: the client refuses it before sending the capability, and
        asks for the result over Foolscap instead (the offer it did not
        take expires)."""
        from taskfarm.remote.tub import new_tub

        tc = await self.start_cluster(1)
        await tc.engine_ids()  # connected: the channel's location is known
        impostor = channel.BulkServer(reactor, channel.Offers(reactor), new_tub().getCertData())
        impostor.start()
        self.addCleanup(impostor.stop)
        tc._connection.bulk_location = "127.0.0.1:%d" % impostor.port
        value = await _within(tc.get_task_result(
            await tc.run(MapTask(bytes, args=(BULK_MIN + MB,))), block=True))
        self.assertEqual(value, bytes(BULK_MIN + MB))
        self.assertEqual(self.bulk().offered, 1)
        self.assertEqual(len(self.bulk().offers), 1)  # untaken, until it expires


class BulkUploadTests(ClusterTestCase):
    """Engines upload big replies over the channel before naming them."""

    folder_prefix = "taskfarm-bulkup-"

    def bulk(self):
        return self.cluster.controller.server.bulk

    @run
    async def test_big_task_replies_are_uploaded_and_small_ones_are_not(self):
        """A big task result travels from the engine over the channel, a
        small one does not; nothing stays in the capability table."""
        tc = await self.start_cluster(1)
        value = await _within(tc.get_task_result(
            await tc.run(MapTask(bytes, args=(UPLOAD_MIN,))), block=True))
        self.assertEqual(value, bytes(UPLOAD_MIN))
        self.assertEqual(self.bulk().uploads, 1)
        # Big enough to be fetched over the channel, not to be uploaded.
        value = await _within(tc.get_task_result(
            await tc.run(MapTask(bytes, args=(UPLOAD_MIN // 2,))), block=True))
        self.assertEqual(self.bulk().uploads, 1)
        self.assertEqual(self.bulk().offered, 2)
        small = await _within(tc.get_task_result(await tc.run(MapTask(len, args=("ab",))),
                                                 block=True))
        self.assertEqual(small, 2)
        self.assertEqual(self.bulk().uploads, 1)
        mec = self.cluster.multiengine_client()
        array = numpy.arange(MB, dtype=numpy.int32)
        await _within(mec.push({"a": array}, targets=0, block=True))
        (pulled,) = await _within(mec.pull("a", targets=0, block=True))
        self.assertTrue(numpy.array_equal(pulled, array))
        self.assertEqual(self.bulk().uploads, 1)
        self.assertEqual(len(self.bulk().offers), 0)

    @run
    async def test_a_batch_of_small_replies_is_uploaded_in_one_transfer(self):
        """Nine 1 MiB task results leave the engine in one reply batch
        (its reactor held while its worker finishes them): together above
        the upload threshold, they go in one upload, and come back equal."""
        tc = await self.start_cluster(1)
        # Short tasks first: the controller then keeps many queued at the engine.
        await _within(tc.get_task_results(
            [await tc.run(MapTask(len, args=("x",))) for _ in range(30)], block=True))
        mib = 1 << 20
        ids = await tc.run_many(
            [MapTask(_hold_the_reactor, args=(mib,))] + [MapTask(bytes, args=(mib,))] * 8)
        values = await _within(tc.get_task_results(ids, block=True))
        self.assertEqual(values, [bytes(mib)] * 9)
        self.assertEqual(self.bulk().uploads, 1)
        self.assertEqual(len(self.bulk().offers), 0)
        self.assertEqual(self.bulk()._batches, {})

    @run
    async def test_a_big_push_is_uploaded_by_the_client(self):
        """A pushed array of 4 MiB or more goes client -> controller over the
        channel and on to both engines; it pulls back equal; a small push
        and a client without the channel stay on Foolscap; nothing is left
        in the capability table."""
        await self.start_cluster(2)
        mec = self.cluster.multiengine_client()
        array = numpy.arange(BULK_MIN // 8 + 1024, dtype=numpy.float64)
        await _within(mec.push({"a": array, "n": 3}, targets="all", block=True))
        self.assertEqual(self.bulk().pushes, 1)
        sums = await _within(mec.execute("s = float(a.sum()) + n", targets="all", block=True))
        self.assertEqual(len(sums), 2)
        for total in await _within(mec.pull("s", targets="all", block=True)):
            self.assertEqual(total, float(array.sum()) + 3)
        await _within(mec.push({"b": b"x" * 1000}, targets=0, block=True))
        mec.use_bulk = False
        await _within(mec.push({"c": array}, targets=1, block=True))
        self.assertEqual(self.bulk().pushes, 1)
        (c,) = await _within(mec.pull("c", targets=1, block=True))
        self.assertTrue(numpy.array_equal(c, array))
        self.assertEqual(len(self.bulk().offers), 0)

    @run
    async def test_a_big_pull_comes_over_the_channel_both_hops(self):
        """A pulled array of 8 MiB or more: the engine uploads it, the
        client fetches it (a small pull and a client without the channel
        stay on Foolscap); each comes back equal, with nothing left in the
        capability table."""
        await self.start_cluster(2)
        mec = self.cluster.multiengine_client()
        array = numpy.arange(UPLOAD_MIN // 4 + 16, dtype=numpy.int32)
        await _within(mec.push({"a": array, "s": 5}, targets=[0, 1], block=True))
        pulled = await _within(mec.pull("a", targets=[0, 1], block=True))
        self.assertEqual(len(pulled), 2)
        for value in pulled:
            self.assertTrue(numpy.array_equal(value, array))
            self.assertTrue(value.flags.writeable)
        self.assertEqual((self.bulk().uploads, self.bulk().offered), (2, 1))
        self.assertEqual(await _within(mec.pull("s", targets=[0], block=True)), [5])
        self.assertEqual((self.bulk().uploads, self.bulk().offered), (2, 1))
        plain = self.cluster.multiengine_client()
        plain.use_bulk = False
        (again,) = await _within(plain.pull("a", targets=[1], block=True))
        self.assertTrue(numpy.array_equal(again, array))
        self.assertEqual(self.bulk().offered, 1)
        self.assertEqual(len(self.bulk().offers), 0)

    @run
    async def test_a_pull_whose_fetch_is_refused_raises(self):
        """A pull is not asked again over Foolscap (it could see other
        values): a channel with the wrong certificate raises BulkRefused."""
        from taskfarm.errors import BulkRefused
        from taskfarm.remote.tub import new_tub

        await self.start_cluster(1)
        mec = self.cluster.multiengine_client()
        array = numpy.arange(UPLOAD_MIN // 4 + 16, dtype=numpy.int32)
        await _within(mec.push({"a": array}, targets=0, block=True))
        impostor = channel.BulkServer(reactor, channel.Offers(reactor), new_tub().getCertData())
        impostor.start()
        self.addCleanup(impostor.stop)
        mec._connection.bulk_location = "127.0.0.1:%d" % impostor.port
        with self.assertRaises(BulkRefused):
            await _within(mec.pull("a", targets=0, block=True))

    @run
    async def test_an_engine_killed_mid_upload_leaves_nothing_partial(self):
        """The engine is SIGKILLed while it uploads a 64 MB result: the
        upload is dropped (nothing claimable, nothing kept), the task runs
        again on the other engine, and the client gets the whole value."""
        import os
        import signal

        from twisted.internet import task

        tc = await self.start_cluster(2)
        mec = self.cluster.multiengine_client()
        await _within(mec.execute("import os; pid = os.getpid()", targets=[0, 1], block=True))
        pids = dict(zip([0, 1], await _within(mec.pull("pid", targets=[0, 1], block=True)),
                        strict=True))
        server = self.cluster.controller.server.bulk_server
        code = "import os; r = bytes(range(256)) * (256 * 1024)"
        taskid = await tc.run(Task(code, pull="r", retries=1))
        for _ in range(2000):
            # Under way: the slot is taken, and bytes are coming in.
            if server._active and self.bulk().uploads and not len(self.bulk().offers):
                break
            await task.deferLater(reactor, 0.005, lambda: None)
        else:
            self.fail("no upload started")
        # The engine that holds the task is the one uploading.
        record = self.cluster.controller.tasks.store.tasks[taskid]
        os.kill(pids[record.engine_id], signal.SIGKILL)
        result = await _within(tc.get_task_result(taskid, block=True), 90)
        self.assertIsNone(result.failure)
        self.assertEqual(result.ns.r, bytes(range(256)) * (256 * 1024))
        self.assertEqual(result.attempts, 2)
        self.assertGreaterEqual(server.failed, 1)
        self.assertEqual(len(self.bulk().offers), 0)


class NoBulkChannelTests(ClusterTestCase):
    folder_prefix = "taskfarm-nobulk-"

    @run
    async def test_a_controller_without_a_channel_answers_over_foolscap(self):
        tc = await self.start_cluster(1, bulk_listen="none")
        self.assertIsNone(self.cluster.controller.server.bulk)
        value = await _within(tc.get_task_result(
            await tc.run(MapTask(bytes, args=(BULK_MIN + MB,))), block=True))
        self.assertEqual(value, bytes(BULK_MIN + MB))
        self.assertIsNone(tc._connection.bulk_location)
