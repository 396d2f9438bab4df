"""`taskfarm.wire`: every message type round-trips as plain data, names the
bad field of a malformed message, and refuses a newer peer's message with
`ProtocolVersionError`; the old forms (what the journal holds) still read.
"""

from __future__ import annotations

import pickle
import shutil
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from taskfarm import serialization, wire
from taskfarm.connection import ControllerConnection
from taskfarm.controller.journal import Journal
from taskfarm.controller.multiengine import MultiEngine
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.controller.tasks import TaskRecord, TaskSpec
from taskfarm.engine.namespace import Namespace
from taskfarm.engine.worker import CommandWorker
from taskfarm.errors import (
    BadRequest,
    ProtocolVersionError,
    TaskAborted,
    from_wire,
    to_wire,
)
from taskfarm.remote.answers import hello_blob
from taskfarm.remote.multiengine import RemoteMultiEngine
from taskfarm.remote.server import RemoteEngineSession, RemoteTaskController
from taskfarm.task import Task, result_from_envelope
from taskfarm.testing import ScriptedChannel
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test, clock_controller
from taskfarm.wire import CALL, EXEC, MAX_RECOVERY_CHAIN, MAX_RETRIES, MAX_TIMEOUT

_OPTIONS = wire.TaskOptions(True, False, 3, -7, 2.5)
_ENVELOPE = wire.TaskEnvelope(
    EXEC, b"payload", _OPTIONS, b"depend", wire.TaskEnvelope(CALL, b"", wire.TaskOptions())
)

#: One example of every message type, in the form its receiver parses.
EXAMPLES = {
    wire.TaskOptions: _OPTIONS,
    wire.TaskEnvelope: _ENVELOPE,
    wire.Submission: wire.Submission("token", [_ENVELOPE.plain()], [4]),
    wire.ResultEnvelope: wire.ResultEnvelope(4, CALL, True, b"result", 1, 10.0, 11.0, 12.0),
    wire.WireError: wire.WireError("TaskAborted", "task 4 was aborted"),
    wire.Answer: wire.Answer(False, wire.WireError("BadRequest", "no")),
    wire.Hello: wire.Hello("task", wire.WIRE_VERSION, 1024, "incarnation", "127.0.0.1:4000"),
    wire.BulkResults: wire.BulkResults(
        [wire.ResultEnvelope(4, CALL, True, b"", 1, 10.0, 11.0, 12.0).plain(), None],
        b"c" * wire.CAPABILITY_BYTES, [10, 2**21], [(0, 2)],
    ),
    wire.TaskArgs: wire.TaskArgs(CALL, b"payload", False, True, None),
    wire.ExecuteArgs: wire.ExecuteArgs("a = 1"),
    wire.PushArgs: wire.PushArgs(b"values"),
    wire.PullArgs: wire.PullArgs(("a", "b")),
    wire.GetResultArgs: wire.GetResultArgs(3),
    wire.MapArgs: wire.MapArgs(b"function", b"chunk"),
    wire.NoArgs: wire.NoArgs(),
    wire.Command: wire.Command(7, "task", wire.TaskArgs(EXEC, b"p", False, False, 1.0)),
    wire.Reply: wire.Reply(7, False, ("TaskTimeout", "too slow"), 1.5, 2.5),
    wire.EngineCall: wire.EngineCall("push", [0, 1], (), {0: (b"a",), 1: (b"b",)}),
    wire.PropertiesRequest: wire.PropertiesRequest("get", "all", ["a"]),
    wire.EngineOutcome: wire.EngineOutcome(2, False, wire.WireError("KeyError", "x")),
    wire.ClusterSummary: wire.ClusterSummary(4, {"scheduled": 3, "failed": 1}, 12.5, 0.5, 100, 1, 0, 2),
    wire.Explanation: wire.Explanation(
        4, "queued", "queued: engines 1 busy", None, 0, None, False, ("RAM",),
        (wire.EngineReason(0, "busy", "busy: its 1 task slots are full", 1, 1),),
    ),
}

_PLAIN_TYPES = (type(None), bool, int, float, str, bytes, list, tuple, dict)


def _message_types() -> list[type]:
    return [
        value
        for value in vars(wire).values()
        if isinstance(value, type) and issubclass(value, tuple) and hasattr(value, "parse")
    ]


