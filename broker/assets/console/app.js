// The console's shell: sign-in, the navigation, and the page of the URL's fragment (#/fleet…).
import { render } from "./vendor/preact-htm.js";
import * as API from "./api.js";
import { html, useState, useEffect, useRef, Me, Notice, Field, can } from "./ui.js";
import { FleetPage } from "./fleet.js";
import { NodePage } from "./node.js";
import { MessagesPage } from "./messages.js";
import { LogPage } from "./log.js";
import { TenantsPage } from "./tenants.js";
import { OperatorsPage } from "./operators.js";
import { SystemPage } from "./system.js";

const PAGES = [
  { path: "fleet", title: "Fleet", perm: "nodes:read", page: FleetPage },
  { path: "messages", title: "Messages", perm: "messages:read_any", page: MessagesPage },
  { path: "log", title: "Live log", perm: "events:read", page: LogPage },
  { path: "tenants", title: "Tenants & updates", perm: "licenses:admin", page: TenantsPage },
  { path: "operators", title: "Operators", perm: "users:admin", page: OperatorsPage },
  { path: "system", title: "System", perm: null, page: SystemPage },
];

function SignIn({ onDone }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const user = useRef(null);
  useEffect(() => user.current && user.current.focus(), []);
  async function submit(e) {
    e.preventDefault();
    const form = new FormData(e.target);
    setBusy(true);
    setError(null);
    try {
      await API.login(form.get("username"), form.get("password"));
      onDone();
    } catch (err) {
      setError(err);
      setBusy(false);
    }
  }
  return html`<main class="signin" id="main">
    <form onSubmit=${submit} aria-labelledby="signin-title">
      <h1 id="signin-title">Fleet broker console</h1>
      <p>Sign in as an operator.</p>
      <${Field} label="Username"><input ref=${user} name="username" autocomplete="username" required /><//>
      <${Field} label="Password"><input name="password" type="password" autocomplete="current-password" required /><//>
      <${Notice} error=${error} />
      <button class="btn primary" type="submit" disabled=${busy}>${busy ? "Signing in…" : "Sign in"}</button>
    </form>
  </main>`;
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  return { name: parts[0] || "fleet", arg: parts.slice(1).join("/") };
}

function Shell({ me, onSignOut }) {
  const [where, setWhere] = useState(route());
  useEffect(() => {
    const onHash = () => { setWhere(route()); document.getElementById("main")?.focus(); };
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);
  let Page = null;
  let title = "";
  if (where.name === "node") { Page = NodePage; title = `Node ${where.arg}`; }
  else {
    const p = PAGES.find((x) => x.path === where.name) || PAGES[0];
    Page = p.page;
    title = p.title;
  }
  useEffect(() => { document.title = `${title} · Fleet broker console`; }, [title]);
  useEffect(() => { document.getElementById("main")?.focus(); }, []); // after sign-in: the page
  const current = where.name === "node" ? "fleet" : where.name;
  return html`<${Me.Provider} value=${me}>
    <a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); document.getElementById("main").focus(); }}>Skip to content</a>
    <header class="top">
      <span class="brand">Fleet broker</span>
      <nav aria-label="pages"><ul>
        ${PAGES.map((p) => html`<li><a href=${`#/${p.path}`}
          aria-current=${current === p.path ? "page" : undefined}
          class=${p.perm && !can(me, p.perm) ? "dim" : ""}>${p.title}</a></li>`)}
      </ul></nav>
      <span class="who">${me.username} <small>(${me.roles.join(", ")})</small></span>
      <button class="btn" onClick=${onSignOut}>Sign out</button>
    </header>
    <main id="main" tabindex="-1">
      <${Page} arg=${where.arg} key=${`${where.name}/${where.arg}`} />
    </main>
  <//>`;
}

function App() {
  const [me, setMe] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => API.onSession((t) => { if (!t) setMe(null); }), []);
  async function loadMe() {
    try { setMe(await API.get("/auth/me")); } catch (err) { setError(err); }
  }
  if (!me) {
    return html`<${SignIn} onDone=${loadMe} />${error ? html`<${Notice} error=${error} />` : null}`;
  }
  return html`<${Shell} me=${me} onSignOut=${() => API.logout()} />`;
}

const root = document.getElementById("app");
root.textContent = ""; // the "Loading" line
render(html`<${App} />`, root);
