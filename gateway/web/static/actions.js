// What the caller may do, and the actions that need a scope. The gateway says who the caller is (GET /v1/me, asked
// once per credential); a button whose scope the credential lacks is disabled, its title naming the scope (it was
// offered to everyone, and a reader's click answered 403). Such a button is written disabled, with data-needs
// naming its scope, and gate() enables it once the gateway has said: none is usable before.

import { api, credential, getJson } from "./api.js";
import { announce } from "./dom.js";

export const STUDIES_WRITE = "studies:write";

let asked = null;  // { token, answer }: the answer for this credential

/**
 * The caller as the gateway sees it ({subject, kind, scopes, effective_scopes}), or null when it cannot tell (an
 * older gateway, the network down): then every action is offered and the gateway decides, as before. Without
 * authentication (loopback) the caller is anonymous with every scope.
 */
export function caller() {
  const token = credential.get();
  if (asked?.token !== token) {
    const mine = { token, answer: null };
    // a 401 here opens the sign-in box (api.js), as the view's own request does; not kept: asked again next time
    mine.answer = getJson("/v1/me").catch(() => { if (asked === mine) asked = null; return null; });
    asked = mine;
  }
  return asked.answer;
}

/** Whether the caller (caller()'s answer) may act with ``scope``; one the gateway did not describe may try. */
export const may = (who, scope) => !who || who.effective_scopes.includes(scope);

/** The buttons in ``root`` (itself included) that need a scope: enabled where the caller holds it, else disabled
 * with a title saying which scope is needed. A button busy with its request is left alone. */
export async function gate(root) {
  const who = await caller();
  const buttons = [root, ...root.querySelectorAll("[data-needs]")].filter((el) => el.dataset?.needs);
  for (const el of buttons) {
    if (el.dataset.busy) continue;
    const scope = el.dataset.needs;
    el.disabled = !may(who, scope);
    if (el.disabled) el.title = `Needs the ${scope} scope, which this credential (${who.subject}) does not grant`;
    else el.removeAttribute("title");
  }
}

/** Whether a job (or a worklist row) can be screened again: the gateway retries a failed job of its study's latest
 * version only (409 for any other; an earlier version's reading would replace nothing: ``newest_version`` is
 * the version to screen). */
export const canScreenAgain = (job) => job.state === "failed" && !(job.newest_version > job.version);

/** The study's later version, failed too, that is to be screened instead of this failed job's, or null (a later
 * version not failed supersedes this one: ``superseded_by`` says so): named in words where no Screen again is. */
export const newerVersion = (job) => (job.state === "failed" && !job.superseded_by && job.newest_version > job.version
  ? job.newest_version : null);

/** Whether a done job's study can be screened again with the current models as a new version (POST
 * /v1/studies/{uid}/rescreen): its latest version only (one superseded has a newer reading to screen again). */
export const canRescreen = (job) => job.state === "done" && !job.superseded_by;

/**
 * POST ``path`` for a button: ``button`` is disabled while it is asked; a refusal is written in ``refused`` after
 * ``notDone`` and announced (a 401/403 opens the sign-in box too) and the button can be pressed again. Resolves to
 * the answer's JSON once accepted (``done`` is announced), else null.
 */
async function act(path, button, refused, done, notDone) {
  button.disabled = true;
  button.dataset.busy = "1";
  refused.textContent = "";
  try {
    const answer = await (await api(path, { method: "POST" })).json();
    announce(done);
    return answer;
  } catch (error) {
    // said too: the line under the button is no live region, and a screen reader heard nothing of the refusal
    refused.textContent = `${notDone}: ${error.message}`;
    announce(refused.textContent);
    button.disabled = false;
    return null;
  } finally {
    delete button.dataset.busy;
  }
}

/**
 * "Screen again" (POST /v1/jobs/{id}/retry: studies:write), for the study view's button and each failed worklist
 * row's (act()). Resolves to the job queued again (the gateway's answer: {job_id, state, ...}), or null when refused.
 */
export function screenAgain(jobId, button, refused) {
  return act(`/v1/jobs/${encodeURIComponent(jobId)}/retry`, button, refused, "Queued to be screened again",
    "Not queued again");
}

/**
 * "Screen again with the current models" (POST /v1/studies/{uid}/rescreen: studies:write), for a done study's view
 * (act()): the study's kept instances screened as a new version, whose reading replaces this one downstream.
 * Resolves to the new version's job ({job_id, state, ...}), or null when refused.
 */
export function rescreen(studyUid, button, refused) {
  return act(`/v1/studies/${encodeURIComponent(studyUid)}/rescreen`, button, refused,
    "Queued to be screened again as a new version", "Not screened again");
}