class RoundTripTests(unittest.SynchronousTestCase):
    """Each type travels as plain data and comes back unchanged."""

    def test_every_type_has_an_example(self):
        """A message type added to the wire needs its example here."""
        self.assertEqual(set(_message_types()), set(EXAMPLES))

    def assert_plain(self, value):
        todo = [value]
        while todo:
            item = todo.pop()
            self.assertIn(type(item), _PLAIN_TYPES, repr(item))
            if isinstance(item, dict):
                todo.extend(item.keys())
                todo.extend(item.values())
            elif isinstance(item, (list, tuple)):
                todo.extend(item)

    def test_round_trip(self):
        """plain() holds only built-in data, so the data-only unpickler
        reads it; parse() of what it read gives the same message back."""
        for cls, message in EXAMPLES.items():
            plain = message.plain()
            self.assert_plain(plain)
            back = cls.parse(serialization.unpack(serialization.pack(plain)))
            self.assertEqual(back, message, cls.__name__)
            self.assertIs(type(back), cls)

    def test_a_message_type_does_not_pickle_as_data(self):
        """Why plain() exists: the message type itself is a class, which the
        data-only unpickler refuses."""
        blob = serialization.pack(EXAMPLES[wire.Reply])
        self.assertRaises(BadRequest, serialization.unpack, blob)

    def test_task_to_envelope_is_the_wire_envelope(self):
        """`Task.to_envelope` is a plain TaskEnvelope that parses to the
        task's options, its recovery chain included."""
        made = Task("a = 1", retries=2, priority=5, timeout=3.0, clear_after=True)
        made.recovery_task = Task("a = 2", retries=1)
        envelope = wire.TaskEnvelope.parse(made.to_envelope())
        self.assertEqual(envelope.options, wire.TaskOptions(False, True, 2, 5, 3.0))
        self.assertEqual(envelope.recovery.options.retries, 1)
        self.assertIsNone(envelope.recovery.recovery)

    def test_result_envelope_of_a_record(self):
        """The controller's result envelope parses as a ResultEnvelope."""
        clock, registry, controller = clock_controller(self)
        (taskid,) = controller.submit([Task("a = 1").to_envelope()])
        controller.abort(taskid)
        (plain,) = controller.results([taskid]).result
        envelope = wire.ResultEnvelope.parse(plain)
        self.assertEqual((envelope.taskid, envelope.kind, envelope.ok), (taskid, EXEC, False))
        self.assertIsInstance(from_wire(envelope.data), TaskAborted)


# -- bad fields ------------------------------------------------------------------------------


def _options(**changes):
    return _OPTIONS._replace(**changes).plain()


def _envelope(**changes):
    fields = dict(zip(wire.TaskEnvelope._fields, _ENVELOPE.plain(), strict=True))
    fields.update(changes)
    return tuple(fields.values())


def _chain(length: int):
    envelope = None
    for _ in range(length):
        envelope = (EXEC, b"", wire.TaskOptions().plain(), None, envelope)
    return envelope


def _result(**changes):
    return EXAMPLES[wire.ResultEnvelope]._replace(**changes).plain()


def _reply(**changes):
    return EXAMPLES[wire.Reply]._replace(**changes).plain()


def _hello(**changes):
    hello = EXAMPLES[wire.Hello].plain()
    hello.update(changes)
    return hello


_NAN = float("nan")
_INF = float("inf")

