"""The Deferred client API: every method returns a Deferred.

Use it inside a Twisted program; `taskfarm.client` wraps the same classes
for blocking use.  Creating a client does no I/O: it connects on the first
call (or on `connect()`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from twisted.internet import defer

from taskfarm import serialization
from taskfarm.errors import FurlError
from taskfarm.profile import TASK, Profile, read_furl_file
from taskfarm.remote.client import DEFAULT_CONNECT_TIMEOUT, ControllerConnection
from taskfarm.task import CALL, BaseTask, result_from_envelope

__all__ = ["TaskClient", "resolve_furl"]


def resolve_furl(furl_or_file, interface: str) -> str:
    """The furl for `interface` from a furl, a furl file, a profile folder,
    or None (the default profile)."""
    if isinstance(furl_or_file, tuple):
        raise FurlError(
            "taskfarm clients do not take a (host, port) address: the furl file "
            "is the credential. Pass the path of the controller's %s furl file "
            "(PROFILE/security/%s.furl), a profile folder, or nothing for the "
            "default profile." % (interface, interface)
        )
    if furl_or_file is None or furl_or_file == "":
        return read_furl_file(Profile.from_option(None).furl_file(interface))
    if not isinstance(furl_or_file, (str, os.PathLike)):
        raise FurlError(
            "expected a furl, a furl file or a profile folder, not %s"
            % type(furl_or_file).__name__
        )
    text = os.fspath(furl_or_file)
    if text.startswith("pb://"):
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        return read_furl_file(Profile(path).furl_file(interface))
    return read_furl_file(path)


class _Client:
    """What both client kinds share: one connection to one interface."""

    interface = TASK

    def __init__(
        self,
        furl_or_file=None,
        reactor=None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tub=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._connection = ControllerConnection(
            resolve_furl(furl_or_file, self.interface),
            self.interface,
            reactor,
            connect_timeout,
            tub=tub,
        )

    def connect(self) -> defer.Deferred:
        """Connect now (clients otherwise connect on their first call)."""
        return self._connection.connect()

    def disconnect(self) -> defer.Deferred:
        """Close this client's connection."""
        self._connection.disconnect()
        return defer.succeed(None)

    def _call(self, method: str, *args) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connection.call(method, *args))


class TaskClient(_Client):
    """The load-balanced Task interface, as Deferreds."""

    interface = TASK

    def __init__(
        self, furl_or_file=None, reactor=None, connect_timeout=DEFAULT_CONNECT_TIMEOUT, tub=None
    ):
        super().__init__(furl_or_file, reactor, connect_timeout, tub)
        self._batch: list[tuple[tuple, defer.Deferred]] = []

    # -- submitting ---------------------------------------------------------------

    def run(self, task: BaseTask) -> defer.Deferred:
        """Submit one task; fires with its id.

        Calls made in the same reactor turn travel together in one message.
        """
        try:
            envelope = _envelope(task)
        except Exception as e:
            return defer.fail(e)
        d: defer.Deferred = defer.Deferred()
        self._batch.append((envelope, d))
        if len(self._batch) == 1:
            self._reactor.callLater(0, self._send_batch)
        return d

    def run_many(self, tasks: Iterable[BaseTask]) -> defer.Deferred:
        """Submit many tasks in one message; fires with their ids, in order."""
        try:
            envelopes = [_envelope(task) for task in tasks]
        except Exception as e:
            return defer.fail(e)
        return defer.Deferred.fromCoroutine(self._submit(envelopes))

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        d = defer.Deferred.fromCoroutine(self._submit([env for env, _ in batch]))

        def deliver(ids):
            for (_, waiter), taskid in zip(batch, ids):
                waiter.callback(taskid)

        def refuse(failure):
            for _, waiter in batch:
                waiter.errback(failure)

        d.addCallbacks(deliver, refuse)

    async def _submit(self, envelopes: list) -> list[int]:
        return await self._connection.call("submit", serialization.pack(envelopes))

    # -- results ---------------------------------------------------------------------

    def get_task_result(self, taskid: int, block: bool = False) -> defer.Deferred:
        """The task's `TaskResult`, or None if unfinished and not `block`.

        For a `MapTask` the result is the function's return value, and a
        failure is raised instead.
        """
        return defer.Deferred.fromCoroutine(self._get_result(taskid, block))

    async def _get_result(self, taskid: int, block: bool):
        _check_id(taskid)
        (envelope,) = await self._connection.call(
            "results", serialization.pack([taskid]), bool(block)
        )
        if envelope is None:
            return None
        return _present(envelope)

    def get_task_results(self, taskids: list[int], block: bool = False) -> defer.Deferred:
        """`get_task_result` for many ids in one message, as a list."""
        return defer.Deferred.fromCoroutine(self._get_results(list(taskids), block))

    async def _get_results(self, taskids: list[int], block: bool) -> list:
        for taskid in taskids:
            _check_id(taskid)
        envelopes = await self._connection.call(
            "results", serialization.pack(taskids), bool(block)
        )
        return [None if env is None else _present(env, raising=False) for env in envelopes]

    def barrier(self, taskids) -> defer.Deferred:
        """Fires (with None) once every task in `taskids` (an id or a list) is done."""
        ids = [taskids] if isinstance(taskids, int) else list(taskids)
        for taskid in ids:
            _check_id(taskid)
        return self._call("wait", serialization.pack(ids))

    # -- control ----------------------------------------------------------------------

    def abort(self, taskid: int) -> defer.Deferred:
        """Abort a queued or running task; its result becomes `TaskAborted`."""
        try:
            _check_id(taskid)
        except TypeError as e:
            return defer.fail(e)
        return self._call("abort", taskid)

    def queue_status(self, verbose: bool = False) -> defer.Deferred:
        """Task counts per state (id lists if `verbose`)."""
        return self._call("queue_status", bool(verbose))

    def clear(self, taskids=None) -> defer.Deferred:
        """Forget finished tasks (all, or the listed ids); fires with how many."""
        if isinstance(taskids, int):
            taskids = [taskids]
        return self._call("clear", serialization.pack(None if taskids is None else list(taskids)))

    def spin(self) -> defer.Deferred:
        """Ask the controller for a scheduling pass (rarely needed)."""
        return self._call("spin")

    def engine_ids(self) -> defer.Deferred:
        """The ids of the registered engines."""
        return self._call("engine_ids")


def _present(envelope: tuple, raising: bool = True):
    """A `TaskResult`; for a MapTask its value (or its failure, raised)."""
    result = result_from_envelope(envelope)
    if envelope[1] != CALL:
        return result
    if result.failure is not None:
        if raising:
            raise result.failure
        return result.failure
    return result.value


def _envelope(task: BaseTask) -> tuple:
    if not isinstance(task, BaseTask):
        raise TypeError(
            "run takes a Task or MapTask, not %s" % type(task).__name__
        )
    return task.to_envelope()


def _check_id(taskid) -> None:
    if isinstance(taskid, bool) or not isinstance(taskid, int):
        raise TypeError("a task id is an int, not %r" % (taskid,))

