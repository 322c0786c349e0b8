// A tiny element builder: h("a", {href: "#/"}, "text", child) — no framework, no build step.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";

export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** An "open" link to a study's view whose accessible name says which row it is (a screen reader's list of links
 * read "open, open, open"): "Open the study of job 1a2b3c4d, WHAT". */
export function studyLink(jobId, what) {
  return h("a", { href: `#/study/${jobId}`, "aria-label": `Open the study of job ${String(jobId).slice(0, 8)}, ${what}` },
    "open");
}

export function announce(text) {
  const region = document.getElementById("announce");
  if (region) region.textContent = text;
}

export const fmtSeconds = (s) => {
  if (s === null || s === undefined) return "—";
  if (s < 59.95) return `${s.toFixed(1)} s`;
  const whole = Math.round(s);  // round once, then split: 119.6 s is "2 min 0 s", not "1 min 60 s"
  return `${Math.floor(whole / 60)} min ${whole % 60} s`;
};

export const fmtDate = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC") : "—");

export const fmtStudyDate = (d) => (d && /^\d{8}$/.test(d) ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : "—");
