// Where a result went: each destination (PACS, RIS) with its state, for the study view; and the deliveries that
// ran out of tries, for the service view. A reader sees whether the PACS holds the SR before she looks for it.

import { api, ApiError, getJson } from "./api.js";
import { announce, fmtDate, h } from "./dom.js";

const REFRESH_MS = 2000;
// the deliverer makes a done job's deliveries within a poll or two (delivery_poll_s): until then the list is empty
const FIRST_DELIVERY_S = 30;
const KINDS = { dicom: "DICOM C-STORE", stowrs: "DICOMweb STOW-RS", fhir: "FHIR" };
const STATES = { pending: "waiting", sending: "sending", done: "delivered", skipped: "not sent", failed: "failed" };

function detail(d) {
  if (d.state === "done") return `at ${fmtDate(d.delivered_at)}`;
  if (d.state === "pending") {
    return d.attempts ? `try ${d.attempts + 1} at ${fmtDate(d.next_attempt_at)}; last: ${d.error || "—"}` : "";
  }
  if (d.state === "sending") return d.attempts > 1 ? `try ${d.attempts}` : "";
  if (d.state === "failed") return `${d.error || "—"} (${fmtDate(d.updated_at)})`;
  // skipped: the rule that left it out (the reason is its last event's; the error field holds failures only)
  return d.history.filter((e) => e.state === "skipped").pop()?.detail || "";
}

/** The study view's delivery list: ``{element, stop}``; refreshed while a delivery is still on its way. */
export function deliveriesPanel(job) {
  const path = `/v1/jobs/${encodeURIComponent(job.job_id)}/deliveries`;
  const body = h("div", { "aria-live": "polite" }, h("p", { class: "hint" }, "Loading…"));
  const element = h("section", { class: "deliveries", "aria-labelledby": "h-deliveries" },
    h("h2", { id: "h-deliveries" }, "Delivery"), body);
  let stopped = false;
  let timer = null;
  let shown = "";

  async function resend(d, button) {
    button.disabled = true;
    try {
      await api(`${path}/${encodeURIComponent(d.destination)}/resend`, { method: "POST" });
      announce(`Sending to ${d.destination} again`);
    } catch (error) {
      announce(`Not sent again to ${d.destination}: ${error.message}`);
    }
    refresh();
  }

  // one tbody a destination: its name and state, then what happened under them (the side panel is narrow)
  function rows(d) {
    const failed = d.state === "failed";
    const why = detail(d);
    return h("tbody", { dataset: { destination: d.destination, state: d.state, updated: d.updated_at } },
      h("tr", {},
        h("th", { scope: "row" }, d.destination, h("small", { class: "kind" }, KINDS[d.kind] || d.kind)),
        h("td", { class: d.state === "done" ? "ok" : failed ? "bad" : "" }, STATES[d.state] || d.state)),
      why || failed ? h("tr", { class: "delivery-detail" }, h("td", { colspan: 2 }, why,
        failed ? h("button", { type: "button", class: "resend", onclick: (e) => resend(d, e.currentTarget),
          "aria-label": `Send to ${d.destination} again` }, "Send again") : null)) : null);
  }

  async function refresh() {
    clearTimeout(timer);
    let list;
    try {
      list = await getJson(path);
    } catch (error) {
      if (stopped) return;
      body.replaceChildren(h("p", { class: "hint" }, `Cannot load the deliveries: ${error.message}`));
      if (error instanceof ApiError && (error.status === 401 || error.status === 403 || error.status === 404)) return;
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    if (stopped) return;
    const age = (Date.now() - Date.parse(job.finished_at)) / 1000;
    // redraw only what changed: a redraw under the keyboard focus (a Send again button) would lose it
    const key = JSON.stringify(list.map((d) => [d.destination, d.state, d.attempts, d.error, d.updated_at]));
    if (key !== shown) {
      shown = key;
      body.replaceChildren(list.length
        ? h("table", { class: "delivery-list" },
          h("thead", {}, h("tr", {}, ["Destination", "State"].map((t) => h("th", { scope: "col" }, t)))),
          list.map(rows))
        : h("p", { class: "hint" }, age < FIRST_DELIVERY_S ? "Not sent yet."
          : "Sent nowhere: no destination was configured when it finished."));
    }
    element.dataset.loaded = String(Date.now());
    const moving = list.some((d) => d.state === "pending" || d.state === "sending");
    if (moving || (!list.length && age < FIRST_DELIVERY_S)) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return { element, stop: () => { stopped = true; clearTimeout(timer); } };
}

/** The service view's table of the deliveries that ran out of tries, the latest changed first ("None." without). */
export async function failedDeliveries(limit = 20) {
  const list = await getJson(`/v1/deliveries?state=failed&limit=${limit}`);
  if (!list.length) return h("p", {}, "None.");
  return h("table", { class: "failed-deliveries" },
    h("thead", {}, h("tr", {}, ["Changed", "Destination", "Error", ""].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, list.map((d) => h("tr", { dataset: { destination: d.destination } },
      h("td", { class: "when" }, fmtDate(d.updated_at)), h("td", {}, d.destination), h("td", {}, d.error || "—"),
      h("td", {}, h("a", { href: `#/study/${d.job_id}` }, "open"))))));
}
