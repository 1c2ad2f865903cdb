// The console's page: sign-in, the batches list, uploads, and the batch followed. Everything
// it knows lives in this page's memory; reloading it signs in again and starts from the list.

import { Api } from "./api.js";
import { Session } from "./auth.js";
import { BatchView } from "./batch.js";
import { byId, el, formatBytes, replaceChildren } from "./dom.js";
import { filesFromDrop, filesFromInput, hashFiles } from "./files.js";
import { UploadRun } from "./upload.js";

const config = await (await fetch("config.json")).json();
const session = new Session(config);
const api = new Api(session);
const batchView = new BatchView(api);
let uploading = false;

function notice(text) {
  byId("notice").textContent = text;
}

function showSignedIn() {
  const claims = session.claims;
  const roles = (claims.realm_access && claims.realm_access.roles) || [];
  byId("who").textContent = `Signed in as ${claims.preferred_username || claims.sub} (${roles.join(", ")})`;
  byId("sign-in").hidden = true;
  byId("sign-out").hidden = false;
  byId("workspace").hidden = false;
  notice("");
  loadBatches();
}

function showSignedOut(message) {
  byId("who").textContent = "";
  byId("sign-in").hidden = false;
  byId("sign-out").hidden = true;
  notice(message);
}

session.addEventListener("signed-in", showSignedIn);
session.addEventListener("expired", () =>
  showSignedOut("Your session has expired: sign in again to go on (this page keeps its state)."),
);
session.addEventListener("signed-out", () => {
  byId("workspace").hidden = true;
  batchView.hide();
  showSignedOut("Signed out.");
});
byId("sign-in").addEventListener("click", () =>
  session.signIn().catch((error) => notice(`Sign-in failed: ${error.message}`)),
);
byId("sign-out").addEventListener("click", () => session.signOut());

// -- batches list ---------------------------------------------------------------------------

async function loadBatches() {
  let page;
  try {
    page = await api.get("/api/v1/batches?limit=50");
  } catch (error) {
    notice(`Could not list the batches: ${error.message}`);
    return;
  }
  replaceChildren(
    byId("batches"),
    page.items.map((batch) => {
      const done = batch.counts.completed + batch.counts.failed + batch.counts.cancelled;
      const created = new Date(batch.created_at).toLocaleString();
      const button = el(
        "button",
        { type: "button", className: "batch-item", "aria-current": batch.id === batchView.id ? "true" : false },
        el("span", { className: "name" }, batch.name || batch.id.slice(0, 8)),
        el("span", { className: "state", dataset: { status: batch.status } }, batch.status),
        el("span", { className: "progress-text" }, `${done}/${batch.total} done`),
        el("time", { datetime: batch.created_at }, created),
      );
      button.addEventListener("click", () => selectBatch(batch.id));
      return el("li", { dataset: { batchId: batch.id } }, button);
    }),
  );
  byId("batches-none").hidden = page.items.length > 0;
}

async function selectBatch(batchId) {
  await batchView.show(batchId);
  describeTarget();
  loadBatches();
}

function targetBatch() {
  return batchView.batch && batchView.batch.status === "open" ? batchView.batch : null;
}

function describeTarget() {
  const batch = targetBatch();
  byId("upload-target").textContent = batch
    ? `Files go into the open batch ${batch.name || batch.id.slice(0, 8)}; those it already holds are skipped.`
    : "Files go into a new batch.";
}

byId("new-batch").addEventListener("click", () => {
  batchView.hide();
  describeTarget();
  loadBatches();
});
byId("refresh-batches").addEventListener("click", () => loadBatches());
batchView.addEventListener("updated", () => loadBatches());
batchView.addEventListener("changed", () => {
  describeTarget();
  loadBatches();
});

// -- uploads --------------------------------------------------------------------------------

function folderName(files) {
  const first = files[0] && files[0].segments.length > 1 ? files[0].segments[0] : null;
  return first && files.every((f) => f.segments[0] === first) ? first : "console upload";
}