#: (type, value, words the BadRequest must contain): at and over each limit.
BAD = [
    # task options
    (wire.TaskOptions, _options(clear_before=1), "clear_before"),
    (wire.TaskOptions, _options(clear_after=None), "clear_after"),
    (wire.TaskOptions, _options(retries="x"), "retries must be an int in 0..%d" % MAX_RETRIES),
    (wire.TaskOptions, _options(retries=-1), "retries"),
    (wire.TaskOptions, _options(retries=MAX_RETRIES + 1), "retries"),
    (wire.TaskOptions, _options(retries=True), "retries"),
    (wire.TaskOptions, _options(retries=1.0), "retries"),
    (wire.TaskOptions, _options(priority="high"), "priority"),
    (wire.TaskOptions, _options(priority=False), "priority"),
    (wire.TaskOptions, _options(priority=1.5), "priority"),
    (wire.TaskOptions, _options(timeout=0), "timeout"),
    (wire.TaskOptions, _options(timeout=-1.0), "timeout"),
    (wire.TaskOptions, _options(timeout=_NAN), "timeout"),
    (wire.TaskOptions, _options(timeout=_INF), "timeout"),
    (wire.TaskOptions, _options(timeout=10**400), "timeout"),
    (wire.TaskOptions, _options(timeout=True), "timeout"),
    (wire.TaskOptions, _options(timeout="1"), "timeout"),
    (wire.TaskOptions, (False, False, 0, 0), "task options must have 5 fields"),
    (wire.TaskOptions, "options", "task options must be a tuple"),
    # task envelopes
    (wire.TaskEnvelope, _envelope(kind="eval"), "task envelope: kind"),
    (wire.TaskEnvelope, _envelope(kind=[EXEC]), "kind"),
    (wire.TaskEnvelope, _envelope(payload="text"), "payload must be bytes"),
    (wire.TaskEnvelope, _envelope(payload=None), "payload"),
    (wire.TaskEnvelope, _envelope(options=None), "task envelope options must be a tuple"),
    (wire.TaskEnvelope, _envelope(options=_options(retries=-1)), "task envelope options: retries"),
    (wire.TaskEnvelope, _envelope(depend="lambda p: True"), "depend"),
    (wire.TaskEnvelope, _envelope(recovery=(EXEC, 3, _OPTIONS.plain(), None, None)), "recovery task 1: payload"),
    (wire.TaskEnvelope, _envelope(recovery="retry"), "recovery task 1 must be a tuple"),
    (wire.TaskEnvelope, _chain(MAX_RECOVERY_CHAIN + 1), "longer than %d tasks" % MAX_RECOVERY_CHAIN),
    (wire.TaskEnvelope, _chain(5 * MAX_RECOVERY_CHAIN), "MAX_RECOVERY_CHAIN"),
    (wire.TaskEnvelope, (EXEC, b"", _OPTIONS.plain(), None), "task envelope must have 5 fields"),
    (wire.TaskEnvelope, {"kind": EXEC}, "task envelope must be a tuple"),
    # submissions
    (wire.Submission, (3, [], None), "submission: token"),
    (wire.Submission, (None, (), None), "envelopes"),
    (wire.Submission, (None, [_envelope()], [1, 2]), "ids"),
    (wire.Submission, (None, [_envelope()], []), "ids"),
    (wire.Submission, (None, [_envelope()], ["1"]), "ids"),
    (wire.Submission, (None, [_envelope()], [True]), "ids"),
    (wire.Submission, (None, [_envelope()], (1,)), "ids"),
    (wire.Submission, (None, [_envelope(), _envelope()], [1, 1]), "twice"),
    (wire.Submission, [None, [], None], "submission must be a tuple"),
    (wire.Submission, (None,), "submission must have 3 fields"),
    # result envelopes
    (wire.ResultEnvelope, _result(taskid="4"), "result envelope: taskid"),
    (wire.ResultEnvelope, _result(kind="shell"), "kind"),
    (wire.ResultEnvelope, _result(ok=1), "ok"),
    (wire.ResultEnvelope, _result(data=("KeyError", "x")), "data"),
    (wire.ResultEnvelope, _result(ok=False, data=b"x"), "wire error"),
    (wire.ResultEnvelope, _result(engine_id=1.0), "engine_id"),
    (wire.ResultEnvelope, _result(submitted=None), "submitted"),
    (wire.ResultEnvelope, _result(started="then"), "started"),
    (wire.ResultEnvelope, _result(completed=True), "completed"),
    (wire.ResultEnvelope, _result()[:7], "result envelope must have 8 fields"),
    # errors and answers
    (wire.WireError, (KeyError, "x"), "wire error: name"),
    (wire.WireError, ("KeyError",), "wire error must have 2 fields"),
    (wire.Answer, (1, 2), "answer: ok"),
    (wire.Answer, (False, "oops"), "wire error must be a tuple"),
    (wire.Answer, (True, 1, "x", 3), "answer must have 2 fields"),
    # hello
    (wire.Hello, ("task", 1), "hello must be a dict"),
    (wire.Hello, _hello(interface=None), "hello: interface"),
    (wire.Hello, _hello(max_message_size="big"), "max_message_size"),
    (wire.Hello, _hello(max_message_size=0), "max_message_size"),
    (wire.Hello, _hello(incarnation=7), "incarnation"),
    (wire.Hello, _hello(bulk="nowhere"), "hello: bulk"),
    (wire.Hello, _hello(bulk="host:0"), "hello: bulk"),
    (wire.Hello, _hello(bulk=4000), "hello: bulk"),
    # replies naming an upload (version 5)
    (wire.Reply, (1, True, b"", 1.0, 2.0, 5, None, None, b"short"), "reply: upload"),
    (wire.Reply, (1, True, b"x", 1.0, 2.0, 5, None, None, b"c" * 32), "reply: upload"),
    (wire.Reply, (1, False, ("E", "x"), 1.0, 2.0, 5, None, None, b"c" * 32), "reply: upload"),
    (wire.Reply, (1, True, b"", 1.0, 2.0, 5, 3, None, b"c" * 32), "reply: stdout"),
    # bulk results (version 5)
    (wire.BulkResults, ([None], None, []), "bulk results must have 4 fields"),
    (wire.BulkResults, ((), None, [], []), "bulk results: envelopes"),
    (wire.BulkResults, ([None], b"c" * 32, [-1], [(0, 1)]), "bulk results: sizes"),
    (wire.BulkResults, ([None], b"c" * 32, [1], [(1, 1)]), "bulk results: moved"),
    (wire.BulkResults, ([None], b"c" * 32, [1], [(0, 0)]), "bulk results: moved"),
    (wire.BulkResults, ([None, None], b"c" * 32, [1, 1], [(0, 1), (0, 1)]), "bulk results: moved"),
    (wire.BulkResults, ([None], b"c" * 32, [1, 2], [(0, 1)]), "as many parts as sizes"),
    (wire.BulkResults, ([None], b"short", [1], [(0, 1)]), "bulk results: capability"),
    (wire.BulkResults, ([None], None, [1], [(0, 1)]), "bulk results: capability"),
    (wire.BulkResults, ([None], b"c" * 32, [], []), "None when nothing moved"),
    # the command stream
    (wire.Command, ("7", "task", ()), "command: seq"),
    (wire.Command, (True, "reset", ()), "seq"),
    (wire.Command, (7, "format_disk", ()), "command 7: op"),
    (wire.Command, (7, ["task"], ()), "op"),
    (wire.Command, (7, "reset", ("x",)), "reset command 7 must have 0 fields"),
    (wire.Command, (7, "reset", None), "reset command 7 must be a tuple"),
    (wire.Command, (7, "execute", (b"a = 1",)), "execute command 7: code"),
    (wire.Command, (7, "push", ("values",)), "push command 7: values"),
    (wire.Command, (7, "pull", ("a",)), "pull command 7: names"),
    (wire.Command, (7, "pull", ([1],)), "names"),
    (wire.Command, (7, "get_result", ("last",)), "get_result command 7: number"),
    (wire.Command, (7, "map", (b"f", None)), "map command 7: chunk"),
    (wire.Command, (7, "map", (None, b"c")), "function"),
    (wire.Command, (7, "task", (EXEC, b"", False, False)), "task command 7 must have 5 fields"),
    (wire.Command, (7, "task", ("sh", b"", False, False, None)), "kind"),
    (wire.Command, (7, "task", (EXEC, "", False, False, None)), "payload"),
    (wire.Command, (7, "task", (EXEC, b"", 0, False, None)), "clear_before"),
    (wire.Command, (7, "task", (EXEC, b"", False, 1, None)), "clear_after"),
    (wire.Command, (7, "task", (EXEC, b"", False, False, 0.0)), "timeout"),
    (wire.Command, (7, "task", (EXEC, b"", False, False, _INF)), "timeout"),
    (wire.Command, (7, "task"), "command must have 3 fields"),
    (wire.Reply, _reply(seq=[7]), "reply: seq"),
    (wire.Reply, _reply(seq=True), "seq"),
    (wire.Reply, _reply(ok="yes"), "reply: ok"),
    (wire.Reply, _reply(ok=True, data=["not bytes"]), "reply: data"),
    (wire.Reply, _reply(data="not a wire error"), "data"),
    (wire.Reply, _reply(data=(1, "x")), "data"),
    (wire.Reply, _reply(started=_NAN), "started"),
    (wire.Reply, _reply(started=1), "started"),
    (wire.Reply, _reply(finished="later"), "finished"),
    (wire.Reply, _reply(finished=2**70), "finished"),
    (wire.Reply, _reply(finished=_INF), "finished"),
    (wire.Reply, _reply()[:4], "reply must have 5 fields"),
    # the MultiEngine interface
    (wire.EngineCall, ("format_disk", "all", (), None), "unknown MultiEngine operation"),
    (wire.EngineCall, ("task", "all", (EXEC, b"", False, False, None), None), "unknown MultiEngine operation"),
    (wire.EngineCall, ("execute", "all", (), None), "execute engine call must have 1 fields"),
    (wire.EngineCall, ("execute", "all", [b"x"], None), "must be a tuple"),
    (wire.EngineCall, ("execute", "all", (b"x",), None), "execute engine call: code"),
    (wire.EngineCall, ("push", [0], (), {0: ("text",)}), "push engine call for engine 0: values"),
    (wire.EngineCall, ("push", [0], (), [(b"x",)]), "per_target"),
    (wire.EngineCall, ("push", [0], None, {0: (b"x",)}), "per_target"),
    (wire.EngineCall, ("push", "all", ()), "engine call must have 4 fields"),
    (wire.PropertiesRequest, ("replace", "all", None), "unknown properties action"),
    (wire.PropertiesRequest, ({}, "all", None), "unknown properties action"),
    (wire.PropertiesRequest, ("get", "all"), "properties request must have 3 fields"),
    (wire.EngineOutcome, ("2", True, b""), "engine outcome: engine_id"),
    (wire.EngineOutcome, (2, None, b""), "engine outcome: ok"),
    (wire.EngineOutcome, (2, False, b""), "wire error"),
    (wire.ClusterSummary, (-1, {}, 0.0, 0.0, 0, 0, 0, 0), "cluster summary: engines"),
    (wire.ClusterSummary, (4, {"scheduled": "3"}, 0.0, 0.0, 0, 0, 0, 0), "cluster summary: queue"),
    (wire.ClusterSummary, (4, {}, "fast", 0.0, 0, 0, 0, 0), "cluster summary: tasks_per_second"),
    (wire.ClusterSummary, (4, {}, 0.0, 0.0, 0, -1, 0, 0), "cluster summary: failed_total"),
    (wire.ClusterSummary, (4, {}, 0.0, 0.0), "cluster summary must have 8 fields"),
]

