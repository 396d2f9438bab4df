"""Batch systems: how to talk to SLURM, PBS/Torque and the like.

A batch system is a `BatchSystem`: a job-script template, a submit
command, a cancel command, a pattern that finds the job id in what the
submit command prints, and a status command whose lines say which jobs
still exist.  `SLURM` and `PBS` are the two that ship; another is one more
`BatchSystem` value.

This module holds what is said to a batch system and read back: its
commands (`run_command`), the job-script templates (`string.Template`:
``${name}`` placeholders, ``$$`` for a shell's own ``$``) and their option
lines, the job id a submission printed, the status lines, and
`cancel_jobs`.  The launcher that keeps engines running as jobs is
`taskfarm.cluster.batch`.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import string
from pathlib import Path

import attr
from twisted.internet import task
from twisted.logger import Logger

from taskfarm.childprocess import OutputChild, exit_status
from taskfarm.cluster.launcher import ClusterError

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


async def run_command(
    reactor, argv: list[str], env: dict | None = None, timeout: float = COMMAND_TIMEOUT
) -> CommandResult:
    """Run `argv` to its end (SIGKILLed after `timeout` seconds); raises
    `ClusterError` when the program cannot be started."""
    child = OutputChild()
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
    #: The directive prefix of the script's option lines.
    directive: str = "#SBATCH"
    #: What the system calls a queue: the launcher's ``--NAME-partition``
    #: or ``--NAME-queue``.
    queue_word: str = "partition"
    #: The option line of a queue and of a walltime (``{}``: the value).
    queue_directive: str = "--partition={}"
    time_directive: str = "--time={}"
    #: An extra option line, as the help and the errors show one.
    option_example: str = "--mem=4G"

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
    queue_word="queue",
    queue_directive="-q {}",
    time_directive="-l walltime={}",
    option_example="-l mem=4gb",
)

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


def directives(
    system: BatchSystem, queue: str | None, walltime: str | None, extra: list[str]
) -> list[str]:
    """The option lines of a job script: the queue, the walltime, and each
    extra option, after the system's directive prefix."""
    lines = []
    if queue:
        lines.append("%s %s" % (system.directive, system.queue_directive.format(queue)))
    if walltime:
        lines.append("%s %s" % (system.directive, system.time_directive.format(walltime)))
    lines += ["%s %s" % (system.directive, option.strip()) for option in extra]
    return lines


# -- cancelling -------------------------------------------------------------------------


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


__all__ = [
    "BatchSystem",
    "BatchTemplateError",
    "CommandResult",
    "PBS",
    "PLACEHOLDERS",
    "SLURM",
    "cancel_jobs",
    "check_template",
    "directives",
    "find_job_id",
    "parse_status",
    "render_template",
    "run_command",
]
