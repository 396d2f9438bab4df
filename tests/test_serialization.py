"""Unit tests of `taskfarm.serialization`: user values, envelopes and size limits."""

import pickle
import threading
from collections import OrderedDict

from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.errors import BadRequest, MessageTooLarge, SerializationError


class _Evil:
    """Unpickling this would run code, if the unpickler let classes through."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Evil.ran = True
    return "ran"


class DumpsLoadsTests(unittest.TestCase):
    """`dumps` / `loads`: user values with cloudpickle."""

    def test_round_trip(self):
        """Plain values and containers come back equal."""
        value = {"a": [1, 2.5, "x", None], "b": (b"bytes", {3}), "c": OrderedDict(z=1)}
        self.assertEqual(serialization.loads(serialization.dumps(value)), value)

    def test_lambda_with_closure(self):
        """Lambdas with closures survive (that is why cloudpickle is used)."""
        base = 40
        blob = serialization.dumps(lambda x: x + base)
        self.assertEqual(serialization.loads(blob)(2), 42)

    def test_dumps_names_unpicklable_value(self):
        """An unpicklable value raises SerializationError naming what it was and its type."""
        with self.assertRaises(SerializationError) as caught:
            serialization.dumps(threading.Lock(), "pulled name 'lock'")
        message = str(caught.exception)
        self.assertIn("pulled name 'lock'", message)
        self.assertIn("lock", message.lower())
        self.assertIn("cannot pickle", message)

    def test_serialization_error_is_type_error(self):
        """SerializationError is a TypeError, as pickle's own errors are."""
        self.assertTrue(issubclass(SerializationError, TypeError))

    def test_dumps_nested_unpicklable(self):
        """An unpicklable value deep in a container is still refused with the container named."""
        with self.assertRaises(SerializationError) as caught:
            serialization.dumps({"ok": 1, "bad": [threading.Lock()]}, "the push dict")
        self.assertIn("the push dict of type dict", str(caught.exception))

    def test_loads_garbage_named(self):
        """Bytes that are no pickle raise SerializationError naming what was read."""
        with self.assertRaises(SerializationError) as caught:
            serialization.loads(b"\x80\x05garbage", "the result of task 3")
        self.assertIn("the result of task 3", str(caught.exception))


class PackUnpackTests(unittest.TestCase):
    """`pack` / `unpack`: envelopes of plain data only."""

    def test_round_trip_plain_data(self):
        """Tuples, lists, dicts, str, bytes, numbers, booleans and None round-trip."""
        envelope = ("exec", b"\x00payload", (False, True, 3, -2, 1.5), None, [1, {"k": (2,)}])
        self.assertEqual(serialization.unpack(serialization.pack(envelope)), envelope)

    def test_refuses_classes(self):
        """An envelope that names any class or function raises BadRequest."""
        for value in (OrderedDict(a=1), complex(1, 2), threading.Event):
            blob = pickle.dumps(value)
            with self.assertRaises(BadRequest) as caught:
                serialization.unpack(blob)
            self.assertIn("plain data only", str(caught.exception))

    def test_refuses_code_execution(self):
        """A hostile pickle that would call a function is refused without running it."""
        _Evil.ran = False
        blob = pickle.dumps(_Evil())
        with self.assertRaises(BadRequest):
            serialization.unpack(blob)
        self.assertFalse(_Evil.ran)
        # The same bytes do run code with plain pickle: the test is meaningful.
        self.assertEqual(pickle.loads(blob), "ran")

    def test_refuses_non_bytes(self):
        """unpack of something that is not bytes raises BadRequest naming its type."""
        with self.assertRaises(BadRequest) as caught:
            serialization.unpack("a string")
        self.assertIn("str", str(caught.exception))

    def test_refuses_garbage(self):
        """Truncated or random bytes raise BadRequest, not a pickle error."""
        blob = serialization.pack(("a", "b"))
        for bad in (blob[:-3], b"", b"\x00\x01\x02"):
            self.assertRaises(BadRequest, serialization.unpack, bad)


class SizeLimitTests(unittest.TestCase):
    """Messages over the size limit are refused before they are read."""

    def test_over_limit(self):
        """A message longer than the limit raises MessageTooLarge with both sizes."""
        blob = serialization.pack(b"x" * 5000)
        with self.assertRaises(MessageTooLarge) as caught:
            serialization.unpack(blob, limit=1024)
        message = str(caught.exception)
        self.assertIn("%d bytes" % len(blob), message)
        self.assertIn("1024 bytes", message)

    def test_at_limit(self):
        """A message exactly at the limit is accepted."""
        blob = serialization.pack(b"x" * 100)
        self.assertEqual(serialization.unpack(blob, limit=len(blob)), b"x" * 100)

    def test_no_limit(self):
        """Without a limit any size is read."""
        blob = serialization.pack(b"x" * 100_000)
        self.assertEqual(len(serialization.unpack(blob)), 100_000)

    def test_limit_checked_before_parsing(self):
        """Even garbage is reported as too large first: the size check comes before parsing."""
        self.assertRaises(MessageTooLarge, serialization.unpack, b"\x00" * 2048, 1024)

    def test_check_size_names_the_message(self):
        """check_size names what was too large."""
        with self.assertRaises(MessageTooLarge) as caught:
            serialization.check_size(b"12345", 4, "the batch of tasks")
        self.assertIn("the batch of tasks of 5 bytes", str(caught.exception))
        serialization.check_size(b"1234", 4)
        serialization.check_size(b"1234", None)

    def test_message_too_large_is_value_error(self):
        """MessageTooLarge is a ValueError."""
        self.assertTrue(issubclass(MessageTooLarge, ValueError))

    def test_default_limit(self):
        """The default limit is a generous but finite 512 MiB."""
        self.assertEqual(serialization.DEFAULT_MAX_MESSAGE_SIZE, 512 * 1024 * 1024)
