"""``twistd -n taskcontroller``: options and service for the controller."""

from __future__ import annotations

from twisted.python import reflect, usage

from taskfarm import logoptions
from taskfarm.controller.predicates import DEFAULT_DEPEND_TIMEOUT
from taskfarm.controller.registry import (
    DEFAULT_HEARTBEAT_PERIOD,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_TIMEOUT_GRACE,
)
from taskfarm.controller.taskcontroller import (
    DEFAULT_FAILURE_PENALTY,
    DEFAULT_PREFETCH,
    DEFAULT_RETENTION,
    DEFAULT_RETRY_DELAY,
    DEFAULT_UNMET_TIMEOUT,
)
from taskfarm.interfaces import IScheduler
from taskfarm.lifeline import follow_launcher
from taskfarm.serialization import DEFAULT_MAX_MESSAGE_SIZE
from taskfarm.usagehint import BriefUsage
from taskfarm.wire import MAX_RETRY_DELAY


def load_scheduler(dotted: str):
    """The scheduler class named by a dotted path, checked against IScheduler."""
    try:
        cls = reflect.namedAny(dotted)
    except (reflect.ModuleNotFound, reflect.ObjectNotFound, ValueError, AttributeError) as e:
        raise usage.UsageError("--scheduler %s cannot be imported: %s" % (dotted, e)) from None
    if not isinstance(cls, type) or not IScheduler.implementedBy(cls):
        raise usage.UsageError(
            "--scheduler %s is not a class implementing taskfarm.interfaces.IScheduler"
            % dotted
        )
    return cls


