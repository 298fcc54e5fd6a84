// Node: registration data, presence and status, heartbeat metrics charted from the node's
// `node.heartbeat` events, its pending and dead-lettered messages, and actions.
import * as API from "./api.js";
import { html, useState, useEffect, useRef, useMe, can, Action, Notice, Presence, Status, Json, Table, fmtTime, ago, throttle } from "./ui.js";
import { SendForm, Ledger } from "./messages.js";
import { Chart } from "./chart.js";
import { queue } from "./fleet.js";

const HOURS = 6;

function HeartbeatChart({ nodeId, tick }) {
  const [series, setSeries] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    API.get("/api/v1/events", { stream: nodeId, types: "node.heartbeat", sort_order: "desc", limit: 1000 })
      .then((page) => {
        const since = Date.now() / 1000 - HOURS * 3600;
        const beats = page.items.filter((e) => e.ts >= since).reverse();
        const names = new Set();
        beats.forEach((e) => Object.entries(e.data.metrics || {}).forEach(([k, v]) => typeof v === "number" && names.add(k)));
        const keys = [...names].sort().slice(0, 6);
        setSeries({ range: [since, Date.now() / 1000], keys, x: beats.map((e) => e.ts), ys: keys.map((k) => beats.map((e) => (e.data.metrics || {})[k] ?? null)) });
      }, setError);
  }, [nodeId, tick]);
  if (error) return html`<${Notice} error=${error} />`;
  if (!series) return html`<p>Loading heartbeats…</p>`;
  if (series.x.length === 0) return html`<p>No heartbeat in the last ${HOURS} hours.</p>`;
  if (series.keys.length === 0) return html`<p>${series.x.length} heartbeats in the last ${HOURS} hours, without numeric metrics.</p>`;
  return html`<${Chart} title=${`Heartbeat metrics, last ${HOURS} hours`} x=${series.x} range=${series.range} names=${series.keys} ys=${series.ys} />`;
}

