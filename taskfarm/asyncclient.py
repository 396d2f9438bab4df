"""The Deferred client API: every method returns a Deferred.

Use it inside a Twisted program; `taskfarm.client` wraps the same classes
for blocking use.  Creating a client does no I/O: it connects on the first
call (or on `connect()`).
"""

from __future__ import annotations

from twisted.internet import defer

from taskfarm.clientbase import BaseClient, parallel_decorator, resolve_furl
from taskfarm.multiengineclient import MultiEngineClient, MultiEngineMapper
from taskfarm.taskclient import TaskClient, TaskMapper, map_tasks

__all__ = [
    "BaseClient",
    "TaskClient",
    "TaskMapper",
    "MultiEngineClient",
    "MultiEngineMapper",
    "parallel_decorator",
    "map_tasks",
    "resolve_furl",
    "get_multiengine_client",
    "get_task_client",
]


# -- the original's way in: a Deferred of a connected client ----------------------------


def get_multiengine_client(furl_or_file=None, reactor=None, **options) -> defer.Deferred:
    """A Deferred firing with a connected Deferred `MultiEngineClient`
    (its ``hello`` answered), as the original's ``get_multiengine_client``.

    `furl_or_file` is a furl, a furl file, a profile folder, or None (or
    ``''``) for the default profile.  The client hands out deferred ids for
    ``block=False`` (see `MultiEngineClient.get_pending_deferred`).  Fails
    with the typed error of the connection: `FurlError` for a bad furl or
    file, `WrongInterface`, `ControllerUnreachable`.  `options` are the
    constructor's (`connect_timeout`, `targets`, `block`, ...).
    """
    options.setdefault("deferred_ids", True)
    return _connected(MultiEngineClient, furl_or_file, reactor, options)


def get_task_client(furl_or_file=None, reactor=None, **options) -> defer.Deferred:
    """A Deferred firing with a connected Deferred `TaskClient`, as the
    original's ``get_task_client``; see `get_multiengine_client`."""
    return _connected(TaskClient, furl_or_file, reactor, options)


def _connected(cls, furl_or_file, reactor, options) -> defer.Deferred:
    try:
        client = cls(furl_or_file, reactor, **options)
    except Exception as e:
        return defer.fail(e)
    d = client.connect()
    d.addCallback(lambda _: client)
    return d
