// Where a result went: each destination (PACS, RIS) with its state, for the study view; and the deliveries that
// ran out of tries, for the service view. A reader sees whether the PACS holds the SR before she looks for it.

import { gate, STUDIES_WRITE } from "./actions.js";
import { api, ApiError, getJson } from "./api.js";
import { announce, fmtDate, h, studyLink } from "./dom.js";

const REFRESH_MS = 2000;
const LONGEST_WAIT_MS = 30000;
// the deliverer makes a done job's deliveries at its next poll (delivery_poll_s, at most 60 s): until then the
// list is empty; measured on the server's clock (its Date header), never the browser's
const FIRST_DELIVERY_S = 90;
const KINDS = { dicom: "DICOM C-STORE", stowrs: "DICOMweb STOW-RS", fhir: "FHIR", hl7: "HL7 v2 (MLLP)" };
const STATES = { pending: "waiting", sending: "sending", done: "delivered", skipped: "not sent", failed: "failed" };
const OBJECTS = { sr: "SR", key_image: "key image", kos: "KOS", rejection: "Rejection Note", fhir: "report",
  hl7: "ORU^R01" };

// what a done delivery sent: "SR, 2 key images, KOS"
function sentWhat(d) {
  const counts = new Map();
  for (const o of d.objects) counts.set(o.kind, (counts.get(o.kind) || 0) + 1);
  return [...counts].map(([kind, n]) => {
    const word = OBJECTS[kind] || kind;
    return n > 1 ? `${n} ${word}s` : word;
  }).join(", ");
}

// only the note that withdraws the earlier reading went (the rule keeps this reading from that destination):
// "delivered" would say the destination holds this reading's SR, which it does not
const retractionOnly = (d) => d.objects.length > 0 && d.objects.every((o) => o.kind === "rejection");

function stateWord(d) {
  if (d.state === "done" && retractionOnly(d)) return "earlier reading retracted";
  return STATES[d.state] || d.state;
}

function lastDetail(d, state) {
  return d.history.filter((e) => e.state === state).pop()?.detail || "";
}

function detail(d) {
  if (d.state === "done") {
    const rule = lastDetail(d, "done").match(/\((.*)\)$/)?.[1];  // "... (the rule's reason; sent all the same ...)"
    return `${sentWhat(d)} at ${fmtDate(d.delivered_at)}${rule ? `; ${rule}` : ""}`;
  }
  if (d.state === "pending") {
    // a later reading is not sent while the earlier one's delivery there goes on (its retraction names it)
    if (d.held_behind) return "after the earlier reading's delivery here ends";
    return d.attempts ? `try ${d.attempts + 1} at ${fmtDate(d.next_attempt_at)}; last: ${d.error || "—"}` : "";
  }
  if (d.state === "sending") return d.attempts > 1 ? `try ${d.attempts}` : "";
  if (d.state === "failed") return `${d.error || "—"} (${fmtDate(d.updated_at)})`;
  return lastDetail(d, "skipped");  // the rule that left it out (the error field holds failures only)
}

