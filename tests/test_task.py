"""Unit tests of the task value types: `Task`, `MapTask`, `TaskResult`."""

import pickle
import re
import threading
import time

from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.errors import (
    EngineLost,
    RecoveryLoopError,
    RemoteTaskError,
    SerializationError,
    TaskfarmError,
    TaskTimeout,
    to_wire,
)
from taskfarm.task import (
    CALL,
    EXEC,
    MapTask,
    Task,
    TaskResult,
    format_time,
    result_from_envelope,
)


def _double(x):
    return 2 * x


def _accept_all(properties):
    return True


class TaskConstructionTests(unittest.TestCase):
    """What `Task` accepts and how it normalises it."""

    def test_defaults(self):
        """A bare Task pulls and pushes nothing and has the original defaults."""
        t = Task("a = 1")
        self.assertEqual(t.expression, "a = 1")
        self.assertEqual(t.pull, ())
        self.assertEqual(t.push, {})
        self.assertIs(t.clear_before, False)
        self.assertIs(t.clear_after, False)
        self.assertEqual(t.retries, 0)
        self.assertIsNone(t.recovery_task)
        self.assertIsNone(t.depend)
        self.assertEqual(t.priority, 0)
        self.assertIsNone(t.timeout)

    def test_pull_string_becomes_tuple(self):
        """pull may be one name; it is kept as a one-name tuple."""
        self.assertEqual(Task("a = 1", pull="a").pull, ("a",))

    def test_pull_list(self):
        """pull may be a list of names, kept in order."""
        self.assertEqual(Task("a = b = 1", pull=["b", "a"]).pull, ("b", "a"))

    def test_push_is_copied(self):
        """push is copied, so later changes to the caller's dict do not leak in."""
        values = {"x": 1}
        t = Task("y = x", push=values)
        values["x"] = 2
        self.assertEqual(t.push, {"x": 1})

    def test_all_options_in_constructor(self):
        """Every option given to the constructor is kept as given."""
        recovery = Task("b = 2")
        t = Task(
            "a = 1",
            pull="a",
            push={"x": 1},
            clear_before=True,
            clear_after=True,
            retries=3,
            recovery_task=recovery,
            depend=_accept_all,
            priority=-4,
            timeout=2,
        )
        self.assertEqual(
            (t.clear_before, t.clear_after, t.retries, t.priority),
            (True, True, 3, -4),
        )
        self.assertIs(t.recovery_task, recovery)
        self.assertIs(t.depend, _accept_all)
        self.assertEqual(t.timeout, 2.0)
        self.assertIsInstance(t.timeout, float)

    def test_repr(self):
        """repr names the code and the pulled names."""
        self.assertEqual(repr(Task("a = 1", pull="a")), "Task('a = 1', pull=['a'])")


