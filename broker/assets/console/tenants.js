// Tenants and licences (create, revoke, usage against the limit, expiry), telemetry per tenant,
// and software updates (publish with upload progress, withdraw).
import * as API from "./api.js";
import { html, useState, useMe, can, Action, Notice, Field, Table, Pager, fmtTime, useLoad } from "./ui.js";
import { Chart } from "./chart.js";

const LIMIT = 20;

function Tenants({ onPick, picked, version, bump }) {
  const [skip, setSkip] = useState(0);
  const [search, setSearch] = useState("");
  const [page, error] = useLoad(() => API.get("/api/v1/admin/tenants", { skip, limit: LIMIT, search, sort_by: "created_at", sort_order: "desc" }), [skip, search, version]);
  const [err, setErr] = useState(null);
  async function create(e) {
    e.preventDefault();
    const name = new FormData(e.target).get("name").trim();
    try { const t = await API.api("POST", "/api/v1/admin/tenants", { name }); e.target.reset(); bump(); onPick(t.id); setErr(null); } catch (x) { setErr(x); }
  }
  return html`<div class="panel">
    <h2>Tenants</h2>
    <div class="row">
      <form class="inline" onSubmit=${create} aria-label="create a tenant">
        <${Field} label="New tenant name"><input name="name" required maxlength="200" /><//>
        <${Action} perm="licenses:admin" type="submit" kind="primary">Create tenant<//>
      </form>
      <${Field} label="Search"><input type="search" value=${search} onInput=${(e) => { setSkip(0); setSearch(e.target.value); }} /><//>
    </div>
    <${Notice} error=${error || err} />
    ${page && html`<${Table} caption="Tenants" rows=${page.items} rowKey=${(t) => t.id} empty="No tenant yet."
      columns=${[
        { label: "Tenant", cell: (t) => html`<button class=${`link ${picked === t.id ? "on" : ""}`} aria-pressed=${picked === t.id} onClick=${() => onPick(t.id)}>${t.name}</button><br/><small>${t.id}</small>` },
        { label: "Active", cell: (t) => (t.active ? "yes" : "no") },
        { label: "Licences", cell: (t) => t.license_count },
        { label: "Created", cell: (t) => fmtTime(t.created_at) },
      ]} />
      <${Pager} skip=${skip} limit=${LIMIT} total=${page.total} onPage=${setSkip} label="tenants" />`}
  </div>`;
}

