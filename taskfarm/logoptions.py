"""``--log-file PATH``, ``--log-rotate-bytes``, ``--log-keep``: the runner's
log to a rotating file, for the ``taskengine`` and ``taskcontroller`` plugins.

Both runners take the plugin's log as it is parsed: ``python -m twisted``
(twist, what the launchers run) writes to its ``logFile`` option, which
becomes the rotating `LogFile`; ``twistd`` builds its observer from its
``--logger`` option, which becomes `taskfarm.logfiles.twistd_observer`.
twistd's own ``--logfile`` rotates at 1 MB but keeps every old file, and
twist's ``--log-file`` never rotates: hence these options.
"""

from __future__ import annotations

from twisted.python import usage

from taskfarm import exitcodes, logfiles


def parameters(what: str) -> list[list]:
    """The three options' ``optParameters`` entries; `what` says what
    PATH may hold."""
    return [
        [
            "log-file",
            None,
            None,
            "Write the log (and what is printed outside tasks) to PATH, rotated by "
            "size, instead of to stdout.  %s" % what,
        ],
        [
            "log-rotate-bytes",
            None,
            logfiles.ROTATE_LENGTH,
            "With --log-file: bytes after which the file is renamed PATH.1 (older "
            "ones shift) and a fresh one started.",
            int,
        ],
        [
            "log-keep",
            None,
            logfiles.MAX_ROTATED,
            "With --log-file: rotated files kept (PATH.1 .. PATH.N).",
            int,
        ],
    ]


def apply(options: usage.Options, rank: int | None = None) -> None:
    """Open the rotating ``--log-file`` of parsed `options` now (a path
    that cannot be written is a `usage.UsageError`, before anything
    starts) and make it where the runner (`options.parent`) logs.  Sets
    ``options["log-file"]`` to the path filled in
    (`logfiles.engine_log_path`, {rank} being `rank`) and
    ``options["log-observer"]`` to the observer factory (None without
    ``--log-file``)."""
    options["log-observer"] = None
    if options["log-file"] is None:
        return
    if options["log-rotate-bytes"] < 1024:
        raise usage.UsageError("--log-rotate-bytes must be at least 1024")
    if options["log-keep"] < 1:
        raise usage.UsageError("--log-keep must be at least 1")
    parent = getattr(options, "parent", None)
    if parent is not None and "logFile" not in parent and parent.get("logger"):
        raise usage.UsageError("--log-file and twistd's --logger both name the log")
    try:
        path = logfiles.engine_log_path(options["log-file"], rank=rank).absolute()
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    try:
        factory = logfiles.rotating_observer_factory(
            path, options["log-rotate-bytes"], options["log-keep"]
        )
    except OSError as e:
        raise usage.UsageError(
            "--log-file %s cannot be written: %s" % (path, e.strerror or e)
        ) from None
    options["log-file"] = str(path)
    options["log-observer"] = factory
    if parent is not None and "logFile" in parent:
        # twist: its observer (of its --log-format) writes to logFile.
        parent["logFile"] = factory.args[0]
    elif parent is not None:
        # twistd: its --logger takes precedence over its --logfile.
        parent["logger"] = logfiles.use_for_twistd(factory)
    # Whoever watches the process's own stderr (mpiexec's launcher) still
    # sees why it exits.
    exitcodes.say_exit_on_stderr()
