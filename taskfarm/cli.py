"""The ``taskfarm`` command: ``cluster``, ``engines``, ``status``, ``stop``, ``demo``.

    taskfarm cluster -n 4          controller + 4 engines; Ctrl-C stops them all
    taskfarm cluster -n 4 --daemon the same in the background
    taskfarm status / stop         what runs on the profile / stop it all
    taskfarm engines -n 4 --furl-file F   4 engines for a controller elsewhere
    taskfarm demo                  a cluster, the quick-start job, a clean stop

``--launcher NAME`` (cluster, engines) picks how engines start
(`taskfarm.cluster.launchers`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from twisted.internet import defer, task
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

import taskfarm
from taskfarm.childprocess import ChildProcess
from taskfarm.cluster import launchers
from taskfarm.controller import tap as controller_tap
from taskfarm.controller.registry import DEFAULT_HEARTBEAT_TIMEOUT
from taskfarm.errors import TaskfarmError
from taskfarm.profile import ENGINE, INTERFACES, Profile
from taskfarm.usagehint import help_hint


def _engine_property(options: usage.Options, text: str) -> None:
    from taskfarm.engine.tap import parse_property

    parse_property(text)  # refuse a bad one now, not in every engine
    options["engine-properties"].append(text)


class _EngineCount:
    """The ``-n N`` and ``--version`` options shared by the commands."""

    def opt_version(self) -> None:
        """Print taskfarm's version and exit."""
        print("taskfarm %s" % taskfarm.__version__)
        sys.exit(0)

    def opt_number(self, value: str) -> None:
        """How many engines."""
        try:
            self["number"] = int(value)
        except ValueError:
            raise usage.UsageError("-n takes a number of engines, not %r" % (value,)) from None

    opt_n = opt_number


def engine_count(number: int | None, launcher, default: int) -> int:
    """``-n`` when given; else what the launcher's own options ask for (its
    `capacity`: ``--hosts node1:4,node2:8`` is 12), else `default`."""
    if number is not None:
        return number
    return getattr(launcher, "capacity", None) or default


_LAUNCHER_PARAMETERS, _LAUNCHER_FLAGS = launchers.option_table()


class _LauncherChoice:
    """``--launcher NAME`` and every launcher's own options."""

    optParameters = [
        [
            "launcher",
            None,
            launchers.DEFAULT_LAUNCHER,
            "How engines start: %s." % ", ".join(sorted(launchers.LAUNCHERS)),
        ],
        *_LAUNCHER_PARAMETERS,
    ]
    optFlags = list(_LAUNCHER_FLAGS)

    def check_launcher(self) -> None:
        launchers.launcher_class(self["launcher"])  # an unknown name: a usage error
        self["launcher-options"] = launchers.check_launcher_options(self["launcher"], self)


for _name, _handler in launchers.repeated_handlers().items():  # --slurm-option ...
    setattr(_LauncherChoice, _name, _handler)


#: Controller options `ClusterOptions.controller_options` does not pass on.
_NOT_FORWARDED = frozenset({"profile-dir", "log-file", "log-rotate-bytes", "log-keep"})


class ClusterOptions(_EngineCount, _LauncherChoice, controller_tap.Options):
    """``taskfarm cluster``: every controller option, plus the engines'."""

    command = "taskfarm cluster"
    runner_log = False

    synopsis = "[-n N] [--launcher NAME] [--daemon] [--profile-dir DIR] [--engine-property KEY=VALUE ...] [controller options]"
    optParameters = [
        ["start-timeout", None, 60.0, "Seconds to wait for the controller and engines.", float],
    ]
    optFlags = [
        ["daemon", None, "Start in the background; return once all engines registered."],
    ]

    def __init__(self) -> None:
        super().__init__()
        # None: as many as the launcher's own options ask for (--hosts), or 4.
        self["number"] = None
        self["engine-properties"] = []

    def opt_engine_property(self, text: str) -> None:
        """Give every engine the property KEY=VALUE (repeatable)."""
        _engine_property(self, text)

    def postOptions(self) -> None:
        if self["number"] is not None and self["number"] < 0:
            raise usage.UsageError("-n must be >= 0")
        self.check_launcher()
        super().postOptions()  # the controller's own checks, before anything starts

    def controller_options(self) -> list[str]:
        """The controller options given, as command-line arguments again."""
        argv = []
        for name, _, default, *_ in controller_tap.Options.optParameters:
            if name not in _NOT_FORWARDED and self[name] != default:
                argv += ["--" + name, str(self[name])]
        for name, *_ in controller_tap.Options.optFlags:
            if self[name]:
                argv.append("--" + name)
        return argv

    def engine_options(self) -> list[str]:
        argv = []
        for text in self["engine-properties"]:
            argv += ["--property", text]
        return argv


