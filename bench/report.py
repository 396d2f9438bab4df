#!/usr/bin/env python
"""Aggregate the JSON lines of one benchmark run into a markdown report.

    python bench/report.py [--stamp STAMP | FILE.jsonl ...] [--out-dir bench/results]

Without arguments it reads the newest run in bench/results (the files
``<stamp>-*.jsonl`` that bench/run.py writes, and ``<stamp>-meta.json``).
Writes ``latest.md`` and ``latest.json`` (and ``<stamp>.md``) and prints the
markdown.  Stdlib only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

PEERS = ("pool", "dask", "ipp", "ray")
PEER_NAMES = {
    "pool": "ProcessPoolExecutor(4)",
    "dask": "dask LocalCluster(4x1)",
    "ipp": "ipyparallel Cluster(n=4)",
    "ray": "ray (num_cpus=4)",
    "taskfarm": "taskfarm (4 engines)",
}

# workload -> [(metric, label)]; every system that has the metric gets a row
WORKLOADS = [
    ("(a) bulk no-op throughput, 10,000 tasks", [
        ("bulk_map_tasks_s", "map"),
        ("bulk_depend_map_tasks_s", "map, every task with one shared depend"),
        ("bulk_batch_tasks_s", "run_many + barrier + get_task_results"),
    ]),
    ("(b) one by one, 10,000 tasks (one submit call each)", [
        ("onebyone_tasks_s", "submit loop + wait + results"),
        ("onebyone_barrier_tasks_s", "run loop + barrier (no results)"),
        ("run_call_us", "one blocking tc.run call"),
    ]),
    ("(c) single-task round trip, 200 samples", [
        ("rtt_ms_median", "median"),
        ("rtt_ms_p99", "p99"),
        ("rtt_leg_client_to_controller_us", "leg: client -> controller accepted"),
        ("rtt_leg_controller_to_engine_us", "leg: accepted -> running on the engine"),
        ("rtt_leg_on_engine_us", "leg: running on the engine"),
        ("rtt_leg_engine_to_client_us", "leg: finished -> value in the calling thread"),
        ("thread_hop_us", "blocking client: a no-op call into the reactor thread"),
        ("controller_call_us", "blocking client: one controller call (engine_ids)"),
        ("fc_seq_rtt_us_median", "raw Foolscap sequential round trip, median"),
        ("fc_seq_rtt_us_p99", "raw Foolscap sequential round trip, p99"),
        ("fc_seq_cpu_us", "raw Foolscap round trip: CPU of both processes, us"),
        ("fc_echo1MB_MBps", "raw Foolscap 1 MiB echo"),
        ("rtt_over_fc_rtt", "round trip / raw Foolscap round trip"),
    ]),
    ("(d) 100 x 1 MiB results gathered at the client", [
        ("ret1MB_MBps", "MB/s"),
    ]),
    ("(e) fairness: 80 x sleep(0.1) on 4 workers (ideal 2.0 s)", [
        ("fairness_wall_s", "wall"),
        ("fairness_ratio", "wall / ideal"),
    ]),
    ("(f) journal on vs off (taskfarm bulk map)", [
        ("bulk_map_tasks_s", "journal on (default)"),
        ("bulk_map_nojournal_tasks_s", "--no-journal"),
    ]),
    ("(g) queue growth (run_many batches of 10,000 with no engine; controller RSS; then 4 engines drain it)", [
        ("queue_submit_tasks_s", "submit rate"),
        ("queue_max_queued", "queued when submission ended"),
        ("queue_peak_rss_mib", "peak controller RSS"),
        ("queue_rss_per_queued_task_bytes", "RSS per queued task"),
        ("queue_batch_ms_start", "run_many(10,000) at the start"),
        ("queue_batch_ms_end", "run_many(10,000) at the end"),
        ("queue_flatness", "end / start"),
        ("queue_drain_tasks_s", "drain: 4 engines on the full queue"),
        ("queue_rss_after_clear_mib", "controller RSS after the drain and clear()"),
        ("queue_depend_submit_tasks_s", "depend: submit rate"),
        ("queue_depend_max_queued", "depend: queued when submission ended"),
        ("queue_depend_peak_rss_mib", "depend: peak controller RSS"),
        ("queue_depend_rss_per_queued_task_bytes", "depend: RSS per queued task"),
        ("queue_depend_batch_ms_start", "depend: run_many at the start"),
        ("queue_depend_batch_ms_end", "depend: run_many at the end"),
        ("queue_depend_flatness", "depend: end / start"),
        ("queue_depend_drain_tasks_s", "depend: drain, 4 engines on the full queue"),
        ("queue_depend_rss_after_clear_mib", "depend: RSS after the drain and clear()"),
    ]),
    ("(h) controller memory per finished task (fetched and cleared)", [
        ("mem_per_finished_task_bytes", "RSS delta / tasks"),
    ]),
    ("(i) data path: one NumPy array (--data-mb, 200 MiB) on one engine", [
        ("data_push_MBps", "push"),
        ("data_pull_MBps", "pull"),
        ("data_result_MBps", "returned as a task result"),
        ("data_push_rss_growth_client_x", "push: client peak RSS growth / payload"),
        ("data_push_rss_growth_controller_x", "push: controller peak RSS growth / payload"),
        ("data_push_rss_growth_engine_x", "push: engine peak RSS growth / payload"),
        ("data_pull_rss_growth_client_x", "pull: client peak RSS growth / payload"),
        ("data_pull_rss_growth_controller_x", "pull: controller peak RSS growth / payload"),
        ("data_pull_rss_growth_engine_x", "pull: engine peak RSS growth / payload"),
        ("data_result_rss_growth_client_x", "result: client peak RSS growth / payload"),
        ("data_result_rss_growth_controller_x", "result: controller peak RSS growth / payload"),
        ("data_result_rss_growth_engine_x", "result: engine peak RSS growth / payload"),
        ("journal_disk_after_clear_mib", "journal disk use after clear()"),
    ]),
    ("cluster start-up", [
        ("startup_s", "until 4 workers answer"),
    ]),
]

SKIP_EXTRA = {"bench", "system", "metric", "value", "unit", "run", "desc", "load1", "variant",
              "points_batch_ms_rssmib"}


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def load(paths):
    records = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        pass
    return records


class Stats:
    def __init__(self, records):
        self.groups: dict[tuple, list] = {}
        for r in records:
            self.groups.setdefault((r.get("system"), r.get("metric")), []).append(r)

    def get(self, system, metric):
        rs = self.groups.get((system, metric))
        if not rs:
            return None
        vals = [r["value"] for r in rs]
        med = statistics.median(vals)
        mid = min(rs, key=lambda r: abs(r["value"] - med))
        return {"median": med, "min": min(vals), "max": max(vals), "runs": len(vals),
                "unit": rs[0].get("unit", ""), "median_run": mid}

    def median(self, system, metric):
        s = self.get(system, metric)
        return None if s is None else s["median"]

    def systems(self):
        return sorted({s for s, _ in self.groups})


def notes_of(rec) -> str:
    extra = {k: v for k, v in rec.items() if k not in SKIP_EXTRA}
    parts = []
    for k, v in extra.items():
        if isinstance(v, float):
            v = fmt(v)
        parts.append("%s=%s" % (k, v))
    return ", ".join(parts)


def workload_tables(st: Stats) -> list[str]:
    out = []
    order = ["taskfarm"] + list(PEERS)
    for title, metrics in WORKLOADS:
        rows = []
        for metric, label in metrics:
            for system in order:
                if title.startswith("(f)") and system != "taskfarm":
                    continue
                s = st.get(system, metric)
                if s is None:
                    continue
                spread = "%s – %s" % (fmt(s["min"]), fmt(s["max"])) if s["runs"] > 1 else ""
                rows.append("| %s | %s | **%s** | %s | %d | %s | %s |" % (
                    PEER_NAMES.get(system, system), label, fmt(s["median"]), spread, s["runs"], s["unit"],
                    notes_of(s["median_run"])))
        if not rows:
            continue
        out.append("### %s\n" % title)
        out.append("| system | metric | median | min – max | runs | unit | details (median run) |")
        out.append("|---|---|---:|---:|---:|---|---|")
        out.extend(rows)
        out.append("")
    return out


def best_peer(st: Stats, metric: str, exclude=(), lowest=False):
    cands = [(st.median(p, metric), p) for p in PEERS if p not in exclude and st.median(p, metric) is not None]
    if not cands:
        return None, None
    return (min if lowest else max)(cands)


def verdict(ok) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def targets(st: Stats) -> tuple[list[str], list[dict]]:
    rows: list[dict] = []

    def add(name, value, target, ok, detail=""):
        rows.append({"target": name, "value": value, "goal": target, "result": verdict(ok), "detail": detail})

    tf = lambda m: st.median("taskfarm", m)  # noqa: E731

    bulk = tf("bulk_map_tasks_s")
    bp, bpn = best_peer(st, "bulk_map_tasks_s")
    if bulk is not None and bp:
        add("bulk: taskfarm / best peer", "%.2fx" % (bulk / bp), ">= 3x", bulk / bp >= 3,
            "taskfarm map %s/s vs %s %s/s" % (fmt(bulk), bpn, fmt(bp)))
        dp, dpn = best_peer(st, "bulk_map_tasks_s", exclude=("pool",))
        if dp:
            add("bulk: taskfarm / best cluster peer (no pool)", "%.2fx" % (bulk / dp), "info", None,
                "vs %s %s/s" % (dpn, fmt(dp)))
    if bulk is not None:
        add("bulk: taskfarm tasks/s", fmt(bulk), ">= 10,000", bulk >= 10_000)
    batch = tf("bulk_batch_tasks_s")
    if batch is not None:
        add("bulk (run_many variant) tasks/s", fmt(batch), "info", None)

    one = tf("onebyone_tasks_s")
    op, opn = best_peer(st, "onebyone_tasks_s")
    if one is not None and op:
        add("one-by-one: taskfarm / best peer", "%.2fx" % (one / op), ">= 1x", one / op >= 1,
            "taskfarm %s/s vs %s %s/s (both include fetching the results)" % (fmt(one), opn, fmt(op)))
        dp, dpn = best_peer(st, "onebyone_tasks_s", exclude=("pool",))
        if dp:
            add("one-by-one: taskfarm / best cluster peer (no pool)", "%.2fx" % (one / dp), "info", None,
                "vs %s %s/s" % (dpn, fmt(dp)))

    rtt = tf("rtt_ms_median")
    if rtt is not None:
        add("RTT median (ms)", fmt(rtt), "<= 0.8 ms", rtt <= 0.8)
        lp, lpn = best_peer(st, "rtt_ms_median", lowest=True)
        if lp:
            add("RTT below every peer", "%s vs %s %s" % (fmt(rtt), lpn, fmt(lp)), "< fastest peer", rtt < lp)

    big = tf("ret1MB_MBps")
    if big is not None:
        add("1 MiB results (MB/s)", fmt(big), ">= 600", big >= 600)

    nj = tf("bulk_map_nojournal_tasks_s")
    if bulk is not None and nj:
        add("journal on / off (bulk)", "%.2f" % (bulk / nj), ">= 0.70", bulk / nj >= 0.70,
            "%s/s on, %s/s off" % (fmt(bulk), fmt(nj)))

    mem = tf("mem_per_finished_task_bytes")
    if mem is not None:
        add("memory per finished task (B)", fmt(mem), "<= 2 KiB", mem <= 2048)

    for prefix, label in (("queue_", ""), ("queue_depend_", " (half with depend)")):
        s = st.get("taskfarm", prefix + "peak_rss_mib")
        if s is None:
            continue
        rec = s["median_run"]
        total = rec.get("total", 0)
        per = st.median("taskfarm", prefix + "rss_per_queued_task_bytes")
        if total >= 1_000_000:
            add("1M queued tasks: controller RSS%s" % label, "%s MiB" % fmt(s["median"]), "< 2 GiB",
                s["median"] < 2048, "peak RSS, %s submitted" % fmt(total))
        elif per is not None:
            proj = rec.get("rss_before_mib", 0) + per * 1_000_000 / 2**20
            add("1M queued tasks: controller RSS%s (projected)" % label, "%s MiB" % fmt(proj), "< 2 GiB",
                proj < 2048, "projected from %s tasks: %s B per queued task" % (fmt(total), fmt(per)))
        flat = st.median("taskfarm", prefix + "flatness")
        if flat is not None:
            add("flatness%s: run_many cost end / start" % label, "%.2f" % flat, "<= 1.5 (assumed)", flat <= 1.5,
                "%s ms -> %s ms per batch of 10,000" % (fmt(st.median("taskfarm", prefix + "batch_ms_start")),
                                                         fmt(st.median("taskfarm", prefix + "batch_ms_end"))))

    fair = tf("fairness_ratio")
    if fair is not None:
        add("fairness: wall / ideal", "%.2f" % fair, "info (1.0 ideal)", None)

    lines = ["| target | taskfarm | goal | result | detail |", "|---|---:|---|---|---|"]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s |" % (r["target"], r["value"], r["goal"], r["result"], r["detail"]))
    return lines, rows


def met(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def issue12_targets(st: Stats) -> tuple[list[str], list[dict]]:
    """Issue 12's targets, each a ratio or bound measured in this run,
    side by side with what it is compared to, as met / missed."""
    rows: list[dict] = []
    tf = lambda m: st.median("taskfarm", m)  # noqa: E731
    ray = lambda m: st.median("ray", m)  # noqa: E731

    def add(name, value, goal, ok, against=""):
        rows.append({"target": name, "value": value, "goal": goal, "result": met(ok), "against": against})

    big, rbig = tf("ret1MB_MBps"), ray("ret1MB_MBps")
    if big is not None:
        if rbig:
            add("100 x 1 MiB results: taskfarm / Ray", "%.2fx" % (big / rbig), ">= 1.0x", big / rbig >= 1.0,
                "taskfarm %s MB/s, Ray %s MB/s" % (fmt(big), fmt(rbig)))
        add("100 x 1 MiB results (MB/s)", fmt(big), ">= 600 (quiet machine)", big >= 600)
    payload = None
    for name in ("push", "pull", "result"):
        rate = tf("data_%s_MBps" % name)
        s = st.get("taskfarm", "data_%s_MBps" % name)
        if rate is None:
            continue
        payload = s["median_run"].get("mb", payload)
        add("%s MiB array, %s (MB/s)" % (payload, name), fmt(rate), ">= 500", rate >= 500)
        worst, who = None, None
        for role in ("client", "controller", "engine"):
            x = tf("data_%s_rss_growth_%s_x" % (name, role))
            if x is not None and (worst is None or x > worst):
                worst, who = x, role
        if worst is not None:
            add("%s MiB array, %s: peak RSS growth / payload" % (payload, name), "%.2fx" % worst, "<= 2x",
                worst <= 2, "largest in the %s" % who)
    rtt, rrtt = tf("rtt_ms_median"), ray("rtt_ms_median")
    if rtt is not None:
        if rrtt:
            add("round trip median vs Ray", "%s ms" % fmt(rtt), "< Ray", rtt < rrtt, "Ray %s ms" % fmt(rrtt))
        floor = tf("fc_seq_rtt_us_median")
        ratio = tf("rtt_over_fc_rtt")
        if floor and ratio is not None:
            add("round trip / raw Foolscap round trip", "%.2fx" % ratio, "<= 4x", ratio <= 4,
                "raw Foolscap %s us" % fmt(floor))
        p99 = tf("rtt_ms_p99")
        if p99 is not None:
            add("round trip p99 / median", "%.2fx" % (p99 / rtt), "<= 2x", p99 / rtt <= 2,
                "p99 %s ms" % fmt(p99))
    bulk = tf("bulk_map_tasks_s")
    if bulk is not None:
        add("bulk no-op tasks/s", fmt(bulk), ">= 19,000 (quiet machine)", bulk >= 19_000)
    mem = tf("mem_per_finished_task_bytes")
    if mem is not None:
        add("memory per finished task (B)", fmt(mem), "<= 2 KiB", mem <= 2048)
    s = st.get("taskfarm", "queue_peak_rss_mib")
    if s is not None:
        total = s["median_run"].get("total", 0)
        per = tf("queue_rss_per_queued_task_bytes")
        if total >= 1_000_000:
            add("1,000,000 queued: controller RSS", "%s MiB" % fmt(s["median"]), "< 2 GiB", s["median"] < 2048)
        elif per is not None:
            proj = s["median_run"].get("rss_before_mib", 0) + per * 1_000_000 / 2**20
            add("1,000,000 queued: controller RSS (projected)", "%s MiB" % fmt(proj), "< 2 GiB", proj < 2048,
                "from %s queued" % fmt(total))
    disk = st.get("taskfarm", "journal_disk_after_clear_mib")
    if disk is not None:
        before = disk["median_run"].get("before_mib")
        ok = None if before is None else disk["median"] <= 1.1 * before + 0.1
        add("journal disk use after clear()", "%s MiB" % fmt(disk["median"]),
            "within 10% of live tasks' need", ok, "before the data phases: %s MiB" % fmt(before))
    lines = ["| target | taskfarm | goal | met? | compared with (same run) |", "|---|---:|---|---|---|"]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s |" % (r["target"], r["value"], r["goal"], r["result"], r["against"]))
    return lines, rows


def problems(records) -> list[str]:
    out = []
    for r in records:
        if r.get("metric") in ("error", "phase_timeout", "unavailable", "skipped", "stage_timeout"):
            out.append("- %s %s run %s: %s %s" % (r.get("bench"), r.get("system"), r.get("run"), r.get("metric"),
                                                 r.get("error") or r.get("phase") or ""))
        elif r.get("note"):
            out.append("- %s %s run %s: %s: %s" % (r.get("bench"), r.get("system"), r.get("run"), r.get("metric"),
                                                  r.get("note")))
    return out


def find_latest():
    metas = sorted(glob.glob(os.path.join(RESULTS, "*-meta.json")))
    if metas:
        return os.path.basename(metas[-1])[: -len("-meta.json")]
    files = sorted(glob.glob(os.path.join(RESULTS, "*-*.jsonl")))
    return os.path.basename(files[-1]).split("-")[0] if files else None


def render(records, meta) -> tuple[str, dict]:
    st = Stats(records)
    target_lines, target_rows = targets(st)
    md = ["## Results%s\n" % (" (%s)" % meta["stamp"] if meta.get("stamp") else "")]
    if meta:
        cond = []
        for key in ("date", "host", "cpus", "python", "mode", "reps", "load_before", "load_after", "wall_s", "git"):
            if key in meta:
                cond.append("%s: %s" % (key, meta[key]))
        md.append("Conditions: " + "; ".join(cond) + ".\n")
        if meta.get("versions"):
            md.append("Versions: " + ", ".join("%s %s" % kv for kv in sorted(meta["versions"].items())) + ".\n")
        if meta.get("notes"):
            md.append("Notes: " + " ".join(meta["notes"]) + "\n")
    md.append("### Targets\n")
    md.extend(target_lines)
    md.append("")
    issue_lines, issue_rows = issue12_targets(st)
    if issue_rows:
        md.append("### Issue 12 targets (ratios measured in this run)\n")
        md.extend(issue_lines)
        md.append("")
    md.extend(workload_tables(st))
    probs = problems(records)
    if probs:
        md.append("### Problems and cut-short phases\n")
        md.extend(probs)
        md.append("")
    summary = {
        "meta": meta,
        "targets": target_rows,
        "issue12_targets": issue_rows,
        "metrics": {"%s/%s" % k: {kk: vv for kk, vv in (st.get(*k) or {}).items() if kk != "median_run"}
                    for k in sorted(st.groups, key=lambda k: (str(k[0]), str(k[1])))},
    }
    return "\n".join(md) + "\n", summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--stamp")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    meta = {}
    if args.files:
        paths = args.files
    else:
        stamp = args.stamp or find_latest()
        if not stamp:
            print("no results in %s" % RESULTS, file=sys.stderr)
            return 1
        paths = sorted(glob.glob(os.path.join(RESULTS, stamp + "-*.jsonl")))
        meta_path = os.path.join(RESULTS, stamp + "-meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        meta.setdefault("stamp", stamp)
    records = load(paths)
    md, summary = render(records, meta)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "latest.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out_dir, "latest.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if meta.get("stamp"):
        with open(os.path.join(args.out_dir, meta["stamp"] + ".md"), "w") as f:
            f.write(md)
    if not args.quiet:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
