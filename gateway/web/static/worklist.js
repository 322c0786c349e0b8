// The worklist: studies newest first (or urgent first), filters and paging done by the server, live progress over
// SSE; a failed study's row has the study view's Screen again (actions.js).

import { canScreenAgain, gate, newerVersion, screenAgain, STUDIES_WRITE } from "./actions.js";
import { ApiError, getJson, sharedSubscribe } from "./api.js";
import { announce, fmtDate, fmtSeconds, fmtStudyDate, h } from "./dom.js";

const STATES = ["receiving", "queued", "screening", "done", "failed"];
const VERDICTS = ["positive", "negative", "indeterminate"];
const PRIORITIES = ["urgent", "routine", "low"];
// the order of the rows (the API's ?order=): newest first (the default, no parameter), or urgent first
const ORDERS = { "": "newest first", priority: "urgent first" };
const PAGE = 50;

function select(name, label, options, value) {
  return h("label", { class: "field" }, label,
    h("select", { name, id: `f-${name}` },
      h("option", { value: "" }, "any"),
      options.map((o) => h("option", { value: o, selected: o === value }, o))));
}

function progress(row) {
  if (row.state !== "screening") return null;
  const total = row.slices_total || 0;
  return h("progress", { max: total || 1, value: row.slices_done, "aria-label": `slices screened of ${total}` });
}

// Rows are written as one HTML string (escaped) and parsed once: a page of 1,000 studies stays fast.
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// a failed study's Screen again (studies:write): written disabled, gate() enables it for a caller who holds the
// scope; named with its row (a screen reader's list of buttons read "Screen again" as often as rows failed). A failed
// earlier version has none (the gateway retries the latest only): its row names the newer version to screen instead
function screenAgainHtml(row, name) {
  const newer = name && newerVersion(row);
  if (newer) return `<small class="newer-version">v${esc(newer)} is newer</small>`;
  if (!canScreenAgain(row) || !row.job_id || !name) return "";
  return `<button type="button" class="screen-again" data-action="screen-again" data-needs="${STUDIES_WRITE}" disabled`
    + ` aria-label="Screen again: ${esc(name)}">Screen again</button><span class="bad retry-refused" data-role="refused"></span>`;
}

function stateHtml(row, name = null) {
  const text = row.state === "screening" && row.slices_total
    ? `screening ${row.slices_done}/${row.slices_total}` : row.state;
  const bar = row.state === "screening"
    ? `<progress max="${row.slices_total || 1}" value="${row.slices_done}" aria-label="slices screened of ${row.slices_total || 0}"></progress>` : "";
  return `<td class="state state-${esc(row.state)}" data-role="state"><span class="state-text">${esc(text)}</span>${bar}`
    + `${screenAgainHtml(row, name)}</td>`;
}

function stateCell(row) {
  const t = document.createElement("template");
  t.innerHTML = `<table><tr>${stateHtml(row)}</tr></table>`;
  return t.content.querySelector("td");
}

// Study UIDs share their first digits (the organisation's root): a row without an accession number shows
// the UID's end, which tells studies apart; the whole UID is its title and its accessible name.
const UID_TAIL = 18;

function label(row) {
  const l = row.labels || {};
  if (l.accession_number) return `Acc. ${l.accession_number}`;
  const uid = row.study_instance_uid;
  return uid.length > UID_TAIL + 1 ? `…${uid.slice(-UID_TAIL)}` : uid;
}

// the day and the time, each kept whole where the column is narrow (the day wrapped after its first hyphen)
function received(iso) {
  const [day, time = ""] = fmtDate(iso).replace(" UTC", "").slice(0, 16).split(" ");
  return `<span>${esc(day)}</span> <span>${esc(time)}</span>`;
}

