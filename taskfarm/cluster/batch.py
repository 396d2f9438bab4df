"""Engines as batch jobs: one launcher for SLURM, PBS/Torque and the like.

A batch system is a `BatchSystem`: a job-script template, a submit
command, a cancel command, a pattern that finds the job id in what the
submit command prints, and a status command whose lines say which jobs
still exist.  `SLURM` and `PBS` are the two that ship; another is one more
`BatchSystem` value.

`BatchLauncher` renders the template (`string.Template`: ``${name}``
placeholders, ``$$`` for a shell's own ``$``), writes the script into its
work folder and submits it.  On SLURM one submission is a job array, one
array task per engine (``1234_0`` ... ``1234_3``): every engine is a job of
its own for ``squeue`` and ``scancel``, and N engines cost one ``sbatch``.
A system without arrays (`PBS`) gets one submission per engine.

The job script runs ``taskengine --furl-file FILE``: the engine reads the
furl from the profile's furl file, on the filesystem the nodes share.  The
furl is never in the script, its argv or its environment.

The launcher polls the status command.  A job that is no longer listed (or
listed in an ending state) has ended: walltime, ``scancel``, node failure.
Its engine is lost for the controller, which retries its tasks as for any
engine loss; `watch` callbacks hear of it; with ``keep_engines`` the
launcher submits a replacement after a back-off (`taskfarm.backoff`) that
grows with each job that ended soon after it started.  `stop()` cancels
every job it submitted and waits, bounded, until the status command lists
none of them.
"""

from __future__ import annotations

import enum
import getpass
import os
import re
import shlex
import string
import sys
from pathlib import Path

import attr
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from taskfarm import backoff as backoffs
from taskfarm import lifeline
from taskfarm.childprocess import ChildProcess, exit_status
from taskfarm.cluster.launcher import ClusterError, twisted_argv
from taskfarm.interfaces import IEngineLauncher

#: The package folder of the shipped job-script templates.
TEMPLATES = Path(__file__).parent / "templates"

_log = Logger()

#: Seconds a batch command (submit, cancel, status) may take.
COMMAND_TIMEOUT = 30.0


class BatchTemplateError(ClusterError):
    """A job-script template names placeholders the launcher does not fill,
    or is not a template at all."""


# -- commands -------------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class CommandResult:
    """What a finished command said: its exit status (None for a signal)
    and its output."""

    argv: tuple
    status: int | None
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.status == 0

    def describe(self) -> str:
        said = (self.err.strip() or self.out.strip()).splitlines()
        return "%s exited with status %s%s" % (
            shlex.join(self.argv),
            self.status,
            (": " + said[-1]) if said else "",
        )


class _Command(ChildProcess):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.err = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data


async def run_command(
    reactor, argv: list[str], env: dict | None = None, timeout: float = COMMAND_TIMEOUT
) -> CommandResult:
    """Run `argv` to its end (SIGKILLed after `timeout` seconds); raises
    `ClusterError` when the program cannot be started."""
    child = _Command()
    try:
        reactor.spawnProcess(
            child, argv[0], list(argv), env=dict(os.environ if env is None else env)
        )
    except OSError as e:
        raise ClusterError("cannot run %s: %s" % (argv[0], e)) from None
    killer = reactor.callLater(timeout, child.kill)
    reason = await child.ended
    if killer.active():
        killer.cancel()
        timed_out = False
    else:
        timed_out = True
    status = exit_status(reason)
    err = child.err.decode(errors="replace")
    if timed_out:
        err += "\n(killed after %g s)" % timeout
    return CommandResult(tuple(argv), status, child.out.decode(errors="replace"), err)


