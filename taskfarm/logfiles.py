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
"""

from __future__ import annotations

import fcntl
import os
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
