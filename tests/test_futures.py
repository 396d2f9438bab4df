"""The executor, the blocking ``as_completed``, the joblib backend, progress
bars and Ctrl-C during a barrier, against a real cluster.

The blocking client runs its own reactor thread, so it runs in a child
Python process (as in test_blocking_example), against a `RealCluster` of
two engines this test starts; the child prints each answer as one
``name=<json>`` line.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import temp_dir
from taskfarm.testing.processes import run_python

SCRIPT = r"""
import concurrent.futures as cf
import faulthandler, io, json, os, signal, sys, threading, time
faulthandler.dump_traceback_later(60, exit=True)  # never a hang: the stacks, and out
import joblib
import taskfarm.joblib  # registers the backend
from taskfarm import client
from taskfarm.errors import RemoteTaskError, WaitTimeout

def show(name, value):
    print(name + "=" + json.dumps(value), flush=True)

def last_line(buf):
    return buf.getvalue().replace("\r", "\n").strip().splitlines()[-1]

def spin(seconds):
    # Pure Python, so an abort's async exception stops it at once (a
    # time.sleep would hold its engine until it ends).
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

GATES = os.environ["TASKFARM_PROFILE"]

def gate(name):
    return os.path.join(GATES, "gate-" + name)

def wait_for(path, limit=30):
    # A task that ends only once the script opens its gate: no race with the clock.
    end = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.01)
    return os.path.basename(path)

def open_gate(path):
    open(path, "w").close()

def fail_on_odd(v):
    if v % 2:
        raise ValueError("odd")
    return v

tc = client.TaskClient()
mec = client.MultiEngineClient()

# -- the executor --------------------------------------------------------------
with tc.executor() as ex:
    show("submit", ex.submit(pow, 2, 10).result(timeout=30))
    show("kwargs", ex.submit(int, "ff", base=16).result(timeout=30))
    slow, fast = ex.submit(wait_for, gate("slow")), ex.submit(abs, -3)
    first = next(cf.as_completed([slow, fast], timeout=30))
    show("as_completed_first", first is fast)
    open_gate(gate("slow"))
    done, not_done = cf.wait([slow, fast], timeout=30)
    show("wait", [len(done), len(not_done)])
    error = ex.submit(divmod, 1, 0).exception(timeout=30)
    show("exception", [isinstance(error, ZeroDivisionError), isinstance(error, RemoteTaskError)])
    show("map", list(ex.map(abs, range(-5, 5))))
    show("map_chunks", list(ex.map(pow, range(7), [2] * 7, chunksize=3)))
    try:
        list(ex.map(spin, [20], timeout=0.5))
    except TimeoutError:
        show("map_timeout", True)
    called = threading.Event()
    f = ex.submit(abs, -1)
    f.add_done_callback(lambda fut: called.set())
    show("done_callback", called.wait(30))
show("shut", True)
try:
    ex.submit(abs, 1)
except RuntimeError as e:
    show("after_shutdown", str(e))

# -- cancelling aborts the task ------------------------------------------------
ex = tc.executor(clear=False)
long = ex.submit(spin, 30)
time.sleep(0.3)
show("cancel", [long.cancel(), long.cancelled()])
def outcome(taskid):
    try:
        return "value %r" % (tc.get_task_result(taskid, block=True),)
    except Exception as e:
        return type(e).__name__

show("aborted", outcome(long.taskid))
t0 = time.monotonic()
many = [ex.submit(spin, 30) for _ in range(3)]
ex.shutdown(wait=True, cancel_futures=True)
show("shutdown_cancel", [all(f.cancelled() for f in many), time.monotonic() - t0 < 15])
show("shutdown_aborted", [outcome(f.taskid) for f in many])

# -- tc.as_completed -------------------------------------------------------------
ids = tc.mapper(block=False).map(time.sleep, [1.0, 0.0])
got = list(tc.as_completed(ids, timeout=30))
finished = [tr.completed_at for tr in got]
show("tc_as_completed", [finished == sorted(finished), sorted(tr.taskid for tr in got) == sorted(ids)])
(slow_id,) = tc.mapper(block=False).map(spin, [20])
try:
    list(tc.as_completed([slow_id], timeout=0.3))
except WaitTimeout as e:
    show("as_completed_timeout", [isinstance(e, TimeoutError), str(e)])
tc.abort(slow_id)

# -- joblib ----------------------------------------------------------------------
with joblib.parallel_config(backend="taskfarm", client=tc):
    show("joblib", joblib.Parallel(n_jobs=-1)(joblib.delayed(pow)(i, 2) for i in range(20)))
try:
    with joblib.parallel_config(backend="taskfarm", client=tc):
        joblib.Parallel(n_jobs=2)(joblib.delayed(fail_on_odd)(i) for i in range(4))
except Exception as e:
    show("joblib_error", [isinstance(e, ValueError), isinstance(e, RemoteTaskError)])

