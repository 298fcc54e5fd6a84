// Small shared pieces: formatting, the permission-aware button, tables, pager, notices.
import { html, useState, useEffect, useRef, createContext, useContext } from "./vendor/preact-htm.js";

export { html, useState, useEffect, useRef };

// The signed-in operator ({username, roles, permissions}), provided by app.js.
export const Me = createContext(null);
export const useMe = () => useContext(Me);
export const can = (me, permission) => !!me && me.permissions.includes(permission);

export function fmtTime(value) {
  if (value === null || value === undefined || value === "") return "—";
  const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function ago(value) {
  if (!value) return "never";
  const t = typeof value === "number" ? value * 1000 : Date.parse(value);
  const s = Math.round((Date.now() - t) / 1000);
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export const nav = (hash) => { location.hash = hash; };

// A button for an action that needs `perm`: disabled (with the reason) when the operator lacks
// it. The server refuses the call anyway; this only keeps the page honest.
export function Action({ perm, onClick, children, kind = "", busy = false, label, type = "button" }) {
  const me = useMe();
  const allowed = !perm || can(me, perm);
  return html`<button type=${type} class=${`btn ${kind}`} onClick=${onClick}
    disabled=${!allowed || busy} aria-label=${label}
    title=${allowed ? label || "" : `needs the ${perm} permission`}>${children}</button>`;
}

export function Notice({ error, ok }) {
  if (error) return html`<p class="notice error" role="alert">${error.code ? `${error.code}: ` : ""}${error.message || String(error)}</p>`;
  if (ok) return html`<p class="notice ok" role="status">${ok}</p>`;
  return null;
}

export function Presence({ value }) {
  return html`<span class=${`pill ${value}`}>${value}</span>`;
}

export function Status({ value }) {
  return html`<span class=${`pill st-${value}`}>${value}</span>`;
}

// A data table: columns [{label, cell(row), key?}], rows, optional onOpen(row) for a row link.
export function Table({ caption, columns, rows, rowKey, empty = "Nothing to show." }) {
  return html`<table>
    <caption class="sr-only">${caption || "table"}</caption>
    <thead><tr>${columns.map((c) => html`<th scope="col">${c.label}</th>`)}</tr></thead>
    <tbody>
      ${rows.length === 0
        ? html`<tr><td colspan=${columns.length} class="empty">${empty}</td></tr>`
        : rows.map((r) => html`<tr key=${rowKey(r)}>${columns.map((c) => html`<td>${c.cell(r)}</td>`)}</tr>`)}
    </tbody>
  </table>`;
}

export function Pager({ skip, limit, total, onPage, label = "items" }) {
  const last = Math.min(skip + limit, total);
  return html`<nav class="pager" aria-label="pages">
    <button class="btn" disabled=${skip === 0} onClick=${() => onPage(Math.max(0, skip - limit))}>← Previous</button>
    <span aria-live="polite">${total === 0 ? `no ${label}` : `${skip + 1}–${last} of ${total} ${label}`}</span>
    <button class="btn" disabled=${last >= total} onClick=${() => onPage(skip + limit)}>Next →</button>
  </nav>`;
}

// Load `fn()` now and whenever `deps` change; returns [data, error, reload].
export function useLoad(fn, deps) {
  const [state, setState] = useState({ data: null, error: null });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    fn().then((data) => live && setState({ data, error: null }),
      (error) => live && setState((s) => ({ data: s.data, error })));
    return () => { live = false; };
  }, [...deps, tick]);
  return [state.data, state.error, () => setTick((t) => t + 1)];
}

// Call `fn` at most once per `ms` however often `poke()` is called (live refreshes).
export function throttle(fn, ms) {
  let timer = null;
  let again = false;
  const run = () => {
    timer = null;
    if (again) { again = false; fn(); timer = setTimeout(run, ms); }
  };
  return () => {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(run, ms);
  };
}

// The props binding a form input to one key of a draft object (a controlled input: a re-render,
// live ones included, keeps what the operator is typing).
export const bind = (draft, setDraft, key) => ({
  value: draft[key],
  onInput: (e) => setDraft({ ...draft, [key]: e.target.value }),
});

export function Field({ label, children, hint }) {
  return html`<label class="field"><span>${label}</span>${children}${hint ? html`<small>${hint}</small>` : null}</label>`;
}

export function Json({ value }) {
  return html`<pre class="json">${JSON.stringify(value, null, 2)}</pre>`;
}
