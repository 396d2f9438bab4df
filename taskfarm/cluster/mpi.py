"""The ``mpiexec`` launcher: N engines as the N ranks of one MPI job.

`MPIExecLauncher.start(n, furl_file, options)` runs::

    mpiexec -n N [-hostfile FILE] [MPI OPTIONS] python -m twisted taskengine \\
        --furl-file FURL_FILE --mpi [ENGINE OPTIONS]

Each rank is an engine started with ``--mpi`` (`taskfarm.engine.mpi`): it
asks for the engine id equal to its rank and has ``mpi`` (``mpi4py.MPI``)
in its namespace when mpi4py is importable.  The engines read the furl
from the furl FILE named in their argv, so the ranks must see that file
(this machine, or a filesystem shared with the hosts of `-hostfile`); the
furl itself is in no argv and no environment.

One mpiexec job holds all N engines:

- `watch` callbacks hear of each rank of this machine that ends (the
  launcher looks at the job's processes every `POLL_PERIOD` seconds) and,
  when the whole job ends, of every rank still counted;
- `stop()` sends SIGTERM to mpiexec (which passes it on to the ranks),
  SIGKILL to its process group after a grace period, and then SIGKILL by
  pid to every process of the job it saw (the ranks are session leaders of
  their own, so the group does not reach them), and waits until each is
  gone;
- the ranks follow the launcher (`taskfarm.engine.mpi.follow_mpi_launcher`):
  a launcher killed with kill -9 takes its MPI job with it within seconds.

Restart policy.  An MPI job is restarted only as a whole: a rank that dies
while the others go on is reported (`watch`) and its engine is lost to the
controller like any other, but it is not started again (an MPI world
cannot grow a rank back).  When the whole job ends without `stop()`, it is
started again after a back-off (`taskfarm.backoff`, doubling from
``RESTART_BACKOFF[0]`` to ``RESTART_BACKOFF[1]`` seconds), at most
``--mpi-restarts`` times in a row (default 3; a job that lived
``LONG_LIFE`` seconds starts the count afresh).  A job stays down when
mpiexec exits with `EXIT_KILLED` or `EXIT_REFUSED`, or when any of its
ranks said it stopped for a MultiEngine kill (`exitcodes.EXIT_LINE` in the
job's output: mpiexec's own exit status need not be the rank's).  A
MultiEngine kill of one rank so ends the whole job, as MPI aborts the
world when one rank leaves it.

Each rank writes its own log (``--log-file``, `rank_log_template`:
``PROFILE/log/mpiexec-N-rank-R.log``, rotated); mpiexec's own output goes to
``PROFILE/log/mpiexec-N.out`` (`log_path`, rotated), N claimed per launcher
(`taskfarm.logfiles.claim_log_name`).  A rank logging to its file still
writes `exitcodes.EXIT_LINE` to its own stderr, which mpiexec passes on.
"""

from __future__ import annotations

import enum
import os
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from taskfarm import backoff as backoffs
from taskfarm import exitcodes, lifeline, states
from taskfarm.childprocess import GroupChild, exit_status
from taskfarm.cluster.slots import ClusterError
from taskfarm.engine.mpi import MPI_LAUNCHER_PID, rank_from_environment
from taskfarm.interfaces import IEngineLauncher
from taskfarm.logfiles import LogClaim, claim_log_name, rotating_file

#: What to say when there is no mpiexec.
INSTALL_HINT = "apt-get install -y mpich"

#: Seconds between two looks at the job's processes.
POLL_PERIOD = 0.5

#: Seconds `start` waits for the ranks of this machine to appear.
START_WAIT = 10.0

#: The back-off of a whole-job restart: (first, most) seconds.
RESTART_BACKOFF = (1.0, 30.0)

#: A job that lived longer than this many seconds resets the restart count.
LONG_LIFE = 60.0

#: Whole-job restarts in a row before the launcher gives up.
DEFAULT_RESTARTS = 3

#: The last bytes of mpiexec's output kept in memory, to quote its last words.
_TAIL_BYTES = 4096

#: What a rank stopped by a MultiEngine kill says as it goes (its exit status
#: does not reach us: mpiexec exits with its own).
_KILLED_LINE = (exitcodes.EXIT_LINE % exitcodes.EXIT_KILLED).encode()


