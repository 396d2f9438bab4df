"""The controller's web dashboard and ``/metrics`` (twisted.web).

Off unless the controller is given ``--dashboard ENDPOINT``.  Every
request must carry the dashboard's token, a `secrets.token_urlsafe` made
at start, as ``?token=`` in the URL or an ``Authorization: Bearer``
header (what a Prometheus scraper sends); anything else is answered 403.
The URL with its token is logged at start and written 0600 to the
profile's ``security/dashboard.url``, removed at stop.

Pages: ``/`` (summary, engines, timeline, recent failures, live over
``/events``) and ``/task/ID`` (one task); their data as JSON under
``/api/``; ``/metrics``; the page's own assets under ``/static/``, shipped
in the package (no CDN).  Nothing here blocks the reactor: each answer is
built from the monitor's bounded buffers.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from importlib import resources

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import resource, server

from taskfarm.dashboard import metrics
from taskfarm.dashboard.events import EventStream
from taskfarm.profile import write_secret

#: The assets served under /static/, and their types.
ASSETS = {
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
}
PAGES = ("index.html", "task.html")

#: Seconds a task page waits for the controller's `why` before it answers without it.
WHY_TIMEOUT = 5.0

_SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)


def dashboard_endpoint(text: str) -> str:
    """`text`, a ``tcp:PORT[:interface=HOST]`` endpoint string, with
    ``interface=127.0.0.1`` added when none is named (loopback unless
    told); `ValueError` with a sentence if it is not one."""
    parts = re.split(r"(?<!\\):", text)
    if len(parts) < 2 or parts[0] != "tcp":
        raise ValueError(
            "--dashboard must be a tcp endpoint like tcp:8765:interface=127.0.0.1, not %r" % (text,)
        )
    try:
        port = int(parts[1])
    except ValueError:
        raise ValueError("the port in --dashboard %r is not a number" % (text,)) from None
    if not 0 <= port <= 65535:
        raise ValueError("the port in --dashboard %r is not in 0..65535" % (text,))
    if not any(part.startswith("interface=") for part in parts[2:]):
        text += ":interface=127.0.0.1"
    return text


def _asset(name: str) -> bytes:
    return resources.files("taskfarm.dashboard").joinpath("assets", name).read_bytes()


def _json(request, value, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(value, separators=(",", ":"), default=repr).encode("utf-8")


class _Forbidden(resource.Resource):
    isLeaf = True

    def render(self, request) -> bytes:
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"403 Forbidden: this dashboard needs its token (see security/dashboard.url in the profile)\n"


class _Bytes(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self._body = body
        self._type = content_type

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", self._type)
        return self._body


class _Call(resource.Resource):
    """A leaf whose GET answers ``render(request)`` (bytes)."""

    isLeaf = True

    def __init__(self, render) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request):
        return self._render(request)


class DashboardRoot(resource.Resource):
    """The token check in front of every page, asset and API."""

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self._dashboard = dashboard
        self._token = dashboard.token.encode("ascii")
        # The pages name their assets with the token, so that those load too.
        pages = {name: _asset(name).replace(b"{{token}}", self._token) for name in PAGES}
        self._index = _Bytes(pages["index.html"], b"text/html; charset=utf-8")
        self._task_page = _Bytes(pages["task.html"], b"text/html; charset=utf-8")
        self._static = {
            name.encode(): _Bytes(_asset(name), kind) for name, kind in ASSETS.items()
        }

    def _allowed(self, request) -> bool:
        given = (request.args.get(b"token") or [b""])[0]
        header = request.getHeader(b"authorization") or b""
        if header.lower().startswith(b"bearer "):
            given = header[7:].strip()
        return hmac.compare_digest(given, self._token)

    def getChildWithDefault(self, name: bytes, request):
        for key, value in _SECURITY_HEADERS:
            request.setHeader(key, value)
        if not self._allowed(request):
            return _Forbidden()
        dashboard = self._dashboard
        rest = request.postpath
        if name == b"":
            return self._index
        if name == b"task" and len(rest) == 1:
            return self._task_page
        if name == b"static" and len(rest) == 1 and rest[0] in self._static:
            return self._static[rest[0]]
        if name == b"events" and not rest:
            return _Call(dashboard.render_events)
        if name == b"metrics" and not rest:
            return _Call(dashboard.render_metrics)
        if name == b"api" and rest == [b"snapshot"]:
            return _Call(lambda request: _json(request, dashboard.snapshot()))
        if name == b"api" and len(rest) == 2 and rest[0] == b"task":
            return _Call(lambda request: dashboard.render_task(request, rest[1]))
        return resource.NoResource("no such dashboard page")


class _Site(server.Site):
    """A Site without an access log: every URL carries the token."""

    def log(self, request) -> None:
        pass


class Dashboard(Service):
    """The dashboard of one controller: `tasks` is its `TaskController`
    (its `monitor` is what the pages show), `endpoint` a twisted server
    endpoint string, `url_file` where the URL with its token is written."""

    _log = Logger()

    def __init__(self, tasks, reactor, endpoint: str, url_file=None, token: str | None = None) -> None:
        self._tasks = tasks
        self._monitor = tasks.monitor
        self._reactor = reactor
        self._endpoint = endpoint
        self._url_file = url_file
        #: The secret every request must carry.
        self.token = token or secrets.token_urlsafe(32)
        self.events = EventStream(reactor, self.snapshot)
        self.site = _Site(DashboardRoot(self))
        self.site.displayTracebacks = False
        self._port = None
        #: The URL with its token, once listening.
        self.url: str | None = None
        #: The URL, or the Failure of listening, once known.
        self._outcome = None
        self._waiters: list[defer.Deferred] = []

    def startService(self) -> None:
        super().startService()
        d = serverFromString(self._reactor, self._endpoint).listen(self.site)
        d.addCallbacks(self._listened, self._not_listening)

    def _listened(self, port) -> None:
        self._port = port
        address = port.getHost()
        host = address.host
        if host in ("0.0.0.0", "::", ""):
            import socket

            host = socket.gethostname()
        if ":" in host:
            host = "[%s]" % host
        self.url = "http://%s:%d/?token=%s" % (host, address.port, self.token)
        if self._url_file is not None:
            write_secret(self._url_file, self.url + "\n")
        self._log.info("dashboard at {url}", url=self.url)
        self._settle(self.url)

    def _not_listening(self, failure) -> None:
        # The controller goes on serving its furls without a dashboard.
        self._log.error(
            "the dashboard cannot listen on {endpoint}: {error}; the controller runs without it",
            endpoint=self._endpoint,
            error=failure.getErrorMessage(),
        )
        self._settle(failure)

    def _settle(self, outcome) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(outcome)  # a Failure errbacks it

    def listening(self) -> defer.Deferred:
        """A Deferred (a new one for each caller) that fires with the URL
        once the dashboard listens, or fails with why it cannot."""
        d: defer.Deferred = defer.Deferred()
        if self._outcome is None:
            self._waiters.append(d)
        else:
            d.callback(self._outcome)
        return d

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.events.close()
        if self._url_file is not None:
            self._url_file.unlink(missing_ok=True)
        if self._port is None:
            return defer.succeed(None)
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening)

    # -- what the pages read ------------------------------------------------------------

    def snapshot(self) -> dict:
        """Everything the main page shows, as plain data."""
        monitor = self._monitor
        failures = []
        for failure in monitor.failures(limit=10):
            failure = dict(failure)
            failure["traceback"] = failure["traceback"][-2000:]
            failures.append(failure)
        return {
            "summary": monitor.summary(),
            "engines": monitor.engines(),
            "timeline": monitor.timeline(),
            "failures": failures,
        }

    def render_metrics(self, request) -> bytes:
        request.setHeader(b"content-type", metrics.CONTENT_TYPE.encode())
        return metrics.render(self._monitor)

    def render_events(self, request):
        if self.events.add(request) is None:
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"10")
            return b"too many dashboard pages are open\n"
        return server.NOT_DONE_YET

    def render_task(self, request, raw_id: bytes):
        try:
            taskid = int(raw_id)
        except ValueError:
            return _json(request, {"error": "a task id is a number, not %r" % raw_id.decode("latin-1")}, 400)
        info = self._monitor.task(taskid)
        if info is None:
            return _json(request, {"error": "no task %d (never submitted, or cleared)" % taskid}, 404)
        why = getattr(self._tasks, "why", None)
        if why is None or info["state"] not in ("scheduled", "waiting_retry"):
            info["why"] = None
            return _json(request, info)
        d = defer.maybeDeferred(why, taskid)
        d.addTimeout(WHY_TIMEOUT, self._reactor)

        def answered(value):
            info["why"] = value
            return info

        def unanswered(failure):
            info["why"] = {"error": failure.getErrorMessage() or failure.type.__name__}
            return info

        d.addCallbacks(answered, unanswered)

        def write(value):
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(_json(request, value))
                request.finish()

        d.addCallback(write)
        d.addErrback(lambda failure: self._log.failure("answering a task page", failure))
        return server.NOT_DONE_YET
