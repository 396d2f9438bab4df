"""Engines as batch jobs: the launcher for SLURM, PBS/Torque and the like.

`BatchLauncher` keeps engines running as jobs of a batch system (a
`taskfarm.cluster.batchsystems.BatchSystem`: `SLURM`, `PBS`, ...).  It
renders the system's job-script template, writes the script into its work
folder and submits it.  On SLURM one submission is a job array, one array
task per engine (``1234_0`` ... ``1234_3``): every engine is a job of its
own for ``squeue`` and ``scancel``, and N engines cost one ``sbatch``.  A
system without arrays (`PBS`) gets one submission per engine.

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

`SlurmLauncher` and `PbsLauncher` are its entries in the launcher table
(`taskfarm.cluster.launchers`): ``--launcher slurm`` with
``--slurm-partition``, ``--slurm-time``, ``--slurm-option`` (repeatable),
``--slurm-template``, ``--slurm-poll`` and ``--keep-engines``; ``--launcher
pbs`` with the same options spelled ``--pbs-`` (``--pbs-queue`` for the
partition).  Their scripts and the jobs' output go to ``PROFILE/log/slurm``
(``PROFILE/log/pbs``); each engine writes its own rotated log there,
``engine-JOBID_TASK.log`` (``engine-JOBID.log``), by ``--log-file``.
"""

from __future__ import annotations

import enum
import getpass
import os
import shlex
import sys
from pathlib import Path

import attr
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from taskfarm import backoff as backoffs
from taskfarm import lifeline
from taskfarm.cluster.batchsystems import (
    PBS,
    SLURM,
    BatchSystem,
    BatchTemplateError,
    ListedJob,
    cancel_jobs,
    check_template,
    directives,
    find_job_id,
    parse_status,
    render_template,
    run_command,
)
from taskfarm.cluster.launcher import ClusterError, twisted_argv
from taskfarm.interfaces import IEngineLauncher

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

    # -- rendering ---------------------------------------------------------------

    @property
    def engine_log_template(self) -> str:
        """Each engine's own log (``--log-file``), written by the engine on
        its node, rotated: ``engine-{job}.log`` in `work_dir`, {job} the
        engine's SLURM array job and task (``JOBID_TASK``) or PBS job id."""
        return str(self.work_dir / "engine-{job}.log")

    def engine_argv(self, furl_file: Path, engine_options: list[str]) -> list[str]:
        log = [] if any(str(x).startswith("--log-file") for x in engine_options) else [
            "--log-file", self.engine_log_template
        ]
        argv = twisted_argv(
            "taskengine", "--furl-file", str(furl_file), *log, *engine_options
        )
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
            # The pid: a `taskfarm engines` of the same profile writes here too.
            name = "%s-%d-%d.sh" % (self.system.name, os.getpid(), self._scripts)
            path = self.work_dir / name
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


# -- the launcher table's entries ----------------------------------------------------------

#: ``--keep-engines``, the same for every batch launcher.
KEEP_ENGINES = [
    "keep-engines",
    None,
    "Keep the requested number of engines: submit a job for each one that "
    "ended (walltime, cancel, node failure), after a back-off.",
]


def option_rows(system: BatchSystem) -> tuple[list, list, list]:
    """(optParameters, optFlags, optRepeated) of the launcher of `system`,
    named after it: ``--slurm-partition`` (``--pbs-queue``), ``--slurm-time``,
    ``--slurm-template``, ``--slurm-poll``, ``--keep-engines`` and the
    repeatable ``--slurm-option``."""
    prefix = system.name
    word = system.queue_word
    parameters = [
        ["%s-%s" % (prefix, word), None, None, "The %s to submit to." % word],
        ["%s-time" % prefix, None, None, "The jobs' walltime, as %s takes it." % system.submit[0]],
        ["%s-template" % prefix, None, None, "A job-script template file of your own."],
        ["%s-poll" % prefix, None, 5.0, "Seconds between two job status checks.", float],
    ]
    repeated = [
        [
            "%s-option" % prefix,
            None,
            "An extra %s line (repeatable), as %s." % (system.directive, system.option_example),
        ]
    ]
    return parameters, [KEEP_ENGINES], repeated