function Licences({ tenantId, version, bump }) {
  const [skip, setSkip] = useState(0);
  const [page, error, reload] = useLoad(() => API.get("/api/v1/admin/licenses", { skip, limit: LIMIT, tenant_id: tenantId, sort_by: "created_at", sort_order: "desc" }), [skip, tenantId, version]);
  const [created, setCreated] = useState(null);
  const [err, setErr] = useState(null);
  const inYear = new Date(Date.now() + 365 * 86400e3).toISOString().slice(0, 10);
  async function create(e) {
    e.preventDefault();
    const f = Object.fromEntries(new FormData(e.target));
    const body = { tenant_id: tenantId, expires_at: `${f.expires_at}T23:59:59Z` };
    if (f.max_usage_count) body.max_usage_count = Number(f.max_usage_count);
    try { setCreated(await API.api("POST", "/api/v1/admin/licenses", body)); setErr(null); bump(); } catch (x) { setErr(x); }
  }
  async function revoke(l) {
    const reason = prompt(`Revoke the licence ending ${l.key_last4}? Reason (optional):`);
    if (reason === null) return;
    try { await API.api("POST", `/api/v1/admin/licenses/${l.id}/revoke`, { reason: reason || null }); reload(); } catch (x) { setErr(x); }
  }
  return html`<div class="panel">
    <h2>Licences ${tenantId ? null : html`<small>(all tenants; pick one to create)</small>`}</h2>
    ${tenantId && html`<form class="inline" onSubmit=${create} aria-label="create a licence">
      <${Field} label="Expires on"><input name="expires_at" type="date" required defaultValue=${inYear} /><//>
      <${Field} label="Usage limit" hint="empty: unlimited"><input name="max_usage_count" type="number" min="1" /><//>
      <${Action} perm="licenses:admin" type="submit" kind="primary">Create licence<//>
    </form>`}
    ${created && html`<p class="notice ok" role="status">Licence created. Its key is shown this once:
      <code data-licence-key>${created.key}</code></p>`}
    <${Notice} error=${error || err} />
    ${page && html`<${Table} caption="Licences" rows=${page.items} rowKey=${(l) => l.id} empty="No licence."
      columns=${[
        { label: "Key", cell: (l) => html`<span class="nowrap">…${l.key_last4}</span>` },
        { label: "Tenant", cell: (l) => l.tenant_name || l.tenant_id },
        { label: "Status", cell: (l) => html`<span class=${`pill st-${l.status}`}>${l.status}</span>` },
        { label: "Usage", cell: (l) => html`<span>${l.usage_count} / ${l.max_usage_count ?? "∞"}</span>
          ${l.max_usage_count ? html`<meter min="0" max=${l.max_usage_count} value=${l.usage_count} aria-label="usage against the limit"></meter>` : null}` },
        { label: "Expires", cell: (l) => fmtTime(l.expires_at) },
        { label: "Last used", cell: (l) => fmtTime(l.last_used_at) },
        { label: "", cell: (l) => (l.revoked ? "" : html`<${Action} perm="licenses:admin" kind="danger" onClick=${() => revoke(l)} label=${`Revoke the licence ending ${l.key_last4}`}>Revoke<//>`) },
      ]} />
      <${Pager} skip=${skip} limit=${LIMIT} total=${page.total} onPage=${setSkip} label="licences" />`}
  </div>`;
}

function Telemetry({ tenantId }) {
  const me = useMe();
  const [summary, error] = useLoad(() => API.get(`/api/v1/admin/tenants/${encodeURIComponent(tenantId)}/telemetry/summary`), [tenantId]);
  const [series] = useLoad(() => (can(me, "events:read")
    ? API.get("/api/v1/events", { stream: tenantId, types: "telemetry.recorded", sort_order: "desc", limit: 1000 }).then((page) => {
      const since = Date.now() / 1000 - 86400;
      const samples = page.items.filter((e) => e.ts >= since).reverse();
      return { range: [since, Date.now() / 1000], x: samples.map((e) => e.ts), users: samples.map((e) => e.data.active_users), latency: samples.map((e) => e.data.ai_latency) };
    })
    : Promise.resolve(null)), [tenantId]);
  const windows = summary ? [["last hour", summary.last_hour], ["last day", summary.last_day]] : [];
  return html`<div class="panel">
    <h2>Telemetry of the tenant</h2>
    <${Notice} error=${error} />
    ${summary && html`<p><small>Last sample ${fmtTime(summary.last_sample_at)}</small></p>
      <${Table} caption="Telemetry aggregates" rows=${windows} rowKey=${(w) => w[0]}
        columns=${[
          { label: "Window", cell: ([name]) => name },
          { label: "Samples", cell: ([, w]) => w.samples },
          { label: "Active users (max)", cell: ([, w]) => w.active_users_max ?? "—" },
          { label: "AI latency mean / max", cell: ([, w]) => (w.ai_latency_mean === null ? "—" : `${w.ai_latency_mean.toFixed(1)} / ${w.ai_latency_max.toFixed(1)}`) },
          { label: "Versions", cell: ([, w]) => Object.entries(w.versions).map(([v, n]) => `${v} (${n})`).join(", ") || "—" },
        ]} />`}
    ${series && series.x.length > 0 && html`<${Chart} title="Active users and AI latency, last 24 hours" x=${series.x}
      range=${series.range} names=${["active users", "AI latency"]} ys=${[series.users, series.latency]} />`}
  </div>`;
}