# -- batch systems ----------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class BatchSystem:
    """How to talk to one kind of batch system.

    Commands are argv lists whose items may hold ``{user}``; submit gets the
    script's path appended, cancel the job ids, status nothing.
    """

    #: The launcher's name ('slurm', 'pbs').
    name: str
    #: The file name of the default template in `TEMPLATES`.
    template_file: str
    #: The argv of the submit command, before the script's path.
    submit: tuple
    #: The argv of the cancel command, before the job ids.
    cancel: tuple
    #: The argv of a command listing the user's jobs, one a line.
    status: tuple
    #: A regex with a group ``job``: the job id in the submit output.
    job_id_pattern: str
    #: A regex with groups ``job``, ``state`` and maybe ``host``, matched
    #: on each line of the status output; other lines are skipped.
    status_pattern: str
    #: States in which a listed job counts as ended (its engine is gone).
    ended_states: frozenset
    #: States in which a listed job runs (and so its engine may).
    running_states: frozenset
    #: With arrays, one submission holds many engines: the id of engine
    #: `index` of submission `job`; None: one submission per engine.
    array_element: str | None = None
    #: The directive prefix of the script's extra option lines.
    directive: str = "#SBATCH"

    def default_template(self) -> str:
        return (TEMPLATES / self.template_file).read_text()


SLURM = BatchSystem(
    name="slurm",
    template_file="slurm.sh",
    submit=("sbatch",),
    cancel=("scancel",),
    status=("squeue", "--noheader", "--array", "--user={user}", "--format=%i %T %N"),
    job_id_pattern=r"Submitted batch job (?P<job>\d+)",
    status_pattern=r"^\s*(?P<job>\d+(?:_\d+)?)\s+(?P<state>[A-Z_]+)(?:\s+(?P<host>\S+))?\s*$",
    ended_states=frozenset(
        {
            "COMPLETING",
            "COMPLETED",
            "CANCELLED",
            "FAILED",
            "TIMEOUT",
            "NODE_FAIL",
            "PREEMPTED",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
        }
    ),
    running_states=frozenset({"RUNNING"}),
    array_element="{job}_{index}",
    directive="#SBATCH",
)

#: PBS Pro and Torque: ``qsub`` prints the job id (``123.server``); the
#: default ``qstat`` lists ``ID NAME USER TIME STATE QUEUE``.  One job per
#: engine: PBS Pro arrays (``-J``) need two jobs at least and Torque spells
#: them ``-t``.  Tested only up to the rendered script (no PBS server here).
PBS = BatchSystem(
    name="pbs",
    template_file="pbs.sh",
    submit=("qsub",),
    cancel=("qdel",),
    status=("qstat",),
    job_id_pattern=r"^\s*(?P<job>\d+(?:\.\S+)?)\s*$",
    status_pattern=r"^\s*(?P<job>\d+(?:\.\S+)?)\s+\S+\s+\S+\s+\S+\s+(?P<state>[A-Z])\s+\S+",
    ended_states=frozenset({"C", "E", "F"}),
    running_states=frozenset({"R"}),
    array_element=None,
    directive="#PBS",
)

SYSTEMS = {system.name: system for system in (SLURM, PBS)}


def find_job_id(system: BatchSystem, output: str) -> str:
    """The job id in a submit command's `output`; `ClusterError` if none."""
    found = re.search(system.job_id_pattern, output, re.MULTILINE)
    if found is None:
        raise ClusterError(
            "%s printed no job id (pattern %r): %r"
            % (system.submit[0], system.job_id_pattern, output.strip()[-200:])
        )
    return found.group("job")


@attr.s(frozen=True, auto_attribs=True)
class ListedJob:
    job: str
    state: str
    host: str


def parse_status(system: BatchSystem, output: str) -> dict[str, ListedJob]:
    """{job id: ListedJob} of the lines of a status command's `output`."""
    pattern = re.compile(system.status_pattern)
    jobs = {}
    for line in output.splitlines():
        found = pattern.match(line)
        if found is not None:
            host = found.groupdict().get("host") or ""
            jobs[found.group("job")] = ListedJob(found.group("job"), found.group("state"), host)
    return jobs


# -- templates ---------------------------------------------------------------------------


