"""A test case base for tests that drive real `taskfarm` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from taskfarm.childprocess import OutputChild, exit_status
from taskfarm.cluster.slots import signal_if_alive
from taskfarm.profile import Profile
from taskfarm.testing.helpers import children_of, proc_stat, temp_dir, wait_until

#: How to run the `taskfarm` command with this interpreter.
TASKFARM = [sys.executable, "-c", "from taskfarm.cli import main; main()"]


def processes_naming(text: str) -> list[int]:
    """The live processes whose command line names `text` (a temporary
    profile folder: unique to the test)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc/%s/cmdline" % entry).read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = proc_stat(int(entry))
        if text in cmdline and fields is not None and fields[0] != "Z":
            found.append(int(entry))
    return found


async def run_python(script: str, profile: str, limit: float = 90, **env) -> tuple[int, dict, str]:
    """Run `script` in a fresh Python process that sees this checkout and
    the cluster of `profile` (TASKFARM_PROFILE); `env` adds variables.
    Returns its exit status, the ``name=<json>`` lines it printed as a
    dict, and its stderr.  A child still running after `limit` seconds is
    SIGKILLed by PID, so none is ever left behind."""
    from twisted.internet import reactor

    child = OutputChild()
    environment = dict(
        os.environ, TASKFARM_PROFILE=profile, PYTHONPATH=os.pathsep.join(sys.path),
        PYTHONUNBUFFERED="1", **env,
    )
    reactor.spawnProcess(child, sys.executable, [sys.executable, "-c", script], env=environment)
    killer = reactor.callLater(limit, child.kill)
    code = exit_status(await child.ended)
    if killer.active():
        killer.cancel()
    answers = {}
    for line in child.out.decode().splitlines():
        name, sep, value = line.partition("=")
        if sep:
            answers[name] = json.loads(value)
    return code, answers, child.err.decode()


def kill_if_alive(pid: int, started: str, signum: int = signal.SIGKILL) -> bool:
    """Signal `pid` only if it is still the process that started at `started`."""
    return started is not None and signal_if_alive(pid, started, signum)


class ProcessTestCase(unittest.TestCase):
    """A temporary folder, processes whose output goes to files there, and
    the end of every process it started (and of their children), by PID."""

    timeout = 120
    #: The folder the processes run in.
    cwd: str | None = None

    def setUp(self):
        self.root = temp_dir(self, "taskfarm-proc-test-")
        #: Every child seen of a process started here: {pid: start time}.
        self.seen_children: dict[int, str] = {}

    def env(self, **extra) -> dict:
        """This environment, unbuffered, without TASKFARM_PROFILE, plus `extra`."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TASKFARM_PROFILE", None)
        env.update(extra)
        return env

    def spawn(self, argv: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        """Start a process whose output goes to NAME.out; ended at cleanup."""
        out = open(self.root / (name + ".out"), "wb")
        self.addCleanup(out.close)
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, env=env or self.env()
        )
        self.addCleanup(self._end, process)
        return process

    def output(self, name: str) -> str:
        return (self.root / (name + ".out")).read_text(errors="replace")

    def remember_children(self, parent: int) -> dict[int, tuple[str, str]]:
        """The children of `parent` now; each is killed at cleanup if alive."""
        children = children_of(parent)
        for pid, (started, _) in children.items():
            self.seen_children[pid] = started
        return children

    def children(self, launcher: subprocess.Popen, kind: str) -> dict[int, str]:
        """{pid: start time} of the launcher's live children whose command
        line names `kind` (``taskengine`` or ``taskcontroller``)."""
        found = {}
        for pid, (started, cmdline) in children_of(launcher.pid).items():
            self.seen_children[pid] = started
            if kind in cmdline:
                found[pid] = started
        return found

    async def _end(self, process: subprocess.Popen) -> None:
        # SIGTERM lets a launcher stop its children; then SIGKILL whatever is
        # left: the process first (or it would restart them), then every
        # child seen, each by PID.
        if process.poll() is None:
            self.remember_children(process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                await wait_until(lambda: process.poll() is not None, "exit", 15, 0.1)
            except AssertionError:
                process.kill()
        process.wait(10)
        for pid, started in self.seen_children.items():
            kill_if_alive(pid, started)

    async def wait_for_exit(self, process: subprocess.Popen, name: str, timeout: float) -> int:
        """The exit status of `process`, which must end within `timeout`."""
        try:
            await wait_until(lambda: process.poll() is not None, name + " to exit", timeout)
        except AssertionError:
            raise AssertionError(
                "%s did not exit within %g s; its output:\n%s" % (name, timeout, self.output(name))
            ) from None
        return process.returncode

    async def start_launcher(
        self, n: int = 2, timeout: float = 120, options: tuple[str, ...] = (), name: str = "launcher"
    ) -> tuple[subprocess.Popen, Profile]:
        """`taskfarm cluster -n N --profile-dir D [options]`, up once it says
        so; its output goes to NAME.out."""
        profile = Profile(self.root / "profile")
        launcher = self.spawn(
            TASKFARM + ["cluster", "-n", str(n), "--profile-dir", str(profile.root), *options],
            name,
        )

        def up():
            if launcher.poll() is not None:
                raise AssertionError(
                    "taskfarm cluster exited with %s:\n%s"
                    % (launcher.returncode, self.output(name))
                )
            return "Press Ctrl-C to stop." in self.output(name)

        await wait_until(up, "taskfarm cluster to start", timeout)
        return launcher, profile
