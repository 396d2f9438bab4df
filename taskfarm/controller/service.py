"""The controller service tree and the factory that builds it."""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from taskfarm.controller.journal import Journal, NullJournal
from taskfarm.controller.multiengine import MultiEngine
from taskfarm.controller.predicates import DEFAULT_DEPEND_TIMEOUT, PredicatePool
from taskfarm.controller.registry import (
    DEFAULT_HEARTBEAT_PERIOD,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_TIMEOUT_GRACE,
    EngineRegistry,
)
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.taskcontroller import (
    DEFAULT_FAILURE_PENALTY,
    DEFAULT_PREFETCH,
    DEFAULT_RETENTION,
    DEFAULT_RETRY_DELAY,
    DEFAULT_UNMET_TIMEOUT,
    TaskController,
)
from taskfarm.profile import ENGINE, MULTIENGINE, TASK, Profile, lock_profile
from taskfarm.remote.server import ControllerServer
from taskfarm.serialization import DEFAULT_MAX_MESSAGE_SIZE
from taskfarm.services import OrderedServices, Part


class ControllerService(OrderedServices):
    """One controller: its engine registry, scheduler and Task interface,
    served over one Foolscap Tub whose furls are written to the profile.

    Its children, in start order (`START_ORDER`): ``journal`` (opened when
    built; stopping writes what is pending and closes it), ``evaluator``
    (the depend processes), ``registry`` (heartbeat), ``tasks`` (restore
    from the journal, timers), ``server`` (the Tub: listens, writes the
    furls).  Serving starts last and stops first; the others stop in the
    reverse order, each waited for, so the journal closes after every
    write the others made, off the reactor thread.  The profile lock is
    released after the last child stopped.
    """

    _log = Logger()

    #: The children's names, in start order (they stop in reverse).  With
    #: ``--dashboard``, a ``dashboard`` child follows ``server``.
    START_ORDER = ("journal", "evaluator", "registry", "tasks", "server")

    def __init__(
        self,
        profile: Profile,
        registry: EngineRegistry,
        scheduler,
        tasks: TaskController,
        multiengine: MultiEngine,
        server,
        journal=None,
        evaluator=None,
        dashboard=None,
    ) -> None:
        super().__init__()
        self.profile = profile
        self.registry = registry
        self.scheduler = scheduler
        self.tasks = tasks
        self.multiengine = multiengine
        #: The task journal (a `NullJournal` when running purely in memory).
        self.journal = journal
        #: Where depend predicates run (`PredicatePool`), or None.
        self.evaluator = evaluator
        #: This controller's hold on its profile (`ProfileLock`), or None.
        self.lock = None
        #: The Foolscap side (`taskfarm.remote.server.ControllerServer`).
        self.server = server
        if journal is not None:
            Part("journal", stop=journal.stop).setServiceParent(self)
        if evaluator is not None:
            Part("evaluator", start=evaluator.start, stop=evaluator.stop).setServiceParent(self)
        Part("registry", start=registry.start, stop=registry.stop).setServiceParent(self)
        Part("tasks", start=tasks.start, stop=tasks.stop).setServiceParent(self)
        server.setName("server")
        server.setServiceParent(self)
        #: The web dashboard (`taskfarm.dashboard.server.Dashboard`), or None.
        self.dashboard = dashboard
        if dashboard is not None:
            dashboard.setName("dashboard")
            dashboard.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        if self.lock is not None:
            self.lock.record_location(str(self.server.location))
        self._log.info(
            "controller serving at {location}; furl files in {folder}",
            location=self.server.location,
            folder=str(self.profile.security_dir),
        )

    def stopService(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        if self.lock is not None:
            self.lock.release()


def create_controller(profile: Profile, reactor, **options) -> ControllerService:
    """Build a controller for `profile` (options: see `build_controller`).

    The controller holds `profile` alone until it stops: `ProfileInUse`
    (naming the holder's pid) is raised here when another controller holds
    it, with or without a journal, since the furl files are shared too.
    """
    # Taken before anything of the profile, the journal first, is opened.
    lock = lock_profile(profile)
    try:
        controller = build_controller(profile, reactor, **options)
    except BaseException:
        lock.release()
        raise
    controller.lock = lock
    return controller


def build_controller(
    profile: Profile,
    reactor,
    listen: str | None = None,
    location: str | None = None,
    scheduler_class=FIFOScheduler,
    task_slots: int = 2,
    unmet_timeout: float | None = DEFAULT_UNMET_TIMEOUT,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    journal: bool = True,
    retention: float | None = DEFAULT_RETENTION,
    heartbeat_period: float | None = DEFAULT_HEARTBEAT_PERIOD,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    prefetch: float | None = DEFAULT_PREFETCH,
    timeout_grace: float = DEFAULT_TIMEOUT_GRACE,
    depend_timeout: float = DEFAULT_DEPEND_TIMEOUT,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    failure_penalty: float = DEFAULT_FAILURE_PENALTY,
    dashboard: str | None = None,
    bulk_listen: str | None = None,
) -> ControllerService:
    """Build a controller for `profile`; it listens once started.  Use
    `create_controller`, which first takes the profile's lock.

    With `dashboard` (a server endpoint string), the web dashboard is
    served there; its URL, with its token, goes to the profile.

    The bulk-data channel (`taskfarm.bulk`) listens at `bulk_listen` (a
    tcp endpoint string; None: a free port on the Tub's interface;
    ``"none"``: no channel, everything over Foolscap).

    With `journal`, tasks are kept in the profile's journal and restored at
    start; `JournalCorrupt` is raised here if it cannot be read.  `depend`
    predicates run in child processes, `depend_timeout` seconds per call.
    """
    registry = EngineRegistry(
        reactor,
        task_slots=task_slots,
        heartbeat_period=heartbeat_period,
        heartbeat_timeout=heartbeat_timeout,
        timeout_grace=timeout_grace,
        max_message_size=max_message_size,
    )
    evaluator = PredicatePool(reactor, timeout=depend_timeout)
    scheduler = scheduler_class(evaluator=evaluator)
    task_journal = NullJournal()
    if journal:
        profile.ensure()
        task_journal = Journal(profile.journal_file, reactor)
        task_journal.open()
    tasks = TaskController(
        registry,
        scheduler,
        reactor,
        unmet_timeout=unmet_timeout,
        journal=task_journal,
        retention=retention,
        prefetch=prefetch,
        retry_delay=retry_delay,
        failure_penalty=failure_penalty,
    )
    multiengine = MultiEngine(registry, reactor)
    server = ControllerServer(
        profile,
        reactor,
        registry,
        {TASK: tasks, MULTIENGINE: multiengine, ENGINE: registry},
        listen=listen,
        location=location,
        max_message_size=max_message_size,
        bulk_listen=bulk_listen,
    )
    web = None
    if dashboard is not None:
        from taskfarm.dashboard.server import Dashboard

        profile.ensure()
        web = Dashboard(tasks, reactor, dashboard, url_file=profile.dashboard_url_file)
    return ControllerService(
        profile, registry, scheduler, tasks, multiengine, server, task_journal, evaluator, web
    )
