// The console's only way to the server: the JSON API with a bearer token held in memory.
// No cookie and no storage: a reload signs out, and a cross-site page has no credential to
// ride on (the server never reads cookies), so there is nothing for CSRF to exploit.

let tokens = null; // {access_token, refresh_token}
let refreshing = null;
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || (body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || String(status);
    this.details = err.details || [];
  }
}

export const signedIn = () => tokens !== null;
export const accessToken = () => tokens && tokens.access_token;
export const onSession = (fn) => { listeners.add(fn); return () => listeners.delete(fn); };
const announce = () => listeners.forEach((fn) => fn(tokens));

async function parse(resp) {
  const type = resp.headers.get("Content-Type") || "";
  if (resp.status === 204) return null;
  if (type.includes("application/json")) return resp.json();
  return resp.text();
}

export async function login(username, password) {
  const resp = await fetch("/auth/login", {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ username, password }),
    credentials: "omit",
  });
  const body = await parse(resp);
  if (!resp.ok) throw new ApiError(resp.status, body);
  tokens = { access_token: body.access_token, refresh_token: body.refresh_token };
  announce();
}

// End the session on the server (refreshing an expired access token first, so the logout is
// not refused), then forget the tokens whatever the answer.
export async function logout() {
  try {
    if (tokens) await api("POST", "/auth/logout");
  } catch {
    // signed out here all the same; the refresh token dies with its family or its expiry
  }
  tokens = null;
  announce();
}

async function refresh() {
  // One refresh at a time: the refresh token rotates, a second use would revoke the family.
  if (!refreshing) {
    const current = tokens;
    refreshing = (async () => {
      const resp = await fetch("/auth/refresh", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ refresh_token: current.refresh_token }),
        credentials: "omit",
      });
      const body = await parse(resp);
      if (!resp.ok) { tokens = null; announce(); throw new ApiError(resp.status, body); }
      tokens = { access_token: body.access_token, refresh_token: body.refresh_token };
      announce();
    })().finally(() => { refreshing = null; });
  }
  return refreshing;
}

// A JSON API call: `body` is sent as JSON (or as is when it is FormData). A 401 refreshes the
// token once and retries; a second 401 signs out.
export async function api(method, path, body, { retry = true, headers = {} } = {}) {
  if (!tokens) throw new ApiError(401, { message: "signed out" });
  const init = {
    method,
    headers: { Authorization: `Bearer ${tokens.access_token}`, Accept: "application/json", ...headers },
    credentials: "omit",
  };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401 && retry && tokens) {
    await refresh();
    return api(method, path, body, { retry: false, headers });
  }
  const data = await parse(resp);
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

export const get = (path, params) => api("GET", params ? `${path}?${query(params)}` : path);

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  return q.toString();
}

// An upload with progress (fetch cannot report it): XMLHttpRequest with the same token.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${tokens.access_token}`);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { body = null; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.onerror = () => reject(new ApiError(0, { message: "the upload failed (network)" }));
    xhr.send(form);
  });
}

// --- the live feed: one WebSocket (GET /ws), shared by every page ---
//
// subscribe({types, streams, from_seq}, onEvent, onState) -> unsubscribe function. Each call
// opens its own socket (a page has one or two), authenticates with the first frame, and
// resubscribes after a drop from the seq after the last event it saw (no gap, no duplicate).

export function subscribe(filter, onEvent, onState = () => {}) {
  let ws = null;
  let closed = false;
  let last = filter.from_seq ? filter.from_seq - 1 : null;
  let retry = 500;
  let timer = null;
  const stopSession = onSession((t) => {
    if (!t) stop();
    else if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "auth", token: `Bearer ${t.access_token}` }));
    }
  });

  function open() {
    if (closed || !tokens) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(`${scheme}//${location.host}/ws`);
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "auth", token: `Bearer ${tokens.access_token}` }));
      const op = { type: "subscribe", types: filter.types || null, streams: filter.streams || null };
      if (last !== null) op.from_seq = last + 1;
      ws.send(JSON.stringify(op));
    };
    ws.onmessage = (m) => {
      let frame;
      try { frame = JSON.parse(m.data); } catch { return; }
      if (frame.type === "event") { last = frame.seq; onEvent(frame); }
      else if (frame.type === "caught_up") { if (last === null) last = frame.seq; retry = 500; onState("live", frame); }
      else if (frame.type === "error") onState("error", frame);
    };
    ws.onclose = (e) => {
      if (closed) return;
      onState("reconnecting", e);
      if (e.code === 4401 && tokens) refresh().catch(() => {});
      if (e.code === 4403) { onState("forbidden", e); return; }
      timer = setTimeout(open, retry);
      retry = Math.min(retry * 2, 15000);
    };
  }

  function stop() {
    closed = true;
    clearTimeout(timer);
    stopSession();
    if (ws) ws.close(1000);
  }

  open();
  return stop;
}
