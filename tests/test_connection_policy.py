"""`ControllerConnection`'s policy on a `task.Clock`: the hello checks, the
reconnect window and its back-off, and incarnations.  No sockets: the
transport is a scripted `IControllerDialer`."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from taskfarm import wire
from taskfarm.connection import ControllerConnection
from taskfarm.errors import (
    ConnectionLost,
    ControllerUnreachable,
    MessageTooLarge,
    ProtocolVersionError,
    WrongInterface,
)
from taskfarm.interfaces import IControllerDialer, IControllerReference
from taskfarm.remote.client import FoolscapDialer
from taskfarm.wire import WIRE_VERSION

FURL = "pb://tubid@tcp:127.0.0.1:7/swiss"


@implementer(IControllerReference)
class _Reference:
    def __init__(self, hello: dict) -> None:
        self.location = "127.0.0.1:7"
        self._hello = hello
        self.calls: list = []
        self.on_disconnect: list = []
        self.broken = False

    def hello(self) -> defer.Deferred:
        # Parsed, as the real transport's is.
        return defer.maybeDeferred(wire.Hello.parse, self._hello)

    def call(self, method, *args) -> defer.Deferred:
        self.calls.append((method, args))
        if self.broken:
            return defer.fail(ConnectionLost("the link broke"))
        return defer.succeed(("answer", method))

    def notify_on_disconnect(self, callback) -> None:
        self.on_disconnect.append(callback)

    def disconnect(self) -> None:
        self.break_link()

    def break_link(self) -> None:
        self.broken = True
        for callback in self.on_disconnect:
            callback()


@implementer(IControllerDialer)
class _Dialer:
    """`up` says whether a controller answers; each connect makes a fresh
    reference whose hello carries the current `incarnation`."""

    def __init__(self, clock) -> None:
        self._clock = clock
        #: True, False, or "broken" (connects, but its calls fail).
        self.up: bool | str = True
        #: Values of `up` for the next connects, in order.
        self.script: list = []
        self.incarnation = "first"
        self.hello_extra: dict = {}
        self.attempts: list[float] = []
        self.references: list[_Reference] = []

    def connect(self, furl, timeout) -> defer.Deferred:
        self.attempts.append(self._clock.seconds())
        if self.script:
            self.up = self.script.pop(0)
        if not self.up:
            return defer.fail(ControllerUnreachable("nothing answers"))
        hello = {
            "interface": "task",
            "version": WIRE_VERSION,
            "max_message_size": 1000,
            "incarnation": self.incarnation,
        }
        hello.update(self.hello_extra)
        reference = _Reference(hello)
        reference.broken = self.up == "broken"
        self.references.append(reference)
        return defer.succeed(reference)


class ControllerConnectionTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.dialer = _Dialer(self.clock)
        self.connection = ControllerConnection(
            FURL, "task", self.clock, reconnect_timeout=5.0, dialer=self.dialer
        )

    def call(self, method: str = "wait", *args, retry: bool = True) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.connection.call(method, *args, retry=retry))

    def connected(self) -> _Reference:
        self.successResultOf(self.connection.connect())
        return self.dialer.references[-1]

    def next_timer(self) -> float:
        (timer,) = self.clock.getDelayedCalls()
        return timer.getTime() - self.clock.seconds()

    def run_out_timers(self, most: int = 50) -> list[float]:
        """Fire the one pending timer until none is left (at most `most`
        times); returns the delays they waited."""
        waits = []
        for _ in range(most):
            if not self.clock.getDelayedCalls():
                return waits
            waits.append(round(self.next_timer(), 6))
            # A hair past: now + (t - now) may fall short of t in floats.
            self.clock.advance(self.next_timer() + 1e-9)
        self.fail("timers still pending after %d" % most)

    def test_hello_teaches_the_limit(self):
        """The limit in hello bounds every later request, checked here."""
        self.connected()
        self.assertEqual(self.connection.max_message_size, 1000)
        self.failureResultOf(self.call("submit", b"x" * 1001, retry=False), MessageTooLarge)
        self.assertEqual(
            self.successResultOf(self.call("submit", b"x" * 1000)), ("answer", "submit")
        )

    def test_wrong_interface_and_version(self):
        """A furl for another interface is WrongInterface; another wire
        version is ProtocolVersionError."""
        self.dialer.hello_extra = {"interface": "engine"}
        failure = self.failureResultOf(self.connection.connect(), WrongInterface)
        self.assertIn("security/task.furl", str(failure.value))
        self.dialer.hello_extra = {"version": WIRE_VERSION + 1}
        self.failureResultOf(self.connection.connect(), ProtocolVersionError)

    def test_never_connected_fails_fast(self):
        """A controller never reached is not retried, even for retry calls."""
        self.dialer.up = False
        self.failureResultOf(self.call(), ControllerUnreachable)
        self.assertEqual(self.dialer.attempts, [0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reconnect_backs_off_from_0_1_to_2_seconds_within_the_window(self):
        """After a break a retry call reconnects after 0.1 s, then twice as
        long each time up to 2 s, and gives up with the transport's error
        once the next try would fall past the window (10 s here)."""
        self.connection = ControllerConnection(
            FURL, "task", self.clock, reconnect_timeout=10.0, dialer=self.dialer
        )
        self.connected().break_link()
        self.dialer.up = False
        d = self.call()
        waits = self.run_out_timers()
        self.assertEqual(waits, [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
        self.failureResultOf(d, ControllerUnreachable)
        self.assertAlmostEqual(self.clock.seconds(), 9.1, places=6)
        self.assertEqual(len(self.dialer.attempts), 2 + 8)

    def test_a_mended_link_opens_a_new_window(self):
        """The window opens at each break, not when the call began: a call
        that reconnected at 0.7 s and found the link broken again backs off
        from 0.1 s once more and gives up only 3.1 s after that break."""
        self.connected().break_link()
        # Down, down, down; then up with a link that breaks at once; then down.
        self.dialer.script = [False, False, False, "broken", False]
        self.dialer.up = False
        d = self.call()
        waits = self.run_out_timers()
        self.assertEqual(waits, [0.1, 0.2, 0.4] + [0.1, 0.2, 0.4, 0.8, 1.6])
        self.failureResultOf(d, ControllerUnreachable)
        self.assertAlmostEqual(self.clock.seconds(), 0.7 + 3.1)

    def test_a_break_mid_call_is_retried(self):
        """A ConnectionLost during a retry call drops the reference and the
        call is made again over a new one."""
        first = self.connected()
        first.broken = True  # the next call finds the link broken
        d = self.call()
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), ("answer", "wait"))
        self.assertEqual(len(self.dialer.references), 2)
        self.failureResultOf(first.call("wait"), ConnectionLost)

    def test_a_new_incarnation_fails_the_call_and_tells(self):
        """A controller that came back without its journal (a new
        incarnation) fails a retry call with ConnectionLost, once the new
        hello is read, and runs the on_new_incarnation callbacks."""
        heard = []
        self.connection.on_new_incarnation.append(lambda: heard.append(True))
        self.connected().break_link()
        self.dialer.incarnation = "second"
        failure = self.failureResultOf(self.call(), ConnectionLost)
        self.assertIn("restarted without a journal", str(failure.value))
        self.assertEqual(heard, [True])
        self.assertEqual(self.connection.incarnation, "second")

    def test_one_connect_for_many_waiters(self):
        """Concurrent connects share one attempt; each waiter gets its own Deferred."""
        a, b = self.connection.connect(), self.connection.connect()
        self.assertIsNot(a, b)
        self.successResultOf(a)
        self.successResultOf(b)
        self.assertEqual(len(self.dialer.attempts), 1)

    def test_implementers(self):
        """The Foolscap dialer and these fakes provide their interfaces."""
        verifyObject(IControllerDialer, FoolscapDialer(self.clock))
        verifyObject(IControllerDialer, self.dialer)
        verifyObject(IControllerReference, _Reference({}))
