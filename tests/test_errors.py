"""Unit tests of `taskfarm.errors`: the wire form of errors and `CompositeError`."""

import io
from contextlib import redirect_stdout

from twisted.trial import unittest

from taskfarm import errors, serialization
from taskfarm.errors import (
    BadRequest,
    CompositeError,
    EngineLost,
    InvalidEngineID,
    RemoteTaskError,
    TaskAborted,
    TaskAlreadyAborted,
    TaskAlreadyCompleted,
    TaskfarmError,
    TaskTimeout,
    UnknownTask,
    from_wire,
    to_wire,
)


def _taskfarm_error_classes():
    return sorted(
        (
            obj
            for obj in vars(errors).values()
            if isinstance(obj, type) and issubclass(obj, TaskfarmError)
        ),
        key=lambda cls: cls.__name__,
    )


def _example(cls):
    if cls is RemoteTaskError:
        return cls("ZeroDivisionError", "division by zero", "Traceback (most recent call last):\n", 3)
    if cls is CompositeError:
        return cls("one or more exceptions", [(0, "execute", ValueError("bad"))])
    return cls("something went wrong")


class WireRoundTripTests(unittest.TestCase):
    """`to_wire` / `from_wire` keep an error's type and message."""

    def test_every_taskfarm_error_round_trips(self):
        """Every error class in taskfarm.errors comes back as itself, message intact."""
        classes = _taskfarm_error_classes()
        self.assertGreater(len(classes), 20)
        for cls in classes:
            error = _example(cls)
            back = from_wire(to_wire(error))
            self.assertIs(type(back), cls, cls.__name__)
            self.assertEqual(str(back), str(error), cls.__name__)

    def test_wire_form_is_plain_data(self):
        """The wire form of every error passes the data-only unpickler."""
        for cls in _taskfarm_error_classes():
            wire = to_wire(_example(cls))
            self.assertEqual(serialization.unpack(serialization.pack(wire)), wire)

    def test_remote_task_error_fields(self):
        """A RemoteTaskError keeps ename, evalue, traceback and engine id."""
        error = RemoteTaskError("KeyError", "'x'", "Traceback:\n  line 1\n", 7)
        back = from_wire(to_wire(error))
        self.assertEqual(
            (back.ename, back.evalue, back.traceback, back.engine_id),
            ("KeyError", "'x'", "Traceback:\n  line 1\n", 7),
        )
        self.assertEqual(str(back), "KeyError: 'x'")
        self.assertIsNone(back.exception)

    def test_builtin_errors(self):
        """TypeError, ValueError and KeyError come back as themselves, message unchanged."""
        for error in (TypeError("t"), ValueError("v"), KeyError("no such key")):
            back = from_wire(to_wire(error))
            self.assertIs(type(back), type(error))
            self.assertEqual(str(back), str(error))
            self.assertEqual(back.args, error.args)

    def test_key_error_does_not_gain_quotes(self):
        """A KeyError's message does not gain a layer of quotes per trip."""
        error = KeyError("x")
        for _ in range(3):
            error = from_wire(to_wire(error))
        self.assertEqual(error.args, ("x",))

    def test_unknown_name_kept(self):
        """A name this side does not know becomes a TaskfarmError naming it."""
        back = from_wire(("ZeroDivisionError", "division by zero"))
        self.assertIs(type(back), TaskfarmError)
        self.assertEqual(str(back), "ZeroDivisionError: division by zero")

    def test_foreign_exception_to_wire(self):
        """Any exception can be put on the wire by name and message."""
        self.assertEqual(to_wire(ZeroDivisionError("zero")), ("ZeroDivisionError", "zero"))

    def test_composite_error_round_trip_keeps_elist(self):
        """A CompositeError comes back with each engine's typed error."""
        error = CompositeError(
            "2 engines failed",
            [
                (0, "execute", RemoteTaskError("NameError", "name 'x' is not defined", "tb", 0)),
                (3, "pull", EngineLost("engine 3 was lost")),
            ],
        )
        back = from_wire(to_wire(error))
        self.assertIsInstance(back, CompositeError)
        self.assertEqual(back.message, "2 engines failed")
        self.assertEqual([(e, m) for e, m, _ in back.elist], [(0, "execute"), (3, "pull")])
        self.assertIsInstance(back.elist[0][2], RemoteTaskError)
        self.assertEqual(back.elist[0][2].traceback, "tb")
        self.assertIsInstance(back.elist[1][2], EngineLost)
        self.assertEqual(str(back), str(error))