class TaskAttributeTests(unittest.TestCase):
    """Every attribute can be assigned after construction, and is checked at once."""

    def test_every_option_settable(self):
        """All options may be set by assignment after construction."""
        t = Task("a = 1")
        recovery = Task("b = 1")
        t.expression = "c = 3"
        t.pull = "c"
        t.push = {"d": 4}
        t.clear_before = True
        t.clear_after = True
        t.retries = 2
        t.recovery_task = recovery
        t.depend = _accept_all
        t.priority = 7
        t.timeout = 0.5
        self.assertEqual(t.expression, "c = 3")
        self.assertEqual(t.pull, ("c",))
        self.assertEqual(t.push, {"d": 4})
        self.assertEqual((t.clear_before, t.clear_after), (True, True))
        self.assertEqual((t.retries, t.priority, t.timeout), (2, 7, 0.5))
        self.assertIs(t.recovery_task, recovery)
        self.assertIs(t.depend, _accept_all)

    def test_options_can_be_reset_to_none(self):
        """recovery_task, depend, timeout, pull and push accept None again."""
        t = Task("a = 1", pull="a", push={"x": 1}, recovery_task=Task("b"), depend=_accept_all, timeout=1)
        t.recovery_task = None
        t.depend = None
        t.timeout = None
        t.pull = None
        t.push = None
        self.assertEqual(
            (t.recovery_task, t.depend, t.timeout, t.pull, t.push),
            (None, None, None, (), {}),
        )

    def assertRefused(self, exception, attribute, value, *words):
        """Assigning `value` raises `exception` whose message holds `words`."""
        t = Task("a = 1")
        before = getattr(t, attribute)
        with self.assertRaises(exception) as caught:
            setattr(t, attribute, value)
        message = str(caught.exception)
        for word in (attribute,) + words:
            self.assertIn(word, message)
        # A refused assignment leaves the old value in place.
        self.assertEqual(getattr(t, attribute), before)
        # And the constructor refuses it the same way.
        with self.assertRaises(exception):
            if attribute == "expression":
                Task(value)
            else:
                Task("a = 1", **{attribute: value})

    def test_expression_must_be_str(self):
        """expression must be a string of code."""
        self.assertRefused(TypeError, "expression", b"a = 1", "str", "bytes")

    def test_pull_wrong_type(self):
        """pull must be a name or a sequence of names."""
        self.assertRefused(TypeError, "pull", 5, "int")

    def test_pull_not_identifier(self):
        """pull names must be identifiers."""
        self.assertRefused(ValueError, "pull", ["a", "not a name"], "'not a name'")

    def test_pull_non_str_name(self):
        """pull names must be strings."""
        self.assertRefused(ValueError, "pull", ["a", 3], "3")

    def test_push_wrong_type(self):
        """push must be a mapping."""
        self.assertRefused(TypeError, "push", [("a", 1)], "dict", "list")

    def test_push_bad_key(self):
        """push keys must be identifiers."""
        self.assertRefused(ValueError, "push", {"1x": 1}, "'1x'")

    def test_clear_before_must_be_bool(self):
        """clear_before must be exactly True or False, not a truthy value."""
        self.assertRefused(TypeError, "clear_before", 1, "True or False")

    def test_clear_after_must_be_bool(self):
        """clear_after must be exactly True or False."""
        self.assertRefused(TypeError, "clear_after", "yes", "True or False")

    def test_retries_must_be_int(self):
        """retries must be an int (a bool is not one)."""
        self.assertRefused(TypeError, "retries", 1.0, "int", "float")
        self.assertRefused(TypeError, "retries", True, "int", "bool")

    def test_retries_not_negative(self):
        """retries must be >= 0."""
        self.assertRefused(ValueError, "retries", -1, ">= 0", "-1")

    def test_priority_must_be_int(self):
        """priority must be an int; negative ones are fine."""
        self.assertRefused(TypeError, "priority", "high", "int", "str")
        self.assertEqual(Task("a", priority=-10).priority, -10)

    def test_timeout_must_be_number(self):
        """timeout must be a number of seconds."""
        self.assertRefused(TypeError, "timeout", "10", "seconds")
        self.assertRefused(TypeError, "timeout", True, "seconds")

    def test_timeout_must_be_positive(self):
        """timeout must be positive."""
        self.assertRefused(ValueError, "timeout", 0, "positive")
        self.assertRefused(ValueError, "timeout", -1.5, "positive")

    def test_depend_must_be_callable(self):
        """depend must be a function of the engine's properties."""
        self.assertRefused(TypeError, "depend", "RAM > 4", "function", "str")

    def test_recovery_task_must_be_task(self):
        """recovery_task must be a Task or MapTask."""
        self.assertRefused(TypeError, "recovery_task", "b = 1", "Task or MapTask", "str")


