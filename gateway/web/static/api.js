// Talking to the gateway: every request carries the signed-in credential as a bearer header.
// Images and event streams are fetched too (never <img src> or EventSource), so a credential
// never goes into a URL, a browser history or a server log.

const KEY = "ctscreen.credential";

export const credential = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, reason, message, retryAfterS = null) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.reason = reason || "http_error";
    this.retryAfterS = retryAfterS;  // the answer's Retry-After, in seconds (a 429, a 503), or null
  }
}

async function body(response) {
  try { return await response.json(); } catch { return {}; }
}

// The request index.html's inline script started before the modules loaded (the first worklist page).
let prefetched = window.ctscreenPrefetch || null;
delete window.ctscreenPrefetch;

/** The prefetched response for this GET path and credential; the first worklist page request uses or drops it. */
function takePrefetch(path, options, token) {
  const p = prefetched;
  if (!p || !path.startsWith("/v1/worklist?")) return null;
  prefetched = null;
  const plain = !options.method && !options.signal && !options.headers;
  return plain && p.url === path && p.token === token ? p.response : null;
}

const DEADLINE_S = 30;

// what an API key or a token (a JWT) is made of: printable ASCII, nothing else
const PRINTABLE = /^[\x21-\x7e]+$/;
// what a paste brings along unseen: white space, zero-width and other format characters
const INVISIBLE = /[\s\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff]/g;

