"""The ``taskfarm`` command: ``cluster``, ``engines`` and ``demo``.

    taskfarm cluster -n 4          controller + 4 engines; Ctrl-C stops them all
    taskfarm engines -n 4 --furl-file F   4 engines for a controller elsewhere
    taskfarm demo                  a cluster, the quick-start job, a clean stop
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from twisted.internet import defer, task
from twisted.python import usage

from taskfarm.profile import ENGINE, INTERFACES, Profile


class _ClusterOptions(usage.Options):
    optParameters = [
        ["n", "n", 4, "How many engines.", int],
        ["profile-dir", "p", None, "The profile folder (default ~/.taskfarm or $TASKFARM_PROFILE)."],
        ["start-timeout", None, 60.0, "Seconds to wait for the controller and engines.", float],
    ]

    def postOptions(self) -> None:
        if self["n"] < 0:
            raise usage.UsageError("-n must be >= 0")


class ClusterOptions(_ClusterOptions):
    synopsis = "[-n N] [--profile-dir DIR] [--listen ENDPOINT --location HOST:PORT] [--scheduler NAME]"
    optParameters = [
        ["listen", None, None, "Passed to the controller (default: loopback)."],
        ["location", None, None, "Passed to the controller."],
        ["scheduler", None, None, "Passed to the controller: dotted scheduler class name."],
    ]

    def controller_options(self) -> list[str]:
        argv = []
        for name in ("listen", "location", "scheduler"):
            if self[name]:
                argv += ["--" + name, self[name]]
        return argv


class EnginesOptions(usage.Options):
    synopsis = "-n N --furl-file FILE"
    optParameters = [
        ["n", "n", 1, "How many engines.", int],
        ["furl-file", "f", None, "The controller's engine furl file (copied from its profile)."],
        ["profile-dir", "p", None, "Profile folder for logs (default ~/.taskfarm)."],
    ]

    def postOptions(self) -> None:
        if self["n"] < 1:
            raise usage.UsageError("-n must be >= 1")
        if self["furl-file"] is None:
            self["furl-file"] = str(Profile.from_option(self["profile-dir"]).furl_file(ENGINE))


class DemoOptions(_ClusterOptions):
    synopsis = "[-n N] [--profile-dir DIR]"


class Options(usage.Options):
    synopsis = "taskfarm COMMAND [options]"
    subCommands = [
        ["cluster", None, ClusterOptions, "Run a controller and N engines until Ctrl-C."],
        ["engines", None, EnginesOptions, "Run N engines for a controller elsewhere."],
        ["demo", None, DemoOptions, "Start a cluster, run the quick-start job, stop."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: cluster, engines or demo")


def _stop_on_shutdown(reactor, cluster) -> None:
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.Deferred.fromCoroutine(cluster.stop())
    )


async def run_cluster(reactor, options) -> int:
    from taskfarm.cluster.launcher import Cluster, ClusterError

    profile = Profile.from_option(options["profile-dir"])
    cluster = Cluster(
        profile,
        options["n"],
        reactor,
        controller_options=options.controller_options(),
        start_timeout=options["start-timeout"],
    )
    _stop_on_shutdown(reactor, cluster)
    try:
        await cluster.start()
    except ClusterError as e:
        print("taskfarm cluster: %s" % e, file=sys.stderr)
        return 1
    print("taskfarm cluster: controller (pid %d) and %d engines running" % (cluster.controller.pid, options["n"]))
    for interface in INTERFACES:
        print("  %-12s furl file: %s" % (interface, profile.furl_file(interface)))
    print("  logs: %s\nPress Ctrl-C to stop." % profile.log_dir, flush=True)
    await defer.Deferred()  # until a signal stops the reactor
    return 0


async def run_engines(reactor, options) -> int:
    from taskfarm.cluster.launcher import ProcessSlot, twisted_argv

    profile = Profile.from_option(options["profile-dir"])
    profile.ensure()
    slots = [
        ProcessSlot(
            "engine %d" % i,
            twisted_argv("taskengine", "--furl-file", options["furl-file"]),
            profile.log_dir / ("remote-engine-%d.out" % i),
            reactor,
        )
        for i in range(options["n"])
    ]

    async def stop():
        await defer.gatherResults([defer.Deferred.fromCoroutine(s.stop()) for s in slots])

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.Deferred.fromCoroutine(stop()))
    for slot in slots:
        slot.start()
    print("taskfarm engines: %d engines started; logs in %s; Ctrl-C stops them" % (len(slots), profile.log_dir), flush=True)
    await defer.Deferred()
    return 0


async def run_demo(reactor, options) -> int:
    from taskfarm.cluster.launcher import Cluster, ClusterError

    temporary = options["profile-dir"] is None
    root = tempfile.mkdtemp(prefix="taskfarm-demo-") if temporary else options["profile-dir"]
    profile = Profile.from_option(root)
    cluster = Cluster(profile, options["n"], reactor, start_timeout=options["start-timeout"])
    # Ctrl-C or SIGTERM stops the reactor without reaching the `finally`
    # below: stop the children on the way out too.
    _stop_on_shutdown(reactor, cluster)
    try:
        print("demo: starting a controller and %d engines in %s" % (options["n"], profile.root), flush=True)
        await cluster.start()
        print("demo: cluster up; running the quick-start job", flush=True)
        status = await _run_job(reactor, profile)
    except ClusterError as e:
        print("demo: %s" % e, file=sys.stderr)
        status = 1
    finally:
        await cluster.stop()
        print("demo: cluster stopped (%d engine restarts)" % cluster.engine_restarts, flush=True)
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    print("demo: %s" % ("OK" if status == 0 else "FAILED"))
    return status


async def _run_job(reactor, profile: Profile) -> int:
    from twisted.internet import utils

    env = dict(os.environ, TASKFARM_PROFILE=str(profile.root), PYTHONUNBUFFERED="1")
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, ["-m", "taskfarm.demo"], env=env
    )
    sys.stdout.write(out.decode())
    sys.stderr.write(err.decode())
    return code


_COMMANDS = {"cluster": run_cluster, "engines": run_engines, "demo": run_demo}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``taskfarm`` command."""
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print("%s\n\ntaskfarm: %s" % (options, e), file=sys.stderr)
        sys.exit(2)
    command = _COMMANDS[options.subCommand]
    sub = options.subOptions

    async def run(reactor):
        status = await command(reactor, sub)
        if status:
            raise SystemExit(status)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