def _why(**changes) -> dict:
    plain = EXAMPLES[wire.Explanation].plain()
    plain.update(changes)
    return plain


BAD += [
    (wire.Explanation, ("not", "a dict"), "why answer must be a dict"),
    (wire.Explanation, {"taskid": 1}, "is missing"),
    (wire.Explanation, _why(taskid="1"), "taskid must be an int"),
    (wire.Explanation, _why(wait="soon"), "wait must be a number or None"),
    (wire.Explanation, _why(properties_read=[1]), "properties_read must be a list of str"),
    (wire.Explanation, _why(engines=[("busy",)]), "engines must be a list of dicts"),
    (wire.Explanation, _why(engines=[{"engine_id": 0}]), "an engine's 'reason' is missing"),
    (wire.Explanation, _why(no_engine_matches=1), "no_engine_matches must be True or False"),
]

#: Values at each limit that are still accepted.
GOOD = [
    (wire.Reply, (1, True, b"", 1.0, 2.0, 5, None, "err", b"c" * 32)),
    (wire.TaskOptions, _options(retries=0)),
    (wire.TaskOptions, _options(retries=MAX_RETRIES)),
    (wire.TaskOptions, _options(priority=-(2**70))),
    (wire.TaskOptions, _options(timeout=MAX_TIMEOUT)),
    (wire.TaskOptions, _options(timeout=sys.float_info.min)),
    (wire.TaskOptions, _options(timeout=1)),
    (wire.TaskOptions, list(_OPTIONS.plain())),
    (wire.TaskEnvelope, _chain(MAX_RECOVERY_CHAIN)),
    (wire.Submission, (None, [])),
    (wire.Submission, (None, [_envelope()], None)),
    (wire.Reply, _reply(ok=True, data=b"", started=None)),
    (wire.Command, (0, "get_result", (None,))),
    (wire.Command, (0, "pull", (["a"],))),
]


