// Operators (seed 004's admin API): users with activation and roles, roles, permissions.
import * as API from "./api.js";
import { html, useState, useMe, can, Action, Notice, Field, Table, Pager, fmtTime, useLoad } from "./ui.js";

const LIMIT = 20;

export function OperatorsPage() {
  const me = useMe();
  const [skip, setSkip] = useState(0);
  const [search, setSearch] = useState("");
  const [version, setVersion] = useState(0);
  const bump = () => setVersion((v) => v + 1);
  const allowed = can(me, "users:admin");
  const [users, error] = useLoad(() => (allowed ? API.get("/admin/users", { skip, limit: LIMIT, search, sort_by: "username", sort_order: "asc" }) : Promise.resolve(null)), [skip, search, version]);
  const [roles] = useLoad(() => (allowed ? API.get("/admin/roles", { limit: 100 }) : Promise.resolve(null)), [version]);
  const [perms] = useLoad(() => (allowed ? API.get("/admin/permissions", { limit: 100 }) : Promise.resolve(null)), [version]);
  const [err, setErr] = useState(null);
  const [note, setNote] = useState(null);
  if (!allowed) return html`<section><h1>Operators</h1><p>Needs the users:admin permission.</p></section>`;

  async function act(fn, done) {
    try { await fn(); setErr(null); setNote(done); bump(); } catch (x) { setErr(x); setNote(null); }
  }
  function create(e) {
    e.preventDefault();
    const f = Object.fromEntries(new FormData(e.target));
    const body = { username: f.username.trim(), password: f.password, roles: [f.role] };
    if (f.email.trim()) body.email = f.email.trim();
    act(() => API.api("POST", "/admin/users", body).then(() => e.target.reset()), `Created ${body.username}.`);
  }
  function createRole(e) {
    e.preventDefault();
    const form = new FormData(e.target);
    const body = { name: form.get("name").trim(), description: form.get("description").trim() || null, permissions: form.getAll("permissions") };
    act(() => API.api("POST", "/admin/roles", body).then(() => e.target.reset()), `Created the role ${body.name}.`);
  }
  const roleByName = Object.fromEntries(((roles && roles.items) || []).map((r) => [r.name, r]));
  function grant(u, e) {
    e.preventDefault();
    const name = new FormData(e.target).get("role");
    const role = roleByName[name];
    if (role) act(() => API.api("POST", `/admin/users/${u.id}/roles/${role.id}`), `Granted ${name} to ${u.username}.`);
  }
  return html`<section aria-labelledby="ops-title">
    <h1 id="ops-title">Operators</h1>
    <${Notice} error=${error || err} ok=${note} />
    <div class="panel">
      <h2>Users</h2>
      <div class="row">
        <form class="inline" onSubmit=${create} aria-label="create an operator">
          <${Field} label="Username"><input name="username" required autocomplete="off" /><//>
          <${Field} label="Email"><input name="email" type="email" autocomplete="off" /><//>
          <${Field} label="Password"><input name="password" type="password" required minlength="8" autocomplete="new-password" /><//>
          <${Field} label="Role"><select name="role">${Object.keys(roleByName).map((n) => html`<option value=${n} defaultSelected=${n === "viewer"}>${n}</option>`)}</select><//>
          <${Action} perm="users:admin" type="submit" kind="primary">Create<//>
        </form>
        <${Field} label="Search"><input type="search" value=${search} onInput=${(e) => { setSkip(0); setSearch(e.target.value); }} /><//>
      </div>
      ${users && html`<${Table} caption="Operators" rows=${users.items} rowKey=${(u) => u.id}
        columns=${[
          { label: "User", cell: (u) => html`${u.username}<br/><small>${u.email || ""}</small>` },
          { label: "Active", cell: (u) => html`<span class=${`pill st-${u.is_active ? "active" : "inactive"}`}>${u.is_active ? "active" : "inactive"}</span>` },
          { label: "Roles", cell: (u) => html`${u.roles.map((r) => html`<span class="tag">${r}
              <button class="x" aria-label=${`Revoke ${r} from ${u.username}`} disabled=${!roleByName[r]}
                onClick=${() => act(() => API.api("DELETE", `/admin/users/${u.id}/roles/${roleByName[r].id}`), `Revoked ${r} from ${u.username}.`)}>×</button></span>`)}
            <form class="inline tight" onSubmit=${(e) => grant(u, e)}>
              <select name="role" aria-label=${`Role to grant ${u.username}`}>${Object.keys(roleByName).filter((n) => !u.roles.includes(n)).map((n) => html`<option value=${n}>${n}</option>`)}</select>
              <button class="btn" type="submit" aria-label=${`Grant the chosen role to ${u.username}`}>Grant</button></form>` },
          { label: "Last login", cell: (u) => fmtTime(u.last_login) },
          { label: "", cell: (u) => (u.is_active
            ? html`<${Action} perm="users:admin" kind="danger" label=${`Deactivate ${u.username}`} onClick=${() => act(() => API.api("POST", `/admin/users/${u.id}/deactivate`), `Deactivated ${u.username}.`)}>Deactivate<//>`
            : html`<${Action} perm="users:admin" label=${`Activate ${u.username}`} onClick=${() => act(() => API.api("POST", `/admin/users/${u.id}/activate`), `Activated ${u.username}.`)}>Activate<//>`) },
        ]} />
        <${Pager} skip=${skip} limit=${LIMIT} total=${users.total} onPage=${setSkip} label="operators" />`}
    </div>
    <div class="grid2">
      <div class="panel"><h2>Roles</h2>
        <form class="stack" onSubmit=${createRole} aria-label="create a role">
          <div class="row">
            <${Field} label="New role name"><input name="name" required maxlength="64" /><//>
            <${Field} label="Description"><input name="description" /><//>
          </div>
          <fieldset class="perms"><legend>Permissions of the new role</legend>
            ${((perms && perms.items) || []).map((p) => html`<label class="check"><input type="checkbox" name="permissions" value=${p.name} /> ${p.name}</label>`)}
          </fieldset>
          <${Action} perm="users:admin" type="submit" kind="primary">Create role<//>
        </form>
        ${roles && html`<${Table} caption="Roles" rows=${roles.items} rowKey=${(r) => r.id}
          columns=${[
            { label: "Role", cell: (r) => html`${r.name}${r.builtin ? html` <small>(built in)</small>` : null}` },
            { label: "Permissions", cell: (r) => r.permissions.join(", ") },
            { label: "", cell: (r) => (r.builtin ? "" : html`<${Action} perm="users:admin" kind="danger" label=${`Delete the role ${r.name}`}
                onClick=${() => confirm(`Delete the role ${r.name}?`) && act(() => API.api("DELETE", `/admin/roles/${r.id}`), `Deleted the role ${r.name}.`)}>Delete<//>`) },
          ]} />`}
      </div>
      <div class="panel"><h2>Permissions</h2>
        ${perms && html`<${Table} caption="Permissions" rows=${perms.items} rowKey=${(p) => p.id}
          columns=${[
            { label: "Permission", cell: (p) => p.name },
            { label: "What it allows", cell: (p) => p.description || "—" },
          ]} />`}
      </div>
    </div>
  </section>`;
}