class MapTaskTests(unittest.TestCase):
    """`MapTask`: a function called with arguments on an engine."""

    def test_construction(self):
        """function, args and kwargs are kept; options go to the base task."""
        m = MapTask(_double, [3], {"y": 1}, retries=2, priority=5)
        self.assertIs(m.function, _double)
        self.assertEqual(m.args, (3,))
        self.assertEqual(m.kwargs, {"y": 1})
        self.assertEqual((m.retries, m.priority), (2, 5))

    def test_repr(self):
        """repr names the function and its arguments."""
        self.assertEqual(repr(MapTask(_double, (3,))), "MapTask(_double, (3,))")

    def test_function_must_be_callable(self):
        """A MapTask of something that cannot be called is refused."""
        with self.assertRaises(TypeError) as caught:
            MapTask(42)
        self.assertIn("callable", str(caught.exception))

    def test_args_must_be_sequence(self):
        """args must be a list or tuple."""
        with self.assertRaises(TypeError) as caught:
            MapTask(_double, 3)
        self.assertIn("args", str(caught.exception))

    def test_kwargs_must_be_mapping(self):
        """kwargs must be a dict."""
        with self.assertRaises(TypeError) as caught:
            MapTask(_double, (), [1])
        self.assertIn("kwargs", str(caught.exception))

    def test_bad_option_refused(self):
        """An option checked by the base task is checked for a MapTask too."""
        with self.assertRaises(ValueError):
            MapTask(_double, (1,), retries=-1)

    def test_function_args_kwargs_settable(self):
        """function, args and kwargs may be assigned after construction."""
        m = MapTask(_double, (1,))
        m.function = len
        m.args = ["abc"]
        m.kwargs = {}
        self.assertIs(m.function, len)
        self.assertEqual(m.args, ("abc",))
        kind, payload, _, _, _ = m.to_envelope()
        function_blob, args_blob = serialization.loads(payload)
        self.assertIs(serialization.loads(function_blob), len)
        self.assertEqual(serialization.loads(args_blob), (("abc",), {}))

    def test_assigned_function_checked(self):
        """Assigning something that cannot be called to `function` is refused at once."""
        m = MapTask(_double, (1,))
        with self.assertRaises(TypeError) as caught:
            m.function = 42
        self.assertIn("callable", str(caught.exception))
        self.assertIs(m.function, _double)

    def test_assigned_args_checked(self):
        """Assigning a non-sequence to `args` is refused at once."""
        m = MapTask(_double, (1,))
        with self.assertRaises(TypeError):
            m.args = 5
        self.assertEqual(m.args, (1,))

    def test_assigned_kwargs_checked(self):
        """Assigning a non-mapping to `kwargs` is refused at once."""
        m = MapTask(_double, (1,))
        with self.assertRaises(TypeError):
            m.kwargs = [("a", 1)]
        self.assertEqual(m.kwargs, {})

    def test_options_settable(self):
        """A MapTask's base options may also be assigned afterwards."""
        m = MapTask(_double, (1,))
        m.retries = 4
        m.clear_after = True
        self.assertEqual((m.retries, m.clear_after), (4, True))
        with self.assertRaises(TypeError):
            m.clear_after = "no"


