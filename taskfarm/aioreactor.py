"""Twisted's asyncio reactor on the program's own loop (`install_reactor`),
and whether it runs on a given loop (`reactor_on`): the ``"loop"`` mode of
`taskfarm.aio`.  Importing this module imports no reactor.
"""

from __future__ import annotations

import asyncio
import sys
import threading


def install_reactor(loop: asyncio.AbstractEventLoop | None = None):
    """Install Twisted's asyncio reactor on `loop` (the running loop if
    None) and mark it running; returns the reactor.  Call it before
    anything imports ``twisted.internet.reactor``; a reactor installed
    already is an error (unless it is this one)."""
    loop = asyncio.get_running_loop() if loop is None else loop
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        if isinstance(reactor, AsyncioSelectorReactor) and reactor._asyncioEventloop is loop:
            return reactor
        raise RuntimeError(
            "a Twisted reactor (%s) is installed already, so Twisted's asyncio reactor "
            "cannot be put on this loop: call taskfarm.aio.install_reactor() before "
            "anything imports twisted.internet.reactor, or use mode='thread'"
            % type(reactor).__name__
        )
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    from twisted.internet import reactor

    # The loop runs already: the reactor only needs its start-up events.
    reactor.startRunning(installSignalHandlers=False)
    # Nobody stops this reactor (the program's loop just ends), so its
    # thread pool (name lookups) must not keep the interpreter from exiting.
    reactor.getThreadPool().threadFactory = _daemon_thread
    return reactor


def _daemon_thread(*args, **kwargs) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


def reactor_on(loop):
    """The installed reactor if it is Twisted's asyncio reactor on `loop`, else None."""
    if "twisted.internet.reactor" not in sys.modules:
        return None
    from twisted.internet import reactor
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if isinstance(reactor, AsyncioSelectorReactor) and reactor._asyncioEventloop is loop:
        return reactor
    return None
