"""Managing a cluster: its state file, ``status``, ``stop`` and ``--daemon``.

Every ``taskfarm cluster`` records itself in ``PROFILE/cluster.json``
(0600) once its controller holds the profile, and keeps it current while
it runs (`StateRecorder`): its own pid, its launcher's name, the
controller's pid and location, and its launcher's ``describe()``.

- `cluster_status` asks the running controller, through the profile's Task
  and MultiEngine furl files, for its engines and queue counts, and adds
  what the state file says of the launcher.
- `stop_cluster` sends SIGTERM to the launcher process named there, which
  stops everything it started (every node, through its launcher's
  ``stop()``), and waits, bounded.  If that process is gone or does not
  stop in time, it kills what the file says it started, by pid (and start
  time, so never a later process given the same pid), or calls the
  launcher class's ``clean_up`` for engines elsewhere.
- `run_daemon` starts ``taskfarm cluster`` detached (its own session,
  stdin closed, output to ``PROFILE/log/cluster.out``, which it rotates by
  size) and returns once the state file says all its engines registered.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet import task
from twisted.logger import Logger

from taskfarm.cluster.slots import process_alive, process_start_time, signal_if_alive
from taskfarm.logfiles import read_since
from taskfarm.profile import MULTIENGINE, TASK, Profile, in_use_error, read_holder, write_secret

#: Seconds between two refreshes of the state file.
STATE_REFRESH = 2.0

#: Set in the environment of the detached ``taskfarm cluster`` of --daemon.
DAEMON_ENV = "TASKFARM_CLUSTER_DAEMON"

#: Phases of the state file.
STARTING, RUNNING, STOPPING = "starting", "running", "stopping"

_log = Logger()


def read_state(profile: Profile) -> dict | None:
    """The state file's data, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(profile.state_file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(profile: Profile, state: dict) -> None:
    write_secret(profile.state_file, json.dumps(state, indent=1, sort_keys=True) + "\n")


def _launcher_alive(state: dict) -> bool:
    launcher = state.get("launcher") or {}
    return process_alive(launcher.get("pid"), launcher.get("started"))


