"""The profile folder: where a controller keeps its certificate, furls and logs.

Layout (folders 0700, secret files 0600)::

    PROFILE/
      security/controller.pem      the controller Tub's key and certificate
      security/engine.furl         lets an engine register
      security/task.furl           the Task interface, for clients
      security/multiengine.furl    the MultiEngine interface, for clients
      security/dashboard.url       the dashboard's URL with its token (--dashboard)
      journal.sqlite               the task journal (unless --no-journal)
      controller.lock              held by the one controller using the
                                   profile; holds its pid, start time and
                                   location (one a line)
      cluster.json                 the state of the `taskfarm cluster`
                                   running on it (0600), for status/stop
      log/                         controller and engine logs

The default profile is ``~/.taskfarm``; ``TASKFARM_PROFILE`` overrides it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from taskfarm.errors import ProfileError, ProfileInUse

_log = Logger()

#: Interface names, each with its own furl file.
ENGINE = "engine"
TASK = "task"
MULTIENGINE = "multiengine"
INTERFACES = (ENGINE, TASK, MULTIENGINE)


def default_profile_dir() -> Path:
    """The profile folder used when none is named."""
    env = os.environ.get("TASKFARM_PROFILE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".taskfarm"


@dataclass(frozen=True)
class Profile:
    """The paths of one profile folder; making one does no I/O."""

    root: Path

    @classmethod
    def from_option(cls, path: str | os.PathLike | None) -> Profile:
        """The profile at `path`, or the default one when `path` is empty."""
        return cls(Path(path).expanduser() if path else default_profile_dir())

    @property
    def security_dir(self) -> Path:
        return self.root / "security"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def cert_file(self) -> Path:
        return self.security_dir / "controller.pem"

    @property
    def journal_file(self) -> Path:
        return self.root / "journal.sqlite"

    @property
    def lock_file(self) -> Path:
        return self.root / "controller.lock"

    @property
    def state_file(self) -> Path:
        """What `taskfarm cluster` records for `taskfarm status` and `stop`."""
        return self.root / "cluster.json"

    @property
    def dashboard_url_file(self) -> Path:
        """The running controller's dashboard URL, token included (0600)."""
        return self.security_dir / "dashboard.url"

    def furl_file(self, interface: str) -> Path:
        """The furl file of one of `INTERFACES`."""
        if interface not in INTERFACES:
            raise ValueError("unknown interface %r" % (interface,))
        return self.security_dir / ("%s.furl" % interface)

    def ensure(self) -> None:
        """Create the folders, with the security folder closed to others."""
        for folder in (self.root, self.security_dir, self.log_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        os.chmod(self.security_dir, 0o700)


#: What the lock file says before the controller listens.
NOT_LISTENING = "not listening yet"


@dataclass(frozen=True)
class LockHolder:
    """What the lock file says of the controller holding a profile."""

    #: Its pid (-1: not written yet).
    pid: int
    #: When it took the profile, "YYYY-MM-DD HH:MM:SS UTC" ("" if unknown).
    since: str = ""
    #: Where it listens (HOST:PORT), or `NOT_LISTENING`.
    location: str = NOT_LISTENING

    @classmethod
    def parse(cls, text: str) -> LockHolder:
        lines = [line.strip() for line in text.splitlines()] + ["", "", ""]
        pid = int(lines[0]) if lines[0].isdigit() else -1
        return cls(pid, lines[1], lines[2] or NOT_LISTENING)

    def text(self) -> bytes:
        return ("%d\n%s\n%s\n" % (self.pid, self.since, self.location)).encode()


def _read_fd(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")


class ProfileLock:
    """The exclusive hold of one controller on a profile (`lock_profile`).

    The lock is an ``flock`` on ``controller.lock``: the kernel lets it go
    when the holder's process ends, however it ends (kill -9 included).
    The file names the holder (`LockHolder`); a clean release empties it,
    so a name left in a free lock file is a holder that died.
    """

    def __init__(self, profile: Profile, fd: int, holder: LockHolder) -> None:
        self.profile = profile
        self._fd: int | None = fd
        self.holder = holder
        #: The dead holder whose lock this one took over, if any.
        self.stale: LockHolder | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def record_location(self, location: str) -> None:
        """Name where the holder listens, for those the lock turns away."""
        if self._fd is None:
            return
        self.holder = LockHolder(self.holder.pid, self.holder.since, location)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, self.holder.text(), 0)

    def release(self) -> None:
        """Let the profile go (also done by the end of the process)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # a clean stop leaves no name behind
            finally:
                os.close(fd)  # closing the only descriptor drops the flock


def lock_profile(profile: Profile, clock=time.time) -> ProfileLock:
    """Take `profile` for one controller, or raise `ProfileInUse` naming the
    profile and the controller that holds it (`in_use_error`).  A lock file
    still naming a controller whose process is gone (it crashed) is taken
    over, and a log line says so."""
    profile.ensure()
    path = profile.lock_file
    # Not inherited by processes this one starts (O_CLOEXEC, Python's default).
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise in_use_error(profile, LockHolder.parse(_read_fd(fd))) from None
        stale = LockHolder.parse(_read_fd(fd))
        if stale.pid > 0 and stale.pid != os.getpid():
            _log.warn(
                "profile {root}: taking over the lock of controller pid {pid} (since {since}, "
                "{location}): that process is gone without letting the profile go",
                root=str(profile.root),
                pid=stale.pid,
                since=stale.since or "unknown",
                location=stale.location,
            )
        holder = LockHolder(
            os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(clock()))
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.text(), 0)
    except BaseException:
        os.close(fd)
        raise
    lock = ProfileLock(profile, fd, holder)
    lock.stale = stale if stale.pid > 0 and stale.pid != os.getpid() else None
    return lock


def in_use_error(profile: Profile, holder: LockHolder | int) -> ProfileInUse:
    """The error for `profile` held by the controller `holder` (a
    `LockHolder`, or a pid: -1 when not known yet)."""
    if isinstance(holder, int):
        holder = LockHolder(holder)
    return ProfileInUse(
        "profile %s: already running: pid %s since %s, listening on %s; stop it "
        "(taskfarm stop --profile-dir %s), or give this one another --profile-dir"
        % (
            profile.root,
            holder.pid if holder.pid > 0 else "unknown",
            holder.since or "unknown",
            holder.location,
            profile.root,
        )
    )


def read_holder(profile: Profile) -> LockHolder | None:
    """The controller holding `profile` now, or None when none does."""
    try:
        fd = os.open(profile.lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockHolder.parse(_read_fd(fd))
        return None
    finally:
        os.close(fd)


def profile_holder(profile: Profile) -> int | None:
    """The pid of the controller holding `profile` now (-1: not written
    yet), or None when none does."""
    holder = read_holder(profile)
    return None if holder is None else holder.pid


def write_secret(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically, readable by its owner only."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_furl_file(path: Path) -> str:
    """Read a furl from its file, with a clear error when that is impossible."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        raise ProfileError(
            "furl file %s does not exist: is the controller running "
            "(`taskfarm cluster` or `twistd -n taskcontroller`)?" % (path,)
        ) from None
    except OSError as e:
        raise ProfileError("cannot read furl file %s: %s" % (path, e)) from None
    if not text.startswith("pb://"):
        raise ProfileError("%s does not hold a furl" % (path,))
    return text
