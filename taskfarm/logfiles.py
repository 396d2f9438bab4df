"""Log files that rotate, and a log name each engine has to itself.

Every log taskfarm writes in a profile's ``log`` folder is a
`twisted.python.logfile.LogFile`: once it reaches `ROTATE_LENGTH` bytes it
is renamed ``NAME.1`` (older ones shift to ``.2`` ...) and a fresh one is
started; at most `MAX_ROTATED` old files are kept, so a log never fills the
disk.  Files are owner-only (0600): logs name hosts, paths and errors.

Engine launchers on one profile name their engines' files ``PREFIX-N.out``;
two launchers running at once (two ``taskfarm engines``, say) would both
pick ``PREFIX-0.out`` and interleave their engines' output in it.
`claim_log_name` gives each engine a name no running launcher holds: it
takes an advisory lock (``flock``) on a small ``PREFIX-N.lock`` beside it,
which the kernel drops when the launcher ends however it ends.

Engines whose output does not come back through a pipe of the launcher
(mpiexec ranks, batch jobs) write their log themselves: ``twistd taskengine
--log-file PATH`` (`engine_log_path` fills in its ``{rank}``, ``{job}``,
``{host}`` and ``{pid}``) replaces twistd's log observer by a rotating one
(`rotating_observer_factory`).  A launcher's detached run (``taskfarm
cluster --daemon``) writes its output to a rotating file too
(`redirect_stdio`).  `read_since` reads what a log gained since an offset,
across a rotation.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import string
import sys
from pathlib import Path

from twisted.logger import textFileLogObserver
from twisted.python.logfile import LogFile

#: Bytes after which a log file is rotated.
ROTATE_LENGTH = 10 * 1024 * 1024

#: Rotated files kept per log (``NAME.1`` .. ``NAME.5``).
MAX_ROTATED = 5

#: How many names `claim_log_name` tries before it gives up.
MAX_CLAIM_TRIES = 4096


def rotating_file(
    path: Path, rotate_length: int | None = None, max_rotated: int | None = None
) -> LogFile:
    """A `LogFile` at `path` (appended to if it exists), rotated by size
    (`ROTATE_LENGTH` and `MAX_ROTATED` unless given)."""
    return LogFile(
        path.name,
        str(path.parent),
        rotateLength=ROTATE_LENGTH if rotate_length is None else rotate_length,
        defaultMode=0o600,
        maxRotatedFiles=MAX_ROTATED if max_rotated is None else max_rotated,
    )


def rotating_observer(path: Path, **options):
    """A twisted.logger observer writing text lines to a rotating file."""
    return textFileLogObserver(rotating_file(path, **options))


class LogClaim:
    """One engine's claim on a log name; `release` gives it up."""

    def __init__(self, path: Path, fd: int, index: int) -> None:
        #: The log file this engine writes (``PREFIX-N.out``), and its N.
        self.path = path
        self.index = index
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def claim_log_name(directory: Path, prefix: str, start: int = 0) -> LogClaim:
    """The first ``PREFIX-N.out`` (N >= `start`) that no running launcher
    holds, claimed for the caller until `LogClaim.release` (or its exit)."""
    for index in range(start, start + MAX_CLAIM_TRIES):
        lock_path = directory / ("%s-%d.lock" % (prefix, index))
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return LogClaim(directory / ("%s-%d.out" % (prefix, index)), fd, index)
    raise OSError("no free log name %s-N.out in %s" % (prefix, directory))


#: What ``--log-file`` may name in braces (`engine_log_path`).
LOG_NAME_FIELDS = ("rank", "job", "host", "pid")


def batch_job_id(environ) -> str | None:
    """The batch job (and array task) this process runs in, from the
    batch system's environment: SLURM ``JOBID_TASK``, else PBS's job id."""
    array = environ.get("SLURM_ARRAY_JOB_ID")
    if array and environ.get("SLURM_ARRAY_TASK_ID"):
        return "%s_%s" % (array, environ["SLURM_ARRAY_TASK_ID"])
    return environ.get("SLURM_JOB_ID") or environ.get("PBS_JOBID") or None


def _safe(value) -> str:
    # A host or a job id never makes a path leave its folder.
    return str(value).replace(os.sep, "_")