class RunView {
  constructor(run) {
    this.run = run;
    this.rows = new Map();
    this.scheduled = false;
    replaceChildren(
      byId("upload-files"),
      run.files.map((upload) => {
        const bar = el("progress", { max: Math.max(1, upload.local.size), value: 0, "aria-label": upload.local.path });
        const state = el("span", { className: "state" });
        const row = el("li", {}, el("span", { className: "name" }, upload.local.path), bar, state);
        this.rows.set(upload, { row, bar, state });
        return row;
      }),
    );
    run.addEventListener("progress", () => this.schedule());
    this.render();
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      this.render();
    });
  }

  render() {
    const run = this.run;
    const answered = run.files.filter((f) => f.done).length;
    const total = byId("total-progress");
    total.max = Math.max(1, run.totalBytes);
    total.value = run.sentBytes;
    byId("total-text").textContent =
      `${answered} of ${run.files.length} files answered, ` +
      `${formatBytes(run.sentBytes)} of ${formatBytes(run.totalBytes)} sent` +
      (run.inFlight ? `, ${run.inFlight} request(s) in flight` : "");
    for (const [upload, { row, bar, state }] of this.rows) {
      bar.value = upload.done ? bar.max : upload.sent;
      row.dataset.state = upload.state;
      state.textContent = upload.state === "known" ? "already in the batch" : upload.reason && upload.state !== "accepted" ? `${upload.state}: ${upload.reason}` : upload.state;
    }
    const refused = run.files.filter((f) => f.state === "refused");
    replaceChildren(
      byId("refused"),
      refused.map((f) =>
        el(
          "li",
          { dataset: { status: f.status ?? "" } },
          el("span", { className: "name" }, f.local.path),
          " ",
          el("span", { className: "status" }, f.status ? `HTTP ${f.status}` : "no answer"),
          " ",
          el("span", { className: "reason" }, f.reason),
        ),
      ),
    );
    byId("refused-none").hidden = refused.length > 0;
  }
}

async function upload(files) {
  if (uploading) {
    notice("An upload is running: drop the next files once it has finished.");
    return;
  }
  if (!files.length) {
    notice("No files found there (hidden files are skipped).");
    return;
  }
  uploading = true;
  const summary = byId("upload-summary-text");
  try {
    await hashFiles(files, (done, total) => {
      summary.textContent = `Reading ${done} of ${total} files...`;
    });
    let batch = targetBatch();
    let known = new Set();
    if (batch) {
      const held = await api.all(`/api/v1/batches/${encodeURIComponent(batch.id)}/images`);
      known = new Set(held.map((image) => image.sha256));
    } else {
      batch = await api.post("/api/v1/batches", { name: folderName(files) });
      await batchView.show(batch.id);
      describeTarget();
      loadBatches();
    }
    const run = new UploadRun(session, batch.id, files, known);
    const view = new RunView(run);
    summary.textContent = `Uploading ${files.length} files into ${batch.name || batch.id.slice(0, 8)}...`;
    await run.run();
    view.render(); // the last state now, not at the next frame: the summary below says "Done"
    const count = (state) => run.files.filter((f) => f.state === state).length;
    summary.textContent =
      `Done: ${count("accepted")} uploaded, ${count("known")} already in the batch, ` +
      `${count("refused")} refused.`;
    byId("upload-summary").dataset.done = "true";
    await batchView.poll();
    loadBatches();
  } catch (error) {
    summary.textContent = `The upload stopped: ${error.message}`;
  } finally {
    uploading = false;
  }
}

for (const id of ["pick-folder", "pick-files"]) {
  const input = byId(id);
  input.addEventListener("change", () => {
    const files = filesFromInput(input);
    input.value = "";
    upload(files);
  });
}
byId("choose-folder").addEventListener("click", () => byId("pick-folder").click());
byId("choose-files").addEventListener("click", () => byId("pick-files").click());

const zone = byId("drop-zone");
zone.addEventListener("dragover", (event) => {
  event.preventDefault();
  zone.classList.add("over");
});
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", async (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  upload(await filesFromDrop(event.dataTransfer));
});
zone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    byId("pick-folder").click();
  }
});

byId("sign-in").disabled = false;
notice("Sign in to upload and follow batches.");
