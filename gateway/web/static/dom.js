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

/** Where the keyboard focus is in ``root``, to put it back once ``root`` is drawn anew, or once a button that was
 * disabled while it asked (which sends the focus to the page's body) can be pressed again: the function returned
 * focuses the same element (its id, or a link's address and words: "← Worklist" is in every view), else
 * ``fallback()``'s (the study view's heading, a worklist row's link). Focus outside ``root``, or on it, is left alone. */
export function focusKeeper(root, fallback = () => null) {
  const el = document.activeElement;
  if (!el || el === root || !root.contains(el)) return () => {};
  const { id, localName, textContent } = el;
  const href = el.getAttribute("href");
  return () => {
    const same = id ? document.getElementById(id)
      : [...root.querySelectorAll(localName)].find((c) => c.getAttribute("href") === href && c.textContent === textContent);
    same?.focus({ preventScroll: true });
    if (same && document.activeElement === same) return;
    fallback()?.focus({ preventScroll: true });
  };
}

export const fmtSeconds = (s) => {
  if (s === null || s === undefined) return "—";
  if (s < 59.95) return `${s.toFixed(1)} s`;
  const whole = Math.round(s);  // round once, then split: 119.6 s is "2 min 0 s", not "1 min 60 s"
  return `${Math.floor(whole / 60)} min ${whole % 60} s`;
};

export const fmtDate = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC") : "—");

export const fmtStudyDate = (d) => (d && /^\d{8}$/.test(d) ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : "—");