function rowHtml(row) {
  const name = esc(label(row));
  const uid = esc(row.study_instance_uid);
  const spoken = row.labels?.accession_number ? name : `Study ${uid}`;
  const link = row.job_id ? `<a href="#/study/${esc(row.job_id)}" title="${uid}" aria-label="${spoken}">${name}</a>`
    : `<span title="${uid}" aria-label="${spoken}">${name}</span>`;
  const verdict = row.verdict ? `<span class="verdict verdict-${esc(row.verdict)}">${esc(row.verdict)}</span>`
    : (row.state === "failed" ? "—" : "");
  // an older version's verdict is not the study's: say so in words, not only by muting the row
  const superseded = row.superseded_by ? `<small class="superseded">superseded by v${esc(row.superseded_by)}</small>` : "";
  // an urgent study is screened before the others (and said so in words); a low one after them
  const priority = row.priority && row.priority !== "routine"
    ? `<span class="priority priority-${esc(row.priority)}">${esc(row.priority)}</span>` : "";
  // on a line of their own under the name, which alone is cut short: behind a long accession number or UID the
  // cell's clip hid them ("urgent" and "superseded by v2" were not on screen at 1280 px)
  const version = row.version > 1 ? `<small class="version">v${esc(row.version)}</small>` : "";
  const badges = priority || version || superseded ? `<span class="badges">${priority}${version}${superseded}</span>` : "";
  return `<tr data-job-id="${esc(row.job_id || "")}" data-study-id="${esc(row.study_id)}" data-uid="${uid}" data-state="${esc(row.state)}" data-verdict="${esc(row.verdict || "")}" data-priority="${esc(row.priority || "routine")}"${row.superseded_by ? ` class="superseded" data-superseded-by="${esc(row.superseded_by)}"` : ""}>`
    + `<td class="when">${received(row.received_at)}</td>`
    + `<td class="when">${esc(fmtStudyDate(row.labels?.study_date))}</td>`
    + `<th scope="row" class="uid"><span class="uid-name">${link}</span>${badges}</th>`
    + `<td class="series">${esc(row.labels?.series_description || "—")}</td>`
    + stateHtml(row, label(row))
    + `<td>${verdict}</td>`
    + `<td class="reason" title="${esc(row.message)}"><code>${esc(row.reason)}</code> ${esc(row.message)}</td>`
    + `<td class="num">${esc(fmtSeconds(row.time_s))}</td></tr>`;
}

// the control a keyboard user pressed to get this view (the pager's, the filters' Apply or Clear): each builds a new
// view, and the new view's own takes the focus once its rows are in (the focus fell to the page's start)
let pressed = null;