class EnginesOptions(_EngineCount, _LauncherChoice, usage.Options):
    synopsis = "-n N [--launcher NAME] --furl-file FILE [--engine-property KEY=VALUE ...]"
    optParameters = [
        ["furl-file", "f", None, "The controller's engine furl file (copied from its profile)."],
        ["profile-dir", "p", None, "Profile folder for logs (default ~/.taskfarm or $TASKFARM_PROFILE)."],
        ["heartbeat-timeout", None, DEFAULT_HEARTBEAT_TIMEOUT, "Seconds an engine may be hung (no liveness tick) before it is killed and replaced (0: never); use the controller's value.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        # None: as many as the launcher's own options ask for (--hosts), or 1.
        self["number"] = None
        self["engine-properties"] = []

    def opt_engine_property(self, text: str) -> None:
        """Give every engine the property KEY=VALUE (repeatable)."""
        _engine_property(self, text)

    def postOptions(self) -> None:
        if self["number"] is not None and self["number"] < 1:
            raise usage.UsageError("-n must be >= 1")
        if self["heartbeat-timeout"] < 0:
            raise usage.UsageError("--heartbeat-timeout must be >= 0")
        self.check_launcher()
        if self["furl-file"] is None:
            self["furl-file"] = str(Profile.from_option(self["profile-dir"]).furl_file(ENGINE))

    engine_options = ClusterOptions.engine_options


class DemoOptions(_EngineCount, usage.Options):
    synopsis = "[-n N] [--profile-dir DIR]"
    optParameters = [
        ["profile-dir", "p", None, "The profile folder (default: a temporary one, removed afterwards)."],
        ["start-timeout", None, 60.0, "Seconds to wait for the controller and engines.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["number"] = 4

    def postOptions(self) -> None:
        if self["number"] < 1:
            raise usage.UsageError("-n must be >= 1")


class _ProfileOnly(usage.Options):
    optParameters = [
        ["profile-dir", "p", None, "The cluster's profile folder (default ~/.taskfarm or $TASKFARM_PROFILE)."],
        ["timeout", None, 30.0, "Seconds to wait for the controller (status) or for everything to stop (stop).", float],
    ]

    def postOptions(self) -> None:
        if not self["timeout"] > 0:
            raise usage.UsageError("--timeout must be > 0")


class StatusOptions(_ProfileOnly):
    synopsis = "[--profile-dir DIR]"


class StopOptions(_ProfileOnly):
    synopsis = "[--profile-dir DIR]"


class Options(usage.Options):
    synopsis = "taskfarm COMMAND [options]"
    subCommands = [
        ["cluster", None, ClusterOptions, "Run a controller and N engines until Ctrl-C (or --daemon)."],
        ["engines", None, EnginesOptions, "Run N engines for a controller elsewhere."],
        ["status", None, StatusOptions, "Show the cluster running on a profile."],
        ["stop", None, StopOptions, "Stop the cluster running on a profile, leaving nothing behind."],
        ["demo", None, DemoOptions, "Start a cluster, run the quick-start job, stop."],
    ]

    def opt_version(self) -> None:
        """Print taskfarm's version and exit."""
        print("taskfarm %s" % taskfarm.__version__)
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: cluster, engines, status, stop or demo")


def _launcher_note(options) -> str:
    """The note ` (--launcher NAME)` for a launcher other than the default."""
    name = options["launcher"]
    return "" if name == launchers.DEFAULT_LAUNCHER else " (--launcher %s)" % name


def _stop_on_shutdown(reactor, cluster, recorder=None) -> None:
    async def stop():
        if recorder is not None:
            recorder.stopping()
        await cluster.stop()
        if recorder is not None:
            recorder.remove()
        if cluster.controller is None:
            return  # refused before starting anything: nothing to report
        print(
            "taskfarm cluster: stopped; %d engine restarts, %d controller restarts"
            % (cluster.engine_restarts, cluster.controller.restarts if cluster.controller else 0),
            flush=True,
        )

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.Deferred.fromCoroutine(stop()))


async def run_cluster(reactor, options) -> int:
    from taskfarm.cluster.launcher import Cluster, ClusterError
    from taskfarm.cluster.manage import (
        DAEMON_ENV,
        RUNNING,
        StateRecorder,
        run_daemon,
        without_daemon,
    )

    profile = Profile.from_option(options["profile-dir"])
    if options["daemon"]:
        # Both the controller and the engines must come up: two start timeouts.
        return await run_daemon(
            reactor, without_daemon(options.raw_argv), profile, 2 * options["start-timeout"] + 15
        )
    # Engines hung for as long as the controller's heartbeat allows are
    # killed and replaced; no heartbeat, no such kills.
    engine_timeout = options["heartbeat-timeout"] if options["heartbeat-period"] else None
    try:
        launcher = launchers.make_launcher(
            options["launcher"], reactor, profile, options, engine_timeout=engine_timeout
        )
    except usage.UsageError as e:
        print("taskfarm cluster: %s" % e, file=sys.stderr)
        return 2
    options["number"] = engine_count(options["number"], launcher, 4)
    cluster = Cluster(
        profile,
        options["number"],
        reactor,
        controller_options=options.controller_options(),
        engine_options=options.engine_options(),
        start_timeout=options["start-timeout"],
        engine_timeout=engine_timeout,
        launcher=launcher,
    )
    # Not for the processes it starts.
    detached = os.environ.pop(DAEMON_ENV, "") == "1"
    recorder = StateRecorder(
        profile,
        cluster,
        options["launcher"],
        reactor,
        daemon=detached,
        options=options["launcher-options"],
    )
    # Recorded once the controller holds the profile (not before: the
    # file may be another cluster's until then).
    cluster.on_controller_up.append(recorder.start)
    _stop_on_shutdown(reactor, cluster, recorder)
    try:
        await cluster.start()
    except ClusterError as e:
        print("taskfarm cluster: %s" % e, file=sys.stderr)
        return 1
    recorder.record(RUNNING)
    print(
        "taskfarm cluster: controller (pid %d) and %d engines running%s"
        % (cluster.controller.pid, options["number"], _launcher_note(options))
    )
    for interface in INTERFACES:
        print("  %-12s furl file: %s" % (interface, profile.furl_file(interface)))
    print("  logs: %s\nPress Ctrl-C to stop." % profile.log_dir, flush=True)
    # Until a signal stops the reactor, or the controller ends the cluster.
    status = await cluster.finished
    if cluster.refused is not None:
        print("taskfarm cluster: the controller refused to start: %s" % cluster.refused,
              file=sys.stderr, flush=True)
    elif cluster.stopped_by is not None:
        print("taskfarm cluster: %s; stopping the cluster" % cluster.stopped_by, flush=True)
    return status


async def run_engines(reactor, options) -> int:
    from taskfarm.cluster.launcher import ClusterError, check_reachable
    from taskfarm.profile import read_furl_file

    profile = Profile.from_option(options["profile-dir"])
    profile.ensure()
    try:
        launcher = launchers.make_launcher(
            options["launcher"],
            reactor,
            profile,
            options,
            engine_timeout=options["heartbeat-timeout"] or None,
        )
        if hasattr(launcher, "log_prefix"):
            launcher.log_prefix = "remote-engine"  # not the cluster's engine-N.out
        check_reachable(launcher, read_furl_file(options["furl-file"]))
    except usage.UsageError as e:
        print("taskfarm engines: %s" % e, file=sys.stderr)
        return 2
    except (ClusterError, TaskfarmError) as e:
        print("taskfarm engines: %s" % e, file=sys.stderr)
        return 1

    options["number"] = engine_count(options["number"], launcher, 1)
    reactor.addSystemEventTrigger("before", "shutdown", launcher.stop)
    try:
        await launcher.start(options["number"], options["furl-file"], options.engine_options())
    except ClusterError as e:
        print("taskfarm engines: %s" % e, file=sys.stderr)
        return 1
    print(
        "taskfarm engines: %d engines started%s; logs in %s; Ctrl-C stops them"
        % (options["number"], _launcher_note(options), profile.log_dir),
        flush=True,
    )
    await defer.Deferred()
    return 0


async def run_status(reactor, options) -> int:
    from taskfarm.cluster.manage import cluster_status

    status, text = await cluster_status(
        reactor, Profile.from_option(options["profile-dir"]), options["timeout"]
    )
    print(text, file=sys.stdout if status == 0 else sys.stderr, flush=True)
    return status


async def run_stop(reactor, options) -> int:
    from taskfarm.cluster.manage import stop_cluster

    status, text = await stop_cluster(
        reactor, Profile.from_option(options["profile-dir"]), options["timeout"]
    )
    print(text, file=sys.stdout if status == 0 else sys.stderr, flush=True)
    return status


async def run_demo(reactor, options) -> int:
    from taskfarm.cluster.launcher import Cluster, ClusterError

    temporary = options["profile-dir"] is None
    root = tempfile.mkdtemp(prefix="taskfarm-demo-") if temporary else options["profile-dir"]
    profile = Profile.from_option(root)
    cluster = Cluster(profile, options["number"], reactor, start_timeout=options["start-timeout"])
    job = _Job()

    async def clean_up():
        job.kill()
        await cluster.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)

    # Ctrl-C or SIGTERM stops the reactor without reaching the `finally`
    # below: clean up on the way out too.
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.Deferred.fromCoroutine(clean_up())
    )
    try:
        print(
            "demo: starting a controller and %d engines in %s" % (options["number"], profile.root),
            flush=True,
        )
        await cluster.start()
        print("demo: cluster up; running the quick-start job", flush=True)
        env = dict(os.environ, TASKFARM_PROFILE=str(profile.root), PYTHONUNBUFFERED="1")
        status = await job.run(reactor, [sys.executable, "-m", "taskfarm.demo"], env)
    except ClusterError as e:
        print("demo: %s" % e, file=sys.stderr)
        status = 1
    finally:
        restarts = cluster.engine_restarts
        await clean_up()
        print("demo: cluster stopped (%d engine restarts)" % restarts, flush=True)
    print("demo: %s" % ("OK" if status == 0 else "FAILED"))
    return status


class _Job(ChildProcess):
    """A child whose output goes straight to ours; `kill` ends it by PID."""

    def run(self, reactor, argv: list[str], env: dict) -> defer.Deferred:
        """Start the job; fires with its exit status (0 for a signal)."""
        reactor.spawnProcess(self, argv[0], argv, env=env)
        return self.ended.addCallback(lambda reason: getattr(reason, "exitCode", 1) or 0)

    def outReceived(self, data: bytes) -> None:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode(errors="replace"))