#: The placeholders a template may use, each with what it holds.
PLACEHOLDERS = {
    "job_name": "the job's name (taskfarm-engine)",
    "array": "SLURM's array range, 0-(N-1), of the engines in this submission",
    "count": "the number of engines in this submission",
    "directives": "the option lines: partition/queue, time, and each extra option",
    "engine_command": "the engine's command line, quoted for the shell",
    "log_dir": "the folder for the jobs' output",
    "work_dir": "the launcher's folder for its scripts",
    "python": "the Python interpreter that runs the engine",
    "furl_file": "the path of the engine furl file (the path, never the furl)",
}


def template_names(text: str) -> tuple[list[str], list[str]]:
    """The placeholder names used in `text`, and the bad ``$`` uses
    (a ``$`` followed by no name), each in order of appearance."""
    names, bad = [], []
    for found in string.Template.pattern.finditer(text):
        name = found.group("named") or found.group("braced")
        if name is not None:
            if name not in names:
                names.append(name)
        elif found.group("invalid") is not None:
            line = text.count("\n", 0, found.start()) + 1
            bad.append("a lone $ on line %d" % line)
    return names, bad


def check_template(text: str, source: str = "the template") -> None:
    """Raise `BatchTemplateError` naming every unknown placeholder of `text`."""
    names, bad = template_names(text)
    unknown = [name for name in names if name not in PLACEHOLDERS]
    if unknown or bad:
        problems = ["$%s" % name for name in unknown] + bad
        raise BatchTemplateError(
            "%s has placeholders the launcher does not fill: %s (known: %s; write $$ for "
            "a shell's own $, as in $${SLURM_JOB_ID})"
            % (source, ", ".join(problems), ", ".join("$" + name for name in PLACEHOLDERS))
        )


def render_template(text: str, values: dict, source: str = "the template") -> str:
    """`text` with its placeholders filled from `values`."""
    check_template(text, source)
    return string.Template(text).substitute(values)


# -- options -----------------------------------------------------------------------------


def options_class(system: BatchSystem) -> type[usage.Options]:
    """The ``usage.Options`` of a batch launcher's own flags, named after its
    system: ``--slurm-partition``, ``--slurm-time``, ``--slurm-option``
    (repeatable), ``--slurm-template``; and ``--keep-engines``."""
    prefix = system.name
    queue_word = "partition" if system is SLURM else "queue"

    class Options(usage.Options):
        optFlags = [
            [
                "keep-engines",
                None,
                "Keep the requested number of engines: submit a job for each one that "
                "ended (walltime, cancel, node failure), after a back-off.",
            ],
        ]
        optParameters = [
            ["%s-%s" % (prefix, queue_word), None, None, "The %s to submit to." % queue_word],
            [
                "%s-time" % prefix,
                None,
                None,
                "The jobs' walltime, as %s takes it." % system.submit[0],
            ],
            ["%s-template" % prefix, None, None, "A job-script template file of your own."],
            ["%s-poll" % prefix, None, 5.0, "Seconds between two job status checks.", float],
        ]

        def __init__(self) -> None:
            super().__init__()
            self["%s-option" % prefix] = []

        def postOptions(self) -> None:
            path = self["%s-template" % prefix]
            if path is not None:
                try:
                    text = Path(path).read_text()
                except OSError as e:
                    raise usage.UsageError(
                        "--%s-template: cannot read %s: %s" % (prefix, path, e.strerror or e)
                    ) from None
                try:
                    check_template(text, "--%s-template %s" % (prefix, path))
                except BatchTemplateError as e:
                    raise usage.UsageError(str(e)) from None
            if self["%s-poll" % prefix] <= 0:
                raise usage.UsageError("--%s-poll must be > 0" % prefix)
            for text in self["%s-option" % prefix]:
                if "\n" in text or not text.strip():
                    raise usage.UsageError(
                        "--%s-option takes one option, as %r" % (prefix, "--mem=4G")
                    )

    def opt_option(self, text: str) -> None:
        self["%s-option" % prefix].append(text)

    opt_option.__doc__ = "An extra %s line (repeatable), as --mem=4G." % system.directive
    setattr(Options, "opt_%s_option" % prefix.replace("-", "_"), opt_option)
    Options.__name__ = "%sOptions" % prefix.capitalize()
    return Options