def engine_log_path(template: str, rank=None, environ=None, host=None, pid=None) -> Path:
    """The path ``--log-file TEMPLATE`` names: ``{rank}`` is the MPI rank,
    ``{job}`` the batch job id (`batch_job_id`), ``{host}`` this host's
    name, ``{pid}`` this process's.  `ValueError` naming the problem for
    an unknown field or a field this process has no value for."""
    environ = os.environ if environ is None else environ
    values = {
        "rank": rank,
        "job": batch_job_id(environ),
        "host": socket.gethostname() if host is None else host,
        "pid": os.getpid() if pid is None else pid,
    }
    try:
        fields = {
            name for _, name, _, _ in string.Formatter().parse(template) if name
        }
    except ValueError as e:
        raise ValueError("--log-file %s: %s" % (template, e)) from None
    unknown = sorted(fields - set(LOG_NAME_FIELDS))
    if unknown:
        raise ValueError(
            "--log-file %s: unknown field {%s} (known: %s)"
            % (template, unknown[0], ", ".join("{%s}" % f for f in LOG_NAME_FIELDS))
        )
    missing = sorted(f for f in fields if values[f] is None)
    if missing:
        raise ValueError(
            "--log-file %s: this engine has no {%s} (%s)"
            % (
                template,
                missing[0],
                "not an MPI rank: start it with --mpi"
                if missing[0] == "rank"
                else "not in a SLURM or PBS job",
            )
        )
    return Path(template.format(**{k: _safe(v) for k, v in values.items() if v is not None}))


def rotating_observer_factory(
    path: Path, rotate_length: int | None = None, max_rotated: int | None = None
):
    """A no-argument callable making `rotating_observer` for `path`, the
    kind twistd's ``--logger`` takes; the folder is made (0700) and the
    file opened at once, so that a path that cannot be written is an error
    before the engine starts."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    opened = rotating_file(path, rotate_length, max_rotated)
    return functools.partial(textFileLogObserver, opened)


#: The observer factory `use_for_twistd` set, for `twistd_observer`.
_FOR_TWISTD: list = []

#: The dotted name twistd's ``--logger`` takes for `twistd_observer`.
TWISTD_LOGGER = "taskfarm.logfiles.twistd_observer"


def use_for_twistd(factory) -> str:
    """Make `factory` (`rotating_observer_factory`) what twistd's log
    observer will be; the name to set as twistd's ``logger`` option
    (twistd imports it by name once every option is parsed)."""
    _FOR_TWISTD[:] = [factory]
    return TWISTD_LOGGER


def twistd_observer():
    """twistd's log observer (``--logger``): the one `use_for_twistd` set."""
    if not _FOR_TWISTD:
        raise RuntimeError("%s: no log file was set (--log-file)" % TWISTD_LOGGER)
    return _FOR_TWISTD[0]()


class _TextToLog:
    """A text stream (``sys.stdout``) over a `LogFile`: each write goes
    through its rotation."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, log: LogFile) -> None:
        self._log = log

    def write(self, text: str) -> int:
        self._log.write(text.encode(self.encoding, self.errors))
        return len(text)

    def flush(self) -> None:
        self._log.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._log._file.fileno()

    def writable(self) -> bool:
        return True


class _StdioLogFile(LogFile):
    """A `LogFile` that is also file descriptors 1 and 2 of this process:
    each file it opens (at start, after each rotation) is ``dup2``-ed onto
    them, so that what bypasses ``sys.stdout`` (C code, a dying
    interpreter's last traceback) lands in the current file too."""

    #: The descriptors it is made to be.
    fds = (1, 2)

    def _openFile(self) -> None:
        super()._openFile()
        for fd in self.fds:
            os.dup2(self._file.fileno(), fd)


def redirect_stdio(path: Path, rotate_length: int | None = None,
                   max_rotated: int | None = None) -> LogFile:
    """This process's stdout and stderr (``sys.stdout``, ``sys.stderr``
    and descriptors 1 and 2) to the rotating log file `path`."""
    log = _StdioLogFile(
        path.name,
        str(path.parent),
        rotateLength=ROTATE_LENGTH if rotate_length is None else rotate_length,
        defaultMode=0o600,
        maxRotatedFiles=MAX_ROTATED if max_rotated is None else max_rotated,
    )
    sys.stdout = sys.stderr = _TextToLog(log)
    return log


def read_since(path: Path, offset: int) -> bytes:
    """What the log `path` gained since it was `offset` bytes long, also
    when it rotated since (the rest of ``PATH.1``, then all of ``PATH``)."""
    try:
        with open(path, "rb") as f:
            current = f.read()
    except FileNotFoundError:
        current = b""
    if len(current) >= offset:
        return current[offset:]
    try:
        with open("%s.1" % path, "rb") as f:
            f.seek(offset)
            older = f.read()
    except FileNotFoundError:
        older = b""
    return older + current


def read_tail(path: Path, limit: int = 4096) -> str:
    """The last `limit` bytes of the log `path` as text, with the end of
    ``PATH.1`` before them when the current file is shorter (it was just
    rotated); empty when neither exists."""
    data = b""
    for candidate in (Path("%s.1" % path), path):
        try:
            with open(candidate, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - limit))
                data += f.read()
        except FileNotFoundError:
            continue
    return data[-limit:].decode(errors="replace")
