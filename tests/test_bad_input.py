"""Property-based tests: whatever a user, client or engine hands us, the answer
is a typed error or a correct result, never a crash, never code execution.

Two layers are checked:

* the client-side value types (`Task`, `MapTask`): a constructor or setter
  either accepts a value or raises `TypeError` / `ValueError`, and whatever
  it accepts encodes, and the controller accepts the encoding;
* the controller's wire entry points (the ``remote_*`` methods of the Task,
  MultiEngine and engine-session Referenceables), called directly on a real
  in-memory `TaskController`, `EngineRegistry` and `MultiEngine` driven by a
  `task.Clock`: every malformed payload is answered with a reply envelope
  ``(False, wire_error)`` carrying a typed error, has no effect, and the
  controller keeps serving.

A note on what is *not* restricted: a task's ``depend`` predicate is user
code that must run, so the controller's depend evaluator processes unpickle
it freely (the controller itself keeps it as bytes); holding the task furl
therefore means running code on the controller's machine (as on the
engines).  Everything else a peer sends is plain data read by the
restricted unpickler, which these tests attack.
"""

from __future__ import annotations

import builtins
import math
import os
import pickle
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.controller.multiengine import ENGINE_OPERATIONS, PROPERTY_ACTIONS, MultiEngine
from taskfarm.controller.tasks import TaskSpec
from taskfarm.errors import (
    BadRequest,
    MessageTooLarge,
    RecoveryLoopError,
    SerializationError,
    TaskfarmError,
    from_wire,
)
from taskfarm.remote.multiengine import RemoteMultiEngine
from taskfarm.remote.server import RemoteEngineSession, RemoteTaskController
from taskfarm.task import CALL, EXEC, MapTask, Task, result_from_envelope
from taskfarm.testing import ScriptedChannel
from taskfarm.testing.helpers import clock_controller, temp_dir

#: Modest example counts keep the file fast; set TASKFARM_FUZZ_SCALE=50 for a
#: long hunt.
_SCALE = int(os.environ.get("TASKFARM_FUZZ_SCALE", "1"))
FAST = settings(
    max_examples=40 * _SCALE,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(FAST, max_examples=80 * _SCALE)


# -- strategies --------------------------------------------------------------------------


def _always(properties):
    return True


def _never(properties):
    return False


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]


#: Plain data, nested: what the restricted unpickler can produce.
plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.tuples(inner, inner, inner, inner, inner)
    | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3)
    | st.frozensets(st.integers(), max_size=3),
    max_leaves=12,
)

#: Anything a user might pass: plain data plus a few odd Python objects.
anything = plain | st.sampled_from(
    [
        len,
        _always,
        lambda x: x,
        Task,
        Task("x = 1"),
        object(),
        {1, 2},
        range(3),
        b"ab",
        "not an identifier",
        ["a", "b"],
        ("ok",),
        {"a": 1},
        {"not id": 1},
        _Unhashable(),
        float("nan"),
        float("inf"),
        -0.0,
        2**70,
        -(2**70),
    ]
)

identifiers = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,6}\Z")
push_values = st.dictionaries(identifiers, plain, max_size=3)
valid_options = {
    "clear_before": st.booleans(),
    "clear_after": st.booleans(),
    "retries": st.integers(0, 5),
    "recovery_task": st.none() | st.builds(Task, st.text(max_size=10)),
    "depend": st.sampled_from([None, _always, _never]),
    "priority": st.integers(-(2**40), 2**40),
    "timeout": st.none() | st.floats(0.001, 1e6),
}


def _either(valid):
    """Mostly a valid value, sometimes anything at all."""
    return st.one_of(valid, valid, anything)


def _either_plain(valid):
    """Mostly a valid value, sometimes any plain data (what can travel)."""
    return st.one_of(valid, valid, plain)


option_values = st.fixed_dictionaries({k: _either(v) for k, v in valid_options.items()})

task_values = st.fixed_dictionaries(
    {
        "expression": _either(st.text(max_size=20)),
        "pull": _either(st.none() | identifiers | st.lists(identifiers, max_size=3)),
        "push": _either(st.none() | push_values),
    }
)