class EnvelopeTests(unittest.TestCase):
    """`to_envelope`: the plain data a task becomes on the wire."""

    def test_exec_envelope(self):
        """A Task becomes (exec, payload, options, None, None) with the code inside."""
        t = Task("a = x", pull="a", push={"x": 5}, clear_after=True, retries=1, priority=2, timeout=3)
        kind, payload, options, depend, recovery = t.to_envelope()
        self.assertEqual(kind, EXEC)
        self.assertEqual(options, (False, True, 1, 2, 3.0))
        self.assertIsNone(depend)
        self.assertIsNone(recovery)
        expression, pull, push = serialization.unpack(payload)
        self.assertEqual((expression, pull), ("a = x", ("a",)))
        self.assertEqual(serialization.loads(push), {"x": 5})

    def test_envelope_is_plain_data(self):
        """The envelope passes the controller's data-only unpickler."""
        t = Task("a = 1", pull="a", depend=_accept_all, recovery_task=MapTask(_double, (1,)))
        envelope = t.to_envelope()
        self.assertEqual(serialization.unpack(serialization.pack(envelope)), envelope)

    def test_empty_push_sends_none(self):
        """A task without push sends None instead of an empty pickled dict."""
        _, payload, _, _, _ = Task("a = 1").to_envelope()
        self.assertIsNone(serialization.unpack(payload)[2])

    def test_call_envelope(self):
        """A MapTask becomes a call envelope with function and arguments pickled."""
        kind, payload, options, _, _ = MapTask(_double, (21,), {}, retries=2).to_envelope()
        self.assertEqual(kind, CALL)
        self.assertEqual(options, (False, False, 2, 0, None))
        function_blob, args_blob = serialization.unpack(payload)
        function = serialization.loads(function_blob)
        args, kwargs = serialization.loads(args_blob)
        self.assertEqual(function(*args, **kwargs), 42)

    def test_closure_travels(self):
        """A lambda with a closure survives the envelope (cloudpickle)."""
        offset = 10
        _, payload, _, _, _ = MapTask(lambda x: x + offset, (1,)).to_envelope()
        function_blob, _ = serialization.unpack(payload)
        self.assertEqual(serialization.loads(function_blob)(1), 11)

    def test_depend_pickled(self):
        """depend travels as cloudpickled bytes that load to the predicate."""
        _, _, _, depend, _ = Task("a", depend=lambda p: p.get("RAM", 0) > 4).to_envelope()
        self.assertIsInstance(depend, bytes)
        predicate = serialization.loads(depend)
        self.assertEqual((predicate({"RAM": 8}), predicate({})), (True, False))

    def test_recovery_chain_nested(self):
        """The recovery chain nests: each envelope's last item is the next one."""
        last = Task("c = 3", retries=5)
        middle = MapTask(_double, (1,), recovery_task=last)
        first = Task("a = 1", recovery_task=middle)
        envelope = first.to_envelope()
        self.assertEqual(envelope[0], EXEC)
        self.assertEqual(envelope[4][0], CALL)
        self.assertEqual(envelope[4][4][0], EXEC)
        self.assertEqual(envelope[4][4][2][2], 5)
        self.assertIsNone(envelope[4][4][4])

    def test_shared_recovery_is_not_a_loop(self):
        """Two tasks may share one recovery task; that is no loop."""
        shared = Task("r = 1")
        Task("a", recovery_task=shared).to_envelope()
        Task("b", recovery_task=shared).to_envelope()

    def test_unpicklable_push_named(self):
        """An unpicklable pushed value raises SerializationError naming the push dict."""
        t = Task("a = 1", push={"lock": threading.Lock()})
        with self.assertRaises(SerializationError) as caught:
            t.to_envelope()
        self.assertIn("push", str(caught.exception))
        self.assertIn("lock", str(caught.exception))

    def test_unpicklable_argument_named(self):
        """An unpicklable argument of a MapTask names the arguments."""
        with self.assertRaises(SerializationError) as caught:
            MapTask(_double, (threading.Lock(),)).to_envelope()
        self.assertIn("arguments", str(caught.exception))


class RecoveryLoopTests(unittest.TestCase):
    """A recovery chain must end: loops are refused with `RecoveryLoopError`."""

    def test_self_loop(self):
        """A task that is its own recovery task is refused."""
        t = Task("a = 1")
        t.recovery_task = t
        self.assertRaises(RecoveryLoopError, t.to_envelope)

    def test_loop_made_by_assignment(self):
        """A loop made by assignment after construction is found when encoding."""
        a = Task("a = 1")
        b = Task("b = 1", recovery_task=a)
        c = MapTask(_double, (1,), recovery_task=b)
        a.recovery_task = c
        for task in (a, b, c):
            with self.assertRaises(RecoveryLoopError) as caught:
                task.to_envelope()
            self.assertIn("recovery_task", str(caught.exception))

    def test_loop_error_is_value_error(self):
        """RecoveryLoopError is a ValueError and a TaskfarmError."""
        self.assertTrue(issubclass(RecoveryLoopError, ValueError))
        self.assertTrue(issubclass(RecoveryLoopError, TaskfarmError))

    def test_loop_further_down(self):
        """A loop that does not pass through the first task is found too."""
        b = Task("b")
        c = Task("c", recovery_task=b)
        b.recovery_task = c
        self.assertRaises(RecoveryLoopError, Task("a", recovery_task=b).to_envelope)

    def test_breaking_the_loop(self):
        """Once the loop is broken by assignment the task encodes again."""
        a = Task("a")
        b = Task("b", recovery_task=a)
        a.recovery_task = b
        self.assertRaises(RecoveryLoopError, a.to_envelope)
        b.recovery_task = None
        self.assertEqual(a.to_envelope()[4][4], None)


