// Which files a pick or a drop holds, in the order the command-line client walks a folder, and
// the content-derived identity of each: its SHA-256, and the Idempotency-Key of a request, by
// the same algorithm as ingest/client.py (`idempotency_key`), so that a request sent again
// (after a reload, or by the command-line client for the same folder) is the same request.

const HIDDEN = /^\./;

export class LocalFile {
  constructor(file, path) {
    this.file = file;
    this.path = path; // relative path inside the pick or drop, "/"-separated
    this.filename = file.name;
    this.size = file.size;
    this.sha256 = null;
  }

  get segments() {
    return this.path.split("/").filter(Boolean);
  }
}

function isHidden(path) {
  return path.split("/").some((segment) => HIDDEN.test(segment));
}

// Path order, segment by segment: the order of `sorted(Path.iterdir())` walked depth first.
export function compareBySegments(a, b) {
  const left = a.segments;
  const right = b.segments;
  for (let i = 0; i < Math.min(left.length, right.length); i += 1) {
    if (left[i] !== right[i]) return left[i] < right[i] ? -1 : 1;
  }
  return left.length - right.length;
}

function chosen(files) {
  return files.filter((f) => !isHidden(f.path)).sort(compareBySegments);
}

// From an <input type="file"> (with or without webkitdirectory).
export function filesFromInput(input) {
  return chosen(
    Array.from(input.files, (file) => new LocalFile(file, file.webkitRelativePath || file.name)),
  );
}

function readEntries(reader) {
  return new Promise((resolve, reject) => reader.readEntries(resolve, reject));
}

function fileOf(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

async function walk(entry, found) {
  if (entry.isFile) {
    found.push(new LocalFile(await fileOf(entry), entry.fullPath.replace(/^\//, "")));
    return;
  }
  if (!entry.isDirectory || HIDDEN.test(entry.name)) return;
  const reader = entry.createReader();
  // readEntries answers in chunks (100 in Chromium) until it answers none.
  for (let chunk = await readEntries(reader); chunk.length; chunk = await readEntries(reader)) {
    for (const child of chunk) await walk(child, found);
  }
}

// From a drop: folders are walked (webkitGetAsEntry), plain files taken as they are.
export async function filesFromDrop(dataTransfer) {
  const entries = [];
  const plain = [];
  for (const item of Array.from(dataTransfer.items)) {
    if (item.kind !== "file") continue;
    const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
    if (entry) entries.push(entry);
    else if (item.getAsFile()) plain.push(item.getAsFile());
  }
  const found = plain.map((file) => new LocalFile(file, file.name));
  for (const entry of entries) await walk(entry, found);
  return chosen(found);
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

// SubtleCrypto has no incremental digest: each file is read whole, one at a time.
export async function hashFiles(files, onHashed) {
  let done = 0;
  for (const item of files) {
    item.sha256 = hex(await crypto.subtle.digest("SHA-256", await item.file.arrayBuffer()));
    done += 1;
    onHashed(done, files.length);
  }
}

// `route` is "bulk"; `salt` is the batch id followed by the sorted renditions asked for
// (the console asks for none), exactly as the command-line client salts its keys.
export async function idempotencyKey(route, files, salt) {
  let text = `${salt}${route}`;
  for (const item of files) text += `\n${item.sha256} ${item.filename}`;
  return `${route}-${hex(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)))}`;
}
