// Messages: send, a message's delivery ledger per recipient (live), dead letters with redrive.
import * as API from "./api.js";
import { html, useState, useEffect, useMe, can, Action, Notice, Field, Table, fmtTime, nav, throttle } from "./ui.js";

const RECENT = 20;

export function SendForm({ to, onSent }) {
  const me = useMe();
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  async function submit(e) {
    e.preventDefault();
    const f = Object.fromEntries(new FormData(e.target));
    let content;
    try { content = f.content.trim() ? JSON.parse(f.content) : null; } catch (err) {
      setError({ code: "VALIDATION_ERROR", message: `content is not JSON: ${err.message}` });
      return;
    }
    const recipients = (to || f.to_nodes).split(",").map((s) => s.trim()).filter(Boolean);
    const body = { to_nodes: recipients, message_type: f.message_type.trim(), content, priority: f.priority };
    if (f.ttl) body.ttl = Number(f.ttl);
    setBusy(true);
    setError(null);
    try {
      const r = await API.api("POST", "/api/v1/messages/send", body);
      onSent(r.message_id);
    } catch (err) { setError(err); }
    setBusy(false);
  }
  const allowed = can(me, "messages:send");
  return html`<form class="stack" onSubmit=${submit} aria-label="send a message">
    ${to ? null : html`<${Field} label="To nodes" hint="comma-separated node ids"><input name="to_nodes" required /><//>`}
    <${Field} label="Message type"><input name="message_type" required defaultValue="command" /><//>
    <${Field} label="Content (JSON)"><textarea name="content" rows="3">{"action": "ping"}</textarea><//>
    <div class="row">
      <${Field} label="Priority"><select name="priority">
        <option value="low">low</option><option value="normal" defaultSelected>normal</option><option value="high">high</option><option value="critical">critical</option></select><//>
      <${Field} label="TTL (seconds)"><input name="ttl" type="number" min="1" step="any" placeholder="default" /><//>
    </div>
    <${Notice} error=${error} />
    <${Action} perm="messages:send" type="submit" kind="primary" busy=${busy}>Send<//>
    ${allowed ? null : html`<small>Sending needs the messages:send permission.</small>`}
  </form>`;
}

// The ledger of one message: each recipient's state, refreshed live from the feed (message
// events of this message, and read batches) and every few seconds (pushes are not events).
export function Ledger({ messageId }) {
  const [view, setView] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    const load = () => API.get(`/api/v1/messages/${encodeURIComponent(messageId)}`).then((v) => { setView(v); setError(null); }, setError);
    const poke = throttle(load, 500);
    load();
    const stop = API.subscribe({ types: ["message.*"] }, (e) => {
      if (e.stream === messageId || e.event === "message.read_batch") poke();
    });
    const timer = setInterval(poke, 5000);
    return () => { stop(); clearInterval(timer); };
  }, [messageId]);
  if (error) return html`<${Notice} error=${error} />`;
  if (!view) return html`<p>Loading ${messageId}…</p>`;
  return html`<div class="ledger" aria-live="polite">
    <h3>Ledger of <a href=${`#/messages/${view.id}`}>${view.id}</a></h3>
    <p><small>${view.message_type}, ${view.priority}, sent ${fmtTime(view.sent_at)}, expires ${fmtTime(view.expires_at)}</small></p>
    <${Table} caption="Delivery per recipient" rows=${view.recipients} rowKey=${(r) => r.node_id}
      columns=${[
        { label: "Recipient", cell: (r) => html`<a href=${`#/node/${encodeURIComponent(r.node_id)}`}>${r.node_id}</a>` },
        { label: "State", cell: (r) => html`<span class=${`pill st-${r.status}`} data-ledger=${r.node_id}>${r.status}</span>` },
        { label: "Attempts", cell: (r) => r.attempts },
        { label: "At", cell: (r) => fmtTime(r.at) },
      ]} />
  </div>`;
}

function DeadLetters() {
  const me = useMe();
  if (!can(me, "messages:read_any")) {
    return html`<div class="panel"><h2>Dead letters</h2><p>Needs the messages:read_any permission.</p></div>`;
  }
  return html`<${DeadLetterList} />`;
}

function DeadLetterList() {
  const [items, setItems] = useState(null);
  const [error, setError] = useState(null);
  const [note, setNote] = useState(null);
  const load = () => API.get("/api/v1/messages/dead-letters").then((r) => { setItems(r.items); setError(null); }, setError);
  useEffect(() => {
    load();
    const poke = throttle(load, 1000);
    // (loaded again once the feed is live: nothing between the first load and the feed is missed)
    return API.subscribe({ types: ["message.dead_lettered", "message.expired", "message.redriven"] }, poke,
      (state) => state === "live" && poke());
  }, []);
  async function redrive(d) {
    try {
      await API.api("POST", "/api/v1/messages/dead-letters/redrive", { message_id: d.message_id, node_id: d.node_id });
      setNote(`${d.message_id} is queued again for ${d.node_id}.`);
      load();
    } catch (err) { setError(err); }
  }
  return html`<div class="panel">
    <h2>Dead letters ${items ? html`<small>(${items.length})</small>` : null}</h2>
    <${Notice} error=${error} ok=${note} />
    ${items && html`<${Table} caption="Dead letters" rows=${items} rowKey=${(d) => `${d.message_id}/${d.node_id}`}
      empty="No dead letter."
      columns=${[
        { label: "Message", cell: (d) => html`<a href=${`#/messages/${d.message_id}`}>${d.message_id}</a>` },
        { label: "Node", cell: (d) => html`<a href=${`#/node/${encodeURIComponent(d.node_id)}`}>${d.node_id}</a>` },
        { label: "Type", cell: (d) => d.message.message_type },
        { label: "Reason", cell: (d) => d.reason },
        { label: "Attempts", cell: (d) => d.attempts },
        { label: "At", cell: (d) => fmtTime(d.at) },
        { label: "", cell: (d) => html`<${Action} perm="messages:send" onClick=${() => redrive(d)}
            label=${`Redrive ${d.message_id} to ${d.node_id}`}>Redrive<//>` },
      ]} />`}
  </div>`;
}