function Updates() {
  const me = useMe();
  const [skip, setSkip] = useState(0);
  const allowed = can(me, "updates:admin");
  const [page, error, reload] = useLoad(() => (allowed ? API.get("/api/v1/admin/updates", { skip, limit: LIMIT, sort_by: "created_at", sort_order: "desc" }) : Promise.resolve(null)), [skip]);
  const [progress, setProgress] = useState(null);
  const [err, setErr] = useState(null);
  const [note, setNote] = useState(null);
  async function publish(e) {
    e.preventDefault();
    const form = new FormData(e.target);
    if (!form.get("tenant_ids")) form.delete("tenant_ids");
    setProgress(0);
    setErr(null);
    try {
      const u = await API.upload("/api/v1/admin/updates", form, setProgress);
      setNote(`Published ${u.version} (${u.file_size} bytes, sha256 ${u.sha256.slice(0, 12)}…).`);
      e.target.reset();
      reload();
    } catch (x) { setErr(x); }
    setProgress(null);
  }
  async function withdraw(u) {
    const reason = prompt(`Withdraw ${u.version}? Reason (optional):`);
    if (reason === null) return;
    try { await API.api("POST", `/api/v1/admin/updates/${u.id}/withdraw`, { reason: reason || null }); reload(); } catch (x) { setErr(x); }
  }
  return html`<div class="panel">
    <h2>Software updates</h2>
    <form class="filters" onSubmit=${publish} aria-label="publish an update">
      <${Field} label="Version"><input name="version" required placeholder="1.2.0" /><//>
      <${Field} label="ZIP file"><input name="file" type="file" accept=".zip,application/zip" required /><//>
      <${Field} label="Tenants" hint="comma-separated ids; empty: every tenant"><input name="tenant_ids" /><//>
      <${Field} label="Changelog"><input name="changelog" /><//>
      <${Action} perm="updates:admin" type="submit" kind="primary" busy=${progress !== null}>Publish<//>
    </form>
    ${progress !== null ? html`<progress max="1" value=${progress} aria-label="upload progress">${Math.round(progress * 100)}%</progress>` : null}
    <${Notice} error=${error || err} ok=${note} />
    ${!allowed ? html`<p>Needs the updates:admin permission.</p>` : page && html`<${Table} caption="Updates" rows=${page.items} rowKey=${(u) => u.id} empty="No update published."
      columns=${[
        { label: "Version", cell: (u) => u.version },
        { label: "File", cell: (u) => html`${u.filename}<br/><small>${u.file_size} bytes</small>` },
        { label: "Tenants", cell: (u) => (u.tenant_ids ? u.tenant_ids.join(", ") : "all") },
        { label: "Published", cell: (u) => fmtTime(u.created_at) },
        { label: "State", cell: (u) => (u.withdrawn ? `withdrawn ${fmtTime(u.withdrawn_at)}` : "available") },
        { label: "", cell: (u) => (u.withdrawn ? "" : html`<${Action} perm="updates:admin" kind="danger" onClick=${() => withdraw(u)} label=${`Withdraw ${u.version}`}>Withdraw<//>`) },
      ]} />
      <${Pager} skip=${skip} limit=${LIMIT} total=${page.total} onPage=${setSkip} label="updates" />`}
  </div>`;
}

export function TenantsPage() {
  const me = useMe();
  const [tenant, setTenant] = useState("");
  const [version, setVersion] = useState(0);
  const bump = () => setVersion((v) => v + 1);
  if (!can(me, "licenses:admin")) {
    return html`<section><h1>Tenants & updates</h1><p>Needs the licenses:admin permission.</p></section>`;
  }
  return html`<section aria-labelledby="tenants-title">
    <h1 id="tenants-title">Tenants, licences and updates</h1>
    <div class="grid2">
      <${Tenants} onPick=${setTenant} picked=${tenant} version=${version} bump=${bump} />
      <div>
        <${Licences} tenantId=${tenant} version=${version} bump=${bump} />
        ${tenant && html`<${Telemetry} tenantId=${tenant} />`}
      </div>
    </div>
    <${Updates} />
  </section>`;
}