class BadFieldTests(unittest.SynchronousTestCase):
    """Each malformed message is a BadRequest that names the bad field."""

    def test_bad_fields(self):
        for cls, value, words in BAD:
            with self.subTest(type=cls.__name__, value=value):
                with self.assertRaises(BadRequest) as caught:
                    cls.parse(value)
                self.assertIn(words, str(caught.exception))

    def test_every_type_has_bad_cases(self):
        """Every message type with fields is attacked in the table above."""
        attacked = {cls for cls, _, _ in BAD}
        for cls in _message_types():
            if cls._fields and cls not in (wire.TaskArgs, wire.ExecuteArgs, wire.PushArgs,
                                           wire.PullArgs, wire.GetResultArgs, wire.MapArgs):
                self.assertIn(cls, attacked, cls.__name__)

    def test_limits_accepted(self):
        for cls, value in GOOD:
            with self.subTest(type=cls.__name__, value=value):
                cls.parse(value)

    def test_huge_bad_value_described_briefly(self):
        """A bad field's value is described in a few words, not dumped."""
        with self.assertRaises(BadRequest) as caught:
            wire.TaskEnvelope.parse(_envelope(kind=b"x" * 10**6))
        self.assertLess(len(str(caught.exception)), 200)
        self.assertIn("1000000 bytes", str(caught.exception))

    def test_task_ids(self):
        """An id list is a list of ints (None too where allowed)."""
        self.assertEqual(wire.TaskIds.parse((1, 2)), [1, 2])
        self.assertIsNone(wire.TaskIds.parse(None, allow_none=True))
        for value in (None, [True], ["1"], 3, [1.0]):
            with self.assertRaises(BadRequest) as caught:
                wire.TaskIds.parse(value)
            self.assertIn("task ids", str(caught.exception))

    def test_batches_are_lists(self):
        for value in ((), None, {}, b""):
            self.assertRaises(BadRequest, wire.parse_list, value, "replies")