def engine_argv(furl_file, engine_options) -> list[str]:
    """One rank's command line: the engine plugin in the foreground, with
    ``--mpi``."""
    return [
        sys.executable, "-m", "twisted", "--log-format", "text", "taskengine",
        "--furl-file", str(furl_file), "--mpi", *engine_options,
    ]


def split_mpi_options(value) -> list[str]:
    """The extra mpiexec arguments of ``--mpi-option`` (a string split as a
    shell would, or a list of such strings); `usage.UsageError` when one
    cannot be split."""
    if not value:
        return []
    parts = [value] if isinstance(value, str) else list(value)
    argv: list[str] = []
    for part in parts:
        try:
            argv += shlex.split(part)
        except ValueError as e:
            raise usage.UsageError("--mpi-option %r: %s" % (part, e)) from None
    return argv


def mpiexec_argv(
    mpiexec: str, count: int, furl_file, engine_options=(), hostfile=None, extra=()
) -> list[str]:
    """The whole mpiexec command line for `count` ranks."""
    argv = [mpiexec, "-n", str(count)]
    if hostfile:
        argv += ["-hostfile", str(hostfile)]
    return argv + list(extra) + engine_argv(furl_file, engine_options)


# -- the job's processes, from /proc ---------------------------------------------------


def parse_stat(text: str) -> tuple[int, str, str]:
    """(parent pid, state, start time) out of a /proc/PID/stat line (the
    command name may hold spaces and parentheses)."""
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], fields[19]