map_values = st.fixed_dictionaries(
    {
        "function": _either(st.sampled_from([len, _always, abs, max])),
        "args": _either(st.lists(plain, max_size=3) | st.tuples(plain)),
        "kwargs": _either(st.none() | st.dictionaries(identifiers, plain, max_size=2)),
    }
)

#: Each class's settable attributes, with a strategy of valid values for each.
SETTABLE = {
    Task: {
        "expression": st.text(max_size=20),
        "pull": st.none() | identifiers | st.lists(identifiers, max_size=3),
        "push": push_values,
        **valid_options,
    },
    MapTask: {
        "function": st.sampled_from([len, abs, _always]),
        "args": st.lists(plain, max_size=3) | st.tuples(plain),
        "kwargs": st.none() | st.dictionaries(identifiers, plain, max_size=2),
        **valid_options,
    },
}

_OPTIONS = (False, False, 0, 0, None)


def _envelope(kind=EXEC, payload=b"", options=_OPTIONS, depend=None, recovery=None):
    return (kind, payload, options, depend, recovery)


#: Task envelopes: right shape with odd parts, or odd shapes altogether.
envelopes = st.one_of(
    st.builds(
        _envelope,
        _either_plain(st.sampled_from([EXEC, CALL])),
        _either_plain(st.binary(max_size=8)),
        _either_plain(
            st.tuples(
                _either_plain(st.booleans()),
                _either_plain(st.booleans()),
                _either_plain(st.integers(0, 3)),
                _either_plain(st.integers()),
                _either_plain(st.none() | st.floats(0.1, 10)),
            )
        ),
        st.none() | st.binary(max_size=8) | plain,
        st.none() | st.just(_envelope()) | plain,
    ),
    plain,
)

#: Reply envelopes an engine might send: right shape with odd parts, or junk.
engine_replies = st.one_of(
    st.lists(
        st.tuples(
            _either_plain(st.integers(0, 6)),
            _either_plain(st.booleans()),
            _either_plain(st.binary(max_size=6) | st.just(("BadRequest", "x"))),
            _either_plain(st.none() | st.floats(0, 1e9)),
            _either_plain(st.floats(0, 1e9)),
        ),
        max_size=3,
    ),
    plain,
)


# -- helpers -------------------------------------------------------------------------


def _check_encodes(testcase, task_object):
    """A task the client accepted encodes, and the controller accepts that."""
    envelope = task_object.to_envelope()
    spec = TaskSpec.from_envelope(serialization.unpack(serialization.pack(envelope)))
    testcase.assertEqual(spec.kind, CALL if isinstance(task_object, MapTask) else EXEC)
    testcase.assertEqual(spec.retries, task_object.retries)
    testcase.assertEqual(spec.priority, task_object.priority)
    testcase.assertEqual(spec.timeout, task_object.timeout)
    testcase.assertEqual(spec.depend is None, task_object.depend is None)
    testcase.assertEqual(spec.recovery is None, task_object.recovery_task is None)


def _marker_pickles(marker: Path) -> list[bytes]:
    """Pickles that would create `marker` if anything unpickled them freely."""

    class System:
        def __reduce__(self):
            return (os.system, ("touch %s" % marker,))

    class Exec:
        def __reduce__(self):
            return (builtins.exec, ("open(%r, 'w').close()" % str(marker),))

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))

    blobs = []
    for evil in (System(), Exec(), Touch()):
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            blobs.append(pickle.dumps(evil, protocol=protocol))
            # Hidden deep inside otherwise plain data, too.
            blobs.append(pickle.dumps((None, [_envelope(), [evil]]), protocol=protocol))
    return blobs


_DEEP = b"N" + b"\x85" * 5_000  # pickle opcodes: None wrapped in 5,000 1-tuples
_EXEC = b"\x8c\x04exec"
_OPTIONS_OPS = b"(\x89\x89K\x00K\x00Nt"  # (False, False, 0, 0, None)


def _pickle(*ops: bytes) -> bytes:
    """A pickle assembled from opcodes, so that nesting far beyond what the
    pickler itself would write costs no recursion."""
    return b"\x80\x04" + b"".join(ops) + b"."


def _submission_of_kind(kind_ops: bytes) -> bytes:
    """``(None, [(kind, b"", options, None, None)])`` with the kind given as opcodes."""
    return _pickle(b"N]", b"(", kind_ops, b"C\x00", _OPTIONS_OPS, b"NN", b"t", b"a", b"\x86")


