"""The blocking client: the same methods as `taskfarm.asyncclient`, returning
values instead of Deferreds.

    from taskfarm import client
    tc = client.TaskClient()          # the default profile's task furl
    taskid = tc.run(client.Task("a = 1", pull="a"))
    print(tc.get_task_result(taskid, block=True).ns.a)

The reactor runs in a daemon thread that starts when the first client is
made.  Each blocking class is generated from its Deferred twin, so the two
cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect

from taskfarm import asyncclient, reactorthread
from taskfarm.errors import *  # noqa: F401,F403  (the errors users catch)
from taskfarm.remote.client import DEFAULT_CONNECT_TIMEOUT
from taskfarm.task import MapTask, Task, TaskResult

__all__ = ["TaskClient", "Task", "MapTask", "TaskResult"]


def _blocking(method_name: str, async_method):
    @functools.wraps(async_method)
    def method(self, *args, **kwargs):
        return reactorthread.call(getattr(self._async, method_name), *args, **kwargs)

    return method


def blocking_facade(cls):
    """Give `cls` a blocking wrapper of every public method of its
    `async_class` that it does not define itself."""
    for name, member in inspect.getmembers(cls.async_class, inspect.isfunction):
        if not name.startswith("_") and name not in cls.__dict__:
            setattr(cls, name, _blocking(name, member))
    return cls


class _BlockingClient:
    async_class: type

    def __init__(self, furl_or_file=None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
        """Connect now to the controller (the default profile if no furl,
        furl file or profile folder is given); fails within
        `connect_timeout` seconds if it does not answer."""
        reactor = reactorthread.ensure_running()
        self._async = self.async_class(furl_or_file, reactor, connect_timeout)
        reactorthread.call(self._async.connect)

    def close(self) -> None:
        """Close this client's connection."""
        reactorthread.call(self._async.disconnect)


@blocking_facade
class TaskClient(_BlockingClient):
    """The load-balanced Task interface, blocking."""

    async_class = asyncclient.TaskClient
