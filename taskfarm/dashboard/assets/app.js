// The taskfarm dashboard's pages.  Plain DOM and SVG, no library, no CDN.
// Everything shown is set as text (never parsed as HTML): task errors and
// engine properties come from user code.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const SVG = "http://www.w3.org/2000/svg";

function withToken(path) {
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setText(id, text) {
  const node = document.getElementById(id);
  if (node) node.textContent = text;
}

function rate(x) {
  return x >= 100 ? x.toFixed(0) : x.toFixed(1);
}

function ago(seconds) {
  if (seconds < 1) return "now";
  if (seconds < 120) return seconds.toFixed(0) + " s ago";
  return (seconds / 60).toFixed(0) + " min ago";
}

function taskLink(taskid) {
  return el("a", { href: withToken("/task/" + taskid), class: "task-link" }, "#" + taskid);
}

// -- the main page -------------------------------------------------------------------

function showSummary(summary) {
  setText("engines-count", summary.engines);
  for (const [state, count] of Object.entries(summary.queue)) {
    setText("count-" + state, count);
  }
  setText("tasks-rate", rate(summary.tasks_per_second));
  setText("failures-rate", rate(summary.failures_per_second));
}

function showEngines(engines) {
  const body = document.querySelector("#engines-table tbody");
  body.replaceChildren(...engines.map((e) => {
    const props = Object.entries(e.properties).map(([k, v]) => k + "=" + v).join(" ");
    return el("tr", { "data-engine": e.engine_id },
      el("td", { class: "num" }, e.engine_id),
      el("td", {}, e.host),
      el("td", { class: "num" }, e.pid === null ? "" : e.pid),
      el("td", { class: "state-" + e.state }, e.state),
      el("td", {}, props),
      el("td", {}, e.current_task === null ? "" : taskLink(e.current_task)),
      el("td", { class: "num" }, e.running),
      el("td", { class: "num tasks-done" }, e.tasks_done),
      el("td", {}, ago(e.heard_ago)));
  }));
}

function showTimeline(timeline) {
  const svg = document.getElementById("timeline");
  const lanes = Object.entries(timeline.lanes);
  const rowHeight = 18, labelWidth = 70, top = 4;
  const width = Math.max(svg.clientWidth || 800, 300);
  const height = top + rowHeight * Math.max(lanes.length, 1) + 18;
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  const plot = width - labelWidth - 8;
  // Zoom to the runs there are: short tasks would be specks in 30 s.
  let oldest = 0;
  for (const [, runs] of lanes) for (const run of runs) oldest = Math.min(oldest, run[1]);
  const shown = Math.min(timeline.window, Math.max(2, Math.ceil(-oldest * 1.1)));
  const x = (t) => labelWidth + plot * (1 + Math.max(t, -shown) / shown);
  const parts = [];
  lanes.forEach(([engineId, runs], row) => {
    const y = top + row * rowHeight;
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", 4);
    label.setAttribute("y", y + 13);
    label.textContent = "engine " + engineId;
    parts.push(label);
    for (const [taskid, start, end, how] of runs) {
      const rect = document.createElementNS(SVG, "rect");
      const x0 = x(start), x1 = x(end === null ? 0 : end);
      rect.setAttribute("x", x0.toFixed(1));
      rect.setAttribute("y", y + 2);
      rect.setAttribute("width", Math.max(x1 - x0, 1.5).toFixed(1));
      rect.setAttribute("height", rowHeight - 4);
      rect.setAttribute("class", how);
      const title = document.createElementNS(SVG, "title");
      title.textContent = "task " + taskid + " (" + how + ")";
      rect.append(title);
      parts.push(rect);
    }
  });
  for (let i = 0; i <= 6; i++) {
    const t = -shown + (shown * i) / 6;
    const tick = document.createElementNS(SVG, "text");
    tick.setAttribute("x", x(t) - (i === 6 ? 20 : 8));
    tick.setAttribute("y", height - 4);
    tick.setAttribute("class", "tick");
    tick.setAttribute("font-size", "10");
    tick.textContent = i === 6 ? "now" : t.toFixed(shown < 12 ? 1 : 0) + "s";
    parts.push(tick);
  }
  svg.replaceChildren(...parts);
  setText("window", shown);
}

function showFailures(failures) {
  const box = document.getElementById("failures");
  if (!failures.length) {
    box.replaceChildren(el("p", { class: "none" }, "none"));
    return;
  }
  box.replaceChildren(...failures.map((f) => el("div", { class: "failure", "data-task": f.taskid },
    el("div", {}, taskLink(f.taskid), " on engine " + (f.engine_id === null ? "–" : f.engine_id) +
      ", " + ago(f.ago) + ": ", el("b", {}, f.error), ": " + f.message),
    f.traceback ? el("details", {}, el("summary", {}, "remote traceback"), el("pre", {}, f.traceback)) : "")));
}

function mainPage() {
  document.getElementById("goto").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("goto-id").value;
    if (id !== "") location.href = withToken("/task/" + id);
  });
  const live = document.getElementById("live");
  const source = new EventSource(withToken("/events"));
  source.addEventListener("snapshot", (event) => {
    const snapshot = JSON.parse(event.data);
    showSummary(snapshot.summary);
    showEngines(snapshot.engines);
    showTimeline(snapshot.timeline);
    showFailures(snapshot.failures);
    live.textContent = "live " + new Date().toLocaleTimeString();
    live.className = "live";
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  });
  source.addEventListener("error", () => {
    live.textContent = "reconnecting";
    live.className = "live off";
  });
}