#: Plain data, nested: what the data-only unpickler can produce.
_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
    max_leaves=10,
)


def _mutants(cls):
    """Messages of `cls` with one field swapped for any plain data, and a
    field more or less."""
    example = EXAMPLES[cls].plain()
    if isinstance(example, dict):
        return st.builds(lambda key, value: {**example, key: value},
                         st.sampled_from(sorted(example)), _plain)
    fields = list(example)
    swapped = st.builds(
        lambda at, value: tuple(fields[:at] + [value] + fields[at + 1:]),
        st.integers(0, max(len(fields) - 1, 0)), _plain,
    ) if fields else st.just(())
    return st.one_of(swapped, st.builds(lambda extra: tuple(fields) + (extra,), _plain),
                     st.just(tuple(fields[:-1])), _plain)


class FuzzTests(unittest.SynchronousTestCase):
    """Whatever plain data a peer sends, parse gives the type or a
    BadRequest / ProtocolVersionError, never another exception."""

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(sorted(EXAMPLES, key=lambda cls: cls.__name__)).flatmap(
        lambda cls: st.tuples(st.just(cls), _mutants(cls))))
    def test_parse_anything(self, case):
        cls, value = case
        try:
            parsed = cls.parse(value)
        except (BadRequest, ProtocolVersionError):
            return
        self.assertIs(type(parsed), cls)
        # What parsed travels again as plain data, and parses the same.
        plain = parsed.plain()
        self.assertEqual(cls.parse(serialization.unpack(serialization.pack(plain))), parsed)


# -- versions -----------------------------------------------------------------------------


def _newer(message: tuple, version: int = wire.WIRE_VERSION + 1) -> tuple:
    """A newer peer's message: the version-1 fields, then its version, then more."""
    return tuple(message) + (version, "a field this side does not know")


class VersionTests(unittest.SynchronousTestCase):
    """A message from a newer peer is a ProtocolVersionError, not a crash."""

    def tuple_examples(self):
        for cls, message in EXAMPLES.items():
            if not isinstance(message.plain(), dict):  # Hello, Explanation: dicts
                yield cls, message.plain()

    def test_newer_messages(self):
        for cls, plain in self.tuple_examples():
            for version in (wire.WIRE_VERSION + 1, 99):
                with self.subTest(type=cls.__name__, version=version):
                    with self.assertRaises(ProtocolVersionError) as caught:
                        cls.parse(_newer(plain, version))
                    self.assertIn("wire version %d" % version, str(caught.exception))
                    # Even one that only adds its version, and no field.
                    self.assertRaises(ProtocolVersionError, cls.parse, tuple(plain) + (version,))

    def test_explicit_version_one(self):
        """Version 1 may also be written out: the fields, then 1."""
        for cls, plain in self.tuple_examples():
            with self.subTest(type=cls.__name__):
                self.assertEqual(cls.parse(tuple(plain) + (1,)), EXAMPLES[cls])

    def test_bad_versions_are_bad_requests(self):
        """A version field that is no version, or version 1 with more
        fields, is malformed."""
        for cls, plain in self.tuple_examples():
            for extra in (("2",), (True,), (None,), (1, "more"), (0,), (-3,)):
                with self.subTest(type=cls.__name__, extra=extra):
                    self.assertRaises(BadRequest, cls.parse, tuple(plain) + extra)

    def test_newer_parts_inside_a_message(self):
        """A newer part nested in an old message is found too."""
        newer_options = _newer(_OPTIONS.plain())
        newer_recovery = _newer(_envelope(recovery=None))
        for envelope in (_envelope(options=newer_options), _envelope(recovery=newer_recovery)):
            self.assertRaises(ProtocolVersionError, wire.TaskEnvelope.parse, envelope)
        command = (7, "task", _newer(EXAMPLES[wire.TaskArgs].plain()))
        self.assertRaises(ProtocolVersionError, wire.Command.parse, command)
        answer = (False, _newer(("KeyError", "x")))
        self.assertRaises(ProtocolVersionError, wire.Answer.parse, answer)

    def test_hello_of_another_version(self):
        """A hello of any other wire version is refused (no version at all too)."""
        for version in (wire.WIRE_VERSION + 1, wire.WIRE_VERSION - 1, 0, None, "1"):
            hello = _hello(version=version)
            with self.assertRaises(ProtocolVersionError) as caught:
                wire.Hello.parse(hello)
            self.assertIn("wire version %r" % (version,), str(caught.exception))
        hello = _hello()
        del hello["version"]
        self.assertRaises(ProtocolVersionError, wire.Hello.parse, hello)

    def test_result_envelope_of_a_newer_controller(self):
        """The client refuses a newer controller's result with ProtocolVersionError."""
        plain = EXAMPLES[wire.ResultEnvelope].plain()
        self.assertRaises(ProtocolVersionError, result_from_envelope, _newer(plain))