/** The study view's delivery list: ``{element, stop}``; read again while a delivery is on its way. */
export function deliveriesPanel(job) {
  const path = `/v1/jobs/${encodeURIComponent(job.job_id)}/deliveries`;
  const status = h("p", { class: "hint" }, "Loading…");
  const table = h("table", { class: "delivery-list" }, h("caption", { class: "visually-hidden" }, "Destinations of this result"),
    h("thead", {}, h("tr", {}, ["Destination", "State"].map((t) => h("th", { scope: "col" }, t)))));
  table.hidden = true;
  // not a live region: a retrying delivery redraws its row every few seconds; state changes are announced
  const element = h("section", { class: "deliveries", "aria-labelledby": "h-deliveries" },
    h("h2", { id: "h-deliveries" }, "Delivery"), status, table);
  const rows = new Map();  // destination -> {key, state, body}
  const refused = new Map();  // destination -> why the last Send again was not taken
  let stopped = false;
  let timer = null;
  let focusAfter = null;  // the destination whose Send again was pressed: its redrawn row takes the focus

  async function resend(d, button) {
    button.disabled = true;
    button.dataset.busy = "1";  // gate() leaves it disabled until its row is drawn again
    focusAfter = d.destination;
    refused.delete(d.destination);
    try {
      await api(`${path}/${encodeURIComponent(d.destination)}/resend`, { method: "POST" });
      announce(`Sending to ${d.destination} again`);
    } catch (error) {
      refused.set(d.destination, `Not sent again: ${error.message}`);  // shown in the row (401/403: the sign-in box too)
      announce(`Not sent again to ${d.destination}: ${error.message}`);
    }
    refresh();
  }

  // one tbody a destination (its header names the whole group): its name and state, then what happened
  function rowsOf(d) {
    const failed = d.state === "failed";
    const why = detail(d);
    const no = refused.get(d.destination);
    return h("tbody", { dataset: { destination: d.destination, state: d.state, updated: d.updated_at } },
      h("tr", {},
        h("th", { scope: "rowgroup" }, d.destination, h("small", { class: "kind" }, KINDS[d.kind] || d.kind)),
        h("td", { class: `state-cell ${d.state === "done" ? "ok" : failed ? "bad" : ""}`, tabindex: -1 }, stateWord(d))),
      why || failed ? h("tr", { class: "delivery-detail" }, h("td", { colspan: 2 }, why,
        no ? h("span", { class: "resend-refused bad" }, no) : null,
        // studies:write: disabled, its title saying so, for a credential without it (gate, after each draw)
        failed ? h("button", { type: "button", class: "resend", disabled: true, dataset: { needs: STUDIES_WRITE },
          onclick: (e) => resend(d, e.currentTarget) }, `Send again to ${d.destination}`) : null)) : null);
  }

  function draw(list) {
    for (const d of list) {
      const key = JSON.stringify([d.state, d.attempts, d.error, d.updated_at, refused.get(d.destination) || ""]);
      const old = rows.get(d.destination);
      if (old?.key === key) continue;
      const body = rowsOf(d);
      if (old) {
        // redraw only this destination; the keyboard focus inside it moves to its new button or state
        const focused = old.body.contains(document.activeElement) || focusAfter === d.destination;
        old.body.replaceWith(body);
        if (focusAfter === d.destination) focusAfter = null;
        // once gate() has said whether its button may be used (a disabled one takes no focus)
        if (focused) {
          gate(body).then(() => (body.querySelector("button.resend:not(:disabled)") || body.querySelector(".state-cell")).focus());
        }
        if (old.state !== d.state) announce(`${d.destination}: ${stateWord(d)}`);
      } else {
        table.append(body);
      }
      rows.set(d.destination, { key, state: d.state, body });
    }
    table.hidden = !list.length;
    gate(table);
  }

  // the next read: soon while sending, at the next try while waiting (a back-off runs up to minutes)
  function nextReadMs(list, now) {
    if (list.some((d) => d.state === "sending")) return REFRESH_MS;
    const due = list.filter((d) => d.state === "pending").map((d) => Date.parse(d.next_attempt_at) - now);
    if (!due.length) return null;
    return Math.min(LONGEST_WAIT_MS, Math.max(REFRESH_MS, Math.min(...due) + 1000));
  }

  async function refresh() {
    clearTimeout(timer);
    let list;
    let now;
    let configured;
    try {
      const response = await api(path);
      now = Date.parse(response.headers.get("Date") || "") || Date.now();
      configured = response.headers.get("X-Destinations-Configured");
      list = await response.json();
    } catch (error) {
      if (stopped) return;
      status.textContent = `Cannot load the deliveries: ${error.message}`;
      status.hidden = false;
      if (error instanceof ApiError && (error.status === 401 || error.status === 403 || error.status === 404)) return;
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    if (stopped) return;
    draw(list);
    const none = !list.length && configured === "0";  // no PACS or RIS to send to: nothing will come
    const young = !none && (now - Date.parse(job.finished_at)) / 1000 < FIRST_DELIVERY_S;
    status.hidden = list.length > 0;
    status.textContent = list.length ? ""
      : none ? "No destination is configured: the result stays here and in the API (no PACS or RIS is sent it)."
      : young ? "Not sent yet." : "No delivery recorded for this result.";
    element.dataset.loaded = String(Date.now());
    const wait = !list.length && young ? REFRESH_MS : nextReadMs(list, now);
    if (wait !== null) timer = setTimeout(refresh, wait);
  }
  refresh();
  return { element, stop: () => { stopped = true; clearTimeout(timer); } };
}

/** The service view's table of the deliveries that ran out of tries, the latest changed first ("None." without). */
export async function failedDeliveries(limit = 20) {
  const list = await getJson(`/v1/deliveries?state=failed&limit=${limit}`);
  if (!list.length) return h("p", {}, "None.");
  return h("table", { class: "failed-deliveries" }, h("caption", { class: "visually-hidden" }, "Undelivered results"),
    h("thead", {}, h("tr", {}, ["Changed", "Destination", "Error", "Study"].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, list.map((d) => h("tr", { dataset: { destination: d.destination } },
      h("td", { class: "when" }, fmtDate(d.updated_at)), h("td", {}, d.destination), h("td", {}, d.error || "—"),
      h("td", {}, studyLink(d.job_id, `not delivered to ${d.destination}, ${fmtDate(d.updated_at)}`))))));
}
