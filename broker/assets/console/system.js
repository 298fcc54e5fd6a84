// System: health (GET /health), the metrics that matter (GET /api/v1/metrics), refreshed.
import * as API from "./api.js";
import { html, useState, useEffect, Notice, Json, Table, fmtTime } from "./ui.js";

const size = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`);

const REFRESH = 5000;
const WANTED = [
  ["broker_log_head_seq", "log head seq"],
  ["broker_projection_seq", "projections at seq"],
  ["broker_projection_lag_events", "projection lag (events)"],
  ["broker_events_appended_total", "events appended since start"],
  ["broker_node_connections", "node WebSockets open"],
  ["broker_ws_refused_total", "WebSockets refused"],
  ["broker_append_seconds_count", "appends (durable writes)"],
  ["broker_append_seconds_sum", "seconds spent appending"],
  ["broker_http_requests_total", "HTTP requests"],
  ["broker_log_lines_dropped_total", "log lines dropped"],
  ["process_resident_memory_bytes", "resident memory (bytes)"],
  ["process_cpu_seconds_total", "CPU seconds"],
  ["process_open_fds", "open file descriptors"],
];

// Sum each wanted metric over its labels, from the Prometheus text format.
function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m) sums[m[1]] = (sums[m[1]] || 0) + Number(m[3]);
  }
  return sums;
}

export function SystemPage() {
  const [health, setHealth] = useState(null);
  const [metrics, setMetrics] = useState(null);
  const [info, setInfo] = useState(null);
  const [log, setLog] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    const load = async () => {
      try {
        const resp = await fetch("/health", { credentials: "omit" });
        setHealth(await resp.json());
        setInfo(await API.get("/api/v1/console/system"));
        setLog(await API.get("/api/v1/admin/log").catch(() => null)); // events:read
        setMetrics(parseMetrics(await API.api("GET", "/api/v1/metrics", undefined, { headers: { Accept: "text/plain" } })));
        setError(null);
      } catch (err) { setError(err); }
    };
    load();
    const timer = setInterval(load, REFRESH);
    return () => clearInterval(timer);
  }, []);
  const store = health && health.checks.store;
  return html`<section aria-labelledby="system-title">
    <h1 id="system-title">System</h1>
    <${Notice} error=${error} />
    ${health && html`<div class="cards">
      <div class="card static"><span class=${`n h-${health.status}`} data-health>${health.status}</span><span>health</span></div>
      <div class="card static"><span class="n">${store.head_seq ?? "—"}</span><span>log head seq</span></div>
      <div class="card static"><span class="n">${health.checks.projections.lag}</span><span>projection lag</span></div>
      <div class="card static"><span class="n">${Math.round(health.uptime / 60)} min</span><span>uptime</span></div>
      <div class="card static"><span class="n">${health.version}</span><span>version</span></div>
    </div>
    <div class="grid2">
      <div>
      ${info && html`<div class="panel"><h2>Log and snapshots</h2>
        <dl class="kv">
          <dt>Backend</dt><dd>${info.backend}${info.instance ? ` (instance ${info.instance})` : ""}</dd>
          <dt>Started</dt><dd>${fmtTime(info.started_at)}</dd>
          <dt>Integrity</dt><dd data-integrity>${info.verified_at_start
            ? `hash chain verified at start (${fmtTime(info.started_at)})`
            : "not verified at start"}</dd>
          <dt>Last verify</dt><dd data-last-verify>${info.last_verify
            ? `verified up to seq ${info.last_verify.up_to_seq}, ${fmtTime(info.last_verify.at)}`
            : "not verified yet (broker verify, or the server's background pass)"}</dd>
          <dt>Log files</dt><dd>${info.log_files.length ? info.log_files.map((f) => html`<div>${f.name}: ${size(f.bytes)}</div>`) : "—"}</dd>
          <dt>Snapshots</dt><dd>${info.snapshots.enabled
            ? `every ${info.snapshots.every.toLocaleString("en")} events, ${info.snapshots.keep} kept; ${info.snapshots.last_seq ? `newest at seq ${info.snapshots.last_seq}` : "none yet"}${info.snapshots.failures ? `; ${info.snapshots.failures} failed in a row` : ""}`
            : "disabled"}</dd>
          ${info.snapshots.files.map((f) => html`<dt></dt><dd>${f.name}: ${size(f.bytes)}, ${fmtTime(f.modified_at)}</dd>`)}
        </dl></div>`}
      ${log && html`<div class="panel"><h2>Retention and compaction</h2>
        <dl class="kv">
          <dt>Log size</dt><dd data-log-bytes>${log.log_bytes === null ? "—" : size(log.log_bytes)}</dd>
          <dt>Removed so far</dt><dd>${log.removed_events.toLocaleString("en")} events, ${log.gaps} gaps</dd>
          <dt>Last compaction</dt><dd>${log.last_compaction
            ? `${fmtTime(log.last_compaction.at)}, up to seq ${log.last_compaction.up_to}`
            : "none"}</dd>
          <dt>Kept</dt><dd>${Object.keys(log.policy.days).length
            ? `${Object.entries(log.policy.days).map(([t, d]) => `${t}: ${d} days`).join(", ")}; the rest forever`
            : "every event, forever"}</dd>
        </dl>
        ${log.by_type && html`<${Table} caption="Size by event type" rows=${Object.entries(log.by_type).sort((a, b) => b[1].bytes - a[1].bytes).slice(0, 8)}
          rowKey=${(r) => r[0]} columns=${[
            { label: "Event type", cell: ([t]) => t },
            { label: "Events", cell: ([, v]) => v.events.toLocaleString("en") },
            { label: "Size", cell: ([, v]) => size(v.bytes) },
          ]} />`}
      </div>`}
      <div class="panel"><h2>Health checks</h2><${Json} value=${health.checks} /></div>
      </div>
      <div class="panel"><h2>Metrics</h2>
        ${metrics && html`<${Table} caption="Metrics (summed over labels)" rows=${WANTED.filter(([k]) => k in metrics)} rowKey=${(r) => r[0]}
          columns=${[
            { label: "Metric", cell: ([k, label]) => html`${label}<br/><small>${k}</small>` },
            { label: "Value", cell: ([k]) => Number(metrics[k].toFixed(3)).toLocaleString("en") },
          ]} />`}
        <p><small>Every figure is at <code>/api/v1/metrics</code>; <code>broker verify</code> checks the log again on the server (docs/operations.md).</small></p>
      </div>
    </div>`}
  </section>`;
}
