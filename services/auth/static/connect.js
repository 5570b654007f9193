// ccbridge connect page: plain JS, same-origin calls to the auth API with the caller's token.
// The caller token comes from the URL fragment (#token=…, never sent to a server) or the form;
// it is kept in memory only. No OAuth token ever reaches this page.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let callerToken = null;

  const FRIENDLY = {
    "unauthorized": "Your ccbridge token was refused (missing, invalid or expired). Get a fresh one from your platform.",
    "forbidden-token": "Your ccbridge token is not meant for this service. Get one issued for ccbridge.",
    "invalid-code-format": "That is not the code Claude showed. Copy the whole code, including the part after “#”.",
    "invalid-state": "This login expired or was already used. Click “Connect Claude Code” to start again.",
    "forbidden-state": "This code belongs to a login someone else started. Click “Connect Claude Code” to start your own.",
    "invalid-code": "Claude rejected this code (used or expired). Click “Connect Claude Code” to start again.",
    "rate-limited": "Too many attempts. Wait a moment and try again.",
    "too-many-pending-logins": "You have too many logins in progress. Finish one, or wait a few minutes.",
    "upstream-rate-limited": "Claude's servers are busy. Try the same code again in a moment.",
    "upstream-error": "Claude's servers could not be reached. Try the same code again in a moment.",
    "upstream-timeout": "Claude's servers did not answer in time. Try the same code again in a moment.",
    "upstream-bad-response": "Claude's servers answered something unexpected. Start again; if it persists, tell your administrator.",
    "vault-key-unavailable": "ccbridge is still starting up. Try again in a moment.",
    "store-unavailable": "ccbridge is busy. Try again in a moment.",
    "bus-unavailable": "ccbridge could not store the connection. Click “Connect Claude Code” to start again.",
    "vault-unavailable": "ccbridge's vault is not answering right now, so the status is unknown.",
    "vault-bad-reply": "ccbridge's vault answered something unexpected.",
    "starting": "ccbridge is starting up. Try again in a moment.",
    "payload-too-large": "That is far too long to be a code.",
  };

  class ApiError extends Error {
    constructor(problem, status) {
      super((problem && problem.detail) || ("HTTP " + status));
      this.problem = problem || {};
      this.status = status;
      this.slug = String(this.problem.type || "").split("/").pop();
      this.retryAfter = null;
    }
  }

  function show(kind, text, detail) {
    const box = $("message");
    box.hidden = false;
    box.className = "message " + kind;
    box.textContent = "";
    const main = document.createElement("strong");
    main.textContent = text;
    box.appendChild(main);
    if (detail && detail !== text) {
      const small = document.createElement("span");
      small.className = "detail";
      small.textContent = detail;
      box.appendChild(small);
    }
  }

  function showError(err) {
    if (err instanceof ApiError) {
      let text = FRIENDLY[err.slug] || err.message;
      if (err.retryAfter) text += " (retry in " + err.retryAfter + " s)";
      show("error", text, err.problem.detail);
    } else {
      show("error", "Could not reach ccbridge. Check your connection and try again.", String(err && err.message || err));
    }
  }

  async function api(method, path, body) {
    if (!callerToken) throw new ApiError({ type: "/unauthorized", detail: "No ccbridge token yet: enter it in step 1." }, 401);
    const init = { method: method, headers: { "Authorization": "Bearer " + callerToken, "Accept": "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const err = new ApiError(data, response.status);
      err.retryAfter = response.headers.get("Retry-After");
      throw err;
    }
    return data;
  }

  function busy(button, on) {
    button.disabled = on;
    button.setAttribute("aria-busy", on ? "true" : "false");
  }

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return isNaN(d) ? "—" : d.toLocaleString();
  }

  const STATE_TEXT = {
    "connected": "Connected",
    "refresh_failed": "Connected — last refresh failed, retrying",
    "reconnect_required": "Reconnect needed",
    "not_connected": "Not connected",
  };

  function renderStatus(s) {
    const state = $("status-state");
    state.dataset.state = s.state;
    state.textContent = STATE_TEXT[s.state] || s.state;
    const a = s.account || {};
    const who = [a.email, a.organization_name].filter(Boolean).join(" · ");
    $("status-account").textContent = who || (s.kind === "setup_token" ? "Long-lived token" : "—");
    $("status-expires").textContent = when(s.expires_at);
    $("status-login-expires").textContent = when(s.login_expires_at);
    $("status-scopes").textContent = (s.scopes && s.scopes.length) ? s.scopes.join(" ") : "—";
    $("disconnect").disabled = !s.connected;
  }

  function renderStatusUnknown(text) {
    const state = $("status-state");
    state.dataset.state = "unknown";
    state.textContent = text;
  }

  async function refreshStatus(quiet) {
    if (!callerToken) { renderStatusUnknown("Unknown — enter your ccbridge token"); return; }
    try {
      renderStatus(await api("GET", "/v1/claude-code/status"));
    } catch (err) {
      renderStatusUnknown(err instanceof ApiError && FRIENDLY[err.slug] ? FRIENDLY[err.slug] : "Unknown");
      if (!quiet) showError(err);
    }
  }

  function setCaller(token, fromLink) {
    callerToken = token || null;
    $("caller-linked").hidden = !(fromLink && callerToken);
    $("caller-form").hidden = Boolean(fromLink && callerToken);
    for (const id of ["connect-button", "paste-submit", "status-refresh"]) $(id).disabled = !callerToken;
    refreshStatus(true);
  }

  function tokenFromFragment() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const token = params.get("token");
    if (token) {
      // Do not leave the token in the address bar or the history.
      history.replaceState(null, "", location.pathname + location.search);
    }
    return token ? token.trim() : null;
  }

  $("caller-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("caller-token").value.trim();
    $("caller-token").value = "";
    if (!token) { show("error", "Enter the ccbridge token your platform gave you."); return; }
    $("message").hidden = true;
    setCaller(token, false);
  });

  $("caller-change").addEventListener("click", () => {
    $("caller-linked").hidden = true;
    $("caller-form").hidden = false;
    $("caller-token").focus();
  });

  $("connect-button").addEventListener("click", async () => {
    const button = $("connect-button");
    busy(button, true);
    try {
      const accountType = document.querySelector("input[name=account-type]:checked").value;
      const started = await api("POST", "/v1/claude-code/login", {
        account_type: accountType,
        create_api_key: $("create-api-key").checked,
      });
      $("authorize-link").href = started.authorize_url;
      $("authorize-hint").hidden = false;
      window.open(started.authorize_url, "_blank", "noopener,noreferrer");
      show("info", "Approve in the new tab, then paste the code Claude shows into step 3.");
      $("paste-box").focus();
    } catch (err) {
      showError(err);
    } finally {
      busy(button, false);
    }
  });

  $("paste-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const pasted = $("paste-box").value.trim();
    if (!pasted) { show("error", "Paste the code Claude showed after you approved."); return; }
    const button = $("paste-submit");
    busy(button, true);
    try {
      const done = await api("POST", "/v1/claude-code/exchange", { code: pasted });
      $("paste-box").value = "";
      $("authorize-hint").hidden = true;
      show("success", "Connected. Claude Code is ready in your sandboxes.",
        "Access renews automatically; this login is valid until you disconnect or it expires.");
      renderStatus({ connected: true, state: "connected", scopes: done.scopes, expires_at: done.expires_at });
      refreshStatus(true);
    } catch (err) {
      showError(err);
    } finally {
      busy(button, false);
    }
  });

  $("status-refresh").addEventListener("click", () => refreshStatus(false));

  $("disconnect").addEventListener("click", async () => {
    const button = $("disconnect");
    busy(button, true);
    try {
      await api("DELETE", "/v1/claude-code");
      show("success", "Disconnected. Sandboxes will no longer get your Claude credentials.");
      renderStatus({ connected: false, state: "not_connected", scopes: [] });
    } catch (err) {
      showError(err);
    } finally {
      busy(button, false);
    }
  });

  setCaller(tokenFromFragment(), true);
})();