def _result(results=None, failure=None, **kw):
    defaults = dict(
        taskid=73,
        results={"a": 73} if results is None else results,
        failure=failure,
        engineid=1,
        submitted_at=1000.0,
        started_at=1001.0,
        completed_at=1003.5,
    )
    defaults.update(kw)
    return TaskResult(**defaults)


class TaskResultTests(unittest.TestCase):
    """`TaskResult`: values, metadata and the namespace view."""

    def test_repr(self):
        """repr is the original's ``TaskResult[ID:73]:{'a': 73}``."""
        self.assertEqual(repr(_result()), "TaskResult[ID:73]:{'a': 73}")

    def test_repr_of_failure(self):
        """repr of a failed result names the error type and message."""
        r = _result(results={}, failure=TaskTimeout("too slow"))
        self.assertEqual(repr(r), "TaskResult[ID:73]:TaskTimeout(too slow)")

    def test_ns_attribute_access(self):
        """ns gives the pulled values as attributes and items."""
        r = _result(results={"a": 73, "b": [1]})
        self.assertEqual(r.ns.a, 73)
        self.assertEqual(r.ns["b"], [1])
        self.assertEqual(r["a"], 73)
        self.assertEqual(sorted(dir(r.ns)), ["a", "b"])
        self.assertEqual(sorted(r.keys), ["a", "b"])

    def test_ns_missing_name(self):
        """A name the task did not pull is an AttributeError naming it."""
        with self.assertRaises(AttributeError) as caught:
            _ = _result().ns.b
        self.assertIn("'b'", str(caught.exception))

    def test_ns_read_only(self):
        """ns cannot be assigned to, and its values mapping cannot be changed."""
        r = _result()
        with self.assertRaises(AttributeError):
            r.ns.a = 5
        with self.assertRaises(AttributeError):
            r.ns.new = 5
        with self.assertRaises(TypeError):
            r.ns._values["a"] = 5
        self.assertEqual(r.ns.a, 73)

    def test_ns_raises_failure(self):
        """On a failed result, reading ns raises the task's failure."""
        error = EngineLost("engine 2 was lost")
        r = _result(results={}, failure=error)
        with self.assertRaises(EngineLost):
            _ = r.ns.a
        with self.assertRaises(EngineLost):
            r["a"]

    def test_raise_exception(self):
        """raise_exception raises the failure, and does nothing on success."""
        _result().raise_exception()
        error = RemoteTaskError("ZeroDivisionError", "division by zero")
        with self.assertRaises(RemoteTaskError) as caught:
            _result(results={}, failure=error).raise_exception()
        self.assertIs(caught.exception, error)

    def test_time_formatting(self):
        """submitted and completed are formatted ``%Y/%m/%d %H:%M:%S`` in local time."""
        now = time.time()
        r = _result(submitted_at=now, completed_at=now + 2.0)
        pattern = r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d$"
        self.assertRegex(r.submitted, pattern)
        self.assertRegex(r.completed, pattern)
        self.assertEqual(r.submitted, time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now)))

    def test_format_time_none(self):
        """An unknown time formats as None."""
        self.assertIsNone(format_time(None))
        self.assertIsNone(_result(completed_at=None).completed)

    def test_duration(self):
        """duration is completed minus started, or 0.0 when either is unknown."""
        self.assertEqual(_result().duration, 2.5)
        self.assertEqual(_result(started_at=None).duration, 0.0)
        self.assertIsInstance(_result(started_at=None).duration, float)

    def test_metadata(self):
        """taskid and engineid are kept."""
        r = _result()
        self.assertEqual((r.taskid, r.engineid), (73, 1))