def _deep_chain(depth: int) -> bytes:
    """A submission of one task whose recovery chain is `depth` long."""
    link = b"(" + _EXEC + b"C\x00" + _OPTIONS_OPS + b"N"
    return _pickle(b"N]", link * depth, b"N", b"t" * depth, b"a", b"\x86")


#: What the restricted unpickler can build without looking up any class.
_PLAIN_TYPES = (
    type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset,
)


# -- the value types ---------------------------------------------------------------------


class TaskValueTests(unittest.TestCase):
    """`Task` / `MapTask` take anything and answer with TypeError / ValueError."""

    @FAST
    @given(task_values, option_values)
    def test_task_constructor(self, values, options):
        """Task(...) with arbitrary arguments: accepted and encodable, or a
        TypeError / ValueError."""
        try:
            made = Task(**values, **options)
        except (TypeError, ValueError):
            return
        _check_encodes(self, made)

    @FAST
    @given(map_values, option_values)
    def test_map_task_constructor(self, values, options):
        """MapTask(...) with arbitrary arguments: accepted and encodable, or a
        TypeError / ValueError."""
        try:
            made = MapTask(values["function"], values["args"], values["kwargs"], **options)
        except (TypeError, ValueError):
            return
        _check_encodes(self, made)

    @FAST
    @given(st.sampled_from([Task, MapTask]), st.data())
    def test_setters(self, cls, data):
        """Assigning an arbitrary value to any attribute either works (and
        the task still encodes) or raises TypeError / ValueError and leaves
        the task as it was."""
        name = data.draw(st.sampled_from(sorted(SETTABLE[cls])), label="name")
        value = data.draw(_either(SETTABLE[cls][name]), label="value")
        made = Task("a = 1", pull="a") if cls is Task else MapTask(abs, (1,))
        before = getattr(made, name)
        try:
            setattr(made, name, value)
        except (TypeError, ValueError):
            self.assertEqual(repr(getattr(made, name)), repr(before))
            _check_encodes(self, made)
            return
        _check_encodes(self, made)

    @FAST
    @given(
        st.floats(allow_nan=True, allow_infinity=True)
        | st.integers()
        | st.sampled_from([10**400, -(10**400), 2**1024, int(sys.float_info.max)])
    )
    def test_timeout_must_be_positive_and_finite(self, value):
        """A timeout is a positive, finite number of seconds: zero, negatives,
        NaN, infinity and ints too big for a float are refused with
        ValueError, on the client and on the controller alike."""
        made = Task("pass")
        envelope = _envelope(options=(False, False, 0, 0, value))
        if isinstance(value, float) and math.isnan(value) or not 0 < value <= sys.float_info.max:
            self.assertRaises(ValueError, setattr, made, "timeout", value)
            self.assertRaises(BadRequest, TaskSpec.from_envelope, envelope)
        else:
            made.timeout = value
            self.assertEqual(made.timeout, float(value))
            self.assertEqual(TaskSpec.from_envelope(envelope).timeout, value)

    def test_recovery_loop(self):
        """A recovery chain that loops is refused at encoding with
        RecoveryLoopError (a ValueError)."""
        first, second = Task("a = 1"), Task("a = 2")
        first.recovery_task = second
        second.recovery_task = first
        error = self.assertRaises(RecoveryLoopError, first.to_envelope)
        self.assertIsInstance(error, ValueError)

    def test_unpicklable_push_value(self):
        """A push value that cannot be pickled fails at encoding with a
        SerializationError (a TypeError) naming the push dict."""
        made = Task("a = 1", push={"a": (x for x in ())})
        error = self.assertRaises(SerializationError, made.to_envelope)
        self.assertIsInstance(error, TypeError)
        self.assertIn("push", str(error))


# -- decoding ----------------------------------------------------------------------------


