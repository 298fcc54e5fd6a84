// Fleet: a page of nodes from GET /api/v1/nodes (server-side filters, sort and paging over the
// discovery indices), counts by presence, and live refreshes from the event feed.
import * as API from "./api.js";
import { html, useState, useEffect, useRef, Table, Pager, Presence, Status, Notice, Field, bind, fmtTime, ago, nav, throttle } from "./ui.js";

const LIMIT = 50;
const LIVE_TYPES = ["node.registered", "node.deregistered", "node.status_updated"];
const SORTS = [
  ["registered_at", "registration"], ["node_id", "node id"], ["name", "name"], ["type", "type"],
  ["status", "status"], ["load", "load"], ["last_heartbeat_at", "last heartbeat"],
];

// "3 (1 in flight), 2 dead" from a node's stats.
export function queue(s) {
  if (!s) return "…";
  const parts = [`${s.queued}${s.in_flight ? ` (${s.in_flight} in flight)` : ""}`];
  if (s.dead_letters) parts.push(html`<span class="pill st-dead">${s.dead_letters} dead</span>`);
  return html`<span data-queue>${parts[0]}</span>${parts.length > 1 ? html` ${parts[1]}` : null}`;
}

// Search by id or name prefix (GET /api/v1/console/node-search): matches as links; Enter opens
// the first.
function Search() {
  const [text, setText] = useState("");
  const [found, setFound] = useState(null);
  const timer = useRef(null);
  function onInput(e) {
    const q = e.target.value;
    setText(q);
    clearTimeout(timer.current);
    if (!q.trim()) { setFound(null); return; }
    timer.current = setTimeout(() => {
      API.get("/api/v1/console/node-search", { q: q.trim(), limit: 10 }).then((r) => setFound(r.nodes), () => setFound([]));
    }, 200);
  }
  function open(e) {
    e.preventDefault();
    const first = found && found[0];
    if (first) nav(`#/node/${encodeURIComponent(first.node_id)}`);
    else if (text.trim()) nav(`#/node/${encodeURIComponent(text.trim())}`);
  }
  return html`<form class="inline search" onSubmit=${open} role="search">
    <${Field} label="Search nodes" hint="id or name, from the start"><input type="search" value=${text} onInput=${onInput} placeholder="node-00" /><//>
    <button class="btn" type="submit">Open</button>
    ${found && html`<ul class="found" aria-live="polite" aria-label="matching nodes">
      ${found.length === 0 ? html`<li class="empty">No node starts so.</li>`
        : found.map((n) => html`<li><a href=${`#/node/${encodeURIComponent(n.node_id)}`}>${n.node_id}</a> <small>${n.name}</small> <${Presence} value=${n.presence} /></li>`)}
    </ul>`}
  </form>`;
}

export function FleetPage() {
  const [filters, setFilters] = useState({ type: "", capabilities: "", region: "", status: "", presence: "" });
  const [draft, setDraft] = useState(filters); // the form, applied by Filter
  const [sort, setSort] = useState({ sort_by: "registered_at", sort_order: "desc" });
  const [skip, setSkip] = useState(0);
  const [page, setPage] = useState(null);
  const [counts, setCounts] = useState(null);
  const [stats, setStats] = useState({});
  const [error, setError] = useState(null);
  const [live, setLive] = useState("connecting");
  const args = useRef();
  args.current = { ...filters, ...sort, skip, limit: LIMIT };

  async function load() {
    try {
      const nodes = await API.get("/api/v1/nodes", args.current);
      const ids = nodes.nodes.map((n) => n.node_id).join(",");
      setStats(ids ? (await API.get("/api/v1/console/node-stats", { ids })).items : {});
      setPage(nodes);
      const each = await Promise.all(["online", "stale", "offline"].map((p) =>
        API.get("/api/v1/nodes", { presence: p, limit: 1 }).then((r) => [p, r.total])));
      setCounts(Object.fromEntries(each));
      setError(null);
    } catch (err) { setError(err); }
  }
  useEffect(() => { load(); }, [filters, sort, skip]);
  useEffect(() => {
    const poke = throttle(load, 1000);
    const stop = API.subscribe({ types: LIVE_TYPES }, poke, (state) => { setLive(state); if (state === "live") poke(); });
    const timer = setInterval(poke, 15000); // presence moves with time alone (stale, offline)
    return () => { stop(); clearInterval(timer); };
  }, []);

  function onFilter(e) {
    e.preventDefault();
    setSkip(0);
    setFilters(Object.fromEntries(Object.entries(draft).map(([k, v]) => [k, v.trim()])));
  }
  function byPresence(p) {
    const next = { ...filters, presence: filters.presence === p ? "" : p };
    setSkip(0);
    setFilters(next);
    setDraft({ ...draft, presence: next.presence });
  }

  const columns = [
    { label: "Node", cell: (n) => html`<a href=${`#/node/${encodeURIComponent(n.node_id)}`}>${n.node_id}</a><br/><small>${n.name}</small>` },
    { label: "Presence", cell: (n) => html`<${Presence} value=${n.presence} />` },
    { label: "Status", cell: (n) => html`<${Status} value=${n.status} />` },
    { label: "Type", cell: (n) => n.type },
    { label: "Capabilities", cell: (n) => n.capabilities.join(", ") || "—" },
    { label: "Region", cell: (n) => (n.metadata && n.metadata.region) || "—" },
    { label: "Load", cell: (n) => (n.load === null ? "—" : n.load) },
    { label: "Queue", cell: (n) => queue(stats[n.node_id]) },
    { label: "Socket", cell: (n) => (stats[n.node_id] && stats[n.node_id].connected ? html`<span title=${`since ${fmtTime(stats[n.node_id].connected_since)}`}>connected</span>` : "—") },
    { label: "Last heartbeat", cell: (n) => html`<span title=${fmtTime(n.last_heartbeat_at)}>${ago(n.last_heartbeat_at)}</span>` },
  ];

  return html`<section aria-labelledby="fleet-title">
    <div class="head">
      <h1 id="fleet-title">Fleet</h1>
      <span class=${`live ${live}`} role="status">${live === "live" ? "● live" : live}</span>
    </div>
    <div class="cards" aria-label="nodes by presence">
      ${["online", "stale", "offline"].map((p) => html`<button class=${`card ${filters.presence === p ? "on" : ""}`}
        aria-pressed=${filters.presence === p}
        onClick=${() => byPresence(p)}>
        <span class="n" data-presence=${p}>${counts ? counts[p] : "…"}</span><span>${p}</span></button>`)}
      <div class="card static"><span class="n" data-total>${page ? page.total : "…"}</span><span>matching</span></div>
    </div>
    <form class="filters" onSubmit=${onFilter} aria-label="filter nodes">
      <${Field} label="Type"><input ...${bind(draft, setDraft, "type")} placeholder="gateway" /><//>
      <${Field} label="Capabilities"><input ...${bind(draft, setDraft, "capabilities")} placeholder="gpu,storage" /><//>
      <${Field} label="Region"><input ...${bind(draft, setDraft, "region")} placeholder="eu-west-1" /><//>
      <${Field} label="Status"><input ...${bind(draft, setDraft, "status")} placeholder="active" /><//>
      <${Field} label="Presence"><select ...${bind(draft, setDraft, "presence")}>
        <option value="">any</option><option value="online">online</option><option value="stale">stale</option><option value="offline">offline</option></select><//>
      <button class="btn primary" type="submit">Filter</button>
    </form>
    <div class="row">
      <${Search} />
      <${Field} label="Sort by"><select value=${sort.sort_by} onChange=${(e) => { setSkip(0); setSort({ ...sort, sort_by: e.target.value }); }}>
        ${SORTS.map(([v, l]) => html`<option value=${v}>${l}</option>`)}</select><//>
      <${Field} label="Order"><select value=${sort.sort_order} onChange=${(e) => { setSkip(0); setSort({ ...sort, sort_order: e.target.value }); }}>
        <option value="desc">descending</option><option value="asc">ascending</option></select><//>
    </div>
    <${Notice} error=${error} />
    ${page && html`<${Table} caption="Nodes" columns=${columns} rows=${page.nodes} rowKey=${(n) => n.node_id}
      empty="No node matches." />
      <${Pager} skip=${skip} limit=${LIMIT} total=${page.total} onPage=${setSkip} label="nodes" />`}
  </section>`;
}