class _TableBatchLauncher(BatchLauncher):
    """`BatchLauncher` in the launcher table's shape, for one `system`:
    ``Launcher(reactor, profile, options, engine_timeout)`` with `options`
    its own parsed options.  `engine_timeout` is not used: a hung engine
    is the controller's heartbeat's to find, a gone job the status
    command's.  Tests may pass `BatchLauncher`'s keywords (``env``,
    ``runner``, ``backoff`` ...)."""

    system: BatchSystem
    remote = True

    def __init__(self, reactor, profile, options=None, engine_timeout=None, **kw) -> None:
        settings = self.settings(options or {})
        settings.update(kw)
        super().__init__(self.system, reactor, Path(profile.log_dir) / self.system.name, **settings)

    @classmethod
    def settings(cls, options) -> dict:
        """`BatchLauncher`'s keywords for parsed `options` (a missing one has
        its default); `usage.UsageError` naming a bad value."""
        prefix = cls.system.name
        parameters, _, _ = option_rows(cls.system)
        values = {row[0]: row[2] for row in parameters}
        values.update(options)
        template = None
        path = values["%s-template" % prefix]
        if path is not None:
            try:
                template = Path(path).read_text()
            except OSError as e:
                raise usage.UsageError(
                    "--%s-template: cannot read %s: %s" % (prefix, path, e.strerror or e)
                ) from None
            try:
                check_template(template, "--%s-template %s" % (prefix, path))
            except BatchTemplateError as e:
                raise usage.UsageError(str(e)) from None
        poll = values["%s-poll" % prefix]
        if not poll > 0:
            raise usage.UsageError("--%s-poll must be > 0" % prefix)
        extra = list(values.get("%s-option" % prefix) or [])
        for text in extra:
            if "\n" in text or not text.strip():
                raise usage.UsageError(
                    "--%s-option takes one option, as %r" % (prefix, cls.system.option_example)
                )
        return dict(
            queue=values["%s-%s" % (prefix, cls.system.queue_word)],
            walltime=values["%s-time" % prefix],
            extra_options=extra,
            template=template,
            keep_engines=bool(values.get("keep-engines")),
            poll_interval=poll,
        )

    @classmethod
    def check_options(cls, options) -> None:
        """At parse time: a usage error for a template that cannot be read or
        names unknown placeholders, a poll interval <= 0, or an option that
        is not one line."""
        cls.settings(options)

    @classmethod
    def command_runner(cls, reactor):
        """``runner(argv, env)`` of the batch commands that `clean_up` runs."""
        return lambda argv, env: run_command(reactor, argv, env)

    @classmethod
    def clean_up(cls, reactor, profile, described, options) -> defer.Deferred:
        """For `taskfarm stop` when the launcher's process is gone: cancel
        the jobs its last `describe()` named and wait, bounded, until the
        status command lists none of them (`ClusterError` naming those
        still listed)."""

        async def clean_up() -> None:
            jobs = [entry["job"] for entry in described or [] if entry.get("job")]
            if not jobs:
                return
            runner = cls.command_runner(reactor)
            left = await cancel_jobs(cls.system, runner, reactor, jobs, dict(os.environ))
            if left:
                raise ClusterError(
                    "jobs still listed by %s: %s" % (cls.system.status[0], " ".join(left))
                )

        return defer.Deferred.fromCoroutine(clean_up())


class SlurmLauncher(_TableBatchLauncher):
    """``--launcher slurm``: engines as a SLURM job array."""

    name = "slurm"
    system = SLURM
    optParameters, optFlags, optRepeated = option_rows(SLURM)


class PbsLauncher(_TableBatchLauncher):
    """``--launcher pbs``: engines as PBS Pro / Torque jobs, one job per
    engine (tested only up to the rendered script: no PBS server here)."""

    name = "pbs"
    system = PBS
    optParameters, optFlags, optRepeated = option_rows(PBS)


__all__ = [
    "BatchLauncher",
    "JobState",
    "LauncherState",
    "PbsLauncher",
    "SlurmLauncher",
    "option_rows",
]
