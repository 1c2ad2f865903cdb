// One batch followed live: its counts and rate (polling the batch document), a gallery of
// results in their smallest rendition, the failed images with their reasons, and the buttons
// that steer it (close, retry, cancel) or download its archive.

import { byId, el, formatBytes, formatSeconds, replaceChildren } from "./dom.js";

const POLL_MS = 1500;
const GALLERY_SIZE = 24;
const COUNTED = ["pending", "processing", "completed", "failed", "cancelled"];
const ENDED = new Set(["finished", "cancelled"]);

function smallestRendition(image) {
  const renditions = (image.renditions || []).filter((r) => r.url);
  renditions.sort((a, b) => a.width * a.height - b.width * b.height || a.bytes - b.bytes);
  return renditions[0] || null;
}

export class BatchView extends EventTarget {
  constructor(api) {
    super();
    this.api = api;
    this.batch = null;
    this.timer = null;
    this.images = new Map(); // image id -> its document with presigned URLs
    this.seen = { completed: -1, failed: -1 };
    byId("close-batch").addEventListener("click", () => this.steer("close"));
    byId("retry-batch").addEventListener("click", () => this.steer("retry"));
    byId("cancel-batch").addEventListener("click", () => this.steer("cancel"));
    byId("download-archive").addEventListener("click", () => this.downloadArchive());
  }

  get id() {
    return this.batch ? this.batch.id : null;
  }

  async show(batchId) {
    if (this.id !== batchId) {
      this.images.clear();
      this.seen = { completed: -1, failed: -1 };
      replaceChildren(byId("gallery"), []);
      replaceChildren(byId("failed"), []);
      this.say("");
    }
    byId("batch-panel").hidden = false;
    await this.poll(batchId);
  }

  hide() {
    clearTimeout(this.timer);
    this.batch = null;
    byId("batch-panel").hidden = true;
  }

  async poll(batchId = this.id) {
    clearTimeout(this.timer);
    if (!batchId) return;
    try {
      const before = this.batch;
      this.batch = await this.api.get(`/api/v1/batches/${encodeURIComponent(batchId)}`);
      this.render();
      if (!before || before.status !== this.batch.status || before.total !== this.batch.total ||
          before.counts.completed !== this.batch.counts.completed ||
          before.counts.failed !== this.batch.counts.failed) {
        this.dispatchEvent(new Event("updated"));
      }
      await this.refreshLists();
    } catch (error) {
      this.say(`Could not read the batch: ${error.message}`);
    }
    if (this.id === batchId && !ENDED.has(this.batch.status)) {
      this.timer = setTimeout(() => this.poll(batchId), POLL_MS);
    }
  }

  render() {
    const batch = this.batch;
    byId("batch-title").textContent = `Batch ${batch.name || batch.id.slice(0, 8)}`;
    byId("batch-status").textContent = batch.status;
    byId("batch-status").dataset.status = batch.status;
    const counts = [["total", batch.total], ...COUNTED.map((name) => [name, batch.counts[name]])];
    replaceChildren(
      byId("batch-counts"),
      counts.map(([name, value]) =>
        el("div", { className: `count count-${name}` }, el("dt", {}, name), el("dd", { id: `count-${name}` }, value)),
      ),
    );
    const done = batch.counts.completed + batch.counts.failed + batch.counts.cancelled;
    const bar = byId("batch-progress");
    bar.max = Math.max(1, batch.total);
    bar.value = done;
    byId("batch-rate").textContent =
      `${batch.images_per_second.toFixed(2)} images/s, ` +
      `ETA ${batch.eta_seconds === null ? "unknown" : formatSeconds(batch.eta_seconds)}, ` +
      `${formatBytes(batch.bytes_in)} in, ${formatBytes(batch.bytes_out)} out`;
    const cancelled = batch.status === "cancelling" || batch.status === "cancelled";
    byId("close-batch").disabled = batch.status !== "open";
    byId("retry-batch").disabled = cancelled || batch.counts.failed === 0;
    byId("cancel-batch").disabled = cancelled || batch.status === "finished";
    byId("download-archive").disabled = batch.counts.completed === 0;
  }

