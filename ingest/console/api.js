// Calls to the API with the session's bearer token. Transient answers (429, 502, 503, 504, or
// no answer at all) are retried as the command-line client retries them (ingest/client.py
// RetryPolicy): exponential backoff with full jitter, never sooner than Retry-After.

import { sleep } from "./dom.js";

export const TRANSIENT_STATUSES = new Set([429, 502, 503, 504]);

export class RetryPolicy {
  constructor({ maxAttempts = 8, baseSeconds = 0.5, capSeconds = 30 } = {}) {
    this.maxAttempts = maxAttempts;
    this.baseSeconds = baseSeconds;
    this.capSeconds = capSeconds;
  }

  delaySeconds(attempt, retryAfter) {
    const backoff = Math.random() * Math.min(this.capSeconds, this.baseSeconds * 2 ** (attempt - 1));
    return Math.max(backoff, retryAfter || 0);
  }
}

// Seconds from a Retry-After header (the delta-seconds form; dates are ignored).
export function parseRetryAfter(value) {
  const seconds = Number.parseFloat(value ?? "");
  return Number.isFinite(seconds) ? Math.max(0, seconds) : null;
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// `code: message` from the API's one error shape, or the start of the body.
export function errorText(status, body) {
  const error = body && typeof body === "object" ? body.error : null;
  if (error && error.code) return `${error.code}: ${error.message}`;
  return `HTTP ${status}`;
}

export class Api {
  constructor(session, policy = new RetryPolicy()) {
    this.session = session;
    this.policy = policy;
  }

  // fetch with retries; a 401 refreshes the token once. Resolves to the last Response.
  async fetch(path, options = {}) {
    let refreshed = false;
    let lastError = null;
    for (let attempt = 1; attempt <= this.policy.maxAttempts; attempt += 1) {
      const headers = { Accept: "application/json", ...options.headers };
      headers.Authorization = `Bearer ${await this.session.bearer()}`;
      let response;
      try {
        response = await fetch(path, { ...options, headers });
      } catch (error) {
        lastError = error;
        await sleep(this.policy.delaySeconds(attempt, null) * 1000);
        continue;
      }
      if (response.status === 401 && !refreshed) {
        refreshed = true;
        await this.session.refresh().catch(() => {}); // signed out: bearer() waits for sign-in
        continue;
      }
      if (!TRANSIENT_STATUSES.has(response.status) || attempt === this.policy.maxAttempts) {
        return response;
      }
      const retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
      await sleep(this.policy.delaySeconds(attempt, retryAfter) * 1000);
    }
    throw new ApiError(0, "unavailable", `no answer from the API: ${lastError}`);
  }

  async json(method, path, body) {
    const options = { method };
    if (body !== undefined) {
      options.body = JSON.stringify(body);
      options.headers = { "Content-Type": "application/json" };
    }
    const response = await this.fetch(path, options);
    const parsed = await response.json().catch(() => null);
    if (!response.ok) {
      const error = parsed && parsed.error ? parsed.error : {};
      throw new ApiError(response.status, error.code || "error", errorText(response.status, parsed));
    }
    return parsed;
  }

  get(path) {
    return this.json("GET", path);
  }

  post(path, body) {
    return this.json("POST", path, body);
  }

  // Every item of a paged listing (`items`, `next_cursor`).
  async all(path, limit = 100) {
    const items = [];
    let cursor = null;
    do {
      const separator = path.includes("?") ? "&" : "?";
      const page = await this.get(
        `${path}${separator}limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`,
      );
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor);
    return items;
  }
}
