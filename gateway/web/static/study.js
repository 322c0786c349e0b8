// The study view: slice viewer with findings drawn over server-rendered slices, findings strip,
// result summary and downloads. Boxes are the result's `original` boxes (the stored image's grid).

import { api, ApiError, download, getJson, saveJson, sharedSubscribe, subscribe } from "./api.js";
import { canRescreen, canScreenAgain, gate, newerVersion, rescreen, screenAgain, STUDIES_WRITE } from "./actions.js";
import { announce, fmtDate, fmtSeconds, h, s } from "./dom.js";
import { deliveriesPanel } from "./deliveries.js";

const WINDOWS = { lung: "Lung", mediastinum: "Mediastinum" };
const GRID = 512;

function boxOf(box, scale) {
  if (box.original) return box.original;
  return { x0: Math.round(box.grid.x0 * scale), y0: Math.round(box.grid.y0 * scale),
           x1: Math.round(box.grid.x1 * scale), y1: Math.round(box.grid.y1 * scale) };
}

// as aggregator.schema.quadrant_words: the patient's side (the grid is in the radiological convention, image
// left = patient right; a stored image may be mirrored from it, so its own side is what the overlay shows)
const ANATOMY = { top_left: "right anterior", top_right: "left anterior", bottom_left: "right posterior",
  bottom_right: "left posterior" };

const quadrantWords = (quadrant) => ANATOMY[quadrant] || quadrant;

// as aggregator.schema.slice_span: slices numbered from 1 (millimetres: toFixed(1) rounds halves up, as mm_text)
const sliceSpan = (a, b) => (a === b ? `slice ${a + 1}` : `slices ${a + 1}-${b + 1}`);

function quadrantRect(quadrant, cx, cy, cols, rows) {
  const left = quadrant.endsWith("left");
  const top = quadrant.startsWith("top");
  return { x: left ? 0 : cx, y: top ? 0 : cy, width: left ? cx : cols - cx, height: top ? cy : rows - cy };
}

// a later version of the study (instances received after this job's) has its own verdict: say so first
// (a list: replaceChildren would write a null as the text "null")
// a failed one below a later version that failed too supersedes nothing, yet has no Screen again (the gateway retries
// the latest version only): the note says which version to screen instead
function supersededNote(job) {
  const newer = newerVersion(job);
  if (newer) {
    return [h("p", { class: "superseded-note", id: "superseded", role: "note" },
      `Version ${newer} of this study was received after this one (version ${job.version}): that version is the one `
      + "to screen, not this one. ", h("a", { href: "#/" }, "The worklist shows the newer version."))];
  }
  if (!job.superseded_by) return [];
  return [h("p", { class: "superseded-note", id: "superseded", role: "note" },
    `Superseded: version ${job.superseded_by} of this study was received after this one (version ${job.version}), `
    + "so this is not the study's latest result. ", h("a", { href: "#/" }, "The worklist shows the newer version."))];
}