class Options(BriefUsage, usage.Options):
    """Options of ``twistd taskcontroller``."""

    command = "twistd taskcontroller"

    #: Whether ``--log-file`` sets the runner's log (twistd, twist); not
    #: for ``taskfarm cluster``, which takes these options for its controller.
    runner_log = True

    synopsis = "[--profile-dir DIR] [--listen ENDPOINT] [--location HOST:PORT] [--scheduler DOTTED.NAME]"
    optParameters = [
        ["profile-dir", "p", None, "The profile folder (default ~/.taskfarm or $TASKFARM_PROFILE)."],
        ["listen", "l", None, "Where to listen, e.g. tcp:10105:interface=127.0.0.1 (default: loopback, same port as last time)."],
        ["location", None, None, "HOST:PORT that engines and clients should dial (default: the listen address)."],
        ["scheduler", "s", "taskfarm.controller.scheduler.FIFOScheduler", "Dotted name of the scheduler class."],
        ["task-slots", None, 2, "Tasks each engine holds at first (fixed if --prefetch is 0).", int],
        ["prefetch", None, DEFAULT_PREFETCH, "Seconds of work to keep queued on each engine; its task slots follow its task run times (0: fixed --task-slots).", float],
        ["unmet-timeout", None, DEFAULT_UNMET_TIMEOUT, "Seconds a task may wait while no engine satisfies its depend (0: forever).", float],
        ["depend-timeout", None, DEFAULT_DEPEND_TIMEOUT, "Seconds one call of a depend function may take; past it, it counts as False.", float],
        ["max-message-size", None, DEFAULT_MAX_MESSAGE_SIZE, "Largest message accepted, in bytes.", int],
        ["heartbeat-period", None, DEFAULT_HEARTBEAT_PERIOD, "Seconds between pings of each engine (0: no heartbeat).", float],
        ["heartbeat-timeout", None, DEFAULT_HEARTBEAT_TIMEOUT, "Seconds of silence after which an engine counts as lost.", float],
        ["timeout-grace", None, DEFAULT_TIMEOUT_GRACE, "Seconds past a task's timeout that the controller waits for its engine's answer before failing it itself.", float],
        ["retry-delay", None, DEFAULT_RETRY_DELAY, "Seconds before a failed task's first retry, unless the task sets retry_delay; doubled per further retry, up to %g s (0: retry at once)." % MAX_RETRY_DELAY, float],
        ["failure-penalty", None, DEFAULT_FAILURE_PENALTY, "Seconds the engine a task failed on sits out for that task while another engine is free (0: none).", float],
        ["retention", None, DEFAULT_RETENTION, "Seconds finished tasks are kept unless cleared (0: until cleared).", float],
        ["bulk-listen", None, None, "Where the bulk-data channel for big values listens, e.g. tcp:10106:interface=127.0.0.1 (default: a free port on --listen's interface; none: no channel, big values over Foolscap)."],
        ["dashboard", None, None, "Serve the web dashboard and /metrics here, e.g. tcp:8765:interface=127.0.0.1 (loopback unless an interface is named; off by default). Its URL, with its access token, is logged and written to security/dashboard.url in the profile."],
        *logoptions.parameters(
            "{host} and {pid} in PATH are filled in.  PROFILE/log/controller.log "
            "holds the same lines, rotated, with or without it."
        ),
    ]
    optFlags = [
        ["no-journal", None, "Keep tasks in memory only: a controller restart loses them."],
    ]

    def postOptions(self) -> None:
        from taskfarm.remote.tub import parse_listen

        self["scheduler_class"] = load_scheduler(self["scheduler"])
        if self["listen"] is not None:
            try:
                interface, _ = parse_listen(self["listen"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
            if interface in ("0.0.0.0", "::", "") and not self["location"]:
                raise usage.UsageError(
                    "--listen on all interfaces needs --location HOST:PORT, the "
                    "address engines and clients should dial"
                )
        if self["bulk-listen"] not in (None, "none"):
            try:
                parse_listen(self["bulk-listen"])
            except ValueError as e:
                raise usage.UsageError(str(e).replace("--listen", "--bulk-listen")) from None
        if self["dashboard"] is not None:
            from taskfarm.dashboard.server import dashboard_endpoint

            try:
                self["dashboard"] = dashboard_endpoint(self["dashboard"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if self["prefetch"] < 0:
            raise usage.UsageError("--prefetch must be >= 0")
        if self["task-slots"] < 1:
            raise usage.UsageError("--task-slots must be at least 1")
        if self["unmet-timeout"] < 0:
            raise usage.UsageError("--unmet-timeout must be >= 0")
        if not 0 < self["depend-timeout"] < float("inf"):
            raise usage.UsageError("--depend-timeout must be a positive number of seconds")
        if self["heartbeat-period"] < 0:
            raise usage.UsageError("--heartbeat-period must be >= 0")
        if self["heartbeat-period"] and self["heartbeat-timeout"] <= self["heartbeat-period"]:
            raise usage.UsageError("--heartbeat-timeout must be longer than --heartbeat-period")
        if self["timeout-grace"] <= 0:
            raise usage.UsageError("--timeout-grace must be > 0")
        if not 0 <= self["retry-delay"] <= MAX_RETRY_DELAY:
            raise usage.UsageError("--retry-delay must be in 0..%g seconds" % MAX_RETRY_DELAY)
        if not 0 <= self["failure-penalty"] < float("inf"):
            raise usage.UsageError("--failure-penalty must be >= 0 seconds")
        if self["retention"] < 0:
            raise usage.UsageError("--retention must be >= 0")
        if self["max-message-size"] < 1024:
            raise usage.UsageError("--max-message-size must be at least 1024 bytes")
        if self.runner_log:
            logoptions.apply(self)
        elif self["log-file"] is not None:
            raise usage.UsageError(
                "--log-file is for twistd taskcontroller; here the controller's log is "
                "PROFILE/log/controller.log (and controller.out), both rotated"
            )


def _stay_down_on_sigterm(reactor) -> None:
    """SIGTERM stops the controller as usual, but it exits with
    `EXIT_TERMINATED`, so that its launcher leaves it down (a crash or
    SIGKILL still gets it restarted).  The handler goes in at once, not
    only once the reactor runs: a controller already holding its profile
    may still be opening its journal, and a SIGTERM then must stick too.
    The reactor installs handlers of its own when it starts, so it goes in
    again after those."""
    import signal

    from twisted.logger import Logger

    from taskfarm.exitcodes import EXIT_TERMINATED, stop_reactor_and_exit

    asked = []

    def terminated(signum, frame) -> None:
        if asked:
            return  # already stopping
        asked.append(signum)
        Logger().info("SIGTERM: stopping; the launcher will not restart this controller")
        # Runs once the reactor runs, if it does not yet.
        reactor.callFromThread(stop_reactor_and_exit, reactor, EXIT_TERMINATED)

    signal.signal(signal.SIGTERM, terminated)
    reactor.callWhenRunning(signal.signal, signal.SIGTERM, terminated)


def makeService(options: Options):
    """The controller service for parsed `options`, logging to the profile."""
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    from taskfarm.controller.journal import JournalCorrupt
    from taskfarm.controller.service import create_controller
    from taskfarm.errors import ProfileInUse
    from taskfarm.exitcodes import refuse_to_start
    from taskfarm.logfiles import rotating_observer
    from taskfarm.profile import Profile

    if follow_launcher(reactor):
        # Its launcher marks its own stops first; a SIGTERM it gets
        # otherwise is a person's (or the system's) and must stick.
        _stay_down_on_sigterm(reactor)
    profile = Profile.from_option(options["profile-dir"])
    profile.ensure()
    # Rotated by size, a few old files kept (`taskfarm.logfiles`).
    globalLogPublisher.addObserver(rotating_observer(profile.log_dir / "controller.log"))
    try:
        return create_controller(
            profile,
            reactor,
            listen=options["listen"],
            location=options["location"],
            scheduler_class=options["scheduler_class"],
            task_slots=options["task-slots"],
            unmet_timeout=options["unmet-timeout"] or None,
            max_message_size=options["max-message-size"],
            journal=not options["no-journal"],
            retention=options["retention"] or None,
            heartbeat_period=options["heartbeat-period"] or None,
            heartbeat_timeout=options["heartbeat-timeout"],
            prefetch=options["prefetch"] or None,
            timeout_grace=options["timeout-grace"],
            depend_timeout=options["depend-timeout"],
            retry_delay=options["retry-delay"],
            failure_penalty=options["failure-penalty"],
            dashboard=options["dashboard"],
            bulk_listen=options["bulk-listen"],
        )
    except (JournalCorrupt, ProfileInUse) as e:
        # Starting again would not help: say why, with EXIT_REFUSED.
        raise refuse_to_start("taskcontroller: %s" % e) from None
