"""A whole controller in one process, on one `task.Clock`, without sockets.

`LocalGrid` is the real controller's logic (registry, scheduler, task
controller, MultiEngine) behind the real Referenceables, served by a
`LocalTub`, so that the real clients (`asyncclient.TaskClient`,
`MultiEngineClient`, their `ControllerConnection` and `Submitter`) talk to
it through the in-process transport.  Engines are `InProcessChannel`s.
Everything moves only when the test advances the clock.
"""

from __future__ import annotations

from twisted.internet import defer, task

from taskfarm.asyncclient import MultiEngineClient, TaskClient
from taskfarm.controller.multiengine import MultiEngine
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.profile import ENGINE, MULTIENGINE, TASK
from taskfarm.remote.multiengine import RemoteMultiEngine
from taskfarm.remote.server import RemoteEngineRegistrar, RemoteTaskController
from taskfarm.testing.fakes import InProcessChannel
from taskfarm.testing.local import LocalTub


class LocalGrid:
    """A controller and its engines on `clock`, served through `tub`.

    `restart()` plays a controller restarted without its journal: a fresh
    controller (a new incarnation) takes the furls and every connection
    breaks.  Call `stop()` when done (a test's cleanup).
    """

    def __init__(
        self,
        clock: task.Clock | None = None,
        task_slots: int = 2,
        heartbeat: tuple[float, float] | None = None,
    ) -> None:
        self.clock = clock or task.Clock()
        self.tub = LocalTub(self.clock)
        self._task_slots = task_slots
        #: (period, timeout) of the registry's heartbeat; None: no heartbeat.
        self._heartbeat = heartbeat
        self.furls: dict[str, str] = {}
        self._start_controller()

    def _start_controller(self) -> None:
        period, timeout = self._heartbeat or (None, None)
        self.registry = EngineRegistry(
            self.clock, task_slots=self._task_slots, heartbeat_period=period,
            **({} if timeout is None else {"heartbeat_timeout": timeout}),
        )
        self.registry.start()
        self.controller = TaskController(
            self.registry, FIFOScheduler(), self.clock, unmet_timeout=None, retention=None
        )
        self.controller.start()
        self.multiengine = MultiEngine(self.registry, self.clock)
        served = {
            TASK: RemoteTaskController(self.controller),
            MULTIENGINE: RemoteMultiEngine(self.multiengine),
            ENGINE: RemoteEngineRegistrar(self.registry),
        }
        for interface, referenceable in served.items():
            self.furls[interface] = self.tub.serve(referenceable, interface)

    def add_engine(self, properties: dict | None = None) -> InProcessChannel:
        """A new in-process engine, registered; returns its channel."""
        channel = InProcessChannel(self.clock)
        channel.engine = self.registry.register(channel, dict(properties or {}))
        channel.namespace.set_engine_id(channel.engine.engine_id)
        return channel

    def task_client(self, **options) -> TaskClient:
        return TaskClient(self.furls[TASK], self.clock, tub=self.tub, **options)

    def multiengine_client(self, **options) -> MultiEngineClient:
        return MultiEngineClient(self.furls[MULTIENGINE], self.clock, tub=self.tub, **options)

    def settle(self, seconds: float = 0.1, step: float = 0.002, until=None) -> None:
        """Let `seconds` of clock time pass in small steps; with `until` (a
        Deferred), stop early once it has its result (not a Deferred it
        waits on)."""
        for _ in range(int(round(seconds / step))):
            if until is not None and until.called and not isinstance(until.result, defer.Deferred):
                return
            self.clock.advance(step)

    def restart(self) -> None:
        """A controller restarted without a journal: new state, same furls;
        every connection to the old one breaks."""
        self.stop()
        self.tub.disconnect_all()
        self._start_controller()

    def stop(self) -> None:
        self.controller.stop()
        self.registry.stop()

