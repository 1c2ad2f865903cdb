// One upload run: the files of a pick or a drop sent into a batch through the bulk route
// (`POST /api/v1/uploads?batch=ID`), several requests at once, each file's progress shown from
// the request's upload progress. Requests are formed as the command-line client forms them
// (groups of 16 in path order, then stripped of files the batch already holds), so a run
// repeated after a reload sends only what the batch lacks, and the same key for the same group.

import { errorText, parseRetryAfter, RetryPolicy, TRANSIENT_STATUSES } from "./api.js";
import { sleep } from "./dom.js";
import { idempotencyKey } from "./files.js";

export const GROUP_SIZE = 16;
export const CONCURRENT_REQUESTS = 3;

// What became of one file: waiting, sending, accepted, known (already in the batch), refused.
export class FileUpload {
  constructor(local) {
    this.local = local;
    this.state = "waiting";
    this.sent = 0;
    this.status = null;
    this.reason = null;
    this.imageId = null;
  }

  get done() {
    return ["accepted", "known", "refused"].includes(this.state);
  }
}

function quoted(value) {
  return value.replaceAll('"', "%22").replaceAll("\r", "").replaceAll("\n", "");
}

// A multipart/form-data body of `image` parts (as ingest/client.py encodes one), and where
// each file's bytes sit in it, for per-file progress.
export function multipartBody(uploads) {
  const boundary = `pixelmill-${crypto.randomUUID().replaceAll("-", "")}`;
  const encoder = new TextEncoder();
  const chunks = [];
  const ranges = [];
  let offset = 0;
  for (const upload of uploads) {
    const head = encoder.encode(
      `--${boundary}\r\nContent-Disposition: form-data; name="image"; ` +
        `filename="${quoted(upload.local.filename)}"\r\n` +
        "Content-Type: application/octet-stream\r\n\r\n",
    );
    chunks.push(head, upload.local.file, "\r\n");
    offset += head.byteLength;
    ranges.push([offset, offset + upload.local.size]);
    offset += upload.local.size + 2;
  }
  chunks.push(`--${boundary}--\r\n`);
  return { blob: new Blob(chunks), contentType: `multipart/form-data; boundary=${boundary}`, ranges };
}

function send(url, body, key, token, onProgress) {
  return new Promise((resolve) => {
    const request = new XMLHttpRequest();
    request.open("POST", url);
    request.setRequestHeader("Content-Type", body.contentType);
    request.setRequestHeader("Idempotency-Key", key);
    request.setRequestHeader("Authorization", `Bearer ${token}`);
    request.setRequestHeader("Accept", "application/json");
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => onProgress(event.loaded));
    request.addEventListener("load", () =>
      resolve({
        status: request.status,
        retryAfter: parseRetryAfter(request.getResponseHeader("Retry-After")),
        body: request.response,
      }),
    );
    // No answer (connection refused or cut): transient, like the CLI's TransientFailure.
    request.addEventListener("error", () => resolve({ status: 0, retryAfter: null, body: null }));
    request.send(body.blob);
  });
}

export class UploadRun extends EventTarget {
  constructor(session, batchId, localFiles, knownDigests, policy = new RetryPolicy()) {
    super();
    this.session = session;
    this.batchId = batchId;
    this.policy = policy;
    this.files = localFiles.map((local) => new FileUpload(local));
    for (const upload of this.files) {
      if (knownDigests.has(upload.local.sha256)) {
        upload.state = "known";
        upload.sent = upload.local.size;
      }
    }
    this.totalBytes = this.files.reduce((sum, f) => sum + f.local.size, 0);
    this.inFlight = 0;
  }

  get sentBytes() {
    return this.files.reduce((sum, f) => sum + (f.done ? f.local.size : f.sent), 0);
  }

  changed() {
    this.dispatchEvent(new Event("progress"));
  }

  // Groups over every file in order, stripped of the files the batch already holds (the
  // command-line client's `batches()` with its journal).
  groups() {
    const planned = [];
    for (let i = 0; i < this.files.length; i += GROUP_SIZE) {
      const group = this.files.slice(i, i + GROUP_SIZE).filter((f) => f.state !== "known");
      if (group.length) planned.push(group);
    }
    return planned;
  }

  async run() {
    const queue = this.groups();
    const lanes = Array.from({ length: CONCURRENT_REQUESTS }, async () => {
      while (queue.length) await this.sendGroup(queue.shift());
    });
    await Promise.all(lanes);
    this.changed();
  }

  async sendGroup(group) {
    // The salt: the batch id, then the renditions asked for (none), as the CLI salts it.
    const key = await idempotencyKey("bulk", group.map((f) => f.local), this.batchId);
    const body = multipartBody(group);
    const url = `/api/v1/uploads?batch=${encodeURIComponent(this.batchId)}`;
    let answer = null;
    let refreshed = false;
    for (let attempt = 1; attempt <= this.policy.maxAttempts; attempt += 1) {
      const token = await this.session.bearer();
      for (const f of group) f.state = "sending";
      this.inFlight += 1;
      this.changed();
      answer = await send(url, body, key, token, (loaded) => {
        group.forEach((f, i) => {
          const [start, end] = body.ranges[i];
          f.sent = Math.max(0, Math.min(loaded, end) - start);
        });
        this.changed();
      });
      this.inFlight -= 1;
      if (answer.status === 401 && !refreshed) {
        refreshed = true;
        await this.session.refresh().catch(() => {});
        continue;
      }
      if (answer.status !== 0 && !TRANSIENT_STATUSES.has(answer.status)) break;
      for (const f of group) {
        f.state = "waiting";
        f.sent = 0;
        f.reason = `retrying: ${answer.status ? `HTTP ${answer.status}` : "no answer"}`;
      }
      this.changed();
      if (attempt < this.policy.maxAttempts) {
        await sleep(this.policy.delaySeconds(attempt, answer.retryAfter) * 1000);
      }
    }
    await this.apply(group, answer);
  }

  async apply(group, answer) {
    if (answer.status === 413 && group.length > 1) {
      const middle = Math.floor(group.length / 2);
      await this.sendGroup(group.slice(0, middle));
      await this.sendGroup(group.slice(middle));
      return;
    }
    if (answer.status === 207 && answer.body && Array.isArray(answer.body.items)) {
      this.applyItems(group, answer.body.items);
    } else {
      const why = answer.status
        ? errorText(answer.status, answer.body)
        : `no answer after ${this.policy.maxAttempts} attempts`;
      for (const f of group) this.refuse(f, answer.status || null, `whole request refused: ${why}`);
    }
    this.changed();
  }

  applyItems(group, items) {
    const answered = new Set();
    for (const item of items) {
      const upload = group[item.index];
      if (!upload) continue;
      answered.add(item.index);
      if ((item.status === 200 || item.status === 201) && item.image) {
        upload.state = "accepted";
        upload.status = item.status;
        upload.reason = null;
        upload.imageId = item.image.id;
      } else {
        const error = item.error || {};
        this.refuse(upload, item.status, `${error.code || "error"}: ${error.message || "refused"}`);
      }
    }
    group.forEach((f, i) => {
      if (!answered.has(i)) this.refuse(f, null, "the server's answer did not mention this file");
    });
  }

  refuse(upload, status, reason) {
    upload.state = "refused";
    upload.status = status;
    upload.reason = reason;
  }
}