class ErrorTypeTests(unittest.TestCase):
    """The error hierarchy callers rely on."""

    def test_already_completed_is_index_error(self):
        """abort of a finished task raises an IndexError 'Task Already Completed'."""
        error = TaskAlreadyCompleted()
        self.assertIsInstance(error, IndexError)
        self.assertEqual(str(error), "Task Already Completed")

    def test_already_aborted(self):
        """A second abort is a TaskAlreadyCompleted with its own message."""
        error = TaskAlreadyAborted()
        self.assertIsInstance(error, TaskAlreadyCompleted)
        self.assertIsInstance(error, IndexError)
        self.assertEqual(str(error), "Task Already Aborted")

    def test_unknown_task_is_index_error(self):
        """An unknown task id is an IndexError."""
        self.assertTrue(issubclass(UnknownTask, IndexError))

    def test_bad_request_is_value_error(self):
        """BadRequest is a ValueError."""
        self.assertTrue(issubclass(BadRequest, ValueError))

    def test_invalid_engine_id_str(self):
        """InvalidEngineID prints its message without KeyError's quotes."""
        self.assertEqual(str(InvalidEngineID("no engine 9")), "no engine 9")

    def test_all_are_taskfarm_errors(self):
        """The task outcomes are TaskfarmErrors."""
        for cls in (TaskAborted, TaskTimeout, EngineLost, RemoteTaskError):
            self.assertTrue(issubclass(cls, TaskfarmError))


class CompositeErrorTests(unittest.TestCase):
    """`CompositeError`: errors of several engines in one exception."""

    def _composite(self):
        return CompositeError(
            "one or more exceptions from call to method: execute",
            [
                (0, "execute", RemoteTaskError("ZeroDivisionError", "division by zero", "TB0", 0)),
                (1, "execute", EngineLost("engine 1 was lost")),
            ],
        )

    def test_str_one_line_per_engine(self):
        """str() gives the message and one ``[id:method]: Type: message`` line each."""
        self.assertEqual(
            str(self._composite()),
            "one or more exceptions from call to method: execute\n"
            "[0:execute]: ZeroDivisionError: division by zero\n"
            "[1:execute]: EngineLost: engine 1 was lost",
        )

    def test_nested_composites_flatten(self):
        """A CompositeError inside a CompositeError is flattened into its elist."""
        outer = CompositeError("outer", [(None, "gather", self._composite()), (2, "pull", KeyError("k"))])
        self.assertEqual([(e, m) for e, m, _ in outer.elist], [(0, "execute"), (1, "execute"), (2, "pull")])

    def test_raise_exception(self):
        """raise_exception raises the chosen engine's error."""
        composite = self._composite()
        self.assertRaises(RemoteTaskError, composite.raise_exception)
        self.assertRaises(EngineLost, composite.raise_exception, 1)

    def test_raise_exception_bad_index(self):
        """An index past the errors is an IndexError saying so."""
        with self.assertRaises(IndexError) as caught:
            self._composite().raise_exception(5)
        self.assertIn("index 5", str(caught.exception))

    def test_print_tracebacks(self):
        """print_tracebacks prints each error's remote traceback text, or says there is none."""
        out = io.StringIO()
        with redirect_stdout(out):
            self._composite().print_tracebacks()
        text = out.getvalue()
        self.assertIn("[0:execute]: ZeroDivisionError: division by zero\nTB0", text)
        self.assertIn("[1:execute]: EngineLost: engine 1 was lost\n(no remote traceback)", text)

    def test_print_one_traceback(self):
        """print_tracebacks(excid) prints only that error."""
        out = io.StringIO()
        with redirect_stdout(out):
            self._composite().print_tracebacks(1)
        self.assertNotIn("TB0", out.getvalue())
        self.assertIn("[1:execute]", out.getvalue())