class OldFormTests(unittest.SynchronousTestCase):
    """What older code wrote still reads."""

    def test_two_field_submission(self):
        """A submission without reserved ids (before clients reserved them)."""
        self.assertEqual(
            wire.Submission.parse((None, [_envelope()])), (None, [_envelope()], None)
        )

    def test_list_envelopes(self):
        """Envelopes and options as lists are read as the tuples they stand for."""
        envelope = [EXEC, b"", list(_OPTIONS.plain()), None, None]
        self.assertEqual(wire.TaskEnvelope.parse(envelope).options, _OPTIONS)


class JournalCompatibilityTests(unittest.TestCase):
    """A journal written with the old 5-tuple envelopes restores."""

    timeout = 60

    @async_test
    async def test_old_envelopes_restore(self):
        """Envelopes pickled as plain 5-tuples (by plain pickle, as older
        code wrote them) come back: a queued task queues again with its options
        and recovery task, a failed one keeps its outcome."""
        folder = Path(tempfile.mkdtemp(prefix="taskfarm-wire-"))
        self.addCleanup(shutil.rmtree, folder, True)
        payload = serialization.pack(("a = 1", ("a",), None))
        old = (EXEC, payload, (False, True, 2, 9, 30.0), None,
               (CALL, b"f", (True, False, 0, 0, None), None, None))
        blob = pickle.dumps(old, protocol=4)
        journal = Journal(folder / "journal.sqlite", reactor)
        journal.open()
        journal.accept_batch([(0, blob, 100.0, 2), (1, blob, 101.0, 2)])
        journal.next_id_is(2)
        record = TaskSpec.from_envelope(serialization.unpack(blob))
        self.assertEqual(record.retries, 2)
        failed = TaskRecord(1, record, 101.0)
        failed.fail(to_wire(TaskAborted("gone")), None, 102.0)
        journal.finished(failed, failed.link)
        await journal.sync()
        journal.close()

        journal = Journal(folder / "journal.sqlite", reactor)
        journal.open()
        self.addCleanup(journal.close)
        clock = task.Clock()
        registry = EngineRegistry(clock, heartbeat_period=None)
        controller = TaskController(
            registry, FIFOScheduler(), clock, unmet_timeout=None, journal=journal, retention=None,
            retry_delay=0.0,  # the old options' retries, at once
        )
        controller.start()
        self.addCleanup(controller.stop)
        self.assertEqual(controller.queue_status(verbose=True)["scheduled"], [0])
        (result,) = controller.results([1]).result
        self.assertIsInstance(result_from_envelope(result).failure, TaskAborted)
        # The queued one runs with its old options: two retries, then its
        # recovery task.
        channel = ScriptedChannel()
        channel.engine = registry.register(channel, {})
        for _ in range(3):
            clock.advance(0)
            ((seq, op, args),) = channel.pending()
            self.assertEqual(wire.TaskArgs.parse(args), (EXEC, payload, False, True, 30.0))
            channel.fail(seq, TaskAborted("again"))
        clock.advance(0)
        ((seq, op, args),) = channel.pending()
        self.assertEqual(wire.TaskArgs.parse(args), (CALL, b"f", True, False, None))


# -- end to end ------------------------------------------------------------------------------


def _newer_submission() -> bytes:
    envelope = _newer(Task("a = 1").to_envelope())
    return serialization.pack((None, [envelope], None))


