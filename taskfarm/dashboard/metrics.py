"""``/metrics``: the controller's monitor in the Prometheus text format.

Written directly (exposition format 0.0.4): every metric has its
``# HELP`` and ``# TYPE`` lines; histograms have cumulative ``_bucket``
lines ending with ``le="+Inf"``, then ``_sum`` and ``_count``.
"""

from __future__ import annotations

import math

#: The Content-Type of the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _histogram(lines: list[str], name: str, help_text: str, histogram) -> None:
    lines.append("# HELP %s %s" % (name, help_text))
    lines.append("# TYPE %s histogram" % name)
    cumulative, total, count = histogram.snapshot()
    for bound, n in cumulative:
        lines.append('%s_bucket{le="%s"} %d' % (name, _number(bound), n))
    lines.append("%s_sum %s" % (name, _number(total)))
    lines.append("%s_count %d" % (name, count))


def render(monitor) -> bytes:
    """The text of ``/metrics`` for `monitor` (the controller's
    `taskfarm.controller.monitor.Monitor`), as bytes."""
    summary = monitor.summary()
    lines = [
        "# HELP taskfarm_engines Engines registered with the controller.",
        "# TYPE taskfarm_engines gauge",
        "taskfarm_engines %d" % summary["engines"],
        "# HELP taskfarm_tasks Tasks the controller holds, by state.",
        "# TYPE taskfarm_tasks gauge",
    ]
    for state, count in summary["queue"].items():
        lines.append('taskfarm_tasks{state="%s"} %d' % (_label(state), count))
    for name, key, help_text in (
        ("taskfarm_tasks_succeeded", "succeeded_total", "Tasks that succeeded."),
        ("taskfarm_tasks_failed", "failed_total", "Tasks that failed for good."),
        ("taskfarm_tasks_aborted", "aborted_total", "Tasks that were aborted."),
        ("taskfarm_tasks_retried", "retried_total", "Failed attempts queued again (retries, recovery tasks)."),
    ):
        lines.append("# HELP %s %s" % (name, help_text))
        lines.append("# TYPE %s counter" % name)
        lines.append("%s_total %d" % (name, summary[key]))
    _histogram(
        lines,
        "taskfarm_dispatch_latency_seconds",
        "Seconds from a task's submission to its first dispatch to an engine.",
        monitor.dispatch_latency,
    )
    _histogram(
        lines,
        "taskfarm_journal_commit_seconds",
        "Seconds each group commit of the task journal took.",
        monitor.journal_commit,
    )
    lines.append("")
    return "\n".join(lines).encode("utf-8")
