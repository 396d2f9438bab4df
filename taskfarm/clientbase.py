"""What the Deferred clients share: finding the furl and one connection to
one controller interface.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from twisted.internet import defer

from taskfarm.backoff import Backoff
from taskfarm.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_TIMEOUT,
    ControllerConnection,
)
from taskfarm.errors import FurlError
from taskfarm.profile import TASK, Profile, read_furl_file
from taskfarm.waiting import bounded

#: Seconds between looks at the engine count in `wait_for_engines`: the
#: first, and the most (doubling).
ENGINE_POLL = (0.05, 1.0)


def resolve_furl(furl_or_file, interface: str) -> str:
    """The furl for `interface` from a furl, a furl file, a profile folder,
    or None (the default profile)."""
    if _is_furl(furl_or_file):
        return furl_or_file
    return read_furl_file(furl_path(furl_or_file, interface))


def _is_furl(furl_or_file) -> bool:
    return isinstance(furl_or_file, str) and furl_or_file.startswith("pb://")


def furl_path(furl_or_file, interface: str, missing_is_profile: bool = False) -> Path | None:
    """The furl file `furl_or_file` stands for (None for a furl itself);
    a bad argument is a `FurlError`.  With `missing_is_profile`, a path
    that does not exist yet and is not named ``*.furl`` is a profile folder
    (one a starting controller has not made yet)."""
    if isinstance(furl_or_file, tuple):
        raise FurlError(
            "taskfarm clients do not take a (host, port) address: the furl file "
            "is the credential. Pass the path of the controller's %s furl file "
            "(PROFILE/security/%s.furl), a profile folder, or nothing for the "
            "default profile." % (interface, interface)
        )
    if furl_or_file is None or furl_or_file == "":
        return Profile.from_option(None).furl_file(interface)
    if not isinstance(furl_or_file, (str, os.PathLike)):
        raise FurlError(
            "expected a furl, a furl file or a profile folder, not %s"
            % type(furl_or_file).__name__
        )
    text = os.fspath(furl_or_file)
    if text.startswith("pb://"):
        return None
    path = Path(text).expanduser()
    if path.is_dir() or (missing_is_profile and not path.exists() and path.suffix != ".furl"):
        return Profile(path).furl_file(interface)
    return path


class BaseClient:
    """What both client kinds share: one connection to one interface.

    Clients of one process to one controller share one Foolscap
    connection, counted: `close()` (or `disconnect()`) ends only this
    client's use of it, and calls of other clients go on.

    With `wait_for_controller`, a client made before its controller is up
    (no furl file yet, or nothing answering) waits for it, up to
    `connect_timeout` seconds, and then fails with `ControllerUnreachable`;
    without, a missing furl file is a `ProfileError` at once.
    """

    interface = TASK

    #: Whether big values (task results, pulled values) may come over the
    #: controller's bulk-data channel (`taskfarm.bulk`); False: everything
    #: over Foolscap.
    use_bulk = True

    def __init__(
        self,
        furl_or_file=None,
        reactor=None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tub=None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        wait_for_controller: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        path = (
            None if _is_furl(furl_or_file)
            else furl_path(furl_or_file, self.interface, missing_is_profile=wait_for_controller)
        )
        if wait_for_controller and path is not None:
            furl = functools.partial(read_furl_file, path)
        else:
            furl = resolve_furl(furl_or_file, self.interface)
        #: Where the furl came from (a file), or None for a furl given as is.
        self.furl_file = path
        self._connection = ControllerConnection(
            furl,
            self.interface,
            reactor,
            connect_timeout,
            tub=tub,
            reconnect_timeout=reconnect_timeout,
            wait_for_controller=wait_for_controller,
            furl_file=path,
        )

    def connect(self) -> defer.Deferred:
        """Connect now (clients otherwise connect on their first call)."""
        return self._connection.connect()

    def disconnect(self) -> defer.Deferred:
        """Close this client's connection (see `close`)."""
        self._connection.disconnect()
        return defer.succeed(None)

    def close(self) -> defer.Deferred:
        """End this client's use of its connection; fires when done.

        Its own calls still waiting fail with `ClientClosed`; other clients
        of this process, which may share the connection, are not touched.
        A `TaskClient` first waits until its submitted tasks are accepted.
        """
        return self.disconnect()

    @property
    def where(self) -> str:
        """The controller, for messages: its furl file (or its location)."""
        path = self.furl_file
        if path is not None and path.parent.name == "security":
            return "the controller of profile %s" % (path.parent.parent,)
        if path is not None:
            return "the controller of %s" % (path,)
        return "the controller at %s" % (self._connection.location,)

    def wait_for_engines(self, n: int = 1, timeout: float | None = None) -> defer.Deferred:
        """Fires with the engine ids once at least `n` engines are
        registered; `WaitTimeout` after `timeout` seconds (None: no limit)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return defer.fail(TypeError("n is a count of engines (an int >= 0), not %r" % (n,)))
        return bounded(
            self._wait_for_engines(n), timeout, self._reactor,
            "%d engine%s to register with %s" % (n, "" if n == 1 else "s", self.where),
        )

    async def _wait_for_engines(self, n: int) -> list[int]:
        backoff = Backoff(*ENGINE_POLL)
        while True:
            ids = await self._connection.call("engine_ids", retry=True)
            if len(ids) >= n:
                return ids
            await backoff.wait(self._reactor)

    def _call(self, method: str, *args, retry: bool = False) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connection.call(method, *args, retry=retry))


    def _call(self, method: str, *args, retry: bool = False) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connection.call(method, *args, retry=retry))


async def gather(coroutines) -> list:
    """Run coroutines side by side; raise the first one's error itself."""
    try:
        return await defer.gatherResults(
            [defer.Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True
        )
    except defer.FirstError as e:
        e.subFailure.raiseException()


def parallel_decorator(mapper):
    """A decorator mapping the function it wraps with `mapper`."""
    def decorate(function):
        @functools.wraps(function)
        def mapped(*sequences):
            return mapper.map(function, *sequences)

        return mapped

    return decorate


def zip_equal(sequences) -> list[tuple]:
    """The argument tuples of a map over `sequences`, which must be equally long."""
    if not sequences:
        raise TypeError("map needs at least one sequence")
    lists = [list(seq) for seq in sequences]
    lengths = {len(seq) for seq in lists}
    if len(lengths) > 1:
        raise ValueError(
            "map's sequences must have equal lengths, not %s" % [len(seq) for seq in lists]
        )
    return list(zip(*lists, strict=True))