_COMMANDS = {
    "cluster": run_cluster,
    "engines": run_engines,
    "status": run_status,
    "stop": run_stop,
    "demo": run_demo,
}


def _info_and_up(event) -> PredicateResult:
    if event.get("log_level", LogLevel.info) >= LogLevel.info:
        return PredicateResult.maybe
    return PredicateResult.no


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``taskfarm`` command."""
    options = Options()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        # The error and where the help is, not the whole help.
        command = "taskfarm" if options.subCommand is None else "taskfarm " + options.subCommand
        print("%s: %s\n%s" % (command, e, help_hint(command)), file=sys.stderr)
        sys.exit(2)
    command = _COMMANDS[options.subCommand]
    sub = options.subOptions
    # The subcommand's own arguments, as given (`--daemon` starts them again).
    sub.raw_argv = argv[argv.index(options.subCommand) + 1 :]

    if options.subCommand in ("cluster", "engines") and not sub.get("daemon"):
        from taskfarm.cluster.manage import DAEMON_ENV

        if os.environ.get(DAEMON_ENV) == "1":
            # A detached run (`--daemon`): its output, cluster.out, rotates.
            from taskfarm import logfiles

            profile = Profile.from_option(sub.get("profile-dir"))
            logfiles.redirect_stdio(profile.log_dir / "cluster.out")
        # The launcher's own news (restarts, clean exits) goes to stdout.
        globalLogBeginner.beginLoggingTo(
            [FilteringLogObserver(textFileLogObserver(sys.stdout), [_info_and_up])],
            redirectStandardIO=False,
        )

    async def run(reactor):
        status = await command(reactor, sub)
        if status:
            raise SystemExit(status)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