export function NodePage({ arg: nodeId }) {
  const me = useMe();
  const [node, setNode] = useState(null);
  const [pending, setPending] = useState(null);
  const [dead, setDead] = useState(null);
  const [stats, setStats] = useState(null);
  const [error, setError] = useState(null);
  const [sent, setSent] = useState(null);
  const [tick, setTick] = useState(0);
  const [gone, setGone] = useState(false); // deregistered while shown
  const shown = useRef(false);

  async function load() {
    try {
      setNode(await API.get(`/api/v1/nodes/${encodeURIComponent(nodeId)}`));
      shown.current = true;
      setError(null);
    } catch (err) {
      if (err.status === 404 && shown.current) setGone(true); // it went away while shown
      else setError(err);
      return;
    }
    API.get("/api/v1/console/node-stats", { ids: nodeId }).then((r) => setStats(r.items[nodeId]), () => {});
    if (can(me, "messages:read_any")) {
      API.get(`/api/v1/messages/pending/${encodeURIComponent(nodeId)}`, { limit: 50 }).then(setPending, () => {});
      API.get("/api/v1/messages/dead-letters").then((r) => setDead(r.items.filter((d) => d.node_id === nodeId)), () => {});
    }
    setTick((t) => t + 1);
  }
  useEffect(() => {
    load();
    const poke = throttle(load, 1000);
    const stopNode = API.subscribe({ streams: [nodeId] }, poke, (state) => state === "live" && poke());
    // Its mailbox: messages to it, read, expired, dead-lettered or redriven (throttled).
    const stopMail = API.subscribe({ types: ["message.*"] }, (e) => {
      if (e.stream === nodeId || JSON.stringify(e.data).includes(JSON.stringify(nodeId))) poke();
    });
    return () => { stopNode(); stopMail(); };
  }, [nodeId]);

  async function deregister() {
    if (!confirm(`Deregister ${nodeId}? Its tokens are revoked and it must register again.`)) return;
    try {
      await API.api("DELETE", `/api/v1/nodes/${encodeURIComponent(nodeId)}`);
      setGone(true);
    } catch (err) { setError(err); }
  }

  if (error && !node) return html`<section><h1>Node ${nodeId}</h1><${Notice} error=${error} /><p><a href="#/fleet">Back to the fleet</a></p></section>`;
  if (!node) return html`<p>Loading ${nodeId}…</p>`;
  const meta = { ...node.metadata };
  return html`<section aria-labelledby="node-title">
    <div class="head">
      <h1 id="node-title">${node.name} <small>${node.node_id}</small></h1>
      <${Presence} value=${node.presence} /> <${Status} value=${node.status} />
      <span class="spacer"></span>
      ${gone ? null : html`<${Action} perm="nodes:write" kind="danger" onClick=${deregister} label="Deregister this node">Deregister<//>`}
    </div>
    <${Notice} error=${error} ok=${gone ? `${nodeId} was deregistered: what is shown is as it was.` : null} />
    <div class="grid2">
      <div class="panel">
        <h2>Registration</h2>
        <dl class="kv">
          <dt>Type</dt><dd>${node.type}</dd>
          <dt>Capabilities</dt><dd>${node.capabilities.join(", ") || "—"}</dd>
          <dt>Region</dt><dd>${meta.region || "—"}</dd>
          <dt>Endpoint</dt><dd>${node.endpoint || "—"}</dd>
          <dt>Registered</dt><dd>${fmtTime(node.registered_at)}</dd>
          <dt>Last login</dt><dd>${fmtTime(node.last_login_at)}</dd>
          <dt>Last heartbeat</dt><dd>${fmtTime(node.last_heartbeat_at)} (${ago(node.last_heartbeat_at)})</dd>
          <dt>Load</dt><dd>${node.load ?? "—"}</dd>
        </dl>
        <h3>Connection and queue</h3>
        <dl class="kv">
          <dt>WebSocket</dt><dd data-socket>${!stats ? "…" : stats.connected
            ? `connected since ${fmtTime(stats.connected_since)}${stats.instance ? ` on instance ${stats.instance}` : ""}`
            : "not connected (to this instance)"}</dd>
          <dt>Queue</dt><dd>${stats ? queue(stats) : "…"}</dd>
        </dl>
        <h3>Metadata</h3><${Json} value=${node.metadata} />
        ${node.heartbeat ? html`<h3>Last heartbeat</h3><${Json} value=${node.heartbeat} />` : null}
      </div>
      <div class="panel">
        <h2>Heartbeats</h2>
        <${HeartbeatChart} nodeId=${nodeId} tick=${tick} />
        <h2>Send a message</h2>
        ${gone ? html`<p>A deregistered node cannot be sent messages.</p>` : html`<${SendForm} to=${nodeId} onSent=${setSent} />`}
        ${sent && html`<${Ledger} messageId=${sent} />`}
      </div>
    </div>
    <div class="panel">
      <h2>Pending messages ${pending ? html`<small>(${pending.total})</small>` : null}</h2>
      ${!can(me, "messages:read_any") ? html`<p>Its pending messages and dead letters need the messages:read_any permission.</p>`
        : pending && html`<${Table} caption="Pending messages" rows=${pending.messages} rowKey=${(m) => m.id}
          empty="No pending message."
          columns=${[
            { label: "Message", cell: (m) => html`<a href=${`#/messages/${m.id}`}>${m.id}</a>` },
            { label: "Type", cell: (m) => m.message_type },
            { label: "Priority", cell: (m) => m.priority },
            { label: "From", cell: (m) => m.from_node },
            { label: "Expires", cell: (m) => fmtTime(m.expires_at) },
          ]} />`}
      ${dead && html`<h2>Dead letters <small>(${dead.length})</small></h2>`}
      ${dead && html`<${Table} caption="Dead letters of this node" rows=${dead} rowKey=${(d) => d.message_id}
        empty="No dead letter."
        columns=${[
          { label: "Message", cell: (d) => html`<a href=${`#/messages/${d.message_id}`}>${d.message_id}</a>` },
          { label: "Reason", cell: (d) => d.reason },
          { label: "Attempts", cell: (d) => d.attempts },
          { label: "At", cell: (d) => fmtTime(d.at) },
        ]} />`}
    </div>
  </section>`;
}