class ControllerRefusesNewerTests(unittest.SynchronousTestCase):
    """A real controller (on a task.Clock) refuses a newer peer's messages."""

    def setUp(self):
        self.clock, self.registry, self.controller = clock_controller(self)

    def answer(self, d):
        results = []
        d.addBoth(results.append)
        (blob,) = results
        return wire.Answer.parse(serialization.unpack(blob))

    def test_submit(self):
        """A submit from a newer client: ProtocolVersionError, nothing queued."""
        remote = RemoteTaskController(self.controller)
        for blob in (
            _newer_submission(),
            serialization.pack(_newer((None, [Task("a = 1").to_envelope()], None))),
        ):
            ok, error = self.answer(remote.remote_submit(blob))
            self.assertIs(ok, False)
            self.assertIsInstance(from_wire(error), ProtocolVersionError)
        self.assertEqual(self.controller.queue_status()["scheduled"], 0)

    def test_engine_call(self):
        """A newer MultiEngine request is refused before any engine sees it."""
        channel = ScriptedChannel.registered(self.registry)
        remote = RemoteMultiEngine(MultiEngine(self.registry, self.clock))
        for blob in (
            serialization.pack(_newer(("execute", "all", ("a = 1",), None))),
            serialization.pack(("execute", "all", _newer(("a = 1",)), None)),
            serialization.pack(_newer(("get", "all", None))),
        ):
            d = remote.remote_properties(blob) if b"get" in blob else remote.remote_engine_call(blob)
            ok, error = self.answer(d)
            self.assertIs(ok, False)
            self.assertIsInstance(from_wire(error), ProtocolVersionError)
        self.clock.advance(0)
        self.assertEqual(channel.sent, [])

    def test_replies_of_a_newer_engine(self):
        """Replies from a newer engine are dropped and the engine
        disconnected (its commands then fail over), not misread."""
        channel = ScriptedChannel.registered(self.registry)
        self.controller.submit([Task("a = 1").to_envelope()])
        self.clock.advance(0)
        ((seq, _, _),) = channel.pending()
        session = RemoteEngineSession(self.registry, channel.engine, channel)
        reply = _newer((seq, True, serialization.dumps({}), 1.0, 2.0))
        self.assertIsNone(session.remote_replies(serialization.pack([reply])))
        self.assertTrue(channel.disconnected)
        self.assertEqual(self.controller.queue_status()["pending"], 1)


class EngineRefusesNewerTests(unittest.SynchronousTestCase):
    """An engine's worker answers a newer controller's command with the error."""

    def test_newer_command(self):
        clock = task.Clock()
        clock.callFromThread = lambda f, *a, **kw: f(*a, **kw)
        worker = CommandWorker(Namespace(), clock)
        sent = []
        worker.begin_session(0, sent.extend)
        worker.receive([_newer((3, "reset", ())), (4, "reset", ("x",)), ("x", "reset", ())])
        self.assertEqual([(seq, ok) for seq, ok, *_ in sent], [(3, False), (4, False)])
        self.assertIsInstance(from_wire(sent[0][2]), ProtocolVersionError)
        self.assertIsInstance(from_wire(sent[1][2]), BadRequest)
        for reply in sent:
            wire.Reply.parse(reply)


class RealControllerTests(unittest.TestCase):
    """Over real Foolscap: a newer client's submit is refused with
    ProtocolVersionError, and a client refuses a controller of another
    wire version at hello."""

    timeout = 60

    @async_test
    async def test_newer_submit_over_foolscap(self):
        cluster = RealCluster(reactor)
        self.addCleanup(shutil.rmtree, str(cluster.profile.root), True)
        await cluster.start(0)
        try:
            client = cluster.task_client()
            with self.assertRaises(ProtocolVersionError):
                await client._connection.call("submit", [_newer_submission()])
            self.assertEqual(cluster.controller.tasks.queue_status()["scheduled"], 0)
            # The connection stays good for a well-formed submission.
            (taskid,) = await client.run_many([Task("a = 1")])
            self.assertEqual(cluster.controller.tasks.queue_status()["scheduled"], 1)
            self.assertIsInstance(taskid, int)
        finally:
            await cluster.stop()

    def test_hello_blob(self):
        """What every hello answers parses as a Hello of this wire version."""
        hello = wire.Hello.parse(serialization.unpack(hello_blob("task", "abc", max_message_size=4096)))
        self.assertEqual((hello.interface, hello.version, hello.incarnation), ("task", wire.WIRE_VERSION, "abc"))


class ConnectionRefusesOtherVersionTests(unittest.TestCase):
    """`ControllerConnection` turns another wire version at hello into
    ProtocolVersionError naming the controller's location."""

    timeout = 10

    @async_test
    async def test_other_version(self):
        class Reference:
            def callRemote(self, method):
                return defer.succeed(serialization.pack(_hello(version=wire.WIRE_VERSION + 1)))

        class Tub:
            def getReference(self, furl):
                return defer.succeed(Reference())

        connection = ControllerConnection(
            "pb://abc@127.0.0.1:1/task", "task", reactor, tub=Tub()
        )
        with self.assertRaises(ProtocolVersionError) as caught:
            await connection.connect()
        self.assertIn("127.0.0.1:1", str(caught.exception))
        self.assertIn("wire version %d" % (wire.WIRE_VERSION + 1), str(caught.exception))