SlurmOptions = options_class(SLURM)
PbsOptions = options_class(PBS)


def directives(
    system: BatchSystem, queue: str | None, walltime: str | None, extra: list[str]
) -> list[str]:
    """The option lines of a job script."""
    if system is PBS:
        lines = []
        if queue:
            lines.append("%s -q %s" % (system.directive, queue))
        if walltime:
            lines.append("%s -l walltime=%s" % (system.directive, walltime))
    else:
        lines = []
        if queue:
            lines.append("%s --partition=%s" % (system.directive, queue))
        if walltime:
            lines.append("%s --time=%s" % (system.directive, walltime))
    lines += ["%s %s" % (system.directive, option.strip()) for option in extra]
    return lines


# -- the launcher -------------------------------------------------------------------------


class JobState(enum.Enum):
    """Where one engine's job is, as the launcher last saw it."""

    #: Submitted; not yet seen running.
    SUBMITTED = "submitted"
    RUNNING = "running"
    #: Gone from the status listing, or listed as ending.
    ENDED = "ended"
    #: `stop()` cancelled it.
    CANCELLED = "cancelled"


@attr.s(auto_attribs=True)
class _Job:
    job: str
    submission: str
    submitted: float
    state: JobState = JobState.SUBMITTED
    host: str = ""
    running_since: float | None = None
    #: Status checks in a row that did not list it.
    missed: int = 0


