"""Remote failures keep their class (issue 11, item 1).

A failure on an engine comes back as an instance of the original
exception's class *and* of `RemoteTaskError`, carrying the engine id, the
task id and the remote traceback (a note, so it prints with the local one).
An exception that cannot travel, or whose class cannot be given a dual
subclass, comes back as a plain `RemoteTaskError` with name, message and
traceback.

`LocalGridTests` run the real clients, controller and engine `Namespace`
in-process on a Clock (`LocalGrid`); `RealEngineTests` run real engine
processes, where a class defined in the user's own module must travel by
value.
"""

from __future__ import annotations

import pickle
import sys
import textwrap
import threading
import traceback
import types
import uuid

import cloudpickle
from twisted.internet import defer
from twisted.trial import unittest

from taskfarm.errors import CompositeError, RemoteTaskError, from_wire, remote_error, to_wire
from taskfarm.task import MapTask, Task
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.grid import LocalGrid


class MyError(Exception):
    """A user exception with an attribute of its own."""

    def __init__(self, message, code=0):
        super().__init__(message, code)
        self.code = code


class TwoArgs(Exception):
    """Plain pickle cannot rebuild it: its args do not fit its __init__."""

    def __init__(self, a, b):
        super().__init__("%s-%s" % (a, b))
        self.b = b


class Prefixed(Exception):
    """Plain pickle would rebuild it wrong: ``Prefixed("no x")`` is "no no x"."""

    def __init__(self, what):
        super().__init__("no %s" % what)
        self.what = what


def open_missing():
    return open("/nowhere/at/all")


def _explode():
    raise RuntimeError("cannot be rebuilt here")


class Bomb:
    """Pickles, but fails when unpickled."""

    def __reduce__(self):
        return (_explode, ())


class Final(Exception):
    """A class that refuses subclasses: no dual class can be made."""

    def __init_subclass__(cls, **kwargs):
        raise TypeError("Final cannot be subclassed")


class Flavoured(type):
    """A metaclass that needs a keyword every class must give."""

    def __new__(mcls, name, bases, namespace, *, flavour):
        return super().__new__(mcls, name, bases, namespace)


class FlavouredError(Exception, metaclass=Flavoured, flavour="sour"):
    pass


def raise_my_error(code):
    raise MyError("bad code %d" % code, code)


def raise_instance(error):
    raise error


class LocalGridTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.grid.add_engine()
        self.tc = self.grid.task_client()
        self.mec = self.grid.multiengine_client()

    def settle(self, d: defer.Deferred) -> None:
        for _ in range(500):
            if d.called:
                return
            self.grid.clock.advance(0.001)

    def value(self, d):
        self.settle(d)
        return self.successResultOf(d)

    def error(self, d, *types):
        self.settle(d)
        return self.failureResultOf(d, *types).value

    def task_result(self, task):
        taskid = self.value(self.tc.run(task))
        return taskid, self.value(self.tc.get_task_result(taskid, block=True))

    def map_failure(self, function, *args):
        taskid = self.value(self.tc.run(MapTask(function, args)))
        return taskid, self.error(self.tc.get_task_result(taskid, block=True), RemoteTaskError)

    def test_task_failure_is_both_classes(self):
        """A Task's failure is a ZeroDivisionError and a RemoteTaskError:
        raise_exception() and tr.ns.x raise it, so either except clause
        catches it; args and str() are the original's; it carries the
        engine id, task id, name, message and remote traceback."""
        taskid, tr = self.task_result(Task("x = 1 / 0", pull="x"))
        error = tr.failure
        self.assertIsInstance(error, ZeroDivisionError)
        self.assertIsInstance(error, RemoteTaskError)
        self.assertEqual(type(error).__name__, "RemoteZeroDivisionError")
        self.assertEqual(error.args, ("division by zero",))
        self.assertEqual(str(error), "division by zero")
        self.assertEqual((error.engine_id, error.task_id), (0, taskid))
        self.assertEqual((error.ename, error.evalue), ("ZeroDivisionError", "division by zero"))
        self.assertIn("ZeroDivisionError: division by zero", error.traceback)
        self.assertIsInstance(error.exception, ZeroDivisionError)
        self.assertNotIsInstance(error.exception, RemoteTaskError)
        with self.assertRaises(ZeroDivisionError):
            tr.raise_exception()
        with self.assertRaises(RemoteTaskError):
            tr.raise_exception()
        with self.assertRaises(ZeroDivisionError):
            _ = tr.ns.x
        self.assertIn("RemoteZeroDivisionError(division by zero)", repr(tr))

    def test_printed_traceback_holds_the_remote_one(self):
        """The remote traceback is a note of the exception, so the printed
        local traceback ends with it:

            Traceback (most recent call last):
              ...
            RemoteZeroDivisionError: division by zero
            Remote traceback (engine 0, task 1):
            Traceback (most recent call last):
              File "<engine 0>", line 2, in <module>
            ZeroDivisionError: division by zero
        """
        taskid, tr = self.task_result(Task("a = 2\nb = a / 0"))
        try:
            tr.raise_exception()
        except ZeroDivisionError as e:
            printed = "".join(traceback.format_exception(e))
        lines = printed.splitlines()
        self.assertEqual(lines[0], "Traceback (most recent call last):")
        start = lines.index("RemoteZeroDivisionError: division by zero")
        self.assertEqual(
            lines[start:],
            [
                "RemoteZeroDivisionError: division by zero",
                "Remote traceback (engine 0, task %d):" % taskid,
                "Traceback (most recent call last):",
                '  File "<engine 0>", line 2, in <module>',
                "ZeroDivisionError: division by zero",
            ],
        )
        self.assertIn("tr.raise_exception()", printed)

    def test_maptask_and_map_failures(self):
        """A failed MapTask's get_task_result and a failed tc.map fail with
        the original class; a user class keeps its own attributes."""
        taskid, error = self.map_failure(lambda v: 1 / v, 0)
        self.assertIsInstance(error, ZeroDivisionError)
        self.assertEqual(error.task_id, taskid)
        error = self.error(self.tc.map(lambda v: 1 / v, [1, 0]), ZeroDivisionError)
        self.assertIsInstance(error, RemoteTaskError)
        taskid, error = self.map_failure(raise_my_error, 7)
        self.assertIsInstance(error, MyError)
        self.assertEqual((error.args, error.code, str(error)), (("bad code 7", 7), 7, "('bad code 7', 7)"))
        # One dual class per original class.
        self.assertIs(type(error), type(self.map_failure(raise_my_error, 8)[1]))

    def test_multiengine_failures(self):
        """MultiEngine errors gather in a CompositeError whose text is as
        before; each entry is the original class, and raise_exception()
        raises the first engine's; the engine's own errors (get_result with
        no history, pulling a missing name) are IndexError and NameError."""
        self.grid.add_engine()
        error = self.error(self.mec.execute("1 / 0"), CompositeError)
        self.assertEqual(
            str(error).splitlines()[1:],
            ["[0:execute]: ZeroDivisionError: division by zero",
             "[1:execute]: ZeroDivisionError: division by zero"],
        )
        with self.assertRaises(ZeroDivisionError) as raised:
            error.raise_exception()
        self.assertEqual(raised.exception.engine_id, 0)
        with self.assertRaises(RemoteTaskError):
            error.raise_exception(1)
        error = self.error(self.mec.get_result(targets=0), CompositeError)
        self.assertIsInstance(error.elist[0][2], IndexError)
        with self.assertRaises(IndexError):
            error.raise_exception()
        error = self.error(self.mec.pull("nope", targets=1), CompositeError)
        with self.assertRaises(NameError) as raised:
            error.raise_exception()
        self.assertIn("'nope' is not defined on engine 1", str(raised.exception))
        error = self.error(self.mec.map(lambda v: 1 / v, [1, 0]), CompositeError)
        self.assertIsInstance(error.elist[0][2], ZeroDivisionError)

    def test_unpicklable_exception_falls_back(self):
        """An exception that cannot be pickled on the engine comes back as a
        plain RemoteTaskError with name, message and traceback."""
        taskid, error = self.map_failure(lambda: raise_instance(ValueError(threading.Lock())))
        self.assertIs(type(error), RemoteTaskError)
        self.assertEqual(error.ename, "ValueError")
        self.assertIn("lock", error.evalue)
        self.assertIn("ValueError", error.traceback)
        self.assertIsNone(error.exception)
        self.assertEqual(error.task_id, taskid)
        self.assertIn("Remote traceback (engine 0, task %d):" % taskid, error.__notes__[0])

    def test_exception_that_cannot_be_unpickled_falls_back(self):
        """An exception that pickles but cannot be unpickled here (an
        argument that fails to load) is a plain RemoteTaskError."""
        taskid, error = self.map_failure(lambda: raise_instance(ValueError(Bomb())))
        self.assertIs(type(error), RemoteTaskError)
        self.assertEqual(error.ename, "ValueError")
        self.assertIsNone(error.exception)

    def test_init_that_does_not_take_its_args_back(self):
        """An exception whose __init__ does not take its own args back (which
        plain pickle cannot rebuild) is rebuilt from its class, args and
        attributes, without calling __init__."""
        taskid, error = self.map_failure(lambda: raise_instance(TwoArgs(1, 2)))
        self.assertIsInstance(error, TwoArgs)
        self.assertIsInstance(error, RemoteTaskError)
        self.assertEqual((error.args, str(error), error.b), (("1-2",), "1-2", 2))
        self.assertIs(type(error.exception), TwoArgs)
        taskid, error = self.map_failure(lambda: raise_instance(Prefixed("x")))
        self.assertEqual((str(error), error.what), ("no x", "x"))

    def test_builtin_state_survives(self):
        """A built-in exception keeps the state its own pickling carries:
        an OSError's errno and filename, an ImportError's name."""
        taskid, error = self.map_failure(open_missing)
        self.assertIsInstance(error, FileNotFoundError)
        self.assertEqual((error.errno, error.filename), (2, "/nowhere/at/all"))
        self.assertEqual(str(error), "[Errno 2] No such file or directory: '/nowhere/at/all'")
        taskid, tr = self.task_result(Task("import no_such_module_here"))
        self.assertIsInstance(tr.failure, ModuleNotFoundError)
        self.assertEqual(tr.failure.name, "no_such_module_here")

    def test_no_dual_class_falls_back(self):
        """A class that refuses subclasses, or whose metaclass cannot make
        the dual class, gives a plain RemoteTaskError that still holds the
        original exception."""
        for cls in (Final, FlavouredError):
            taskid, error = self.map_failure(raise_instance, cls("boom"))
            self.assertIs(type(error), RemoteTaskError)
            self.assertEqual((error.ename, error.evalue), (cls.__name__, "boom"))
            self.assertIs(type(error.exception), cls)
            self.assertIn("boom", error.traceback)

    def test_base_exception_is_not_raised_as_itself(self):
        """A remote SystemExit (not an Exception) stays a plain
        RemoteTaskError, so it cannot stop the client."""
        taskid, error = self.map_failure(lambda: sys.exit(3))
        self.assertIs(type(error), RemoteTaskError)
        self.assertEqual(error.ename, "SystemExit")

    def test_dual_pickles_and_keeps_the_wire_form(self):
        """A dual exception pickles (to the same class) and goes back onto
        the wire as the RemoteTaskError it is."""
        taskid, error = self.map_failure(raise_my_error, 3)
        again = pickle.loads(pickle.dumps(error))
        self.assertIs(type(again), type(error))
        self.assertEqual((again.args, again.code, again.task_id), (error.args, 3, taskid))
        rebuilt = from_wire(to_wire(error), taskid)
        self.assertIs(type(rebuilt), type(error))
        self.assertEqual(rebuilt.traceback, error.traceback)
        plain = remote_error("OSError", "x", "tb")
        self.assertIs(type(plain), RemoteTaskError)
        self.assertEqual(plain.__notes__, ["Remote traceback:\ntb"])