export function studyView(main, jobId) {
  let stopped = false;
  let cleanup = () => {};
  main.replaceChildren(h("h1", {}, "Study"), h("p", {}, "Loading…"));
  const again = () => { cleanup(); cleanup = studyView(main, jobId); };
  let line = null;  // the study's identity line, read once for the view (identity)
  const draw = (job) => (job.state === "done" ? viewer(main, job, line) : pending(main, job, line, queued, ended));
  // the view drawn again in place from ``job``, the focus put back where ``keep`` (focusKeeper) found it
  const redraw = (job, keep) => {
    if (stopped) return false;
    cleanup();
    cleanup = draw(job);
    keep();
    return true;
  };
  // the job followed here ended: the view is drawn again in place from the job its stream ended with, the focus
  // kept, the outcome said once. A done one reloaded the whole page: the sign-in asked again, the page flashed, the
  // scroll and the focus went to the page's start and a screen reader read the page again, not the verdict
  const ended = (job) => {
    if (redraw(job, focusKeeper(main))) {
      announce(`screening ${job.state === "done" ? `done: ${job.result.verdict}` : failedWords(job)}`);
    }
  };
  // a failed job queued again by its Screen again (said by actions.js): drawn again in place from the gateway's
  // answer, followed from there; the focus found before the button was pressed goes to the view's heading (the
  // button is gone). The view was built anew: the button vanished, the focus fell to the page's body and nothing
  // was said. An answer without the job's details (a caller without results:read) keeps the study's own
  const queued = (job, answer, keep) => redraw({ ...job, error: null, slices_done: 0, ...answer }, keep);

  (async () => {
    let job;
    try {
      job = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      if (stopped) return;  // the user has moved on: this view no longer owns the page
      const missing = error instanceof ApiError && error.status === 404;
      main.replaceChildren(h("h1", {}, "Study"), h("p", { role: "alert" },
        missing ? "No such study (or its result has expired)." : error.message),
        missing ? null : h("button", { type: "button", onclick: again }, "Try again"));
      return;
    }
    if (stopped) return;
    line = identity(job);
    cleanup = draw(job);
  })();
  return () => { stopped = true; cleanup(); };
}

// a failed job's message ends "its instances are kept: POST /v1/jobs/ID/retry queues it again." for the API's
// callers; the page has a button for it
const withoutRetryHint = (text) => text.replace(/:?\s*POST \/v1\/jobs\/\S+\/retry queues (it|one) again\.?/, ".");

/** A failed job's state in words, as its view shows it ("failed: No Triton was ready. ..."). */
const failedWords = (job) => `failed: ${withoutRetryHint(job.error?.message || job.error?.reason || "")}`;

/** Where the keyboard focus is in the view, to put it back once the view is drawn anew: on the same element (its
 * id, or a link's address and words: "← Worklist" is in every view), else on the view's heading. Focus outside
 * the view, or on the view itself, is left alone. */
function focusKeeper(main) {
  const el = document.activeElement;
  if (!el || el === main || !main.contains(el)) return () => {};
  const { id, localName, textContent } = el;
  const href = el.getAttribute("href");
  return () => {
    const same = id ? document.getElementById(id)
      : [...main.querySelectorAll(localName)].find((c) => c.getAttribute("href") === href && c.textContent === textContent);
    same?.focus({ preventScroll: true });
    if (same && document.activeElement === same) return;
    const heading = main.querySelector("h1");
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  };
}

/** A failed job's "Screen again" (actions.js, as a failed worklist row's; studies:write: disabled without it);
 * queued, queued(job, answer, keep) draws the view again in place, the focus kept as it was when pressed (the
 * button is disabled meanwhile, which may take the focus off it). */
function retryButton(main, job, queued) {
  const refused = h("p", { class: "bad", id: "retry-refused" });
  const button = h("button", { type: "button", id: "retry", disabled: true, dataset: { needs: STUDIES_WRITE },
    onclick: async () => {
      const keep = focusKeeper(main);
      const answer = await screenAgain(job.job_id, button, refused);
      if (answer) queued(job, answer, keep);
      else if (button.isConnected && document.activeElement === document.body) keep();  // refused: back on it
    } }, "Screen again");
  gate(button);
  return [h("p", {}, button), refused];
}

/** A done study's "Screen again with the current models" (actions.js rescreen; studies:write: disabled without it),
 * for its latest version only. Pressed, it asks first (the new reading replaces this one at the study's
 * destinations); confirmed and queued, the page follows the new version's job; a refusal is said under it. */
