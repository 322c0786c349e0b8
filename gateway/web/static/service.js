// The service view: Triton endpoints and readiness, backlog, throughput, latency, recent failures.
// Refreshed every 2 s while shown.

import { getJson } from "./api.js";
import { failedDeliveries } from "./deliveries.js";
import { fmtDate, fmtSeconds, h, studyLink } from "./dom.js";

const REFRESH_MS = 2000;

function figure(label, value, id) {
  return [h("dt", {}, label), h("dd", { id }, value)];
}

export function serviceView(main) {
  const body = h("div", { class: "service", "aria-live": "off" });
  const stamp = h("p", { class: "hint" });  // not live: "Updated ..." every 2 s would talk over everything
  main.replaceChildren(h("div", { class: "view-head" }, h("h1", {}, "Service"), stamp), body);
  let timer = null;
  let stopped = false;

  async function refresh() {
    try {
      // the undelivered results apart: a failing list must not freeze the service figures
      const [d, undelivered] = await Promise.all([getJson("/v1/service"), failedDeliveries().catch((e) =>
        h("p", { class: "bad" }, `Cannot load the undelivered results: ${e.message}`))]);
      if (stopped) return;
      const ready = d.endpoints.filter((e) => e.ready).length;
      body.replaceChildren(
        h("section", { "aria-labelledby": "h-triton" },
          h("h2", { id: "h-triton" }, `Triton endpoints (${ready} of ${d.endpoints.length} ready)`),
          h("table", { class: "endpoints" },
            h("thead", {}, h("tr", {}, ["Endpoint", "Ready", "Measured rate"].map((t) => h("th", { scope: "col" }, t)))),
            h("tbody", {}, d.endpoints.map((e) => h("tr", { dataset: { ready: e.ready } },
              h("td", {}, e.url ?? e.name), h("td", { class: e.ready ? "ok" : "bad" }, e.ready ? "ready" : "not ready"),
              h("td", { class: "num" }, e.slices_per_second === null ? "not measured" : `${e.slices_per_second} slices/s`)))))),
        h("section", { "aria-labelledby": "h-load" },
          h("h2", { id: "h-load" }, "Load"),
          h("dl", { class: "figures" },
            figure("Backlog", `${d.backlog_slices} slices`, "backlog-slices"),
            figure("Backlog time", d.backlog_seconds !== null ? fmtSeconds(d.backlog_seconds)
              : ready ? "unknown (no rate measured yet)" : "unknown (no Triton ready)", "backlog-seconds"),
            figure("Queued / screening", `${d.queued} / ${d.running}`, "inflight"),
            figure("Studies per hour", d.studies_per_hour.toFixed(1), "per-hour"),
            figure("Study time p50", fmtSeconds(d.p50_s), "p50"),
            figure("Study time p95", fmtSeconds(d.p95_s), "p95"))),
        h("section", { "aria-labelledby": "h-failures" },
          h("h2", { id: "h-failures" }, "Recent failures"),
          d.failures.length ? h("table", { class: "failures" },
            h("thead", {}, h("tr", {}, ["Finished", "Reason", "Message", "Study"].map((t) => h("th", { scope: "col" }, t)))),
            h("tbody", {}, d.failures.map((f) => h("tr", {},
              h("td", {}, fmtDate(f.finished_at)), h("td", {}, h("code", {}, f.reason)), h("td", {}, f.message),
              h("td", {}, studyLink(f.job_id, `${f.reason}, ${fmtDate(f.finished_at)}`))))))
            : h("p", {}, "None.")),
        h("section", { "aria-labelledby": "h-undelivered" },
          h("h2", { id: "h-undelivered" }, "Undelivered results"),
          h("p", { class: "hint" }, "Deliveries that ran out of tries. A study's view sends its own again; "
            + "POST /v1/deliveries/resend?destination=NAME sends every one to a destination again."), undelivered));
      stamp.textContent = `Updated ${fmtDate(d.at)}`;
      main.dataset.loaded = String(Date.now());
    } catch (error) {
      stamp.textContent = `Cannot load the service figures: ${error.message}`;
      // refused (no credential, or no results:read): asking again every 2 s only pulled the focus back
      // into the sign-in form each time; signing in reloads the view
      if (error.status === 401 || error.status === 403) return;
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}