class DecodingTests(unittest.TestCase):
    """`TaskSpec.from_envelope` and `serialization.unpack` on junk."""

    @FUZZ
    @given(envelopes)
    def test_from_envelope(self, envelope):
        """A task envelope decodes or raises BadRequest, nothing else."""
        try:
            spec = TaskSpec.from_envelope(envelope)
        except BadRequest:
            return
        self.assertIn(spec.kind, (EXEC, CALL))
        self.assertIsInstance(spec.payload, bytes)

    def assert_plain(self, value):
        """`value` is made of built-in data types only (cycles allowed)."""
        todo, seen = [value], set()
        while todo:
            item = todo.pop()
            self.assertIn(type(item), _PLAIN_TYPES)
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                todo.extend(item.keys())
                todo.extend(item.values())
            elif isinstance(item, (list, tuple, set, frozenset)):
                todo.extend(item)

    @FUZZ
    @given(st.binary(max_size=64))
    def test_unpack_random_bytes(self, blob):
        """Random bytes unpack to plain data or raise BadRequest."""
        try:
            value = serialization.unpack(blob)
        except BadRequest:
            return
        self.assert_plain(value)

    @FUZZ
    @given(plain, st.data())
    def test_unpack_damaged_pickles(self, value, data):
        """A valid envelope with bytes changed or cut off unpacks to plain
        data or raises BadRequest."""
        blob = bytearray(serialization.pack(value))
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
        blob = bytes(blob[: data.draw(st.integers(0, len(blob)))])
        try:
            unpacked = serialization.unpack(blob)
        except BadRequest:
            return
        self.assert_plain(unpacked)

    def test_code_executing_pickles_are_refused(self):
        """Pickles whose loading would call os.system, exec or Path.touch
        are refused with BadRequest, and nothing runs."""
        marker = temp_dir(self, "taskfarm-bad-input-") / "marker"
        for blob in _marker_pickles(marker):
            error = self.assertRaises(BadRequest, serialization.unpack, blob)
            self.assertIn("plain data only", str(error))
        self.assertFalse(marker.exists())

    def test_huge_declared_lengths(self):
        """A pickle announcing a gigantic bytes object is refused at once."""
        for size in (2**62, 2**33):
            for opcode in (b"\x8e", b"\x8d"):
                blob = b"\x80\x05" + opcode + size.to_bytes(8, "little") + b"abc"
                self.assertRaises(BadRequest, serialization.unpack, blob)

    def test_not_bytes(self):
        """unpack refuses anything but bytes with BadRequest."""
        for value in ("text", bytearray(b"x"), None, 3, memoryview(b"x")):
            self.assertRaises(BadRequest, serialization.unpack, value)


# -- the controller's entry points ---------------------------------------------------------


class EntryPointTestCase(unittest.TestCase):
    """A real controller on a task.Clock, its Referenceables called directly."""

    def setUp(self):
        self.clock, self.registry, self.controller = clock_controller(self, evaluator=True)
        self.multiengine = MultiEngine(self.registry, self.clock)
        self.task_remote = RemoteTaskController(self.controller)
        self.multiengine_remote = RemoteMultiEngine(self.multiengine)
        self.channels = []
        for _ in range(2):
            channel = ScriptedChannel.registered(self.registry, {"hostname": "h", "pid": 1})
            self.channels.append(channel)
        self.marker = temp_dir(self, "taskfarm-bad-input-") / "marker"

    def answer(self, d):
        """The reply envelope a remote_* call answered, unpacked."""
        results = []
        d.addBoth(results.append)
        self.assertEqual(len(results), 1, "the call did not answer")
        # One byte string, or (results, engine_call) a message in parts.
        if not isinstance(results[0], bytes):
            self.assertIsInstance(results[0], list)
            self.assertTrue(all(isinstance(part, bytes) for part in results[0]))
        ok, value = serialization.unpack(results[0])
        self.assertIsInstance(ok, bool)
        return ok, value

    def assert_typed_refusal(self, ok, value):
        """`(False, wire_error)` with a typed error, not an internal one."""
        self.assertIs(ok, False)
        error = from_wire(value)
        self.assertIsInstance(error, (TaskfarmError, TypeError, ValueError, KeyError))
        self.assertIsNot(type(error), TaskfarmError, str(error))
        self.assertNotIn("internal controller error", str(error))
        return error

    def refused(self, d):
        return self.assert_typed_refusal(*self.answer(d))

    def turn(self):
        self.clock.advance(0)

    def sent(self):
        self.turn()
        return [len(c.sent) for c in self.channels]

    def answer_engines(self):
        """Answer every command the engines get, as engines would, until
        nothing is left to run."""
        for _ in range(10_000):
            self.turn()
            pending = [(c, command) for c in self.channels for command in c.pending()]
            if not pending:
                return
            for channel, (seq, op, _) in pending:
                data = serialization.dumps({"a": 1}) if op == "task" else b""
                channel.reply(seq, True, data)
        self.fail("the engines never ran out of commands")

    def submit_valid(self):
        """A valid submission still works: ids come back, tasks run."""
        blob = serialization.pack((None, [Task("a = 1", pull="a").to_envelope()]))
        ok, ids = self.answer(self.task_remote.remote_submit(blob))
        self.assertIs(ok, True)
        self.answer_engines()
        ok, results = self.answer(
            self.task_remote.remote_results(serialization.pack(ids), False)
        )
        self.assertIs(ok, True)
        self.assertEqual(result_from_envelope(results[0]).results, {"a": 1})