// The latest messages sent (their message.sent events), live: a way to a ledger without its id.
function Recent() {
  const me = useMe();
  const [items, setItems] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    if (!can(me, "events:read")) return undefined;
    let stop = null;
    let gone = false;
    API.get("/api/v1/events", { types: "message.sent", sort_order: "desc", limit: RECENT }).then((page) => {
      if (gone) return;
      setItems(page.items);
      // then what follows the page's head: no gap, no duplicate
      stop = API.subscribe({ types: ["message.sent"], from_seq: page.head + 1 },
        (e) => setItems((old) => [e, ...old].slice(0, RECENT)));
    }, setError);
    return () => { gone = true; if (stop) stop(); };
  }, []);
  if (!can(me, "events:read")) return null;
  return html`<div class="panel">
    <h2>Recent messages</h2>
    <${Notice} error=${error} />
    ${items && html`<${Table} caption="Recent messages, newest first" rows=${items} rowKey=${(e) => e.seq}
      empty="No message sent yet."
      columns=${[
        { label: "Message", cell: (e) => html`<a href=${`#/messages/${e.data.message_id}`}>${e.data.message_id}</a>` },
        { label: "Type", cell: (e) => e.data.message_type },
        { label: "From", cell: (e) => e.data.from_node },
        { label: "To", cell: (e) => e.data.to_nodes.slice(0, 3).join(", ") + (e.data.to_nodes.length > 3 ? ` and ${e.data.to_nodes.length - 3} more` : "") },
        { label: "Priority", cell: (e) => e.data.priority },
        { label: "Sent", cell: (e) => fmtTime(e.ts) },
      ]} />`}
  </div>`;
}

export function MessagesPage({ arg }) {
  const [lookup, setLookup] = useState(arg || "");
  return html`<section aria-labelledby="messages-title">
    <h1 id="messages-title">Messages</h1>
    <div class="grid2">
      <div class="panel">
        <h2>Send</h2>
        <${SendForm} onSent=${(id) => nav(`#/messages/${id}`)} />
      </div>
      <div class="panel">
        <h2>A message's ledger</h2>
        <form class="inline" onSubmit=${(e) => { e.preventDefault(); nav(`#/messages/${encodeURIComponent(lookup.trim())}`); }}>
          <${Field} label="Message id"><input value=${lookup} onInput=${(e) => setLookup(e.target.value)} required /><//>
          <button class="btn" type="submit">Show</button>
        </form>
        ${arg ? html`<${Ledger} messageId=${arg} />` : null}
      </div>
    </div>
    <${DeadLetters} />
    <${Recent} />
  </section>`;
}