def process_table(proc: Path = Path("/proc")) -> dict[int, tuple[int, str, str]]:
    """Every process of this machine: pid -> (parent pid, state, start time)."""
    table = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            table[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return table


def descendants(root: int, table: dict[int, tuple[int, str, str]]) -> list[int]:
    """The pids under `root` in `table` (children, their children ...),
    zombies left out."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, state, _) in table.items():
        if state != "Z":
            children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return sorted(found)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path("/proc/%d/environ" % pid).read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def _is_engine(pid: int) -> bool:
    try:
        return b"taskengine" in Path("/proc/%d/cmdline" % pid).read_bytes()
    except OSError:
        return False


def _alive(pid: int, started: str) -> bool:
    try:
        _, state, now = parse_stat(Path("/proc/%d/stat" % pid).read_text())
    except (OSError, ValueError, IndexError):
        return False
    return now == started and state != "Z"


# -- mpiexec, the child ---------------------------------------------------------------------


class _JobProcess(GroupChild):
    """The mpiexec process: its output goes to the log; `ended` follows the
    process (not its pipes)."""

    def __init__(self, log_path: Path, reactor) -> None:
        super().__init__()
        self._reactor = reactor
        # Appended to across restarts of the job; rotated by size.
        self._log_file = rotating_file(Path(log_path))
        self._head = bytearray()
        self._tail = bytearray()
        #: Set once a rank said it ends for a MultiEngine kill.
        self.rank_killed = False
        #: Fires once its pipes are closed too (at most 1 s after `ended`).
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        super().connectionMade()  # a group of its own
        self.transport.closeStdin()  # mpiexec would pass it on to rank 0

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if len(self._head) < _TAIL_BYTES:
            self._head += data[: _TAIL_BYTES - len(self._head)]
        self._tail += data
        if _KILLED_LINE in self._tail[-(len(data) + len(_KILLED_LINE)) :]:
            self.rank_killed = True
        del self._tail[:-_TAIL_BYTES]
        if not self._log_file.closed:
            self._log_file.write(data)  # unbuffered

    def last_words(self) -> str:
        """The last non-empty line of its output."""
        lines = [x for x in self._tail.decode(errors="replace").splitlines() if x.strip()]
        return lines[-1].strip() if lines else ""

    def first_words(self) -> str:
        """The first non-empty line of its output (mpiexec's complaint)."""
        lines = [x for x in self._head.decode(errors="replace").splitlines() if x.strip()]
        return lines[0].strip() if lines else ""

    def processExited(self, reason) -> None:
        self.end_with_process(reason, self._reactor, 1.0)  # its proxies go with it

    def processEnded(self, reason) -> None:
        self._log_file.close()
        super().processEnded(reason)
        if not self.closed.called:
            self.closed.callback(None)


# -- the launcher ---------------------------------------------------------------------------


class JobState(enum.Enum):
    """Where an `MPIExecLauncher`'s job is."""

    IDLE = "idle"
    #: mpiexec runs (or is starting).
    RUNNING = "running"
    #: The job ended by itself; a fresh one starts after the back-off.
    RESTARTING = "restarting"
    #: `stop()` was called; waiting for every process of the job to end.
    STOPPING = "stopping"
    STOPPED = "stopped"
    #: mpiexec exited with `EXIT_KILLED` or `EXIT_REFUSED`: stays down.
    EXITED = "exited"
    #: It ended `--mpi-restarts` times in a row: the launcher gave up.
    FAILED = "failed"


#: (state, event) -> the next state; every other pair is a bug.
JOB_TRANSITIONS = {
    (JobState.IDLE, "start"): JobState.RUNNING,
    (JobState.IDLE, "stop"): JobState.STOPPED,
    (JobState.RUNNING, "died"): JobState.RESTARTING,
    (JobState.RUNNING, "exited"): JobState.EXITED,
    (JobState.RUNNING, "gave up"): JobState.FAILED,
    (JobState.RUNNING, "stop"): JobState.STOPPING,
    (JobState.RESTARTING, "restart"): JobState.RUNNING,
    (JobState.RESTARTING, "stop"): JobState.STOPPED,
    (JobState.STOPPING, "ended"): JobState.STOPPED,
    (JobState.STOPPING, "stop"): JobState.STOPPING,
    (JobState.STOPPED, "stop"): JobState.STOPPED,
    (JobState.EXITED, "stop"): JobState.EXITED,
    (JobState.FAILED, "stop"): JobState.FAILED,
}


def after_job_end(
    status: int | None, quick_deaths: int, restarts: int, rank_killed: bool = False
) -> str:
    """What a job that ended by itself leads to: ``"exited"`` (stays down:
    a MultiEngine kill of any of its ranks, or a refusal), ``"gave up"``
    (after `restarts` quick deaths in a row) or ``"died"`` (start it
    again)."""
    if rank_killed or status in (exitcodes.EXIT_KILLED, exitcodes.EXIT_REFUSED):
        return "exited"
    if quick_deaths > restarts:
        return "gave up"
    return "died"


@implementer(IEngineLauncher)
class MPIExecLauncher:
    """N engines as the ranks of one mpiexec job (see the module)."""

    name = "mpiexec"
    #: True for an instance with a hostfile (its ranks run elsewhere).
    remote = False
    optParameters = [
        ["mpiexec", None, "mpiexec", "The mpiexec program (a name on PATH, or a path)."],
        [
            "mpi-option",
            None,
            None,
            "Extra mpiexec arguments, split as a shell would "
            "(e.g. \"-bind-to core -ppn 2\").",
        ],
        [
            "mpi-hostfile",
            None,
            None,
            "A hosts file for mpiexec (-hostfile FILE); the engine furl file must be "
            "on a filesystem those hosts share.",
        ],
        [
            "mpi-restarts",
            None,
            DEFAULT_RESTARTS,
            "Restarts of the whole MPI job in a row after it ended by itself.",
            int,
        ],
    ]
    optFlags: list = []

    _log = Logger()

    def __init__(
        self,
        reactor,
        profile,
        options: dict | None = None,
        engine_timeout: float | None = None,
        env: dict | None = None,
    ) -> None:
        options = dict(options or {})
        self.check_options(options)
        self._reactor = reactor
        self.profile = profile
        # The controller's heartbeat finds hung ranks; no liveness pipe
        # reaches a rank through mpiexec.
        self._engine_timeout = engine_timeout
        self._env = env
        self.mpiexec = options.get("mpiexec") or "mpiexec"
        self.extra = split_mpi_options(options.get("mpi-option"))
        self.hostfile = options.get("mpi-hostfile")
        self.restarts_allowed = int(options.get("mpi-restarts", DEFAULT_RESTARTS))
        self.remote = bool(self.hostfile)
        self._delay_for = backoffs.policy(*RESTART_BACKOFF)
        self.state = JobState.IDLE
        self.argv: list[str] | None = None
        self.job: _JobProcess | None = None
        #: Whole-job restarts so far.
        self.restarts = 0
        self._quick_deaths = 0
        self._restart_call = None
        self._starting = False
        #: Why the last job ended (its exit reason), None while it runs.
        self.last_reason = None
        self._watchers: list = []
        self._poll: task.LoopingCall | None = None
        #: The ranks of this machine seen in the running job: pid -> (rank, start time).
        self.ranks: dict[int, tuple[int, str]] = {}
        #: Every process of the running job seen (pid -> start time), for `stop`.
        self.processes: dict[int, str] = {}
        self._claim: LogClaim | None = None

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Check the values before anything starts (`usage.UsageError`)."""
        split_mpi_options(options.get("mpi-option"))
        hostfile = options.get("mpi-hostfile")
        if hostfile and not Path(hostfile).is_file():
            raise usage.UsageError("--mpi-hostfile %s: no such file" % hostfile)
        restarts = options.get("mpi-restarts", DEFAULT_RESTARTS)
        try:
            if int(restarts) < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise usage.UsageError(
                "--mpi-restarts takes a number >= 0, not %r" % (restarts,)
            ) from None

    def _move(self, event: str) -> JobState:
        self.state = states.move(JOB_TRANSITIONS, self.state, event, "mpiexec job")
        return self.state

    @property
    def log_path(self) -> Path:
        """mpiexec's own output: ``PROFILE/log/mpiexec-N.out``, N the first
        number no other launcher on this profile holds (`claim_log_name`)."""
        if self._claim is None:
            self.profile.ensure()
            self._claim = claim_log_name(self.profile.log_dir, "mpiexec")
        return self._claim.path

    @property
    def rank_log_template(self) -> str:
        """Each rank's own log (``--log-file``): ``mpiexec-N-rank-R.log``
        beside `log_path`, written by the rank itself, rotated."""
        return str(self.log_path.with_suffix("")) + "-rank-{rank}.log"

    def rank_options(self, engine_options: list[str]) -> list[str]:
        """`engine_options` with ``--log-file`` `rank_log_template` unless
        they name a log file already."""
        if any(str(x).startswith("--log-file") for x in engine_options):
            return list(engine_options)
        return [*engine_options, "--log-file", self.rank_log_template]

    # -- IEngineLauncher ------------------------------------------------------------------

    def start(self, count: int, furl_file, engine_options=()) -> defer.Deferred:
        """Start the job of `count` ranks; fires once its ranks of this
        machine run (or after `START_WAIT` s for ranks elsewhere)."""
        return defer.Deferred.fromCoroutine(self._start(count, furl_file, list(engine_options)))

    async def _start(self, count: int, furl_file, engine_options: list[str]) -> None:
        if self.state is not JobState.IDLE:
            raise ClusterError(
                "this mpiexec launcher already holds a job (%s); start another "
                "launcher for more engines" % self.state.value
            )
        if not isinstance(count, int) or count < 1:
            raise ClusterError("the mpiexec launcher needs -n 1 or more, not %r" % (count,))
        program = shutil.which(self.mpiexec)
        if program is None:
            raise ClusterError(
                "mpiexec not found (%r): %s, or name it with --mpiexec PATH"
                % (self.mpiexec, INSTALL_HINT)
            )
        self.profile.ensure()
        self.argv = mpiexec_argv(
            program, count, furl_file, self.rank_options(engine_options), self.hostfile,
            self.extra,
        )
        self._move("start")
        self._starting = True
        try:
            self._spawn()
            job = self.job
            deadline = self._reactor.seconds() + START_WAIT
            while self._reactor.seconds() < deadline and not job.ended.called:
                self._look()
                if len(self.ranks) >= count:
                    return
                await task.deferLater(self._reactor, 0.05, lambda: None)
        finally:
            self._starting = False
        if job.ended.called and self.state is JobState.EXITED:
            await _fired(job.closed)  # its output read (within 1 s)
            first, last = job.first_words(), job.last_words()
            words = " ... ".join(dict.fromkeys(x for x in (first, last) if x)) or "no output"
            raise ClusterError(
                "mpiexec exited at start (%s): %s; see %s and the ranks' own logs, %s"
                % (self.last_reason, words, self.log_path,
                   self.rank_log_template.replace("{rank}", "R"))
            )

    def _spawn(self) -> None:
        env = dict(self._env if self._env is not None else os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # The ranks' parent is mpiexec's proxy, not us: `lifeline` must not
        # take them for our children; they follow us by MPI_LAUNCHER_PID.
        for name in (lifeline.LAUNCHER_PID, lifeline.LIVENESS_FD, lifeline.LIVENESS_PERIOD):
            env.pop(name, None)
        env[MPI_LAUNCHER_PID] = str(os.getpid())
        self.ranks = {}
        self.processes = {}
        self.last_reason = None
        self.job = _JobProcess(self.log_path, self._reactor)
        self._reactor.spawnProcess(
            self.job, self.argv[0], self.argv, env=env, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self._log.info(
            "mpiexec job (pid {pid}) started: {argv}", pid=self.job.last_pid,
            argv=" ".join(self.argv),
        )
        self._poll = task.LoopingCall(self._look)
        self._poll.clock = self._reactor
        self._poll.start(POLL_PERIOD, now=False)
        # Last: a job that already ended calls `_ended` at once, which
        # stops the looking.
        started = self._reactor.seconds()
        self.job.ended.addCallback(self._ended, self.job, started)

    def _look(self) -> None:
        """Note the job's processes; report ranks gone since last time."""
        job = self.job
        if job is None or job.last_pid is None or job.ended.called:
            return
        table = process_table()
        pids = descendants(job.last_pid, table)
        engines = {pid for pid in pids if _is_engine(pid)}
        for pid in pids:
            self.processes.setdefault(pid, table[pid][2])
            # A rank runs the engine with a rank in its environment (a fork
            # of mpiexec not yet exec'ed has its command line, not a rank),
            # and its parent is no engine (not a process its tasks forked).
            if pid in engines and pid not in self.ranks and table[pid][0] not in engines:
                rank = rank_from_environment(_environ(pid))
                if rank is not None:
                    self.ranks[pid] = (rank, table[pid][2])
        for pid, (rank, started) in list(self.ranks.items()):
            if pid not in table or table[pid][2] != started or table[pid][1] == "Z":
                del self.ranks[pid]
                self._tell(_rank_label(rank, pid), "ended")

    def _tell(self, label: str, reason) -> None:
        for callback in list(self._watchers):
            callback(label, reason)

    def _ended(self, reason, job: _JobProcess, started: float) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        for pid, (rank, _) in sorted(self.ranks.items(), key=lambda item: item[1][0]):
            self._tell(_rank_label(rank, pid), "the mpiexec job ended (%s)" % reason)
        self.ranks = {}
        self.last_reason = reason
        if self.state is not JobState.RUNNING:
            return  # stopping: `stop` finishes
        # Ranks are session leaders of their own: one whose proxy died
        # before it could end it would live on as an engine.  The job is
        # over, so whatever is left of it goes now, by pid.
        self._kill_pids(self.processes)
        if self._starting:
            self._move("exited")  # `start` fails: a restart would fail alike
            return
        lived = self._reactor.seconds() - started
        defer.Deferred.fromCoroutine(self._after_end(reason, job, lived)).addErrback(
            lambda f: self._log.failure("deciding about the mpiexec job's end", f)
        )

    async def _after_end(self, reason, job: _JobProcess, lived: float) -> None:
        # A rank's last line (`EXIT_LINE`) may still be in the pipe: read
        # all of the job's output first (within 1 s).
        await _fired(job.closed)
        if self.state is not JobState.RUNNING or self.job is not job:
            return  # stopped meanwhile
        self._quick_deaths = 0 if lived > LONG_LIFE else self._quick_deaths
        self._quick_deaths += 1
        status = exit_status(reason)
        event = after_job_end(
            status, self._quick_deaths, self.restarts_allowed, job.rank_killed
        )
        self._move(event)
        if event == "exited":
            self._log.info(
                "mpiexec job (pid {pid}) exited with status {status} (a rank stopped for "
                "a MultiEngine kill: {killed}); it stays down",
                pid=job.last_pid, status=status, killed=job.rank_killed,
            )
        elif event == "gave up":
            self._log.error(
                "mpiexec job (pid {pid}) ended ({reason}) {n} times in a row; not starting "
                "it again (see {log} and the ranks' own logs, {ranks})",
                pid=job.last_pid, reason=reason, n=self._quick_deaths, log=self.log_path,
                ranks=self.rank_log_template.replace("{rank}", "R"),
            )
        else:
            delay = self._delay_for(self._quick_deaths - 1)
            self._log.warn(
                "mpiexec job (pid {pid}) ended ({reason}); starting the whole job again "
                "in {delay:.1f} s",
                pid=job.last_pid, reason=reason, delay=delay,
            )
            self._restart_call = self._reactor.callLater(delay, self._restart_now)

    def _restart_now(self) -> None:
        self._restart_call = None
        self._move("restart")
        self.restarts += 1
        self._spawn()

    def watch(self, callback) -> None:
        self._watchers.append(callback)

    def describe(self) -> list[dict]:
        host = socket.gethostname()
        job = self.job
        if job is None or job.ended.called:
            return []
        try:
            job_started = parse_stat(Path("/proc/%d/stat" % job.last_pid).read_text())[2]
        except (OSError, ValueError, IndexError):
            job_started = None
        # "started" tells each process from a later one given its pid.
        entries = [
            {"label": "mpiexec job", "host": host, "pid": job.last_pid, "started": job_started,
             "state": self.state.value, "restarts": self.restarts, "ranks": len(self.ranks)}
        ]
        for pid, (rank, started) in sorted(self.ranks.items(), key=lambda item: item[1][0]):
            entries.append(
                {"label": _rank_label(rank, None), "host": host, "pid": pid, "rank": rank,
                 "started": started}
            )
        return entries

    def stop(self, grace: float = 5.0) -> defer.Deferred:
        """End the whole job; fires once every process of it is gone (its
        log names are free again then)."""
        return defer.Deferred.fromCoroutine(self._stop(grace)).addBoth(self._release_claim)

    def _release_claim(self, result):
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()
        return result

    async def _stop(self, grace: float) -> None:
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        job = self.job
        if self._move("stop") is not JobState.STOPPING:
            return
        self._look()  # the latest processes of the job, before it goes
        seen = dict(self.processes)
        if not job.ended.called:
            job.signal(signal.SIGTERM)  # mpiexec passes it on to the ranks
            kill = self._reactor.callLater(grace, self._kill, job, seen)
            await _fired(job.ended)
            if kill.active():
                kill.cancel()
        # The ranks are session leaders of their own: end them by pid.
        deadline = self._reactor.seconds() + grace + 5.0
        while True:
            left = {pid: started for pid, started in seen.items() if _alive(pid, started)}
            if not left:
                break
            if self._reactor.seconds() > deadline:
                self._log.error(
                    "processes of the mpiexec job still there: {pids}", pids=sorted(left)
                )
                break
            self._kill_pids(left)
            await task.deferLater(self._reactor, 0.05, lambda: None)
        await _fired(job.closed)  # within 1 s: its pipes are closed then
        self._move("ended")

    def _kill(self, job: _JobProcess, seen: dict[int, str]) -> None:
        self._log.warn("mpiexec job (pid {pid}) still there after SIGTERM; SIGKILL", pid=job.last_pid)
        job.signal_group(signal.SIGKILL)
        job.kill()
        self._kill_pids(seen)

    @staticmethod
    def _kill_pids(processes: dict[int, str]) -> None:
        for pid, started in processes.items():
            if _alive(pid, started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


async def _fired(deferred: defer.Deferred) -> None:
    """Wait until `deferred` has fired, leaving its result to others."""
    if not deferred.called:
        waiter: defer.Deferred = defer.Deferred()
        deferred.addBoth(lambda r: waiter.callback(None) or r)
        await waiter


def _rank_label(rank: int | None, pid: int | None) -> str:
    label = "mpiexec rank %s" % ("?" if rank is None else rank)
    return label if pid is None else "%s (pid %d)" % (label, pid)