class TaskEntryPointTests(EntryPointTestCase):
    """RemoteTaskController's submit / results / wait / clear."""

    @FUZZ
    @given(
        st.one_of(
            st.binary(max_size=40),
            plain.map(serialization.pack),
            st.tuples(
                st.none() | st.text(max_size=4) | plain, st.lists(envelopes, max_size=3) | plain
            ).map(serialization.pack),
            # With the ids a client reserved (or thinks it did).
            st.tuples(
                st.none() | st.text(max_size=4),
                st.lists(envelopes, max_size=3),
                st.none() | st.lists(st.integers(-2, 300), max_size=3) | plain,
            ).map(serialization.pack),
        )
    )
    def test_submit(self, batch):
        """remote_submit answers ids for a valid batch and a typed refusal for
        anything else; a refused batch queues nothing."""
        before = self.controller.queue_status(verbose=True)
        ok, value = self.answer(self.task_remote.remote_submit(batch))
        if ok:
            self.assertIsInstance(value, list)
            self.assertTrue(all(isinstance(i, int) for i in value))
        else:
            self.assert_typed_refusal(ok, value)
            self.assertEqual(self.controller.queue_status(verbose=True), before)
        self.submit_valid()

    @FUZZ
    @given(
        st.sampled_from(["results", "wait", "clear"]),
        st.one_of(
            st.binary(max_size=24),
            plain.map(serialization.pack),
            st.lists(st.integers(-3, 3) | plain, max_size=4).map(serialization.pack),
        ),
        st.booleans(),
    )
    def test_id_lists(self, method, blob, block):
        """remote_results / remote_wait / remote_clear answer a typed refusal
        for anything but a list of known task ids."""
        if method == "results":
            d = self.task_remote.remote_results(blob, block)
        elif method == "wait":
            d = self.task_remote.remote_wait(blob)
        else:
            d = self.task_remote.remote_clear(blob)
        results = []
        d.addBoth(results.append)
        if not results:
            # Waiting is right only for a well-formed list of known, unfinished ids.
            ids = serialization.unpack(blob)
            self.assertIsInstance(ids, list)
            self.assertTrue(all(i in self.controller._tasks for i in ids))
            self.answer_engines()
            self.assertEqual(len(results), 1, "a wait on finished tasks did not answer")
        ok, value = serialization.unpack(results[0])
        if not ok:
            self.assert_typed_refusal(ok, value)
        self.submit_valid()

    def test_code_executing_pickles(self):
        """Hostile pickles anywhere in submit / results / wait / clear are
        refused as BadRequest and nothing runs."""
        for blob in _marker_pickles(self.marker):
            for d in (
                self.task_remote.remote_submit(blob),
                self.task_remote.remote_results(blob, False),
                self.task_remote.remote_wait(blob),
                self.task_remote.remote_clear(blob),
            ):
                self.assertIsInstance(self.refused(d), BadRequest)
        self.assertFalse(self.marker.exists())
        self.submit_valid()

    def test_payload_is_never_opened(self):
        """A task's payload is opaque to the controller: a hostile pickle
        there is queued, not unpickled (only an engine opens it)."""
        payload = _marker_pickles(self.marker)[0]
        blob = serialization.pack((None, [_envelope(payload=payload)]))
        ok, ids = self.answer(self.task_remote.remote_submit(blob))
        self.assertIs(ok, True)
        self.turn()
        self.assertFalse(self.marker.exists())

    def test_deep_nesting(self):
        """Data nested too deeply to describe (a task kind, a recovery chain
        of thousands) is a BadRequest, not an internal error."""
        for blob in (_submission_of_kind(_DEEP), _deep_chain(5000)):
            self.assertIsInstance(self.refused(self.task_remote.remote_submit(blob)), BadRequest)
        self.submit_valid()

    def test_too_large(self):
        """A message over the size limit is refused with MessageTooLarge."""
        small = RemoteTaskController(self.controller, max_message_size=1024)
        blob = serialization.pack((None, [_envelope(payload=b"x" * 2000)]))
        error = self.refused(small.remote_submit(blob))
        self.assertIsInstance(error, MessageTooLarge)
        self.assertIn("1024", str(error))
        self.submit_valid()

    def test_huge_retries(self):
        """Retries too large to keep are refused at the door: the client
        value type and the controller agree on the bound."""
        self.assertRaises(ValueError, Task, "a = 1", retries=2**70)
        blob = serialization.pack((None, [_envelope(options=(False, False, 2**70, 0, None))]))
        self.assertIsInstance(self.refused(self.task_remote.remote_submit(blob)), BadRequest)
        self.submit_valid()


