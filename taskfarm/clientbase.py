"""What the Deferred clients share: finding the furl and one connection to
one controller interface.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from twisted.internet import defer

from taskfarm.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_TIMEOUT,
    ControllerConnection,
)
from taskfarm.errors import (
    FurlError,
)
from taskfarm.profile import TASK, Profile, read_furl_file


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


class BaseClient:
    """What both client kinds share: one connection to one interface."""

    interface = TASK

    def __init__(
        self,
        furl_or_file=None,
        reactor=None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tub=None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
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
            reconnect_timeout=reconnect_timeout,
        )

    def connect(self) -> defer.Deferred:
        """Connect now (clients otherwise connect on their first call)."""
        return self._connection.connect()

    def disconnect(self) -> defer.Deferred:
        """Close this client's connection."""
        self._connection.disconnect()
        return defer.succeed(None)

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
