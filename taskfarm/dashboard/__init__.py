"""The controller's web dashboard (twisted.web) and its ``/metrics``.

`server.Dashboard` is the service; `events` streams the monitor's
snapshots to open pages; `metrics` writes the Prometheus text format.
The pages' HTML, script and style ship in ``assets/``.
"""
