// The page's router (#/, #/study/<job>, #/service) and the sign-in box.

import { cleanCredential, credential } from "./api.js";
import { worklistView } from "./worklist.js";

const main = document.getElementById("main");
let leave = () => {};
let routed = 0;
let openStudy = null;  // the job of the study view shown, if one is: back on the worklist, its row takes the focus

// The study viewer and the service view load on first use: the worklist, the first screen, waits for fewer modules.
const lazy = (load) => (...args) => {
  const at = routed;
  let stop = null;
  load().then((view) => { if (at === routed) stop = view(...args); });
  return () => stop?.();
};
const studyView = lazy(async () => (await import("./study.js")).studyView);
const serviceView = lazy(async () => (await import("./service.js")).serviceView);

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  if (routed && !hash.startsWith("/")) return;  // an in-page anchor, not a view: stay where we are
  leave();
  // a view opened from the page (a link, the pager, Back) puts the focus at its start: the link pressed is gone
  // with the view it was in, and the focus fell to the page's start (a keyboard user tabbed through the header
  // and the filters again, a screen reader heard nothing of the new view); the first view keeps the page's
  if (routed) main.focus({ preventScroll: true });
  routed += 1;
  const [path, query = ""] = hash.split("?");
  const params = new URLSearchParams(query);
  const study = path.match(/^\/study\/([0-9a-f]{8,64})$/i);
  const left = openStudy;
  openStudy = study ? study[1] : null;
  let nav = "worklist";
  if (study) {
    leave = studyView(main, study[1]);
    document.title = "Study · ctscreen";
  } else if (path === "/service") {
    nav = "service";
    leave = serviceView(main);
    document.title = "Service · ctscreen";
  } else {
    leave = worklistView(main, params, { focusJob: left });
    document.title = "Worklist · ctscreen";
  }
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

// --- sign-in: the credential lives in sessionStorage (this tab only) and rides on every request
const toggle = document.getElementById("signin-toggle");
const form = document.getElementById("signin-form");
const input = document.getElementById("credential");
const message = document.getElementById("signin-message");
const who = document.getElementById("who");

function showSignedIn() {
  who.textContent = credential.get() ? "signed in" : "";
  toggle.textContent = credential.get() ? "Credential" : "Sign in";
}
function openForm(text = "") {
  form.hidden = false;
  toggle.setAttribute("aria-expanded", "true");
  message.textContent = text;
  input.focus();
}
toggle.addEventListener("click", () => (form.hidden ? openForm() : (form.hidden = true,
  toggle.setAttribute("aria-expanded", "false"))));
form.addEventListener("submit", (e) => {
  e.preventDefault();
  // a pasted credential's invisible characters (a zero-width space) go; one a header cannot carry is refused here
  const { value, error } = cleanCredential(input.value);
  if (error) {
    message.textContent = error;
    input.focus();
    return;
  }
  if (value) credential.set(value);
  input.value = "";
  form.hidden = true;
  toggle.setAttribute("aria-expanded", "false");
  showSignedIn();
  route();
});
// what the page read leaves with the credential, the screen reader's last announcement too (a study's accession
// number and verdict, "Acc. A123: positive", stayed in the live region after sign-out)
const forget = () => { document.getElementById("announce").textContent = ""; };
document.getElementById("signout").addEventListener("click", () => {
  credential.clear();
  forget();
  form.hidden = true;
  showSignedIn();
  route();
});
window.addEventListener("ctscreen:auth", (e) => {
  // a stored credential the gateway refuses (revoked, expired, mistyped) is no sign-in, and what it read (the
  // worklist's accession numbers and series, a study's images) leaves the screen as at sign-out
  if (e.detail.status === 401 && credential.get()) {
    credential.clear();
    forget();
    leave();
    leave = () => {};
    const note = document.createElement("p");
    note.setAttribute("role", "alert");
    note.textContent = "The gateway refused the credential (revoked, expired or mistyped): sign in again.";
    main.replaceChildren(note);
    showSignedIn();
    who.textContent = "credential refused";
  }
  openForm(e.detail.status === 403 ? `Not allowed: ${e.detail.message}`
    : e.detail.reason === "bad_credential" ? e.detail.message : "Sign in with an API key or an access token.");
});

// "Skip to content" moves the focus; it must not touch the hash, which names the view
document.querySelector("a.skip").addEventListener("click", (e) => { e.preventDefault(); main.focus(); });
window.addEventListener("hashchange", route);
showSignedIn();
route();