class MultiEngineEntryPointTests(EntryPointTestCase):
    """RemoteMultiEngine's engine_call / properties / queue calls."""

    targets = st.sampled_from(["all", 0, 1, [0, 1], [1], 7, [0, 7], [], True, "none"]) | plain

    @FUZZ
    @given(
        st.one_of(
            st.binary(max_size=24),
            plain.map(serialization.pack),
            st.tuples(
                _either_plain(st.sampled_from(sorted(ENGINE_OPERATIONS) + ["bogus"])),
                targets,
                _either_plain(st.tuples() | st.tuples(st.text(max_size=5))),
                st.none()
                | st.dictionaries(
                    st.integers(0, 2), _either_plain(st.tuples(st.integers())), max_size=2
                )
                | plain,
            ).map(serialization.pack),
        )
    )
    def test_engine_call(self, request):
        """remote_engine_call runs a valid request on every target, and
        refuses anything else with a typed error before any engine is
        sent anything."""
        before = self.sent()
        d = self.multiengine_remote.remote_engine_call(request)
        results = []
        d.addBoth(results.append)
        if results:
            ok, value = serialization.unpack(results[0])
            if not ok:
                self.assert_typed_refusal(ok, value)
                self.assertEqual(self.sent(), before, "a refused call reached an engine")
        else:
            self.answer_engines()
            self.assertEqual(len(results), 1)
            ok, value = serialization.unpack(results[0])
            self.assertIs(ok, True)
        self.submit_valid()

    @FUZZ
    @given(
        st.one_of(
            st.binary(max_size=24),
            plain.map(serialization.pack),
            st.tuples(
                _either_plain(st.sampled_from(sorted(PROPERTY_ACTIONS) + ["bogus"])),
                targets,
                _either_plain(
                    st.none()
                    | st.text(max_size=4)
                    | st.dictionaries(st.text(max_size=4), plain, max_size=2)
                ),
            ).map(serialization.pack),
        )
    )
    def test_properties(self, request):
        """remote_properties answers per-engine outcomes or a typed refusal."""
        ok, value = self.answer(self.multiengine_remote.remote_properties(request))
        if ok:
            self.assertIsInstance(value, list)
        else:
            self.assert_typed_refusal(ok, value)
        self.answer_engines()
        self.submit_valid()

    @FAST
    @given(st.binary(max_size=24) | plain.map(serialization.pack))
    def test_queue_calls(self, targets):
        """remote_queue_status / remote_clear_queue answer a typed refusal for
        bad targets."""
        for d in (
            self.multiengine_remote.remote_queue_status(targets),
            self.multiengine_remote.remote_clear_queue(targets),
        ):
            ok, value = self.answer(d)
            if not ok:
                self.assert_typed_refusal(ok, value)

    def test_code_executing_pickles(self):
        """Hostile pickles in MultiEngine requests are refused as BadRequest
        and nothing runs."""
        for blob in _marker_pickles(self.marker):
            for d in (
                self.multiengine_remote.remote_engine_call(blob),
                self.multiengine_remote.remote_properties(blob),
                self.multiengine_remote.remote_queue_status(blob),
            ):
                self.assertIsInstance(self.refused(d), BadRequest)
        self.assertFalse(self.marker.exists())

    def test_partial_per_target_arguments(self):
        """A call whose per-target arguments miss one engine is refused and
        reaches no engine at all (not even those it had arguments for)."""
        before = self.sent()
        request = serialization.pack(("execute", "all", (), {0: ("a = 1",)}))
        error = self.refused(self.multiengine_remote.remote_engine_call(request))
        self.assertIsInstance(error, BadRequest)
        self.assertEqual(self.sent(), before)

    def test_deep_nesting(self):
        """Deeply nested targets or operation names are a BadRequest."""
        execute, all_ = b"\x8c\x07execute", b"\x8c\x03all"
        call, properties = (
            self.multiengine_remote.remote_engine_call,
            self.multiengine_remote.remote_properties,
        )
        for method, request in (
            (call, _pickle(b"(", execute, _DEEP, b")N", b"t")),
            (call, _pickle(b"(", _DEEP, all_, b")N", b"t")),
            (properties, _pickle(b"(", _DEEP, all_, b"N", b"t")),
            (properties, _pickle(b"(\x8c\x03get", _DEEP, b"N", b"t")),
        ):
            self.assertEqual(len(serialization.unpack(request)), 4 if method is call else 3)
            self.assertIsInstance(self.refused(method(request)), BadRequest)