class ResultFromEnvelopeTests(unittest.TestCase):
    """`result_from_envelope`: the controller's result envelope made a `TaskResult`."""

    def test_exec_success(self):
        """A successful code task gives the pulled dict as results."""
        data = serialization.dumps({"a": 73})
        r = result_from_envelope((73, EXEC, True, data, 2, 10.0, 11.0, 12.0))
        self.assertEqual(r.results, {"a": 73})
        self.assertEqual(r.ns.a, 73)
        self.assertIsNone(r.value)
        self.assertIsNone(r.failure)
        self.assertEqual((r.taskid, r.engineid, r.duration), (73, 2, 1.0))
        self.assertEqual(repr(r), "TaskResult[ID:73]:{'a': 73}")

    def test_call_success(self):
        """A successful MapTask gives its return value as `value`."""
        data = serialization.dumps([1, 2])
        r = result_from_envelope((5, CALL, True, data, 0, 1.0, 2.0, 3.0))
        self.assertEqual(r.value, [1, 2])
        self.assertEqual(r.results, {})

    def test_typed_failure(self):
        """A failure comes back as the same typed error with its message."""
        wire = to_wire(EngineLost("engine 3 was lost: gone"))
        r = result_from_envelope((5, EXEC, False, wire, 3, 1.0, None, 3.0))
        self.assertIsInstance(r.failure, EngineLost)
        self.assertEqual(str(r.failure), "engine 3 was lost: gone")
        self.assertEqual(r.results, {})
        self.assertRaises(EngineLost, r.raise_exception)

    def test_remote_task_error(self):
        """A user error keeps its name, message, traceback text and engine."""
        wire = to_wire(RemoteTaskError("KeyError", "'x'", "Traceback...", 4))
        r = result_from_envelope((5, EXEC, False, wire, 4, 1.0, 2.0, 3.0))
        self.assertIsInstance(r.failure, RemoteTaskError)
        self.assertEqual(
            (r.failure.ename, r.failure.evalue, r.failure.traceback, r.failure.engine_id),
            ("KeyError", "'x'", "Traceback...", 4),
        )

    def test_builtin_failure_kept_as_taskfarm_error(self):
        """A plain built-in error becomes a TaskfarmError that keeps its message."""
        r = result_from_envelope((5, EXEC, False, ("ValueError", "bad"), None, 1.0, None, 3.0))
        self.assertIsInstance(r.failure, TaskfarmError)
        self.assertIn("bad", str(r.failure))

    def test_unknown_error_name_kept(self):
        """An error name this side does not know comes back naming it."""
        r = result_from_envelope((5, EXEC, False, ("WeirdError", "odd"), None, 1.0, None, 3.0))
        self.assertIsInstance(r.failure, TaskfarmError)
        self.assertEqual(str(r.failure), "WeirdError: odd")

    def test_corrupt_result_named(self):
        """A result that cannot be unpickled raises SerializationError naming the task."""
        with self.assertRaises(SerializationError) as caught:
            result_from_envelope((9, EXEC, True, b"not a pickle", 0, 1.0, 2.0, 3.0))
        self.assertIn("task 9", str(caught.exception))

    def test_result_pickles(self):
        """A failure inside a result survives pickling (it is plain data)."""
        error = RemoteTaskError("ValueError", "boom", "tb", 1)
        back = pickle.loads(pickle.dumps(error))
        self.assertEqual((back.ename, back.evalue, back.traceback), ("ValueError", "boom", "tb"))
        self.assertTrue(re.match(r"ValueError: boom", str(back)))
