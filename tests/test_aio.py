"""`taskfarm.aio` against a real cluster: in plain ``asyncio.run`` programs
(child processes) in both modes, and in a real ipykernel (the kernel
harness of test_magics), in both modes too.
"""

from __future__ import annotations

from test_magics import run_kernel_session
from twisted.internet import defer, threads

from taskfarm.profile import TASK
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import temp_dir
from taskfarm.testing.processes import run_python

#: What both modes run; `MODE` and the set-up come before it.
COMMON = r"""
import asyncio, contextlib, faulthandler, json, threading, time
faulthandler.dump_traceback_later(60, exit=True)  # never a hang: the stacks, and out

def show(name, value):
    print(name + "=" + json.dumps(value), flush=True)

def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

async def common(aio):
    # One `async with` for both: closing one client drops the connection
    # they share (issue 14's first item, another part's fix).
    async with aio.TaskClient() as tc, aio.MultiEngineClient() as mec:
        show("mode", tc.mode)
        show("map", await tc.map(abs, [-1, -2, -3]))
        ids = await tc.run_many([aio.MapTask(time.sleep, (1.0,)), aio.MapTask(abs, (-7,))])
        got = [tr async for tr in tc.as_completed(ids, timeout=30)]
        finished = [tr.completed_at for tr in got]
        show("as_completed", [finished == sorted(finished), sorted(tr.taskid for tr in got) == ids])
        show("result", await tc.get_task_result(ids[1], block=True))
        # Leaving an as_completed early: the rest are let go.
        early = await tc.run_many([aio.MapTask(abs, (-4,)), aio.MapTask(spin, (20,))])
        async with contextlib.aclosing(tc.as_completed(early)) as results:
            async for tr in results:
                show("early", tr.value)
                break
        await tc.abort(early[1])
        (slow,) = await tc.run_many([aio.MapTask(spin, (20,))])
        try:
            await asyncio.wait_for(tc.barrier([slow]), 0.3)
        except asyncio.TimeoutError:
            show("wait_for_timeout", True)
        await tc.abort(slow)
        try:
            await tc.get_task_result(slow, block=True)
        except Exception as e:
            show("aborted", type(e).__name__)
        try:
            await tc.get_task_result(10**9)
        except Exception as e:
            show("error", type(e).__name__)
        # Calls side by side on one loop.
        show("gathered", await asyncio.gather(*(tc.map(abs, [-i]) for i in range(5))))
        await mec.execute("a = id * 10")
        show("pull", await mec.pull("a"))
        pending = await mec.pull("a", block=False)
        show("pending", await pending)
    show("reactor_thread", any(t.name == "taskfarm-reactor" for t in threading.enumerate()))
"""

THREAD_MODE = COMMON + r"""
from taskfarm import aio

async def main():
    try:
        await aio.TaskClient(mode="loop").connect()
    except RuntimeError as e:
        show("loop_refused", str(e))
    await common(aio)

asyncio.run(main())
show("done", True)
"""

LOOP_MODE = COMMON + r"""
import sys
from taskfarm import aio

async def main():
    reactor = aio.install_reactor()
    show("installed", type(reactor).__name__)
    try:
        await aio.TaskClient(mode="thread").connect()
    except RuntimeError as e:
        show("thread_refused", str(e))
    await common(aio)

asyncio.run(main())
show("done", True)
"""


