"""A real SLURM for tests: ``munged``, ``slurmctld`` and ``slurmd`` in a
temporary folder, this machine as one node with several CPU slots.

Everything lives in the folder it is given: the munge key (made for the
test) and munged's socket, ``slurm.conf``, the state and spool folders, the
logs and pid files.  The daemons listen on free unprivileged ports of
127.0.0.1 and run in the foreground as children of the test, so they are
stopped by PID.  Commands (``sbatch``, ``squeue`` ...) find this SLURM
through `env` (``SLURM_CONF``).

The three settings that make a SLURM run here, in a container of two cores
without cgroups of its own: ``SlurmdParameters=config_overrides`` (the node
claims `cpus` CPUs, whatever the hardware says), ``ProctrackType=
proctrack/linuxproc`` and ``TaskPlugin=task/none`` (no cgroups).  ``KillWait=2``
and ``OverTimeLimit=0`` make ending jobs quick; ``MinJobAge=2`` lets
``squeue`` forget ended jobs soon.  `CONF` is the template of the whole file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

from twisted.internet import defer, task

from taskfarm.childprocess import ChildProcess
from taskfarm.cluster.batchsystems import run_command
from taskfarm.testing.helpers import is_alive, proc_stat

#: The command that installs what this harness needs.
INSTALL = "apt-get install -y slurm-wlm munge"

#: The programs it runs.
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")

#: slurm.conf; ``{root}`` is the harness's folder.
CONF = """\
ClusterName=taskfarmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge-socket/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
ReturnToService=2
OverTimeLimit=0
KillWait=2
InactiveLimit=0
MinJobAge=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmMissing(AssertionError):
    """A program this harness needs is not installed."""


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Daemon(ChildProcess):
    def __init__(self, name: str, log_path: Path) -> None:
        super().__init__()
        self.name = name
        self._log = open(log_path, "ab")
        self.last_pid: int | None = None

    def connectionMade(self) -> None:
        self.last_pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self._log.write(data)
        self._log.flush()

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self._log.close()
        super().processEnded(reason)


