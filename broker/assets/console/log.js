// Live log: the event feed (GET /ws) with type filters, pause and jump to a seq; time travel:
// the fleet as it was at a seq, by pages (GET /api/v1/console/fleet-at?at_seq=N).
import * as API from "./api.js";
import { html, useState, useEffect, useRef, Notice, Field, Table, Pager, Presence, bind, fmtTime } from "./ui.js";

const KEEP = 500; // events kept on the page
const PAGE = 50; // nodes a page of a past fleet

function Feed() {
  const [filter, setFilter] = useState({ types: "", from_seq: "" });
  const [draft, setDraft] = useState(filter); // the form, applied by Apply
  const [events, setEvents] = useState([]);
  const [paused, setPaused] = useState(false);
  const [held, setHeld] = useState(0);
  const [state, setState] = useState("connecting");
  const [open, setOpen] = useState(null);
  const pausedRef = useRef(false);
  const buffer = useRef([]);
  pausedRef.current = paused;

  useEffect(() => {
    setEvents([]);
    buffer.current = [];
    const types = filter.types.split(",").map((s) => s.trim()).filter(Boolean);
    const sub = { types: types.length ? types : null };
    if (filter.from_seq) sub.from_seq = Number(filter.from_seq);
    let frame = 0;
    const flush = () => {
      frame = 0;
      if (pausedRef.current) { setHeld(buffer.current.length); return; }
      const fresh = buffer.current.reverse();
      buffer.current = [];
      setEvents((old) => fresh.concat(old).slice(0, KEEP));
    };
    return API.subscribe(sub, (e) => {
      buffer.current.push(e);
      if (buffer.current.length > KEEP) buffer.current.shift();
      if (!frame) frame = requestAnimationFrame(flush);
    }, setState);
  }, [filter]);

  function resume() {
    setPaused(false);
    pausedRef.current = false;
    const fresh = buffer.current.reverse();
    buffer.current = [];
    setHeld(0);
    setEvents((old) => fresh.concat(old).slice(0, KEEP));
  }

  return html`<div class="panel">
    <div class="head">
      <h2>Event feed</h2>
      <span class=${`live ${state}`} role="status">${state === "live" ? "● live" : state}</span>
      <span class="spacer"></span>
      <span>last seq <strong data-last-seq>${events.length ? events[0].seq : "—"}</strong></span>
      ${paused
        ? html`<button class="btn primary" onClick=${resume}>Resume (${held} held)</button>`
        : html`<button class="btn" onClick=${() => setPaused(true)}>Pause</button>`}
    </div>
    <form class="filters" aria-label="feed filter" onSubmit=${(e) => { e.preventDefault(); setFilter({ ...draft }); }}>
      <${Field} label="Event types" hint="comma-separated; patterns such as node.* work"><input ...${bind(draft, setDraft, "types")} placeholder="node.*, message.sent" /><//>
      <${Field} label="Jump to seq" hint="history from this seq, then live"><input type="number" min="1" ...${bind(draft, setDraft, "from_seq")} /><//>
      <button class="btn primary" type="submit">Apply</button>
    </form>
    <ol class="events" aria-label="events, newest first">
      ${events.map((e) => html`<li key=${e.seq}>
        <button class="event" aria-expanded=${open === e.seq} onClick=${() => setOpen(open === e.seq ? null : e.seq)}>
          <span class="seq">#${e.seq}</span> <span class="type">${e.event}</span>
          <span class="stream">${e.stream}</span> <span class="ts">${fmtTime(e.ts)}</span>
        </button>
        ${open === e.seq ? html`<pre class="json">${JSON.stringify(e.data, null, 2)}</pre>` : null}
      </li>`)}
    </ol>
    ${events.length === 0 ? html`<p class="empty">Waiting for events…</p>` : null}
  </div>`;
}

function TimeTravel() {
  const [head, setHead] = useState(null);
  const [seq, setSeq] = useState("");
  const [shown, setShown] = useState(null); // {at, skip}
  const [result, setResult] = useState(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => { API.get("/api/v1/admin/state").then((r) => { setHead(r.head); setSeq(String(r.head)); }, setError); }, []);
  useEffect(() => {
    if (!shown) return;
    setBusy(true);
    setError(null);
    API.get("/api/v1/console/fleet-at", { at_seq: shown.at, skip: shown.skip, limit: PAGE, sort_by: "registered_at", sort_order: "asc" })
      .then((r) => { setResult(r); setHead(r.head); }, setError)
      .finally(() => setBusy(false));
  }, [shown]);
  const page = result && result.page;
  return html`<div class="panel">
    <h2>Time travel: the fleet as it was</h2>
    <form class="filters" onSubmit=${(e) => { e.preventDefault(); setShown({ at: Number(seq), skip: 0 }); }} aria-label="time travel">
      <${Field} label=${`Seq (0 to ${head ?? "…"})`}>
        <input type="range" min="0" max=${head || 0} value=${seq || 0} onInput=${(e) => setSeq(e.target.value)} aria-label="seq slider" />
      <//>
      <${Field} label="At seq"><input type="number" min="0" max=${head || undefined} value=${seq} onInput=${(e) => setSeq(e.target.value)} required /><//>
      <button class="btn primary" type="submit" disabled=${busy}>${busy ? "Replaying…" : "Show the fleet"}</button>
    </form>
    <${Notice} error=${error} />
    ${result && html`<p role="status">At seq <strong>${result.at_seq}</strong> (${fmtTime(result.as_of)}; head ${result.head}):
      <strong data-past-count>${page.total}</strong> registered nodes, ${result.retired} deregistered; presence as of then.</p>
      <${Table} caption=${`Nodes at seq ${result.at_seq}`} rows=${page.nodes} rowKey=${(n) => n.node_id}
        empty="No node was registered yet."
        columns=${[
          { label: "Node", cell: (n) => html`${n.node_id}<br/><small>${n.name}</small>` },
          { label: "Presence", cell: (n) => html`<${Presence} value=${n.presence} />` },
          { label: "Type", cell: (n) => n.type },
          { label: "Status", cell: (n) => n.status },
          { label: "Registered", cell: (n) => fmtTime(n.registered_at) },
          { label: "Last heartbeat", cell: (n) => fmtTime(n.last_heartbeat_at) },
        ]} />
      <${Pager} skip=${page.skip} limit=${PAGE} total=${page.total} label="nodes"
        onPage=${(skip) => setShown({ at: result.at_seq, skip })} />`}
  </div>`;
}

export function LogPage() {
  return html`<section aria-labelledby="log-title">
    <h1 id="log-title">Live log</h1>
    <${Feed} />
    <${TimeTravel} />
  </section>`;
}