function rescreenButton(job) {
  const refused = h("p", { class: "bad", id: "rescreen-refused" });
  const confirm = h("div", { class: "rescreen-confirm", id: "rescreen-confirm", role: "group", hidden: true,
    "aria-label": "Confirm screening again" });
  const button = h("button", { type: "button", id: "rescreen", disabled: true, "aria-expanded": "false",
    "aria-controls": "rescreen-confirm", dataset: { needs: STUDIES_WRITE },
    onclick: () => { ask(true); yes.focus(); } }, "Screen again with the current models");
  const ask = (open) => {
    confirm.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
  };
  const yes = h("button", { type: "button", id: "rescreen-yes", onclick: async () => {
    ask(false);
    const view = await rescreen(job.study_instance_uid, button, refused);
    if (view) location.hash = `#/study/${encodeURIComponent(view.job_id)}`;  // the new view takes the focus (main.js)
    // refused: the confirmation hidden with the focus on it, the focus fell to the page's body; the button has it
    else if (button.isConnected && document.activeElement === document.body) button.focus();
  } }, "Screen again");
  const no = h("button", { type: "button", id: "rescreen-no", onclick: () => { ask(false); button.focus(); } }, "Cancel");
  // "a new version", not "version N + 1": a later version of the study that failed does not supersede this one (the
  // page still offers the button here), and the gateway screens the study's latest version again, as N + 2
  confirm.append(h("p", {}, "This screens the study's kept images again, as a new version, with the models served "
    + "now. Its reading replaces this one at the study's destinations (PACS, RIS, FHIR)."), yes, " ", no);
  gate(button);
  return h("section", { class: "rescreen", "aria-label": "Screen again" }, h("p", {}, button), confirm, refused);
}

// a later version of the study received while its view is open (late instances, a re-screen, the study sent again)
// supersedes this reading: the view said nothing of it until reloaded, and offered this reading for a re-screen. It
// follows the worklist's event stream (one for the tabs of a credential, api.js) and, when a version of this study
// moves or a study version opens, reads this job's worklist row again; onChange(row) when its versions changed
function followVersions(job, onChange) {
  let seen = [job.superseded_by ?? null, job.newest_version ?? null];
  let timer = null;
  let asking = false;
  let again = false;
  const ask = async () => {
    timer = null;
    if (asking) { again = true; return; }
    asking = true;
    try {
      const row = (await getJson(`/v1/worklist?job_id=${encodeURIComponent(job.job_id)}&limit=1`)).rows?.[0];
      if (row && (row.superseded_by !== seen[0] || row.newest_version !== seen[1])) {
        seen = [row.superseded_by, row.newest_version];
        onChange(row);
      }
    } catch {
      // read again at the next event; a refused credential is the page's (api.js)
    } finally {
      asking = false;
      if (again) { again = false; soon(); }
    }
  };
  const soon = () => { if (timer === null) timer = setTimeout(ask, 1000); };  // a burst of events, one read
  const stop = sharedSubscribe("/v1/worklist/events", (type, e) => {
    if (type === "studies" || (type === "progress" && e.study_instance_uid === job.study_instance_uid
      && e.job_id !== job.job_id)) soon();
  }, { onState: (state) => { if (state === "live") soon(); } });  // what changed before the stream (re)opened
  return () => { stop(); clearTimeout(timer); };
}

// the study as the worklist names it (accession number, study date, series, priority, received), so a reader can
// tell which study is open: the UID alone said nothing; filled in once the worklist's row is read
function identity(job) {
  const line = h("p", { class: "identity", id: "study-identity" });
  getJson(`/v1/worklist?job_id=${encodeURIComponent(job.job_id)}&limit=1`).then((page) => {
    const row = page.rows?.[0];
    if (!row) return;
    const l = row.labels || {};
    const parts = [l.accession_number && `Accession ${l.accession_number}`, l.study_date && `study date ${l.study_date}`,
      l.series_description && `series ${l.series_description}`, row.priority !== "routine" && row.priority,
      `received ${fmtDate(row.received_at)}`].filter(Boolean);
    line.textContent = parts.join(" · ");
  }).catch(() => {});  // the labels are a help: the view goes on without them
  return line;
}

// a marker in words, for the image's alt text: "R" -> "right", "LP" -> "left posterior"
function sideWords(letters) {
  const words = { R: "right", L: "left", A: "anterior", P: "posterior", H: "head", F: "feet" };
  return [...letters].map((c) => words[c] || c).join(" ");
}