class EngineSessionTests(EntryPointTestCase):
    """RemoteEngineSession.remote_replies: what an engine sends back."""

    def setUp(self):
        super().setUp()
        self.channel = self.channels[0]
        self.session = RemoteEngineSession(self.registry, self.channel.engine, self.channel)

    @FUZZ
    @given(
        st.one_of(
            st.binary(max_size=24),
            engine_replies.map(serialization.pack),
        )
    )
    def test_replies(self, batch):
        """Malformed replies never raise: the engine is disconnected (its
        commands then fail over), and the controller keeps serving."""
        self.channel.disconnected = False
        # A task in flight on this engine, as the fuzzed reply may name it.
        self.controller.submit([Task("a = 1", pull="a").to_envelope()])
        self.turn()
        self.assertIsNone(self.session.remote_replies(batch))
        try:
            replies = serialization.unpack(batch)
        except BadRequest:
            replies = None
        if self.channel.disconnected:
            self.registry.engine_lost(self.channel.engine, "test")
            self.channel = ScriptedChannel()
            self.channel.engine = self.registry.register(self.channel, {"hostname": "h"})
            self.channels[0] = self.channel
            self.session = RemoteEngineSession(self.registry, self.channel.engine, self.channel)
        else:
            self.assertIsInstance(replies, list)
        self.submit_valid()

    def test_code_executing_pickles(self):
        """Hostile pickles as replies are dropped (engine disconnected) and
        nothing runs."""
        for blob in _marker_pickles(self.marker):
            self.channel.disconnected = False
            self.assertIsNone(self.session.remote_replies(blob))
            self.assertTrue(self.channel.disconnected)
        self.assertFalse(self.marker.exists())

    def test_badly_typed_replies(self):
        """Replies of the right length but wrong types (an unhashable seq,
        a non-bool ok, a result that is not bytes, a time that is not a
        number) disconnect the engine instead of raising or corrupting
        the task's record."""
        self.controller.submit([Task("a = 1").to_envelope()])
        self.turn()
        (seq, _, _), = self.channel.pending()
        for reply in (
            ([seq], True, b"", 0.0, 1.0),
            (seq, "yes", b"", 0.0, 1.0),
            (seq, True, ["not bytes"], 0.0, 1.0),
            (seq, False, "not a wire error", 0.0, 1.0),
            (seq, True, b"", 0.0, "later"),
            (seq, True, b"", 0.0, float("nan")),
            (seq, True, b"", 0.0, 2**70),
        ):
            self.channel.disconnected = False
            self.assertIsNone(self.session.remote_replies(serialization.pack([reply])))
            self.assertTrue(self.channel.disconnected, reply)
        self.assertEqual(self.controller.queue_status()["pending"], 1)
