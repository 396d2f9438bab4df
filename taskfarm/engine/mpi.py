"""An engine that is one rank of an MPI job (``taskengine --mpi``).

As the original IPython engine did, an MPI engine asks the controller for
the engine id equal to its MPI rank, and gets it when it is free (the
registry gives another one when it is taken).  The rank comes from mpi4py
when it can be imported (``MPI.COMM_WORLD.Get_rank()``), else from the
variables that the MPI starters set: MPICH/Hydra and Intel MPI
(``PMI_RANK``), Open MPI (``OMPI_COMM_WORLD_RANK``), PMIx (``PMIX_RANK``)
and Slurm's ``srun`` (``SLURM_PROCID``).

When mpi4py can be imported, the module ``mpi4py.MPI`` is bound as ``mpi``
in the engine's user namespace, so that code run on the engines can use
``mpi.COMM_WORLD``.  Only an engine started with ``--mpi`` imports it:
importing ``mpi4py.MPI`` initialises MPI, which a plain engine must not do.

An MPI engine's parent is the MPI starter's proxy, not the taskfarm
launcher, so `taskfarm.lifeline` cannot tie the two together.  The
launcher names itself in `MPI_LAUNCHER_PID` instead, and the engine looks
every second whether that process is still there; when it is gone the
engine exits, and so the whole MPI job ends with it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping

from twisted.internet import task
from twisted.logger import Logger

#: The environment variables that hold a process's MPI rank, in the order
#: they are read: MPICH/Hydra, Open MPI, PMIx, Slurm.
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")

#: The pid of the `MPIExecLauncher` that started this engine's MPI job.
MPI_LAUNCHER_PID = "TASKFARM_MPI_LAUNCHER_PID"

#: Seconds between two looks at whether the launcher is still there.
LAUNCHER_CHECK_PERIOD = 1.0

_log = Logger()


def rank_from_environment(environ: Mapping[str, str]) -> int | None:
    """The MPI rank named by the first of `RANK_VARIABLES` that holds a
    number, or None when none does."""
    for name in RANK_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def load_mpi(import_module: Callable = importlib.import_module):
    """The module ``mpi4py.MPI`` (MPI initialised), or None when mpi4py
    cannot be imported or finds no MPI library (logged)."""
    try:
        return import_module("mpi4py.MPI")
    except ImportError as e:
        _log.info("mpi4py cannot be imported ({error}): no `mpi` in the namespace", error=e)
    except RuntimeError as e:
        # mpi4py's own error when it finds no libmpi (first line is enough).
        _log.warn(
            "mpi4py found no MPI library ({error}): no `mpi` in the namespace",
            error=str(e).splitlines()[0] if str(e) else e,
        )
    return None


def mpi_rank(mpi, environ: Mapping[str, str]) -> int | None:
    """This process's rank: from `mpi` (``mpi4py.MPI``) when given, else
    from `environ`; None when neither knows one."""
    if mpi is not None:
        return int(mpi.COMM_WORLD.Get_rank())
    return rank_from_environment(environ)


class NoRank(Exception):
    """``--mpi`` was given, but this process is no MPI rank."""


def mpi_engine_setup(environ=None, import_module: Callable = importlib.import_module):
    """``(rank, names)`` for an engine started with ``--mpi``: the engine id
    to ask for, and the names to put in its user namespace (``mpi`` when
    mpi4py is importable).  Raises `NoRank` when no rank can be found."""
    environ = os.environ if environ is None else environ
    # Without one of the variables this process was not started by an MPI
    # starter: do not initialise MPI (a singleton) just to learn rank 0.
    if rank_from_environment(environ) is None:
        raise NoRank(
            "--mpi: this engine is no MPI rank (none of %s is set); start it with "
            "mpiexec, or leave out --mpi" % ", ".join(RANK_VARIABLES)
        )
    mpi = load_mpi(import_module)
    names = {"mpi": mpi} if mpi is not None else {}
    return mpi_rank(mpi, environ), names


def follow_mpi_launcher(reactor, environ=None, exit=os._exit) -> task.LoopingCall | None:
    """Exit (status 1) once the launcher named in `MPI_LAUNCHER_PID` is
    gone; the looping call, or None when no launcher is named."""
    environ = os.environ if environ is None else environ
    # Taken out, so that programs our tasks run do not follow it.
    launcher = environ.pop(MPI_LAUNCHER_PID, "")
    if not launcher.isdigit():
        return None
    pid = int(launcher)

    def look() -> None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("the MPI launcher (pid %d) is gone; exiting" % pid, file=sys.stderr, flush=True)
            exit(1)
        except PermissionError:
            pass  # there, but another user's: keep going

    loop = task.LoopingCall(look)
    loop.clock = reactor
    loop.start(LAUNCHER_CHECK_PERIOD, now=True)
    return loop
