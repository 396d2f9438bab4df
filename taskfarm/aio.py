"""The clients for asyncio programs and Jupyter cells: the methods of
`taskfarm.asyncclient`'s clients as coroutines.

    from taskfarm import aio

    async def main():
        async with aio.TaskClient() as tc:
            print(await tc.map(abs, [-1, -2]))
            async for tr in tc.as_completed(await tc.run_many(tasks)):
                print(tr.id, tr.value)

    asyncio.run(main())           # or, in a Jupyter cell: await tc.map(...)

Two ways to reach Twisted, chosen when the client first runs (``mode=``):

``"thread"``
    The reactor runs in its own thread (`taskfarm.reactorthread`, as for
    the blocking client).  Each call is started there with
    ``reactor.callFromThread``; its answer comes back with
    ``loop.call_soon_threadsafe`` to an `asyncio.Future` of the calling
    loop.  Any loop works: ``asyncio.run``, Jupyter's, one per thread.
``"loop"``
    Twisted's asyncio reactor runs on the program's own loop
    (`install_reactor`, first thing in the program, before anything imports
    ``twisted.internet.reactor``).  Calls return Deferreds on that loop,
    awaited with ``Deferred.asFuture``; no second thread.
``"auto"`` (the default)
    ``"loop"`` when Twisted's asyncio reactor is installed on the running
    loop, else ``"thread"``.

The wrong combination is an error saying so, never a hang: a ``"loop"``
client without the asyncio reactor on the running loop, a ``"thread"``
client while the reactor runs on this loop, and any call from a loop
other than the client's first.  Cancelling the awaiting task cancels the
call's Deferred.
"""

from __future__ import annotations

from taskfarm.aioreactor import install_reactor
from taskfarm.task import MapTask, Task, TaskResult

__all__ = [  # noqa: F822  (the clients come from `__getattr__`)
    "TaskClient", "MultiEngineClient", "PendingResult", "install_reactor",
    "Task", "MapTask", "TaskResult", "MODES",
]

#: The names `taskfarm.aioclient` gives, imported on first use: importing
#: the clients imports Foolscap, which installs Twisted's default reactor,
#: and `install_reactor` must be able to come first.
_LAZY = frozenset({"TaskClient", "MultiEngineClient", "PendingResult", "MODES"})


def __getattr__(name: str):
    if name in _LAZY:
        from taskfarm import aioclient

        return getattr(aioclient, name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def __dir__():
    return sorted(set(globals()) | _LAZY)