class SlurmHarness:
    """munged + slurmctld + slurmd in `root` (which the caller removes).

    ``await start()`` brings them up and waits until the node is idle;
    ``await stop()`` cancels every job, waits until none is left, and stops
    the daemons by PID (SIGKILL after a grace period).
    """

    def __init__(self, reactor, root: Path, cpus: int = 8) -> None:
        self.reactor = reactor
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._daemons: list[_Daemon] = []
        #: Processes `stop` had to SIGKILL after the daemons were gone
        #: ({pid: command line}): what a launcher left behind.
        self.leftovers: dict[int, str] = {}

    def _write_files(self) -> None:
        # munged insists: a socket folder everyone may enter, a key only
        # its owner reads.
        os.chmod(self.root, 0o755)
        for name in ("state", "spool", "log", "run", "munge", "munge-socket"):
            (self.root / name).mkdir()
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        self.conf.write_text(
            CONF.format(
                root=self.root,
                host=self.host,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                user="root",
                cpus=self.cpus,
            )
        )

    def _spawn(self, name: str, argv: list[str]) -> _Daemon:
        daemon = _Daemon(name, self.root / "log" / ("%s.out" % name))
        self.reactor.spawnProcess(daemon, argv[0], argv, env=self.env)
        self._daemons.append(daemon)
        return daemon

    async def start(self, timeout: float = 30.0) -> None:
        missing = missing_programs()
        if missing:
            raise SlurmMissing("%s not found: %s" % (", ".join(missing), INSTALL))
        if os.geteuid() != 0:
            raise SlurmMissing("slurmd must run as root for this harness (uid %d)" % os.geteuid())
        self._write_files()
        munge = self.root / "munge"
        sock = self.root / "munge-socket" / "munge.socket"
        self._spawn(
            "munged",
            [
                shutil.which("munged"),
                "--foreground",
                "--socket=%s" % sock,
                "--key-file=%s" % (munge / "munge.key"),
                "--pid-file=%s" % (munge / "munged.pid"),
                "--log-file=%s" % (munge / "munged.log"),
                "--seed-file=%s" % (munge / "munged.seed"),
            ],
        )
        await self._until(lambda: sock.exists(), "munged's socket", timeout)
        self._spawn("slurmctld", [shutil.which("slurmctld"), "-D", "-f", str(self.conf)])
        await self._until_command(["scontrol", "ping"], "UP", "slurmctld", timeout)
        self._spawn("slurmd", [shutil.which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        await self._until_command(
            ["sinfo", "--noheader", "--format=%T"], "idle", "the node idle", timeout
        )

    def _check_daemons(self) -> None:
        for daemon in self._daemons:
            if daemon.ended.called:
                out = (self.root / "log" / ("%s.out" % daemon.name)).read_text(errors="replace")
                words = [line for line in out.splitlines() if line.strip()][-3:]
                raise AssertionError(
                    "%s exited at start (%s); see %s"
                    % (daemon.name, " / ".join(words), self.root / "log")
                )

    async def _until(self, condition, what: str, timeout: float) -> None:
        deadline = self.reactor.seconds() + timeout
        while not condition():
            self._check_daemons()
            if self.reactor.seconds() > deadline:
                raise AssertionError(
                    "no %s within %g s; see %s" % (what, timeout, self.root / "log")
                )
            await task.deferLater(self.reactor, 0.1, lambda: None)

    async def _until_command(self, argv, expected: str, what: str, timeout: float) -> None:
        said = [""]

        async def check():
            result = await self.run(*argv)
            said[0] = result.out.strip()
            return expected in said[0].split()

        deadline = self.reactor.seconds() + timeout
        while not await check():
            self._check_daemons()
            if self.reactor.seconds() > deadline:
                raise AssertionError(
                    "%s not up within %g s (%r); see %s"
                    % (what, timeout, said[0], self.root / "log")
                )
            await task.deferLater(self.reactor, 0.2, lambda: None)

    async def run(self, *argv: str):
        """Run a SLURM command against this cluster; its `CommandResult`."""
        return await run_command(
            self.reactor, [shutil.which(argv[0]) or argv[0], *argv[1:]], self.env
        )

    async def jobs(self) -> dict[str, str]:
        """{job id: state} of every job ``squeue`` lists (array tasks one by one)."""
        result = await self.run("squeue", "--noheader", "--array", "--format=%i %T")
        if not result.ok:
            raise AssertionError(result.describe())
        return dict(line.split()[:2] for line in result.out.splitlines() if line.strip())

    def log_text(self) -> str:
        """slurmctld's log so far."""
        try:
            return (self.root / "log" / "slurmctld.log").read_text(errors="replace")
        except OSError:
            return ""

    async def stop(self, timeout: float = 20.0) -> None:
        """Cancel every job, then stop the daemons; leaves no process."""
        try:
            if self._daemons and not self._daemons[-1].ended.called:
                await self._cancel_everything(timeout)
        finally:
            for daemon in reversed(self._daemons):
                await self._stop_daemon(daemon)
            self._kill_leftovers()

    async def _cancel_everything(self, timeout: float) -> None:
        deadline = self.reactor.seconds() + timeout
        while True:
            jobs = await self.jobs()
            if not jobs:
                return
            await self.run("scancel", "--full", *sorted({j.split("_")[0] for j in jobs}))
            if self.reactor.seconds() > deadline:
                raise AssertionError("jobs left after %g s: %s" % (timeout, jobs))
            await task.deferLater(self.reactor, 0.3, lambda: None)

    async def _stop_daemon(self, daemon: _Daemon, grace: float = 5.0) -> None:
        if daemon.ended.called:
            return
        daemon.signal(signal.SIGTERM)
        kill = self.reactor.callLater(grace, daemon.kill)
        waiter: defer.Deferred = defer.Deferred()
        daemon.ended.addBoth(lambda r: waiter.callback(None) or r)
        await waiter
        if kill.active():
            kill.cancel()

    def _kill_leftovers(self) -> None:
        """SIGKILL any process still pointing at this cluster (a slurmstepd
        or a job's program outliving slurmd): found by SLURM_CONF in its
        environment or its folder in its command line."""
        mark_env = ("SLURM_CONF=%s" % self.conf).encode()
        mark_arg = str(self.root).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                environ = Path("/proc/%d/environ" % pid).read_bytes().split(b"\0")
                cmdline = Path("/proc/%d/cmdline" % pid).read_bytes()
            except OSError:
                continue
            if mark_env in environ or mark_arg in cmdline:
                fields = proc_stat(pid)
                if fields is not None and is_alive(pid, fields[19]):
                    self.leftovers[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace")
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