# -- progress bars ---------------------------------------------------------------
buf = io.StringIO()
ids = tc.mapper(block=False).map(fail_on_odd, range(10))
tc.barrier(ids, progress={"file": buf})
show("barrier_bar", last_line(buf))
buf = io.StringIO()
show("map_values", tc.map(abs, range(-12, 0), progress={"file": buf}))
show("map_bar", last_line(buf))
buf = io.StringIO()
show("mec_map_values", mec.map(abs, range(-6, 0), progress={"file": buf}))
show("mec_map_bar", last_line(buf))
os.environ["TASKFARM_PROGRESS"] = "1"
show("env_values", tc.map(abs, range(-3, 0)))  # its bar on stderr
os.environ["TASKFARM_PROGRESS"] = "0"

# -- Ctrl-C during a barrier -------------------------------------------------------
for shown in (True, False):
    buf = io.StringIO()
    name = "interrupt-%s" % shown
    ids = tc.mapper(block=False).map(wait_for, [gate(name)] * 2)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        tc.barrier(ids, progress={"file": buf} if shown else False)
        show("interrupted_%s" % shown, False)
    except KeyboardInterrupt:
        show("interrupted_%s" % shown, True)
    if shown:
        size = len(buf.getvalue())
        time.sleep(0.3)
        show("bar_stopped", [len(buf.getvalue()) == size, "0/2" in last_line(buf)])
    # The client is usable: the same tasks, waited on again.
    open_gate(gate(name))
    tc.barrier(ids)
    show("after_interrupt_%s" % shown, tc.get_task_results(ids) == ["gate-" + name] * 2)

tc.close()
mec.close()
show("done", True)
"""


class FuturesTests(unittest.TestCase):
    timeout = 120

    def test_executor_as_completed_joblib_progress(self):
        """In one process against two real engines:
        - the executor: submit (args, kwargs), its futures in
          `concurrent.futures.as_completed` (the fast one first) and `wait`,
          a task's error as the future's exception, `map` in order, with
          `chunksize`, and its `timeout`; done callbacks run; `with` shuts
          it down, after which `submit` is a RuntimeError;
        - `cancel()` aborts the task (its result is `TaskAborted`), and
          ``shutdown(cancel_futures=True)`` aborts all and returns at once;
        - `tc.as_completed` yields in finishing order, and raises
          `WaitTimeout` (a TimeoutError) past its timeout;
        - joblib's own `Parallel` over the "taskfarm" backend gives the
          results in order, and a task's failure raises;
        - the bars of barrier, tc.map and mec.map end on the right totals
          and failures; TASKFARM_PROGRESS=1 turns a bar on;
        - Ctrl-C (a real SIGINT) during a barrier on tasks that cannot end
          before it, with and without a bar, raises KeyboardInterrupt,
          stops the bar, and the client then waits on the same tasks."""

        async def go():
            root = str(temp_dir(self, "taskfarm-futures-"))
            cluster = RealCluster(reactor, profile_root=root)
            self.addCleanup(lambda: defer.Deferred.fromCoroutine(cluster.stop()))
            await cluster.start(2)
            code, answers, err = await run_python(SCRIPT, root, TASKFARM_PROGRESS="0")
            self.assertEqual(code, 0, "the script failed:\n%s\n%s" % (answers, err[-4000:]))
            a = answers
            self.assertEqual(a["submit"], 1024)
            self.assertEqual(a["kwargs"], 255)
            self.assertIs(a["as_completed_first"], True)
            self.assertEqual(a["wait"], [2, 0])
            self.assertEqual(a["exception"], [True, True])
            self.assertEqual(a["map"], [abs(v) for v in range(-5, 5)])
            self.assertEqual(a["map_chunks"], [v * v for v in range(7)])
            self.assertIs(a["map_timeout"], True)
            self.assertIs(a["done_callback"], True)
            self.assertIn("cannot schedule new futures after shutdown", a["after_shutdown"])
            self.assertEqual(a["cancel"], [True, True])
            self.assertEqual(a["aborted"], "TaskAborted")
            self.assertEqual(a["shutdown_aborted"], ["TaskAborted"] * 3)
            self.assertEqual(a["shutdown_cancel"], [True, True])
            self.assertEqual(a["tc_as_completed"], [True, True])
            self.assertEqual(a["as_completed_timeout"][0], True)
            self.assertIn("1 of 1 tasks were unfinished after 0.3 s", a["as_completed_timeout"][1])
            self.assertEqual(a["joblib"], [i * i for i in range(20)])
            self.assertEqual(a["joblib_error"], [True, True])
            for name, total, failed in (("barrier_bar", 10, 5), ("map_bar", 12, 0), ("mec_map_bar", 6, 0)):
                self.assertIn("100%", a[name])
                self.assertIn("%d/%d" % (total, total), a[name])
                self.assertIn("failed=%d" % failed, a[name])
            self.assertEqual(a["map_values"], list(range(12, 0, -1)))
            self.assertEqual(a["mec_map_values"], list(range(6, 0, -1)))
            self.assertEqual(a["env_values"], [3, 2, 1])
            self.assertIn("map: 100%", err)
            self.assertIn("3/3", err)
            for shown in (True, False):
                self.assertIs(a["interrupted_%s" % shown], True)
                self.assertIs(a["after_interrupt_%s" % shown], True)
            self.assertEqual(a["bar_stopped"], [True, True])
            self.assertIs(a["done"], True)
            return a

        return defer.Deferred.fromCoroutine(go())