class StateRecorder:
    """Keeps ``cluster.json`` current for the `Cluster` of this process."""

    def __init__(
        self,
        profile: Profile,
        cluster,
        launcher_name: str,
        reactor,
        daemon: bool = False,
        options: dict | None = None,
        clock=time.time,
    ):
        self.profile = profile
        self._options = dict(options or {})
        self._cluster = cluster
        self._name = launcher_name
        self._reactor = reactor
        self._daemon = daemon
        self._clock = clock
        self._loop: task.LoopingCall | None = None
        self.phase: str | None = None
        self._last: str | None = None

    def state(self) -> dict:
        controller = self._cluster.controller
        pid = controller.pid if controller is not None else None
        holder = read_holder(self.profile)
        me = os.getpid()
        return {
            "phase": self.phase,
            "launcher": {
                "pid": me,
                "started": process_start_time(me),
                "name": self._name,
                "daemon": self._daemon,
                "host": socket.gethostname(),
                "engines_requested": self._cluster.n,
            },
            "controller": {
                "pid": pid,
                "started": process_start_time(pid) if pid else None,
                "location": holder.location if holder is not None and holder.pid == pid else None,
                "since": holder.since if holder is not None and holder.pid == pid else None,
            },
            "engines": self._cluster.launcher.describe(),
            # The launcher's own options, for its class's clean_up.
            "options": self._options,
        }

    def record(self, phase: str | None = None) -> None:
        if phase is not None:
            self.phase = phase
        if self.phase is None:
            return
        state = self.state()
        text = json.dumps(state, sort_keys=True)
        if text != self._last:  # rewritten only when something changed
            self._last = text
            state["updated"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._clock()))
            write_state(self.profile, state)

    def start(self, phase: str = STARTING) -> None:
        """Record `phase` now, and keep the file current every `STATE_REFRESH` s."""
        self.record(phase)
        if self._loop is None:
            self._loop = task.LoopingCall(self.record)
            self._loop.clock = self._reactor
            self._loop.start(STATE_REFRESH, now=False)

    def stopping(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.phase is not None:
            self.record(STOPPING)

    def remove(self) -> None:
        """The cluster is gone: so is its state file (if it is still ours)."""
        state = read_state(self.profile)
        if state is not None and (state.get("launcher") or {}).get("pid") == os.getpid():
            self.profile.state_file.unlink(missing_ok=True)


# -- taskfarm status ---------------------------------------------------------------


def _no_cluster(profile: Profile, state: dict | None) -> str:
    text = "taskfarm status: no cluster runs on profile %s" % profile.root
    if state is not None:
        text += " (its cluster.json names launcher pid %s, which is gone)" % (
            (state.get("launcher") or {}).get("pid"),
        )
    return text


def summary_lines(summary, dashboard: str | None) -> list[str]:
    """The cluster summary (a `wire.ClusterSummary`), as the dashboard's
    summary panel shows it, in lines of ``taskfarm status``."""
    return [
        "tasks:      %s" % ", ".join("%s %s" % (k, v) for k, v in sorted(summary.queue.items())),
        "rates:      %.1f tasks/s, %.1f failures/s (last 10 s)"
        % (summary.tasks_per_second, summary.failures_per_second),
        "totals:     %d succeeded, %d failed, %d aborted, %d attempts retried since the controller started"
        % (summary.succeeded_total, summary.failed_total, summary.aborted_total, summary.retried_total),
        "dashboard:  %s" % (dashboard or "off (start the controller with --dashboard tcp:8765)"),
    ]


def dashboard_url(profile: Profile) -> str | None:
    """The running controller's dashboard URL (with its token), or None."""
    try:
        return profile.dashboard_url_file.read_text().strip() or None
    except OSError:
        return None


async def cluster_status(reactor, profile: Profile, timeout: float = 10.0) -> tuple[int, str]:
    """(exit status, text) of ``taskfarm status``: 0 with the cluster's
    state, 1 when no cluster runs on `profile`."""
    from taskfarm.asyncclient import MultiEngineClient, TaskClient
    from taskfarm.errors import TaskfarmError

    state = read_state(profile)
    holder = read_holder(profile)
    if holder is None:
        if state is not None and _launcher_alive(state):
            return 1, (
                "taskfarm status: launcher pid %s runs on profile %s, but no controller holds "
                "it now (starting, or restarting its controller)"
                % (state["launcher"]["pid"], profile.root)
            )
        return 1, _no_cluster(profile, state)
    lines = [
        "profile:    %s" % profile.root,
        "controller: pid %s since %s, listening on %s" % (holder.pid, holder.since, holder.location),
    ]
    if state is not None and _launcher_alive(state):
        launcher = state["launcher"]
        lines.append(
            "launcher:   pid %s, --launcher %s%s, %s engines requested, %s"
            % (
                launcher["pid"],
                launcher["name"],
                " (--daemon)" if launcher.get("daemon") else "",
                launcher.get("engines_requested"),
                state.get("phase"),
            )
        )
    else:
        lines.append("launcher:   none (this controller was not started by `taskfarm cluster`)")
        state = None
    tc = TaskClient(profile.furl_file(TASK), reactor, connect_timeout=timeout, reconnect_timeout=timeout)
    mec = MultiEngineClient(
        profile.furl_file(MULTIENGINE), reactor, connect_timeout=timeout, reconnect_timeout=timeout
    )
    try:
        ids = await mec.get_ids()
        properties = await mec.get_properties(["hostname", "pid"], targets=ids) if ids else []
        queues = await mec.queue_status(targets=ids) if ids else []
        summary = await tc.status()
    except TaskfarmError as e:
        lines.append("the controller did not answer: %s" % e)
        return 1, "\n".join(lines)
    finally:
        await tc.disconnect()
        await mec.disconnect()
    lines.append("engines:    %d registered" % len(ids))
    if ids:
        lines.append("  %4s  %-20s %8s  %-16s %s" % ("id", "host", "pid", "state", "tasks"))
    for engine_id, props, (_, queue) in zip(ids, properties, queues, strict=False):
        ops = ([queue["pending"]] if queue.get("pending") else []) + list(queue.get("queue", []))
        busy = "running " + queue["pending"] if queue.get("pending") else "idle"
        lines.append(
            "  %4d  %-20s %8s  %-16s %d"
            % (engine_id, props.get("hostname"), props.get("pid"), busy, ops.count("task"))
        )
    lines.extend(summary_lines(summary, dashboard_url(profile)))
    if state is not None and state.get("engines"):
        lines.append("launched by %s:" % state["launcher"]["name"])
        for entry in state["engines"]:
            where = "pid %s" % entry["pid"] if entry.get("pid") else "job %s" % entry.get("job")
            lines.append(
                "  %-20s %-20s %s %s"
                % (entry.get("label"), entry.get("host"), where, entry.get("state", ""))
            )
    return 0, "\n".join(lines)


# -- taskfarm stop -----------------------------------------------------------------


def _recorded_processes(state: dict) -> list[tuple[str, int, str | None]]:
    """(label, pid, start time) of the processes of this machine that the
    state file says the cluster started."""
    here = socket.gethostname()
    found = []
    controller = state.get("controller") or {}
    if controller.get("pid"):
        found.append(("controller", controller["pid"], controller.get("started")))
    for entry in state.get("engines") or []:
        if entry.get("pid") and entry.get("host", here) == here and "started" in entry:
            found.append((str(entry.get("label")), entry["pid"], entry.get("started")))
    return found


async def _gone(reactor, check, timeout: float) -> bool:
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() >= deadline:
            return False
        await task.deferLater(reactor, 0.1, lambda: None)
    return True


async def stop_cluster(reactor, profile: Profile, timeout: float = 30.0) -> tuple[int, str]:
    """(exit status, text) of ``taskfarm stop``: 0 once everything the
    cluster started is gone, 1 when there was nothing to stop or something
    could not be stopped."""
    state = read_state(profile)
    holder = read_holder(profile)
    if state is None or (
        not _launcher_alive(state)
        and holder is None
        and not any(process_alive(pid, started) for _, pid, started in _recorded_processes(state))
        and not (_clean_up_of(state) and state.get("engines"))
    ):
        if holder is not None:
            return 1, (
                "taskfarm stop: controller pid %d holds profile %s, but no `taskfarm cluster` "
                "started it (no cluster.json); stop it where it was started (kill %d)"
                % (holder.pid, profile.root, holder.pid)
            )
        text = "taskfarm stop: no cluster runs on profile %s" % profile.root
        if state is not None:
            text += " (its cluster.json names launcher pid %s, gone with all it started)" % (
                (state.get("launcher") or {}).get("pid"),
            )
            profile.state_file.unlink(missing_ok=True)
        return 1, text
    launcher = state.get("launcher") or {}
    pid, started = launcher.get("pid"), launcher.get("started")
    recorded = _recorded_processes(state)
    notes = []
    # Whether the launcher stopped its engines itself (else: clean up here).
    stopped_itself = False
    if signal_if_alive(pid, started, signal.SIGTERM):
        if await _gone(reactor, lambda: not process_alive(pid, started), timeout):
            stopped_itself = True
            notes.append("launcher pid %d stopped its controller and engines" % pid)
        else:
            signal_if_alive(pid, started, signal.SIGKILL)
            notes.append("launcher pid %d did not stop within %g s: killed it" % (pid, timeout))
    else:
        notes.append("launcher pid %s was gone" % pid)
    # Whatever is still running of what it started (a launcher killed, or
    # one that could not stop everything): killed by pid.
    if any(process_alive(p, s) for _, p, s in recorded):
        # Its children die with it (parent-death signal): give them a moment.
        await _gone(reactor, lambda: not any(process_alive(p, s) for _, p, s in recorded), 2.0)
    killed = [label for label, p, s in recorded if signal_if_alive(p, s, signal.SIGKILL)]
    if killed:
        notes.append("killed what was left: %s" % ", ".join(killed))
    if not stopped_itself:
        await _clean_up_elsewhere(reactor, profile, state, notes)
    await _gone(reactor, lambda: not any(process_alive(p, s) for _, p, s in recorded), 5.0)
    left = ["%s (pid %d)" % (label, p) for label, p, s in recorded if process_alive(p, s)]
    if left:
        return 1, "taskfarm stop: %s; still running: %s" % ("; ".join(notes), ", ".join(left))
    profile.state_file.unlink(missing_ok=True)
    return 0, "taskfarm stop: stopped the cluster on profile %s (%s; %d processes, none left)" % (
        profile.root,
        "; ".join(notes),
        len(recorded) + 1,
    )


def _clean_up_of(state: dict):
    """The ``clean_up`` of the state file's launcher class, or None."""
    from taskfarm.cluster.launchers import LAUNCHERS

    name = (state.get("launcher") or {}).get("name", "")
    return getattr(LAUNCHERS.get(name), "clean_up", None)


async def _clean_up_elsewhere(reactor, profile: Profile, state: dict, notes: list) -> None:
    """A launcher gone without stopping its engines: its class's
    ``clean_up`` for engines on other nodes or in jobs, if it has one."""
    name = (state.get("launcher") or {}).get("name", "")
    clean_up = _clean_up_of(state)
    if clean_up is None:
        return
    try:
        await clean_up(reactor, profile, state.get("engines") or [], state.get("options") or {})
        notes.append("the %s launcher cleaned up its engines" % name)
    except Exception as e:  # noqa: BLE001  (reported, not raised)
        notes.append("the %s launcher's clean-up failed: %s" % (name, e))


# -- taskfarm cluster --daemon -------------------------------------------------------


def without_daemon(argv: list[str]) -> list[str]:
    """`argv` without ``--daemon`` (nor an abbreviation of it)."""
    return [a for a in argv if not (len(a) > 3 and "--daemon".startswith(a))]


async def run_daemon(reactor, argv: list[str], profile: Profile, timeout: float) -> int:
    """Start ``taskfarm cluster ARGV`` detached; 0 once all its engines
    registered (printing where the controller is), 1 if it failed (with
    its last words), within `timeout` seconds."""
    holder = read_holder(profile)
    if holder is not None:
        print("taskfarm cluster: %s" % in_use_error(profile, holder), file=sys.stderr)
        return 1
    profile.ensure()
    out_path = profile.log_dir / "cluster.out"
    # Owner-only, as every log (the child's `logfiles.redirect_stdio` keeps it so).
    with os.fdopen(os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as out:
        offset = out.tell()
        child = subprocess.Popen(
            [sys.executable, "-c", "from taskfarm.cli import main; main()", "cluster", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **{DAEMON_ENV: "1"}),
        )

    def up() -> bool:
        state = read_state(profile)
        return (
            state is not None
            and (state.get("launcher") or {}).get("pid") == child.pid
            and state.get("phase") == RUNNING
        )

    await _gone(reactor, lambda: up() or child.poll() is not None, timeout)
    if up():
        state = read_state(profile)
        print(
            "taskfarm cluster: running in the background: launcher pid %d, controller pid %s "
            "listening on %s, %d engines registered\n"
            "  logs: %s\n  taskfarm status --profile-dir %s\n  taskfarm stop --profile-dir %s"
            % (
                child.pid,
                state["controller"]["pid"],
                state["controller"]["location"],
                state["launcher"]["engines_requested"],
                profile.log_dir,
                profile.root,
                profile.root,
            ),
            flush=True,
        )
        return 0
    if child.poll() is None:
        # Took too long: stop it (it stops what it started), by pid.
        child.terminate()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)
        why = "did not register all its engines within %g s" % timeout
    else:
        why = "exited with status %d" % child.returncode
    # It rotates (`logfiles.redirect_stdio`): what it wrote may begin in cluster.out.1.
    words = read_since(out_path, offset).decode(errors="replace").strip()
    print("taskfarm cluster: the background cluster %s:\n%s" % (why, words), file=sys.stderr)
    return 1