// -- the task page -------------------------------------------------------------------

function clock(epoch) {
  return epoch === null ? null : new Date(epoch * 1000).toLocaleTimeString();
}

function fact(name, value) {
  return el("tr", {}, el("th", {}, name), el("td", { "data-fact": name }, value === null ? "–" : value));
}

function showWhy(why, state) {
  const box = document.getElementById("why");
  if (why === null || why === undefined) {
    const text = (state === "scheduled" || state === "waiting_retry")
      ? "state: " + state + " (this controller does not explain waits)"
      : "not waiting: " + state;
    box.replaceChildren(el("p", { class: "none" }, text));
    return;
  }
  box.replaceChildren(el("pre", { id: "why-data" }, JSON.stringify(why, null, 2)));
}

function showTask(info) {
  setText("task-id", info.taskid);
  const seconds = (s) => (s === null ? null : s.toFixed(3) + " s");
  document.querySelector("#task-facts tbody").replaceChildren(
    fact("state", info.state),
    fact("kind", info.kind),
    fact("attempts", info.attempts),
    fact("retries left", info.retries_left),
    fact("recovery link", info.recovery_link),
    fact("engine", info.engine_id),
    fact("submitted", ago(info.submitted_ago)),
    fact("started", clock(info.started)),
    fact("finished", clock(info.completed)),
    fact("ran for", seconds(info.ran_for)));
  showWhy(info.why, info.state);
  const section = document.getElementById("error-section");
  if (info.error) {
    section.hidden = false;
    setText("error-line", info.error.error + ": " + info.error.message);
    setText("traceback", info.error.traceback || "(no remote traceback: the controller failed this task)");
  } else {
    section.hidden = true;
  }
  document.querySelector("#attempts tbody").replaceChildren(...info.failed_attempts.map((a) =>
    el("tr", {}, el("td", { class: "num" }, a.attempt), el("td", { class: "num" }, a.engine_id === null ? "–" : a.engine_id),
      el("td", {}, a.error), el("td", {}, a.message))));
}

async function taskPage() {
  const taskid = location.pathname.split("/").pop();
  const live = document.getElementById("live");
  for (;;) {
    let final = false;
    try {
      const response = await fetch(withToken("/api/task/" + encodeURIComponent(taskid)));
      const info = await response.json();
      if (!response.ok) {
        live.textContent = info.error;
        live.className = "live off";
        return;
      }
      showTask(info);
      final = ["succeeded", "failed", "aborted"].includes(info.state);
      live.textContent = final ? "final" : "live " + new Date().toLocaleTimeString();
      live.className = final ? "live off" : "live";
      document.body.dataset.loaded = "1";
    } catch (error) {
      live.textContent = "cannot reach the controller";
      live.className = "live off";
    }
    if (final) return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

if (document.body.dataset.page === "task") taskPage(); else mainPage();