export function worklistView(main, params, { focusJob = null } = {}) {
  const refocus = pressed;
  pressed = null;
  const filters = {
    state: STATES.includes(params.get("state")) ? params.get("state") : "",
    verdict: VERDICTS.includes(params.get("verdict")) ? params.get("verdict") : "",
    priority: PRIORITIES.includes(params.get("priority")) ? params.get("priority") : "",
    received_from: params.get("received_from") || "",
    received_to: params.get("received_to") || "",
    order: params.get("order") in ORDERS ? params.get("order") : "",
  };
  const byPriority = filters.order === "priority";
  const offset = Math.max(0, Number(params.get("offset")) || 0);
  const limit = Math.min(1000, Math.max(1, Number(params.get("limit")) || PAGE));

  const form = h("form", { class: "filters", "aria-label": "Filter the worklist" },
    select("state", "State", STATES, filters.state),
    select("verdict", "Verdict", VERDICTS, filters.verdict),
    select("priority", "Priority", PRIORITIES, filters.priority),
    h("label", { class: "field" }, "Received from (UTC day)",
      h("input", { type: "date", name: "received_from", value: filters.received_from })),
    h("label", { class: "field" }, "to (UTC day)",
      h("input", { type: "date", name: "received_to", value: filters.received_to })),
    h("label", { class: "field" }, "Order",
      h("select", { name: "order", id: "f-order" },
        Object.entries(ORDERS).map(([value, text]) => h("option", { value, selected: value === filters.order }, text)))),
    h("button", { type: "submit", dataset: { control: "apply" } }, "Apply"),
    h("button", { type: "reset", dataset: { control: "clear" } }, "Clear"));
  const go = (next) => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(next)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
    location.hash = `#/?${q}`;
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    pressed = "apply";
    go({ ...Object.fromEntries(new FormData(form)), limit: limit === PAGE ? "" : limit });
  });
  form.addEventListener("reset", (e) => { e.preventDefault(); pressed = "clear"; go({}); });

  const tbody = h("tbody");
  const table = h("table", { class: "worklist", "aria-describedby": "worklist-caption" },
    h("caption", { id: "worklist-caption" },
      byPriority ? "Studies, urgent first, then routine, then low; newest first within each" : "Studies, newest first"),
    h("colgroup", {}, ["c-when", "c-date", "c-uid", "c-series", "c-state", "c-verdict", "c-reason", "c-time"]
      .map((c) => h("col", { class: c }))),
    h("thead", {}, h("tr", {},
      ["Received (UTC)", "Study date", "Accession / Study UID", "Series", "State", "Verdict", "Reason", "Turnaround"]
        .map((t) => h("th", { scope: "col", title: t === "Turnaround"
          ? "From Received (the first instance; an upload: its acceptance) to the result: arrival, quiet period and queue included; a study screened again after a failed try counts from then too"
          : null }, t)))),
    tbody);
  const summary = h("p", { class: "pager-summary", "aria-live": "polite" });
  // urgent first, the next page is not older (its first rows may be newer than the last here)
  const prev = h("button", { type: "button", disabled: offset === 0, dataset: { control: "prev" } },
    byPriority ? "← Previous" : "← Newer");
  const next = h("button", { type: "button", disabled: true, dataset: { control: "next" } },
    byPriority ? "Next →" : "Older →");
  // the page size travels with the pages (it went back to 50 on "Older", and "Newer" missed the first page)
  const size = limit === PAGE ? "" : limit;
  prev.addEventListener("click", () => {
    pressed = "prev";
    go({ ...filters, limit: size, offset: Math.max(0, offset - limit) || "" });
  });
  next.addEventListener("click", () => {
    pressed = "next";
    go({ ...filters, limit: size, offset: offset + limit });
  });
  const live = h("span", { class: "live", id: "live-state" }, "connecting…");

  main.replaceChildren(
    h("div", { class: "view-head" }, h("h1", {}, "Worklist"), live),
    form, summary, h("div", { class: "table-wrap" }, table), h("nav", { class: "pager", "aria-label": "Pages" }, prev, next));

  // a failed row's Screen again: queued, its row follows the job (the event stream), the focus on the row's link
  tbody.addEventListener("click", async (e) => {
    const button = e.target.closest('button[data-action="screen-again"]');
    const tr = button?.closest("tr");
    if (!tr) return;
    if (await screenAgain(tr.dataset.jobId, button, tr.querySelector('[data-role="refused"]'))) {
      if (left) return;
      tr.querySelector("th.uid a")?.focus();
      reloadSoon();
    }
  });

  // once the first rows are in (or refused): back from a study, its row's link; after a pager's or the filters'
  // button, that button here (a pager button now disabled: the other); unless the focus has moved on meanwhile
  let placed = !focusJob && !refocus;
  const place = () => {
    if (placed) return;
    placed = true;
    if (document.activeElement !== main && document.activeElement !== document.body) return;
    const target = (focusJob && tbody.querySelector(`tr[data-job-id="${CSS.escape(focusJob)}"] th.uid a`))
      || (refocus && [refocus, { prev: "next", next: "prev" }[refocus]]
        .map((c) => c && main.querySelector(`[data-control="${c}"]:not(:disabled)`)).find(Boolean));
    target?.focus();
  };

  let reloadTimer = null;
  let loads = 0;
  const finished = new Set();  // jobs whose end is announced once their rows are loaded again
  let left = false;  // the view was left: an answer still on the wire must not write to the page
  async function load() {
    const q = new URLSearchParams({ limit, offset });
    for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
    const mine = ++loads;
    try {
      performance.mark("worklist-fetch");
      const page = await getJson(`/v1/worklist?${q}`);
      if (left || mine !== loads) return;  // a later load was asked for: an older answer must not overwrite it
      performance.mark("worklist-data");
      // a live reload must not throw a keyboard user's focus to the page's start: keep it on its row's link
      const held = tbody.contains(document.activeElement) ? document.activeElement.closest("tr")?.dataset.jobId : null;
      tbody.innerHTML = page.rows.length ? page.rows.map(rowHtml).join("")
        : '<tr><td colspan="8" class="empty">No study matches.</td></tr>';
      if (held) tbody.querySelector(`tr[data-job-id="${CSS.escape(held)}"] a`)?.focus();
      gate(tbody);  // the rows' Screen again, for a caller who may
      const said = [...finished].map((job) => {
        const tr = tbody.querySelector(`tr[data-job-id="${CSS.escape(job)}"]`);
        const name = tr?.querySelector("th.uid a, th.uid span")?.textContent || "A study";
        return `${name}: ${tr?.dataset.verdict || tr?.dataset.state || "finished"}`;
      });
      if (said.length) announce(said.join("; "));
      finished.clear();
      performance.mark("worklist-dom");
      requestAnimationFrame(() => setTimeout(() => performance.mark("worklist-painted")));  // after the next paint
      const last = Math.min(page.total, offset + page.rows.length);
      summary.textContent = !page.total ? "No studies"
        : offset >= page.total ? `No studies on this page (${page.total} in all)`
        : `Studies ${offset + 1}–${last} of ${page.total}`;
      next.disabled = last >= page.total;
      place();
      main.dataset.loaded = String(Date.now());
    } catch (error) {
      if (left || mine !== loads) return;
      summary.textContent = error instanceof ApiError ? `Cannot load the worklist: ${error.message}` : String(error);
      place();
    }
  }
  // throttled, not debounced: progress of a new study arrives every few hundred ms, and a debounce
  // restarted by each event would keep its row off the page until the study is done
  const reloadSoon = () => {
    if (reloadTimer === null) reloadTimer = setTimeout(() => { reloadTimer = null; load(); }, 300);
  };

  const stop = sharedSubscribe("/v1/worklist/events", (type, e) => {
    // a study version opened (received by STOW or C-STORE, or a late instance superseding a verdict): it has
    // no job yet, so no progress event; the first page shows it
    if (type === "studies") { if (!offset) reloadSoon(); return; }
    if (type !== "progress") return;
    const tr = tbody.querySelector(`tr[data-job-id="${CSS.escape(e.job_id)}"]`);
    // a new study on the first page; past it, a version of a study shown here queued, done or failed: whether its
    // other versions' rows are superseded may have changed (the rows may shift, as they would for a reload)
    if (!tr) {
      const mine = tbody.querySelector(`tr[data-uid="${CSS.escape(e.study_instance_uid || "")}"]`);
      if (!offset || (mine && ["queued", "done", "failed"].includes(e.state))) reloadSoon();
      return;
    }
    const was = tr.dataset.state;
    tr.dataset.state = e.state;
    const row = { state: e.state, slices_done: e.slices_done, slices_total: e.slices_total };
    tr.querySelector('[data-role="state"]').replaceWith(stateCell(row));
    // said with the row's name (its accession number, or its UID's end), and a finished one with its verdict once
    // the row is loaded again: "A study finished: done" told a screen reader user neither which nor what
    const name = tr.querySelector("th.uid a, th.uid span")?.textContent || "A study";
    if (e.state === "done" || e.state === "failed") { finished.add(e.job_id); reloadSoon(); return; }
    // a failed version replaces no reading (the earlier versions' rows lose "superseded"); retried, it is to
    // replace it again: the server tells those rows their mark back, which only a reload of the page shows
    if (was === "failed") reloadSoon();
    if (was !== e.state) announce(`${name}: ${e.state}`);
  }, { onState: (s, detail) => {
    // refused (429, too many streams open): the server's reason, and when the page asks again
    live.textContent = s === "refused" ? `not live: ${detail.message} (trying again in ${detail.retryS} s)` : s;
    live.dataset.state = s;
    // the stream tells what happens from now on: what happened before it (re)connected, the table
    // learns by loading again (a study that finished while the connection was down, or before it opened)
    if (s === "live") reloadSoon();
  } });

  load();
  return () => { left = true; stop(); clearTimeout(reloadTimer); };
}