class LauncherState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@implementer(IEngineLauncher)
class BatchLauncher:
    """Engines as jobs of a batch system (`SLURM`, `PBS`, ...).

    `work_dir` holds the rendered scripts and the jobs' output, and must be
    on the filesystem the nodes share (the profile's log folder is).
    `env` is the environment of the batch commands (SLURM passes it on to
    the jobs; the launcher's own lifeline variables are taken out).
    """

    remote = True
    _log = Logger()

    #: A job that ran longer than this many seconds gets a fresh back-off.
    LONG_LIFE = 60.0
    #: Status checks in a row that must miss a job before it counts as
    #: ended (one check may race a submission or a restarted server).
    MISSES = 2

    def __init__(
        self,
        system: BatchSystem,
        reactor,
        work_dir: Path,
        queue: str | None = None,
        walltime: str | None = None,
        extra_options: list[str] | None = None,
        template: str | None = None,
        keep_engines: bool = False,
        poll_interval: float = 5.0,
        backoff: tuple[float, float] = (1.0, 60.0),
        env: dict | None = None,
        python: str = sys.executable,
        stop_timeout: float = 30.0,
        job_name: str = "taskfarm-engine",
        runner=None,
    ) -> None:
        self.system = system
        self.name = system.name
        self._reactor = reactor
        self.work_dir = Path(work_dir)
        self.template = template if template is not None else system.default_template()
        check_template(self.template)
        self._directives = directives(system, queue, walltime, list(extra_options or []))
        self.keep_engines = keep_engines
        self._poll_interval = poll_interval
        self._backoff = backoffs.Backoff(*backoff)
        env = dict(os.environ if env is None else env)
        for name in (lifeline.LAUNCHER_PID, lifeline.LIVENESS_FD, lifeline.LIVENESS_PERIOD):
            env.pop(name, None)
        self._env = env
        self._python = python
        self._stop_timeout = stop_timeout
        self._job_name = job_name
        self.state = LauncherState.IDLE
        #: Every engine job it submitted, by job id (array elements on SLURM).
        self.jobs: dict[str, _Job] = {}
        #: The ids given to the cancel command at `stop` (submissions).
        self.submissions: list[str] = []
        #: Engines it should hold (what `start` asked, in all).
        self.wanted = 0
        #: Replacement jobs submitted for jobs that ended.
        self.replacements = 0
        self._watchers: list = []
        self._poller: task.LoopingCall | None = None
        self._replacing: defer.Deferred | None = None
        self._delay: defer.Deferred | None = None
        self._furl_file: Path | None = None
        self._engine_options: list[str] = []
        self._scripts = 0
        #: ``runner(argv, env)``: awaitable `CommandResult` (`run_command` by
        #: default; unit tests pass an in-memory batch system).
        self._runner = runner or (lambda argv, env: run_command(reactor, argv, env))

    @classmethod
    def from_options(cls, system: BatchSystem, options, reactor, work_dir: Path, **kw):
        """A launcher for parsed `options_class(system)` options."""
        prefix = system.name
        queue_word = "partition" if system is SLURM else "queue"
        template = None
        if options["%s-template" % prefix] is not None:
            template = Path(options["%s-template" % prefix]).read_text()
        return cls(
            system,
            reactor,
            work_dir,
            queue=options["%s-%s" % (prefix, queue_word)],
            walltime=options["%s-time" % prefix],
            extra_options=options["%s-option" % prefix],
            template=template,
            keep_engines=bool(options["keep-engines"]),
            poll_interval=options["%s-poll" % prefix],
            **kw,
        )

    # -- rendering ---------------------------------------------------------------

    def engine_argv(self, furl_file: Path, engine_options: list[str]) -> list[str]:
        argv = twisted_argv("taskengine", "--furl-file", str(furl_file), *engine_options)
        argv[0] = self._python
        return argv

    def render(self, count: int, furl_file: Path, engine_options: list[str]) -> str:
        """The job script for `count` engines (an array on SLURM)."""
        values = {
            "job_name": self._job_name,
            "array": "0-%d" % (count - 1),
            "count": str(count),
            "directives": "\n".join(self._directives),
            "engine_command": shlex.join(self.engine_argv(furl_file, engine_options)),
            "log_dir": str(self.work_dir),
            "work_dir": str(self.work_dir),
            "python": shlex.quote(self._python),
            "furl_file": shlex.quote(str(furl_file)),
        }
        return render_template(self.template, values)

    # -- IEngineLauncher ----------------------------------------------------------

    def start(self, count: int, furl_file, engine_options=()) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            self._start(count, Path(furl_file).absolute(), list(engine_options))
        )

    async def _start(self, count: int, furl_file: Path, engine_options: list[str]) -> None:
        if count < 0:
            raise ClusterError("the number of engines must be >= 0, not %d" % count)
        if self.state in (LauncherState.STOPPING, LauncherState.STOPPED):
            raise ClusterError("the %s launcher was stopped" % self.name)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._furl_file = furl_file
        self._engine_options = engine_options
        self.state = LauncherState.RUNNING
        before = len(self.jobs)
        try:
            if count:
                await self._submit(count)
        finally:
            # Only the engines actually submitted are kept (a refused
            # submission is the caller's error, not one to repeat).
            self.wanted += len(self.jobs) - before
        if self._poller is None:
            self._poller = task.LoopingCall(self._poll_once)
            self._poller.clock = self._reactor
            self._poller.start(self._poll_interval, now=False).addErrback(
                lambda f: self._log.failure("the job poller stopped", f)
            )

    async def _submit(self, count: int) -> list[str]:
        """Submit `count` engines; their job ids.  `ClusterError` if the
        system said no."""
        per_submission = count if self.system.array_element else 1
        ids = []
        for _ in range(count // per_submission):
            script = self.render(per_submission, self._furl_file, self._engine_options)
            self._scripts += 1
            path = self.work_dir / ("%s-%d.sh" % (self.system.name, self._scripts))
            path.write_text(script)
            argv = [item.format(user=getpass.getuser()) for item in self.system.submit]
            result = await self._runner([*argv, str(path)], self._env)
            if not result.ok:
                raise ClusterError("cannot submit the engines' job: %s" % result.describe())
            submission = find_job_id(self.system, result.out + "\n" + result.err)
            self.submissions.append(submission)
            now = self._reactor.seconds()
            if self.system.array_element:
                elements = [
                    self.system.array_element.format(job=submission, index=i)
                    for i in range(per_submission)
                ]
            else:
                elements = [submission]
            for job in elements:
                self.jobs[job] = _Job(job, submission, now)
            ids += elements
            self._log.info(
                "submitted {count} engine(s) to {system} as job {job} ({script})",
                count=per_submission,
                system=self.system.name,
                job=submission,
                script=str(path),
            )
        return ids

    def watch(self, callback) -> None:
        self._watchers.append(callback)

    def describe(self) -> list[dict]:
        return [
            {
                "label": "job %s" % job.job,
                "host": job.host,
                "job": job.job,
                "state": job.state.value,
            }
            for job in self.jobs.values()
            if job.state in (JobState.SUBMITTED, JobState.RUNNING)
        ]

    @property
    def live(self) -> int:
        """Jobs submitted and not yet ended."""
        return sum(
            1 for job in self.jobs.values() if job.state in (JobState.SUBMITTED, JobState.RUNNING)
        )

    # -- watching -----------------------------------------------------------------------

    async def _status(self) -> dict[str, ListedJob] | None:
        argv = [item.format(user=getpass.getuser()) for item in self.system.status]
        try:
            result = await self._runner(argv, self._env)
        except ClusterError as e:
            self._log.warn("job status unknown: {error}", error=str(e))
            return None
        if not result.ok:
            self._log.warn("job status unknown: {error}", error=result.describe())
            return None
        return parse_status(self.system, result.out)

    def _poll_once(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._poll())

    async def _poll(self) -> None:
        if self.state is not LauncherState.RUNNING:
            return
        listed = await self._status()
        if listed is None or self.state is not LauncherState.RUNNING:
            return
        now = self._reactor.seconds()
        for job in list(self.jobs.values()):
            if job.state not in (JobState.SUBMITTED, JobState.RUNNING):
                continue
            seen = listed.get(job.job)
            if seen is None:
                job.missed += 1
                if job.missed >= self.MISSES:
                    self._ended(job, "no longer listed by %s" % self.system.status[0], now)
                continue
            job.missed = 0
            job.host = seen.host if seen.host not in ("", "(null)") else job.host
            if seen.state in self.system.ended_states:
                self._ended(job, seen.state, now)
            elif seen.state in self.system.running_states and job.state is JobState.SUBMITTED:
                job.state = JobState.RUNNING
                job.running_since = now
        if self.keep_engines and self.live < self.wanted and self._replacing is None:
            replacing = defer.Deferred.fromCoroutine(self._replace())
            if not replacing.called:
                self._replacing = replacing

    def _ended(self, job: _Job, reason: str, now: float) -> None:
        job.state = JobState.ENDED
        lived = now - job.running_since if job.running_since is not None else 0.0
        if lived > self.LONG_LIFE:
            self._backoff.reset()
        self._log.warn(
            "engine job {job} ended ({reason}) after {lived:.0f} s running",
            job=job.job,
            reason=reason,
            lived=lived,
        )
        for callback in self._watchers:
            callback("job %s" % job.job, reason)

    async def _replace(self) -> None:
        try:
            while self.state is LauncherState.RUNNING and self.live < self.wanted:
                delay = self._backoff.next()
                self._log.info(
                    "{missing} engine job(s) ended; submitting replacements in {delay:.1f} s",
                    missing=self.wanted - self.live,
                    delay=delay,
                )
                # Only this wait is cancelled by `stop`; a submission under
                # way is waited for, so that its job is known and cancelled.
                self._delay = task.deferLater(self._reactor, delay, lambda: None)
                try:
                    await self._delay
                except defer.CancelledError:
                    return
                finally:
                    self._delay = None
                missing = self.wanted - self.live
                if self.state is not LauncherState.RUNNING or missing <= 0:
                    return
                try:
                    await self._submit(missing)
                except ClusterError as e:
                    self._log.warn("replacement failed: {error}", error=str(e))
                    continue
                self.replacements += missing
                return
        finally:
            self._replacing = None

    # -- stopping -----------------------------------------------------------------------

    def stop(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.state in (LauncherState.STOPPING, LauncherState.STOPPED):
            return
        self.state = LauncherState.STOPPING
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._delay is not None:
            self._delay.cancel()
        if self._replacing is not None:
            await self._replacing  # a submission under way
        try:
            await self._cancel_all()
        except Exception:
            self._log.failure("cancelling the engine jobs failed")
        self.state = LauncherState.STOPPED

    async def _cancel_all(self) -> None:
        if not self.submissions:
            return
        # The submissions with engines not known to have ended.
        targets = sorted(
            {job.submission for job in self.jobs.values() if job.state is not JobState.ENDED}
        )
        left = await cancel_jobs(
            self.system,
            self._runner,
            self._reactor,
            targets,
            self._env,
            timeout=self._stop_timeout,
            ours=lambda listed: listed in self.jobs,
        )
        if not left:
            for job in self.jobs.values():
                if job.state in (JobState.SUBMITTED, JobState.RUNNING):
                    job.state = JobState.CANCELLED


async def cancel_jobs(
    system: BatchSystem,
    runner,
    reactor,
    job_ids: list[str],
    env: dict | None = None,
    timeout: float = 30.0,
    ours=None,
) -> list[str]:
    """Cancel `job_ids` (submissions or array elements) and wait, at most
    `timeout` seconds, until the status command lists none of them (or,
    with `ours`, no job for which ``ours(job_id)`` is true); the ids still
    listed then ([] when all are gone).  What `taskfarm stop` needs for the
    jobs a launcher's `describe` named (``runner(argv, env)`` as for
    `BatchLauncher`)."""
    if ours is None:
        wanted = set(job_ids)

        def ours(listed: str) -> bool:
            return listed in wanted or listed.split("_")[0] in wanted

    user = getpass.getuser()
    argv = [item.format(user=user) for item in system.cancel]
    status = [item.format(user=user) for item in system.status]
    deadline = reactor.seconds() + timeout
    targets = list(job_ids)
    left: list[str] | None = None
    while True:
        if targets:
            result = await runner([*argv, *targets], env)
            if not result.ok:
                _log.warn("cancelling: {error}", error=result.describe())
        try:
            result = await runner(status, env)
        except ClusterError as e:
            result = None
            _log.warn("job status unknown: {error}", error=str(e))
        if result is not None and result.ok:
            left = sorted(j for j in parse_status(system, result.out) if ours(j))
            if not left:
                _log.info(
                    "cancelled {count} job(s) of {system}; none is left",
                    count=len(job_ids),
                    system=system.name,
                )
                return []
        if reactor.seconds() > deadline:
            _log.error(
                "jobs still listed {timeout} s after cancelling: {jobs}",
                timeout=timeout,
                jobs=left,
            )
            return left if left is not None else list(job_ids)
        # Cancel again what is still listed (a request may be lost).
        targets = left or []
        await task.deferLater(reactor, 0.5, lambda: None)


def slurm_launcher(options, reactor, work_dir: Path, **kw) -> BatchLauncher:
    """The SLURM launcher for parsed `SlurmOptions`."""
    return BatchLauncher.from_options(SLURM, options, reactor, work_dir, **kw)


def pbs_launcher(options, reactor, work_dir: Path, **kw) -> BatchLauncher:
    """The PBS/Torque launcher for parsed `PbsOptions`."""
    return BatchLauncher.from_options(PBS, options, reactor, work_dir, **kw)


#: The batch launchers for the launcher table (`taskfarm.cluster.launchers`):
#: name -> (factory(options, reactor, work_dir, **kw), its options class).
BATCH_LAUNCHERS = {
    "slurm": (slurm_launcher, SlurmOptions),
    "pbs": (pbs_launcher, PbsOptions),
}


__all__ = [
    "BATCH_LAUNCHERS",
    "BatchLauncher",
    "BatchSystem",
    "BatchTemplateError",
    "cancel_jobs",
    "PBS",
    "PbsOptions",
    "SLURM",
    "SlurmOptions",
]