_USER_MODULE = '''
class UserError(Exception):
    def __init__(self, what):
        super().__init__("no %s" % what)
        self.what = what

def fail(v):
    raise UserError(v)

def fail_unpicklable():
    import threading
    raise ValueError(threading.Lock())
'''


def user_module(testcase) -> types.ModuleType:
    """A module like a user's script: the engines cannot import it, so its
    classes and functions travel by value."""
    name = "taskfarm_user_script_%s" % uuid.uuid4().hex
    module = types.ModuleType(name)
    exec(textwrap.dedent(_USER_MODULE), module.__dict__)
    sys.modules[name] = module
    cloudpickle.register_pickle_by_value(module)
    testcase.addCleanup(sys.modules.pop, name)
    testcase.addCleanup(cloudpickle.unregister_pickle_by_value, module)
    return module


class RealEngineTests(ClusterTestCase):
    async def test_failures_keep_their_class(self):
        """With real engine processes: except ZeroDivisionError catches a
        failed Task, MapTask, tc.map and MultiEngine execute; a class from
        a module the engines cannot import travels by value (except
        UserError matches); an unpicklable exception is a plain
        RemoteTaskError; the remote traceback prints with the local one."""
        tc = await self.start_cluster(2)
        mec = self.cluster.multiengine_client()

        tr = await tc.get_task_result(await tc.run(Task("y = 1 / 0")), block=True)
        with self.assertRaises(ZeroDivisionError):
            tr.raise_exception()
        try:
            tr.raise_exception()
        except ZeroDivisionError as e:
            printed = "".join(traceback.format_exception(e))
        self.assertIn("RemoteZeroDivisionError: division by zero\nRemote traceback (engine ", printed)
        self.assertIn(', task %d):\nTraceback (most recent call last):\n  File "<engine ' % tr.taskid, printed)

        taskid = await tc.run(MapTask(lambda v: 1 / v, (0,)))
        try:
            await tc.get_task_result(taskid, block=True)
        except ZeroDivisionError as e:
            self.assertEqual(e.task_id, taskid)
        else:
            self.fail("no ZeroDivisionError")
        with self.assertRaises(ZeroDivisionError):
            await tc.map(lambda v: 1 / v, [1, 0, 2])
        try:
            await mec.execute("1 / 0", targets=[1])
        except CompositeError as e:
            with self.assertRaises(ZeroDivisionError) as raised:
                e.raise_exception()
            self.assertEqual(raised.exception.engine_id, 1)
        else:
            self.fail("no CompositeError")

        module = user_module(self)
        try:
            await tc.map(module.fail, ["x"])
        except module.UserError as e:
            self.assertIsInstance(e, RemoteTaskError)
            self.assertEqual((str(e), e.what), ("no x", "x"))
        else:
            self.fail("no UserError")
        taskid = await tc.run(MapTask(module.fail_unpicklable))
        try:
            await tc.get_task_result(taskid, block=True)
        except RemoteTaskError as e:
            self.assertIs(type(e), RemoteTaskError)
            self.assertEqual(e.ename, "ValueError")
        else:
            self.fail("no RemoteTaskError")