class AsyncioProgramTests(ClusterTestCase):
    timeout = 120

    async def run_child(self, script: str) -> tuple[dict, str]:
        code, answers, err = await run_python(script, str(self.cluster.profile.root))
        self.assertEqual(code, 0, "the program failed:\n%s\n%s" % (answers, err[-4000:]))
        return answers, err

    def check_common(self, a: dict, mode: str) -> None:
        self.assertEqual(a["mode"], mode)
        self.assertEqual(a["map"], [1, 2, 3])
        self.assertEqual(a["as_completed"], [True, True])
        self.assertEqual(a["result"], 7)
        self.assertEqual(a["early"], 4)
        self.assertIs(a["wait_for_timeout"], True)
        self.assertEqual(a["aborted"], "TaskAborted")
        self.assertEqual(a["error"], "UnknownTask")
        self.assertEqual(a["gathered"], [[i] for i in range(5)])
        self.assertEqual(a["pull"], [0, 10])
        self.assertEqual(a["pending"], [0, 10])
        self.assertIs(a["done"], True)

    def test_asyncio_run_both_modes(self):
        """An ``asyncio.run`` program, in each mode: ``async with``, map,
        ``async for`` over as_completed (in finishing order, and left
        early), a result,
        ``asyncio.wait_for`` timing out a barrier (the client goes on), abort,
        a typed error, calls gathered side by side, the MultiEngine client
        with an awaitable PendingResult.  Thread mode runs the reactor in
        its thread; loop mode (`install_reactor`) runs none.  The wrong
        combination is a RuntimeError at once, saying what to do."""

        async def go():
            await self.start_cluster(2)
            (thread, _), (loop, _) = await defer.gatherResults(
                [defer.Deferred.fromCoroutine(self.run_child(THREAD_MODE)),
                 defer.Deferred.fromCoroutine(self.run_child(LOOP_MODE))],
                consumeErrors=True,
            )
            self.check_common(thread, "thread")
            self.assertIs(thread["reactor_thread"], True)
            self.assertIn("taskfarm.aio.install_reactor()", thread["loop_refused"])
            self.check_common(loop, "loop")
            self.assertEqual(loop["installed"], "AsyncioSelectorReactor")
            self.assertIs(loop["reactor_thread"], False)
            self.assertIn("use mode='loop'", loop["thread_refused"])

        return defer.Deferred.fromCoroutine(go())

    def test_jupyter_kernel_both_modes(self):
        """In a real ipykernel, top-level ``await``: the thread mode by
        default, and the loop mode after `install_reactor()` on the kernel's
        loop; ``async with``; and a blocking map's progress bar is tqdm's
        notebook widget there."""

        async def go():
            await self.start_cluster(2)
            furl_file = str(self.cluster.profile.furl_file(TASK))
            thread_cells = [
                "from taskfarm import aio, client",
                "tc = aio.TaskClient(%r)" % furl_file,
                "await tc.map(abs, [-1, -2])",
                "tc.mode",
                "ids = await tc.run_many([aio.MapTask(abs, (-i,)) for i in range(3)])\n"
                "sorted([tr.value async for tr in tc.as_completed(ids)])",
                "from taskfarm import progress\n"
                "btc = client.TaskClient(%r)\n"
                "print(btc.map(abs, [-4, -5], progress=True))\n"
                "print([c.__module__ for c in type(progress.TaskProgress(1, 'x')._bar).__mro__])" % furl_file,
                # Last: its close drops the connection the others share.
                "async with aio.TaskClient(%r) as tc2:\n    print(await tc2.map(abs, [-3]))" % furl_file,
            ]
            loop_cells = [
                "from taskfarm import aio\nprint(type(aio.install_reactor()).__name__)",
                "tc = aio.TaskClient(%r)" % furl_file,
                "await tc.map(abs, [-6])",
                "tc.mode",
            ]
            folder = temp_dir(self)
            (folder / "a").mkdir()
            (folder / "b").mkdir()
            thread, loop = await defer.gatherResults(
                [threads.deferToThread(run_kernel_session, thread_cells, folder / "a"),
                 threads.deferToThread(run_kernel_session, loop_cells, folder / "b")],
                consumeErrors=True,
            )
            for cell in thread + loop:
                self.assertEqual(cell.status, "ok", cell)
            self.assertEqual(thread[2].result, "[1, 2]")
            self.assertEqual(thread[3].result, "'thread'")
            self.assertEqual(thread[4].result, "[0, 1, 2]")
            self.assertIn("[4, 5]\n", thread[5].stdout)
            self.assertIn("tqdm.notebook", thread[5].stdout)
            self.assertEqual(thread[6].stdout, "[3]\n")
            self.assertEqual(loop[0].stdout, "AsyncioSelectorReactor\n")
            self.assertEqual(loop[2].result, "[6]")
            self.assertEqual(loop[3].result, "'loop'")

        return defer.Deferred.fromCoroutine(go())