// the job's states in the worklist's words (gateway/store/worklist.py row_state): its steps are "screening"
const SHOWN_STATE = { decoding: "screening", inferring: "screening", aggregating: "screening" };

function pending(main, job, line, queued, ended) {
  // the state (a failure with its reason) is a live region, said when it changes; the slice count is not: written at
  // each progress event (every CTSCREEN_PROGRESS_INTERVAL_S), it had a screen reader read out "screening: 5/24
  // slices", "6/24", ... without end. The bar holds the count for whoever asks for it
  const said = h("span", { "aria-live": "polite", id: "job-state" });
  const count = h("span", { class: "count" });
  const status = h("p", { class: `state state-${job.state}` }, said, count);
  const bar = h("progress", { max: 1, value: 0, "aria-label": "slices screened" });
  const write = (el, text) => { if (el.textContent !== text) el.textContent = text; };
  const show = (v) => {
    status.className = `state state-${v.state}`;
    write(said, v.state === "failed" ? failedWords(v) : SHOWN_STATE[v.state] || v.state);
    write(count, v.state !== "failed" && v.slices_total ? `: ${v.slices_done}/${v.slices_total} slices` : "");
    bar.max = v.slices_total || 1;
    bar.value = v.slices_done || 0;
  };
  show(job);
  main.replaceChildren(h("p", {}, h("a", { href: "#/" }, "← Worklist")),
    h("h1", {}, "Study ", h("span", { class: "uid" }, job.study_instance_uid || job.job_id)), line,
    ...supersededNote(job),
    status, bar, ...(canScreenAgain(job) ? retryButton(main, job, queued) : []));
  if (job.state === "failed") return () => {};
  // done or failed, the view is drawn again (a failed one with its Screen again button): its state line, a live
  // region, is not told "done" first
  return subscribe(`/v1/jobs/${encodeURIComponent(job.job_id)}/events`, (type, v) => {
    if (type === "done" || type === "failed") ended(v);
    else show(v);
  });
}