/** A credential as typed or pasted: ``{value}`` without invisible characters, or ``{error}`` saying which is wrong. */
export function cleanCredential(text) {
  const value = text.replace(INVISIBLE, "");
  const bad = [...value].find((c) => !PRINTABLE.test(c));
  if (!bad) return { value };
  const code = `U+${bad.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
  return { error: `An API key or access token holds only printable ASCII characters; this one has “${bad}” (${code}) `
    + "in it. Copy it again from where it was issued." };
}

/**
 * fetch() with the credential; a 401/403 also tells the page to ask for one. A request without a signal of its
 * own (all but the event streams) gets a deadline: a gateway that never answers left "Loading…" up for good.
 * A deadline passed and a network failure are ApiErrors whose message a person can read.
 */
export async function api(path, options = {}) {
  const token = credential.get();
  let headers;
  try {
    if (token && !PRINTABLE.test(token)) throw new TypeError("not printable ASCII");
    headers = new Headers(options.headers || {});
    if (token) headers.set("Authorization", `Bearer ${token}`);
  } catch {
    // a credential stored with a character a header cannot carry: "TypeError: Failed to execute 'set' on
    // 'Headers'" was all the page said
    const error = new ApiError(0, "bad_credential", "The credential cannot be sent: it holds a character no API "
      + "key or token has. Sign in again.");
    window.dispatchEvent(new CustomEvent("ctscreen:auth", { detail: error }));
    throw error;
  }
  let response;
  try {
    response = await (takePrefetch(path, options, token)
      ?? fetch(path, { ...options, headers, signal: options.signal ?? AbortSignal.timeout(DEADLINE_S * 1000) }));
  } catch (error) {
    if (options.signal?.aborted) throw error;  // the caller's own abort (a stream closed)
    if (error?.name === "TimeoutError") {
      throw new ApiError(0, "timeout", `The gateway did not answer within ${DEADLINE_S} s. Try again.`);
    }
    if (error instanceof TypeError) {
      throw new ApiError(0, "unreachable", "Cannot reach the gateway (the network or the gateway is down). Try again.");
    }
    throw error;
  }
  if (response.ok || response.status === 304) return response;
  const detail = await body(response);
  const retryAfter = Number(response.headers.get("Retry-After"));
  const error = new ApiError(response.status, detail.reason, detail.message, retryAfter > 0 ? retryAfter : null);
  if (response.status === 401 || response.status === 403) {
    window.dispatchEvent(new CustomEvent("ctscreen:auth", { detail: error }));
  }
  throw error;
}

export const getJson = async (path, options) => (await api(path, options)).json();

// a stream silent for this many of the server's keep-alive intervals (its X-Keepalive-Interval header; 15 s
// without one) is taken for a dead connection: a proxy or a network that drops packets without a reset kept
// "live" on screen while nothing came
const SILENT_INTERVALS = 2.5;
const KEEPALIVE_S = 15;
// a stream refused for too many streams open (429) is asked for again no sooner than its Retry-After, and later
// each time it is refused again, up to this
const LONGEST_REFUSED_MS = 60000;

/**
 * Server-sent events over fetch (so the request carries the Authorization header).
 * Calls onEvent(type, data) per event; reconnects after a drop, or after a silence longer than the server's
 * keep-alive allows; returns a function that stops it. onState(state, detail): "live", "reconnecting", "stopped"
 * (refused: 401, 403, 404), or "refused" with the server's reason (429: too many streams open) and the wait in s.
 */
export function subscribe(path, onEvent, { onState } = {}) {
  const controller = new AbortController();
  const job = type_is_final(path);
  let finished = false;  // a job's stream: its done or failed event came
  let retryMs = 2000;
  let silentMs = SILENT_INTERVALS * KEEPALIVE_S * 1000;
  let refusedMs = 0;  // the last wait after a 429 (0: the last try was not refused)
  (async () => {
    while (!controller.signal.aborted) {
      // this try's own abort: the caller's stop, or the watchdog when nothing came for silentMs
      const attempt = new AbortController();
      const stop = () => attempt.abort();
      controller.signal.addEventListener("abort", stop);
      let watchdog = null;
      const quiet = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(stop, silentMs);
      };
      quiet();  // a request that never answers counts as silence too
      let refused = null;  // a 429's ApiError
      try {
        const response = await api(path, { signal: attempt.signal, headers: { Accept: "text/event-stream" } });
        const keepalive = Number(response.headers.get("X-Keepalive-Interval"));
        if (keepalive > 0) silentMs = SILENT_INTERVALS * keepalive * 1000;
        quiet();
        refusedMs = 0;
        onState?.("live");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          quiet();  // any bytes, a keep-alive comment too
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let type = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) type = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
              else if (line.startsWith("retry:")) retryMs = Number(line.slice(6)) || retryMs;
            }
            if (data.length) {
              const event = JSON.parse(data.join("\n"));
              if (job && (event.state === "done" || event.state === "failed")) finished = true;
              onEvent(type, event);
            }
          }
        }
        // a job's stream ends when the job does; one that ends before (a restart, an expired
        // credential) is opened again, like the worklist's
        if (finished) return;
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof ApiError && (error.status === 401 || error.status === 403 || error.status === 404)) {
          onState?.("stopped");
          return;
        }
        refused = error instanceof ApiError && error.status === 429 ? error : null;
      } finally {
        clearTimeout(watchdog);
        controller.signal.removeEventListener("abort", stop);
        attempt.abort();  // a silent connection is closed, not left to the browser's pool
      }
      let waitMs = retryMs;
      if (refused) {
        // the caller or the gateway holds as many streams as it may: say so, and back off (it showed
        // "reconnecting" and asked again every 2 s, for good)
        waitMs = refusedMs = Math.min(LONGEST_REFUSED_MS,
          Math.max((refused.retryAfterS || 0) * 1000, 2 * refusedMs, retryMs));
        onState?.("refused", { message: refused.message, retryS: Math.round(waitMs / 1000) });
      } else {
        onState?.("reconnecting");
      }
      await new Promise((resolve) => setTimeout(resolve, waitMs));
    }
  })();
  return () => controller.abort();
}

// a job's own stream (it ends when the job does)
const type_is_final = (path) => /\/v1\/jobs\/[^/]+\/events$/.test(path);

// a name for the credential that tabs can share without writing it out (a lock's name is listed by
// navigator.locks.query() to every script of the origin): a 53-bit string hash (cyrb53), not a secret
function keyOf(text) {
  let a = 0xdeadbeef;
  let b = 0x41c6ce57;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    a = Math.imul(a ^ c, 2654435761);
    b = Math.imul(b ^ c, 1597334677);
  }
  a = Math.imul(a ^ (a >>> 16), 2246822507) ^ Math.imul(b ^ (b >>> 13), 3266489909);
  b = Math.imul(b ^ (b >>> 16), 2246822507) ^ Math.imul(a ^ (a >>> 13), 3266489909);
  return (4294967296 * (2097151 & b) + (a >>> 0)).toString(36);
}

/**
 * subscribe() for a stream every tab may follow at once (the worklist's): one tab of the origin reads it for all
 * the tabs with the same credential. Chromium opens at most 6 HTTP/1.1 connections to a host, and a stream holds
 * one for good: six worklist tabs left a seventh unable to load anything, and the six without live updates.
 * The tab holding the Web Lock named for the path and credential (navigator.locks) reads the stream and passes
 * each event and state on over a BroadcastChannel; the others listen, and one of them takes the lock, and the
 * stream, when that tab closes or leaves the view. Where there are no Web Locks (they need a secure context:
 * a page served over plain http from another host than localhost), each tab reads its own stream, closed while
 * the tab is hidden and opened again (the view then loads again) when it is shown.
 */
export function sharedSubscribe(path, onEvent, { onState } = {}) {
  if (!navigator.locks || typeof BroadcastChannel !== "function") return whileShown(path, onEvent, { onState });
  const name = `ctscreen-events ${path} ${keyOf(credential.get() || "")}`;
  const channel = new BroadcastChannel(name);
  const waiting = new AbortController();
  let leading = false;
  let state = null;  // [state, detail] as this tab last learnt it (leading: its own)
  let release = null;
  const setState = (...s) => { state = s; onState?.(...s); };
  channel.onmessage = ({ data }) => {
    if (data.kind === "hello") {  // a tab that just opened asks the leader where the stream stands
      if (leading && state) channel.postMessage({ kind: "state", state });
    } else if (!leading && data.kind === "state") {
      setState(...data.state);
    } else if (!leading && data.kind === "event") {
      onEvent(data.type, data.data);
    }
  };
  channel.postMessage({ kind: "hello" });
  navigator.locks.request(name, { signal: waiting.signal }, () => new Promise((resolve) => {
    leading = true;
    const stop = subscribe(path, (type, data) => {
      channel.postMessage({ kind: "event", type, data });
      onEvent(type, data);
    }, { onState: (...s) => { channel.postMessage({ kind: "state", state: s }); setState(...s); } });
    release = () => { stop(); resolve(); };
  })).catch(() => {});  // the view left while it waited for the lock (AbortError)
  return () => {
    waiting.abort();
    release?.();
    channel.close();
  };
}

/** subscribe() while the tab is shown: closed while it is hidden (onState "paused"), opened again when shown. */
function whileShown(path, onEvent, { onState } = {}) {
  let stop = null;
  const sync = () => {
    if (document.hidden) {
      stop?.();
      stop = null;
      onState?.("paused");
    } else if (!stop) {
      stop = subscribe(path, onEvent, { onState });
    }
  };
  document.addEventListener("visibilitychange", sync);
  sync();
  return () => {
    document.removeEventListener("visibilitychange", sync);
    stop?.();
  };
}

/** Save what a route answers as a file (the credential rides along, unlike a plain link). */
export async function download(path, filename) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** Save a JSON value as a file. */
export function saveJson(value, filename) {
  const url = URL.createObjectURL(new Blob([JSON.stringify(value, null, 2)], { type: "application/json" }));
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
