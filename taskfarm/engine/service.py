"""The engine service: a worker thread, a namespace and a link to the controller."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

from twisted.application import service

from taskfarm.engine.link import EngineLink
from taskfarm.engine.namespace import DEFAULT_MAX_TASK_OUTPUT, Namespace, install_output_capture
from taskfarm.engine.worker import CommandWorker
from taskfarm.profile import read_furl_file
from taskfarm.remote.engine import FoolscapControllerLink
from taskfarm.services import OrderedServices, Part


def machine_facts() -> dict:
    """What an engine knows about where it runs, sent with its properties."""
    facts = {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "ncpus": os.cpu_count() or 1,
        "python": platform.python_version(),
    }
    try:
        facts["ram"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        facts["ram"] = 0
    return facts


class EngineService(OrderedServices):
    """One engine: runs commands in its worker thread, stays registered.

    Its children, in start order: ``worker`` (the `CommandWorker` thread),
    ``link`` (the `EngineLink`).  They stop in the reverse order, each
    waited for: the link first (the session ends, nothing new arrives),
    then the worker, whose thread is joined off the reactor within a bound.
    """

    #: The children's names, in start order (they stop in reverse).
    START_ORDER = ("worker", "link")

    def __init__(self, worker: CommandWorker, link: service.Service) -> None:
        super().__init__()
        self.worker = worker
        self.link = link
        Part("worker", start=worker.start, stop=worker.stop).setServiceParent(self)
        link.setName("link")
        link.setServiceParent(self)

    def startService(self) -> None:
        install_output_capture()
        super().startService()


def create_engine(
    furl_file: Path,
    properties: dict,
    reactor,
    requested_id: int | None = None,
    names: dict | None = None,
    max_task_output: int = DEFAULT_MAX_TASK_OUTPUT,
) -> EngineService:
    """Build an engine that registers through the furl in `furl_file`,
    asking for `requested_id` (an MPI rank) the first time; `names` are in
    its user namespace from the start (``mpi``), also after a reset.  Each
    task keeps `max_task_output` bytes of its stdout and of its stderr."""
    props = machine_facts()
    props.update(properties)
    namespace = Namespace(properties=props, names=names, max_task_output=max_task_output)
    worker = CommandWorker(namespace, reactor)
    link = EngineLink(
        lambda: read_furl_file(furl_file), worker, reactor,
        transport=FoolscapControllerLink(reactor),
        requested_id=requested_id,
    )
    return EngineService(worker, link)
