// The sign-in pop-up lands here with ?code=&state= (or ?error=): hand the answer to the page
// that opened it (same origin only) and close. The page checks the state.
const answer = { type: "pixelmill-sign-in", search: window.location.search };
if (window.opener && !window.opener.closed) {
  window.opener.postMessage(answer, window.location.origin);
  window.close();
} else {
  document.getElementById("message").textContent =
    "This window finishes a sign-in to the pixelmill console; open the console and sign in there.";
}
