"""The profile folder: where a controller keeps its certificate, furls and logs.

Layout (folders 0700, secret files 0600)::

    PROFILE/
      security/controller.pem      the controller Tub's key and certificate
      security/engine.furl         lets an engine register
      security/task.furl           the Task interface, for clients
      security/multiengine.furl    the MultiEngine interface, for clients
      journal.sqlite               the task journal (unless --no-journal)
      controller.lock              held by the one controller using the
                                   profile; holds its pid
      log/                         controller and engine logs

The default profile is ``~/.taskfarm``; ``TASKFARM_PROFILE`` overrides it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from taskfarm.errors import ProfileError, ProfileInUse

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


class ProfileLock:
    """The exclusive hold of one controller on a profile (`lock_profile`).

    The lock is an ``flock`` on ``controller.lock``: the kernel lets it go
    when the holder's process ends, however it ends (kill -9 included).
    """

    def __init__(self, profile: Profile, fd: int) -> None:
        self.profile = profile
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the profile go (also done by the end of the process)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock


def lock_profile(profile: Profile) -> ProfileLock:
    """Take `profile` for one controller, or raise `ProfileInUse` naming the
    profile and the pid of the controller that holds it."""
    profile.ensure()
    path = profile.lock_file
    # Not inherited by processes this one starts (O_CLOEXEC, Python's default).
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise in_use_error(profile, int(holder) if holder.isdigit() else -1) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    except BaseException:
        os.close(fd)
        raise
    return ProfileLock(profile, fd)


def in_use_error(profile: Profile, holder: int) -> ProfileInUse:
    """The error for `profile` held by the controller with pid `holder`
    (-1: not known yet)."""
    return ProfileInUse(
        "profile %s is in use by another controller (pid %s); stop that one, "
        "or give this one another --profile-dir"
        % (profile.root, holder if holder > 0 else "unknown")
    )


def profile_holder(profile: Profile) -> int | None:
    """The pid of the controller holding `profile` now, or None when none does."""
    try:
        fd = os.open(profile.lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


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