function viewer(main, job, line) {
  const result = job.result;
  const slices = result.slices;
  // a series that is no chest CT (a head's sinuses): its boxes are no lung lesions and its run counts for nothing
  const noChest = result.reason === "not_chest";
  const evidence = noChest ? null : result.evidence;
  const word = noChest ? "box" : "lesion";
  const runIndex = new Set((evidence?.slices || []).map((e) => e.index));
  // the run's quadrant on each stored image, as the rule split the slice (older results lack it)
  const runQuadrant = new Map((evidence?.slices || []).map((e) => [e.index, e.quadrant_original]));
  const findings = slices.filter((sl) => sl.boxes.length);
  const urls = new Map();
  let index = evidence?.slices?.[0]?.index ?? findings[0]?.index ?? Math.floor(slices.length / 2);
  let windowName = "lung";
  let dims = null; // [cols, rows] of the stored image
  let token = 0;

  const img = h("img", { alt: "", class: "slice", draggable: "false" });
  // the image and its boxes keep the stored matrix's shape inside the square stage (a 180 x 256 slice was stretched
  // to a square: its anatomy 1.4 times too wide, the boxes stretched alike, so nothing on screen said so)
  const overlay = s("svg", { class: "overlay", "aria-hidden": "true", preserveAspectRatio: "xMidYMid meet" });
  // orientation markers (the PNG's X-Image-Sides: the patient directions at the left, top, right, bottom edges):
  // the image is drawn as stored, so a slice stored mirrored shows the patient's left on the image's left
  const sides = ["left", "top", "right", "bottom"].map((edge) =>
    h("span", { class: `side side-${edge}`, "aria-hidden": "true", dataset: { edge } }));
  const stage = h("div", {
    class: "stage", tabindex: 0, role: "group", id: "viewer",
    "aria-roledescription": "slice viewer",
    "aria-label": "Slice viewer. Arrow keys, Page Up/Down, Home/End or the mouse wheel change the slice; L and M change the window.",
  }, img, overlay, ...sides);
  const readout = h("p", { class: "readout", id: "readout", "aria-live": "polite" });
  const slider = h("input", { type: "range", min: 0, max: slices.length - 1, value: index, id: "slice-slider",
                              "aria-label": "Slice" });
  const windowButtons = Object.entries(WINDOWS).map(([name, text]) =>
    h("button", { type: "button", class: "preset", "aria-pressed": String(name === windowName), dataset: { window: name },
                  onclick: () => setWindow(name) }, text));
  const strip = h("ol", { class: "strip", "aria-label": "Slices with findings" },
    findings.map((sl) => h("li", {}, h("button", {
      type: "button", class: runIndex.has(sl.index) ? "in-run" : "", dataset: { index: sl.index },
      "aria-label": `Slice ${sl.index + 1}: ${sl.boxes.length} ${word}${sl.boxes.length > 1 ? (noChest ? "es" : "s") : ""}${runIndex.has(sl.index) ? ", in the run" : ""}`,
      onclick: () => { go(sl.index); stage.focus(); },
    }, String(sl.index + 1)))));

  const models = h("table", { class: "models" }, h("caption", {}, "Models"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Name"), h("th", { scope: "col" }, "Version"))),
    h("tbody", {}, result.models.map((m) => h("tr", {}, h("td", {}, m.name), h("td", {}, m.version)))));
  const run = noChest
    ? h("p", {}, "Not a chest CT: the boxes the models drew are no lung lesions, and no run counts.")
    : evidence
    ? h("p", {}, `${evidence.qualifies ? "Qualifying run" : "Longest run (does not qualify)"}: ${evidence.n_slices} `
      + `slice${evidence.n_slices === 1 ? "" : "s"} (${evidence.extent_mm.toFixed(1)} mm) in the ${quadrantWords(evidence.quadrant)} `
      + `quadrant, ${sliceSpan(evidence.slices[0].index, evidence.slices[evidence.slices.length - 1].index)}.`)
    : h("p", {}, result.verdict === "negative" ? "The model flagged no lesion on any slice."
      : "No lesion run to show.");  // indeterminate (no lung field, too few slices): nothing was ruled out
  const deliveries = deliveriesPanel(job);
  const rescreenSlot = h("div", { id: "rescreen-slot" }, canRescreen(job) ? rescreenButton(job) : null);
  // the superseded note, said when a later version comes while the view is open (a live region)
  const noteSlot = h("div", { id: "superseded-slot", "aria-live": "polite" }, ...supersededNote(job));
  const stopVersions = followVersions(job, (row) => {
    const now = { ...job, superseded_by: row.superseded_by, newest_version: row.newest_version };
    noteSlot.replaceChildren(...supersededNote(now));
    // a superseded reading is not screened again (its newer version is): a Screen again pressed now answered 409
    if (canRescreen(now) !== Boolean(rescreenSlot.firstChild)) {
      const held = rescreenSlot.contains(document.activeElement);
      rescreenSlot.replaceChildren(...(canRescreen(now) ? [rescreenButton(now)] : []));
      if (held) main.focus();  // not to the page's start with the button it was on
    }
  });
  const side = h("aside", { class: "summary", "aria-label": "Result" },
    h("p", {}, h("span", { class: `verdict verdict-${result.verdict}`, id: "verdict" }, result.verdict)),
    h("p", { class: "reason" }, result.message), run,
    h("dl", {},
      h("dt", {}, "Slices"), h("dd", {}, String(result.n_slices)),
      h("dt", {}, "Spacing"), h("dd", {}, result.nominal_spacing_mm ? `${result.nominal_spacing_mm.toFixed(2)} mm` : "—"),
      h("dt", {}, "Time taken"), h("dd", {}, fmtSeconds(result.timings.total_s)),
      h("dt", {}, "Finished"), h("dd", {}, fmtDate(job.finished_at))),
    // what the reader must know about the input: lossy slices, gaps, a derived series, resampling ...
    result.warnings.length ? h("section", { class: "warnings", "aria-label": "Warnings" },
      h("h2", {}, `Warnings (${result.warnings.length})`),
      h("ul", {}, result.warnings.map((w) => h("li", {}, w)))) : null,
    models, deliveries.element, rescreenSlot,
    h("div", { class: "downloads" }, h("h2", {}, "Download"),
      h("button", { type: "button", onclick: () => saveJson(result, `ctscreen-result-${job.job_id}.json`) }, "CaseResult (JSON)"),
      h("button", { type: "button", onclick: () => download(`/v1/jobs/${job.job_id}/sr`, `ctscreen-sr-${job.job_id}.dcm`)
        .catch((e) => announce(`No SR: ${e.message}`)) }, "DICOM SR"),
      h("button", { type: "button", onclick: () => saveJson({ job_id: job.job_id, models: result.models,
        software_version: result.software_version, rule: result.rule }, `ctscreen-models-${job.job_id}.json`) }, "Model versions (JSON)")));

  main.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← Worklist")),
    h("h1", {}, "Study ", h("span", { class: "uid", title: result.study_instance_uid }, result.study_instance_uid)),
    line,
    noteSlot,
    h("div", { class: "study" },
      h("section", { class: "viewer", "aria-label": "Images" },
        h("div", { class: "tools" },
          h("div", { role: "group", "aria-label": "Window" }, windowButtons), slider, readout),
        stage,
        h("h2", { id: "strip-title" }, `Slices with findings (${findings.length})`), strip,
        noChest
          ? h("p", { class: "legend" }, h("span", { class: "key ignored" }), "box (no lesion) ",
            h("span", { class: "key valid-area" }), "valid area")
          : h("p", { class: "legend" }, h("span", { class: "key lesion" }), "lesion ",
            h("span", { class: "key in-run" }), "lesion in the run ",
            h("span", { class: "key quadrant" }), "run quadrant ",
            h("span", { class: "key valid-area" }), "valid area")),
      side));

  function draw() {
    const sl = slices[index];
    overlay.replaceChildren();
    if (!dims) return;
    const [cols, rows] = dims;
    const scale = Math.max(cols, rows) / GRID;
    overlay.setAttribute("viewBox", `0 0 ${cols} ${rows}`);
    const va = sl.valid_area_original || (sl.valid_area && boxOf({ grid: sl.valid_area }, scale));
    if (runIndex.has(index) && evidence) {
      const q = runQuadrant.get(index);
      const split = result.rule.quadrant_split === "valid_area" && va
        ? [(va.x0 + va.x1 + 1) / 2, (va.y0 + va.y1 + 1) / 2] : [cols / 2, rows / 2];
      overlay.append(s("rect", { class: "quadrant", "data-quadrant": evidence.quadrant,
        ...(q ? { x: q.x0, y: q.y0, width: q.x1 - q.x0 + 1, height: q.y1 - q.y0 + 1 }
          : quadrantRect(evidence.quadrant, split[0], split[1], cols, rows)) }));
    }
    if (va) {
      overlay.append(s("rect", { class: "valid-area", x: va.x0, y: va.y0, width: va.x1 - va.x0 + 1, height: va.y1 - va.y0 + 1 }));
    }
    for (const box of sl.boxes) {
      const b = boxOf(box, scale);
      const inRun = runIndex.has(index) && box.quadrants.includes(evidence.quadrant);
      overlay.append(s("rect", {
        class: noChest ? "ignored" : inRun ? "lesion in-run" : "lesion",
        x: b.x0, y: b.y0, width: b.x1 - b.x0 + 1, height: b.y1 - b.y0 + 1,
        "data-x0": b.x0, "data-y0": b.y0, "data-x1": b.x1, "data-y1": b.y1, "data-score": box.score.toFixed(3),
      }, s("title", {}, noChest ? `box, score ${box.score.toFixed(2)}, no lung lesion (not a chest CT)`
        : `lesion, score ${box.score.toFixed(2)}, ${box.quadrants.map(quadrantWords).join(", ")}`)));
    }
  }

  async function imageUrl(i, w) {
    const key = `${i}:${w}`;
    if (!urls.has(key)) {
      urls.set(key, api(`/v1/jobs/${job.job_id}/slices/${i}.png?window=${w}`)
        .then(async (r) => ({ url: URL.createObjectURL(await r.blob()),
                              sides: (r.headers.get("X-Image-Sides") || "").split(" ").filter(Boolean) }))
        .catch((e) => { urls.delete(key); throw e; }));  // a failed image is asked for again next time
    }
    return urls.get(key);
  }

  async function show() {
    const mine = ++token;
    const sl = slices[index];
    const lesions = sl.boxes.length;
    readout.textContent = `Slice ${index + 1} / ${slices.length} · ${sl.position_mm.toFixed(1)} mm · `
      + `${WINDOWS[windowName]} window · ${lesions ? `${lesions} ${word}${lesions > 1 ? (noChest ? "es" : "s") : ""}` : `no ${word}`}`
      + (runIndex.has(index) ? " · in the run" : "");
    slider.value = index;
    stage.dataset.index = index;
    stage.dataset.ready = "false";
    stage.setAttribute("aria-busy", "true");  // the image is on its way (the stage says so too: style.css)
    delete stage.dataset.failed;
    img.alt = `Axial slice ${index + 1} of ${slices.length}, ${WINDOWS[windowName]} window`;
    for (const b of strip.querySelectorAll("button")) b.setAttribute("aria-current", String(Number(b.dataset.index) === index));
    try {
      const { url, sides: named } = await imageUrl(index, windowName);
      if (mine !== token) return;
      img.src = url;
      sides.forEach((el, k) => { el.textContent = named.length === 4 ? named[k] : ""; });
      img.alt = `Axial slice ${index + 1} of ${slices.length}, ${WINDOWS[windowName]} window`
        + (named.length === 4 ? `, the patient's ${sideWords(named[0])} on the image's left` : "");
      await img.decode();
      if (mine !== token) return;
      dims = [img.naturalWidth, img.naturalHeight];
      draw();
      stage.dataset.ready = "true";
      stage.removeAttribute("aria-busy");
      // neighbours ahead of time; one that fails says so when it is shown
      for (const n of [index + 1, index - 1]) if (n >= 0 && n < slices.length) imageUrl(n, windowName).catch(() => {});
    } catch (error) {
      if (mine !== token) return;
      // never leave the previous slice (or window) on screen under this slice's readout
      img.removeAttribute("src");
      for (const el of sides) el.textContent = "";
      dims = null;
      overlay.replaceChildren();
      stage.dataset.failed = "true";
      stage.removeAttribute("aria-busy");
      readout.textContent = `Slice ${index + 1}: no image (${error.message})`;
    }
  }

  function go(i) {
    const next = Math.max(0, Math.min(slices.length - 1, i));
    if (next === index && stage.dataset.ready === "true") return;
    index = next;
    show();
  }
  function setWindow(name) {
    windowName = name;
    for (const b of windowButtons) b.setAttribute("aria-pressed", String(b.dataset.window === name));
    show();
  }

  stage.addEventListener("wheel", (e) => { e.preventDefault(); go(index + (e.deltaY > 0 ? 1 : -1)); }, { passive: false });
  stage.addEventListener("keydown", (e) => {
    const step = { ArrowDown: 1, ArrowRight: 1, j: 1, ArrowUp: -1, ArrowLeft: -1, k: -1, PageDown: 10, PageUp: -10 }[e.key];
    if (step) { e.preventDefault(); go(index + step); }
    else if (e.key === "Home") { e.preventDefault(); go(0); }
    else if (e.key === "End") { e.preventDefault(); go(slices.length - 1); }
    else if (e.key === "l" || e.key === "L") setWindow("lung");
    else if (e.key === "m" || e.key === "M") setWindow("mediastinum");
  });
  slider.addEventListener("input", () => go(Number(slider.value)));
  show();
  return () => { token++; deliveries.stop(); stopVersions(); for (const p of urls.values()) p.then((u) => URL.revokeObjectURL(u)).catch(() => {}); };
}