  async refreshLists() {
    const { completed, failed } = this.batch.counts;
    if (failed !== this.seen.failed) {
      this.seen.failed = failed;
      await this.renderFailed();
    }
    if (completed !== this.seen.completed) {
      this.seen.completed = completed;
      await this.renderGallery();
    }
  }

  async renderFailed() {
    const page = await this.api.get(
      `/api/v1/batches/${encodeURIComponent(this.id)}/images?status=failed&limit=100`,
    );
    replaceChildren(
      byId("failed"),
      page.items.map((image) =>
        el(
          "li",
          { dataset: { imageId: image.id } },
          el("span", { className: "name" }, image.filename || image.id),
          " ",
          el("span", { className: "reason" }, image.error || "failed"),
        ),
      ),
    );
    byId("failed-none").hidden = page.items.length > 0;
  }

  async renderGallery() {
    const page = await this.api.get(
      `/api/v1/batches/${encodeURIComponent(this.id)}/images?status=completed&limit=${GALLERY_SIZE}`,
    );
    const documents = [];
    for (const item of page.items) {
      if (!this.images.has(item.id)) {
        this.images.set(item.id, await this.api.get(`/api/v1/images/${encodeURIComponent(item.id)}`));
      }
      documents.push(this.images.get(item.id));
    }
    replaceChildren(
      byId("gallery"),
      documents.map((image) => {
        const rendition = smallestRendition(image);
        const label = image.filename || image.id;
        return el(
          "li",
          { dataset: { imageId: image.id } },
          el(
            "figure",
            {},
            rendition
              ? el("img", {
                  src: rendition.url,
                  alt: label,
                  width: rendition.width,
                  height: rendition.height,
                  loading: "lazy",
                })
              : el("span", { className: "placeholder" }, "no preview"),
            el("figcaption", {}, label),
          ),
        );
      }),
    );
  }

  async steer(action) {
    try {
      const answer = await this.api.post(`/api/v1/batches/${encodeURIComponent(this.id)}/${action}`);
      if (action === "retry") this.say(`${answer.requeued} failed image(s) requeued.`);
      else if (action === "cancel") this.say(`${answer.cancelled} waiting image(s) cancelled.`);
      else this.say("Closed: no more uploads join; it finishes when its last image is done.");
      this.seen.failed = -1;
      this.dispatchEvent(new Event("changed"));
    } catch (error) {
      this.say(`${action} refused: ${error.message}`);
    }
    await this.poll();
  }

  // The archive is fetched with the bearer token (a link cannot carry it) and saved from
  // memory: fine for the batches a browser tab holds; the CLI's `download` resumes big ones.
  async downloadArchive() {
    const batch = this.batch;
    const response = await this.api.fetch(`/api/v1/batches/${encodeURIComponent(batch.id)}/archive`, {
      headers: { Accept: "application/zip" },
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      const why = body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${response.status}`;
      this.say(`The archive could not be downloaded: ${why}`);
      return;
    }
    const total = Number(response.headers.get("Content-Length")) || 0;
    const reader = response.body.getReader();
    const parts = [];
    let received = 0;
    for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
      parts.push(chunk.value);
      received += chunk.value.byteLength;
      this.say(`Downloading the archive: ${formatBytes(received)}${total ? ` of ${formatBytes(total)}` : ""}`);
    }
    const url = URL.createObjectURL(new Blob(parts, { type: "application/zip" }));
    const link = el("a", { href: url, download: `${batch.name || batch.id}.zip` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    this.say(`Archive saved (${formatBytes(received)}).`);
  }

  say(text) {
    byId("batch-message").textContent = text;
  }
}
