// Sign-in with the OIDC authorization code flow and PKCE (S256), as a public client. The code
// comes back to a pop-up window (callback.html), which hands it to this page and closes, so the
// verifier and the tokens never leave this page's memory: nothing goes to localStorage,
// sessionStorage or cookies, and a new sign-in (when the refresh token has expired) keeps the
// uploads and views of the page as they are. Tokens are refreshed before they expire.

const REFRESH_AT_FRACTION = 0.7;
const MIN_REFRESH_MS = 1000;
const SIGN_IN_MESSAGE = "pixelmill-sign-in";

function base64url(bytes) {
  let text = "";
  for (const byte of new Uint8Array(bytes)) text += String.fromCharCode(byte);
  return btoa(text).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

function randomString(byteCount) {
  return base64url(crypto.getRandomValues(new Uint8Array(byteCount)));
}

export async function s256(verifier) {
  return base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
}

function decodedClaims(token) {
  try {
    const payload = token.split(".")[1].replaceAll("-", "+").replaceAll("_", "/");
    const json = new TextDecoder().decode(Uint8Array.from(atob(payload), (c) => c.charCodeAt(0)));
    return JSON.parse(json);
  } catch {
    return {};
  }
}

export class SignInError extends Error {}

export class Session extends EventTarget {
  constructor(config) {
    super();
    this.config = config;
    this.discovery = null;
    this.accessToken = null;
    this.refreshToken = null;
    this.expiresAt = 0;
    this.refreshTimer = null;
    this.refreshing = null;
  }

  get signedIn() {
    return this.accessToken !== null;
  }

  get claims() {
    return this.accessToken ? decodedClaims(this.accessToken) : {};
  }

  get redirectUri() {
    return new URL("callback.html", window.location.href).href;
  }

  async discover() {
    if (this.discovery) return this.discovery;
    const url = `${this.config.issuer}/.well-known/openid-configuration`;
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new SignInError(`the issuer answered ${response.status} at ${url}`);
    const document = await response.json();
    if (document.issuer !== this.config.issuer) {
      throw new SignInError(`the issuer calls itself ${document.issuer}, not ${this.config.issuer}`);
    }
    this.discovery = document;
    return document;
  }

  // Opens the issuer's login page in a pop-up; call it from a click (pop-up blockers).
  async signIn() {
    const popup = window.open("about:blank", "pixelmill-sign-in", "popup,width=480,height=640");
    if (!popup) throw new SignInError("the browser blocked the sign-in window: allow pop-ups");
    try {
      const discovery = await this.discover();
      const verifier = randomString(48);
      const state = randomString(16);
      const query = new URLSearchParams({
        response_type: "code",
        client_id: this.config.client_id,
        redirect_uri: this.redirectUri,
        scope: this.config.scope,
        state,
        code_challenge: await s256(verifier),
        code_challenge_method: "S256",
      });
      popup.location.href = `${discovery.authorization_endpoint}?${query}`;
      const answer = await this.codeFrom(popup, state);
      await this.redeem(discovery, answer.get("code"), verifier);
    } catch (error) {
      popup.close();
      throw error;
    }
  }

  codeFrom(popup, state) {
    return new Promise((resolve, reject) => {
      const closedWatch = setInterval(() => {
        if (popup.closed) finish(new SignInError("the sign-in window was closed"));
      }, 500);
      const onMessage = (event) => {
        if (event.origin !== window.location.origin || event.source !== popup) return;
        if (!event.data || event.data.type !== SIGN_IN_MESSAGE) return;
        const answer = new URLSearchParams(event.data.search);
        if (answer.get("state") !== state) return finish(new SignInError("unexpected state"));
        if (answer.has("error")) {
          return finish(new SignInError(answer.get("error_description") || answer.get("error")));
        }
        if (answer.has("iss") && answer.get("iss") !== this.config.issuer) {
          return finish(new SignInError("the answer came from another issuer"));
        }
        finish(null, answer);
      };
      const finish = (error, answer) => {
        clearInterval(closedWatch);
        window.removeEventListener("message", onMessage);
        if (error) reject(error);
        else resolve(answer);
      };
      window.addEventListener("message", onMessage);
    });
  }

  async redeem(discovery, code, verifier) {
    await this.tokenRequest(discovery, {
      grant_type: "authorization_code",
      code,
      redirect_uri: this.redirectUri,
      client_id: this.config.client_id,
      code_verifier: verifier,
    });
    this.dispatchEvent(new Event("signed-in"));
  }

  async tokenRequest(discovery, fields) {
    const response = await fetch(discovery.token_endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams(fields),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new SignInError(body.error_description || body.error || `HTTP ${response.status}`);
    }
    this.accept(body);
  }

  accept(tokens) {
    this.accessToken = tokens.access_token;
    this.refreshToken = tokens.refresh_token || null;
    const lifetimeMs = Math.max(1, Number(tokens.expires_in) || 60) * 1000;
    this.expiresAt = Date.now() + lifetimeMs;
    clearTimeout(this.refreshTimer);
    if (this.refreshToken) {
      const delay = Math.max(MIN_REFRESH_MS, lifetimeMs * REFRESH_AT_FRACTION);
      this.refreshTimer = setTimeout(() => this.refresh().catch(() => {}), delay);
    }
  }

  // One refresh at a time; a failed one signs the page out (it says so and offers sign-in).
  refresh() {
    if (!this.refreshing) {
      this.refreshing = this.refreshOnce().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  async refreshOnce() {
    if (!this.refreshToken) throw new SignInError("signed out");
    try {
      await this.tokenRequest(await this.discover(), {
        grant_type: "refresh_token",
        refresh_token: this.refreshToken,
        client_id: this.config.client_id,
      });
      this.dispatchEvent(new Event("refreshed"));
    } catch (error) {
      if (error instanceof SignInError) this.expire();
      throw error;
    }
  }

  expire() {
    this.forget();
    this.dispatchEvent(new Event("expired"));
  }

  signOut() {
    this.forget();
    this.dispatchEvent(new Event("signed-out"));
  }

  forget() {
    clearTimeout(this.refreshTimer);
    this.accessToken = null;
    this.refreshToken = null;
    this.expiresAt = 0;
  }

  // The access token to send now: refreshed first when it is about to expire. Signed out (the
  // refresh token expired), callers wait for the next sign-in, so uploads under way go on.
  async bearer() {
    if (this.accessToken && Date.now() > this.expiresAt - 5000 && this.refreshToken) {
      await this.refresh().catch(() => {});
    }
    while (!this.accessToken) {
      await new Promise((resolve) => this.addEventListener("signed-in", resolve, { once: true }));
    }
    return this.accessToken;
  }
}
