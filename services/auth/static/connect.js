// ccbridge connect page: plain JS, same-origin calls to the auth API with the caller's token.
// The caller token comes from the URL fragment (#token=…, never sent to a server) or the form;
// it is kept in memory only and never shown. No OAuth token ever reaches this page.
//
// Account-linking safety: a link can carry ANYONE's caller token. So the page says whose ccbridge
// account it would connect (the user id the status route answers, shown as text) and nothing
// starts a login until the person ticks a confirmation naming that account.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  // shared.events.SandboxId: a sandbox id is also a path segment, so check it before use.
  const SANDBOX_ID = /^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$/;

  const state = {
    token: null,        // the caller token (memory only)
    userId: null,       // whose account: from GET /v1/claude-code/status
    confirmedFor: null, // the user id the person confirmed, or null
    connected: false,   // the vault holds a connection for this caller
  };

  const FRIENDLY = {
    "unauthorized": "Your ccbridge token was refused (missing, invalid or expired). Get a fresh one from your platform.",
    "forbidden-token": "Your ccbridge token is not meant for this service. Get one issued for ccbridge.",
    "invalid-code-format": "That is not the code Claude showed. Copy the whole code, including the part after “#”.",
    "invalid-state": "This login expired or was already used. Click “Connect Claude Code” to start again.",
    "forbidden-state": "This code belongs to a login someone else started. Click “Connect Claude Code” to start your own.",
    "invalid-code": "Claude rejected this code. Check that you copied all of it and paste it again, or click “Connect Claude Code” to start again.",
    "rate-limited": "Too many attempts. Wait a moment and try again.",
    "too-many-pending-logins": "You have too many logins in progress. Finish one, or wait a few minutes.",
    "upstream-rate-limited": "Claude's servers are busy. Try the same code again in a moment.",
    "upstream-error": "Claude's servers could not be reached. Try the same code again in a moment.",
    "upstream-timeout": "Claude's servers did not answer in time. Try the same code again in a moment.",
    "upstream-bad-response": "Claude's servers answered something unexpected. Start again; if it persists, tell your administrator.",
    "vault-key-unavailable": "ccbridge is still starting up. Try again in a moment.",
    "store-unavailable": "ccbridge is busy. Try again in a moment.",
    "bus-unavailable": "ccbridge could not pass this on. Try again in a moment.",
    "vault-unavailable": "ccbridge's vault is not answering right now, so the status is unknown.",
    "vault-bad-reply": "ccbridge's vault answered something unexpected.",
    "starting": "ccbridge is starting up. Try again in a moment.",
    "payload-too-large": "That is far too long to be a code.",
    "invalid-request": "ccbridge could not use that request.",
  };

  const MODE_TEXT = {
    "access_only": "access token only",
    "env": "access token, as an environment variable",
    "file": "whole login (can refresh)",
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

  // One message region at the top. An error is made an alert, scrolled into view and focused,
  // so it is seen (and read out) wherever on the page the person acted.
  function show(kind, text, detail) {
    const box = $("message");
    box.hidden = false;
    box.className = "message " + kind;
    box.setAttribute("role", kind === "error" ? "alert" : "status");
    box.setAttribute("aria-live", kind === "error" ? "assertive" : "polite");
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
    if (kind === "error") {
      box.focus({ preventScroll: true });
      box.scrollIntoView({ block: "center" });
    } else {
      box.scrollIntoView({ block: "nearest" });
    }
  }

  function hideMessage() {
    $("message").hidden = true;
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
    if (!state.token) throw new ApiError({ type: "/unauthorized", detail: "No ccbridge token yet: enter it in step 1." }, 401);
    const init = { method: method, headers: { "Authorization": "Bearer " + state.token, "Accept": "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    if (response.status !== 204) {
      try { data = await response.json(); } catch (e) { data = null; }
    }
    if (!response.ok) {
      const err = new ApiError(data, response.status);
      err.retryAfter = response.headers.get("Retry-After");
      throw err;
    }
    return data;
  }

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return isNaN(d) ? "—" : d.toLocaleString();
  }

  // --- which buttons can act ------------------------------------------------------------------
  function confirmed() {
    return Boolean(state.token && state.userId && $("confirm-account").checked && state.confirmedFor === state.userId);
  }

  const busyButtons = new Set(); // buttons whose request is under way

  function updateButtons() {
    const has = Boolean(state.token);
    $("confirm-account").disabled = !(has && state.userId);
    $("connect-button").disabled = busyButtons.has("connect-button") || !confirmed();
    $("paste-submit").disabled = busyButtons.has("paste-submit") || !confirmed() || !$("paste-box").value.trim();
    $("status-refresh").disabled = busyButtons.has("status-refresh") || !has;
    $("disconnect").disabled = busyButtons.has("disconnect") || !(has && state.connected);
    $("grants-refresh").disabled = busyButtons.has("grants-refresh") || !has;
    if ($("disconnect").disabled) $("disconnect-confirm").hidden = true;
  }

  async function whileBusy(id, work) {
    const button = $(id);
    busyButtons.add(id);
    button.setAttribute("aria-busy", "true");
    updateButtons();
    try {
      return await work();
    } finally {
      busyButtons.delete(id);
      button.setAttribute("aria-busy", "false");
      updateButtons();
    }
  }

  // --- whose account --------------------------------------------------------------------------
  function setUser(userId) {
    if (userId !== state.userId) {
      state.confirmedFor = null;       // a new account needs its own confirmation
      $("confirm-account").checked = false;
    }
    state.userId = userId || null;
    const known = Boolean(state.userId);
    $("caller-who").dataset.known = known ? "true" : "false";
    $("caller-user").textContent = known ? state.userId : "(not known yet)";
    $("confirm-user").textContent = known ? state.userId : "(not known yet)";
    updateButtons();
  }

  // --- status ---------------------------------------------------------------------------------
  const STATE_TEXT = {
    "connected": "Connected",
    "refresh_failed": "Connected — last refresh failed, retrying",
    "reconnect_required": "Reconnect needed",
    "not_connected": "Not connected",
  };

  function renderStatus(s) {
    const el = $("status-state");
    el.dataset.state = s.state;
    el.textContent = STATE_TEXT[s.state] || s.state;
    const a = s.account || {};
    const who = [a.email, a.organization_name].filter(Boolean).join(" · ");
    $("status-account").textContent = who || (s.kind === "setup_token" ? "Long-lived token" : "—");
    $("status-expires").textContent = when(s.expires_at);
    $("status-login-expires").textContent = when(s.login_expires_at);
    $("status-scopes").textContent = (s.scopes && s.scopes.length) ? s.scopes.join(" ") : "—";
    state.connected = Boolean(s.connected);
    updateButtons();
  }

  function renderStatusUnknown(text) {
    const el = $("status-state");
    el.dataset.state = "unknown";
    el.textContent = text;
    state.connected = false;
    updateButtons();
  }

  async function refreshStatus(quiet) {
    if (!state.token) { renderStatusUnknown("Unknown — enter your ccbridge token"); return; }
    try {
      const s = await api("GET", "/v1/claude-code/status");
      setUser(s.user_id);
      renderStatus(s);
    } catch (err) {
      const refused = err instanceof ApiError && (err.status === 401 || err.status === 403);
      if (refused) setUser(null);
      renderStatusUnknown(err instanceof ApiError && FRIENDLY[err.slug] ? FRIENDLY[err.slug] : "Unknown");
      if (!quiet || refused) showError(err); // a refused token is always said: nothing works without one
    }
  }

  // --- grants: sandboxes holding the login ----------------------------------------------------
  function leaseItem(lease) {
    const li = document.createElement("li");
    li.className = "lease";
    li.dataset.sandboxId = lease.sandbox_id;
    const text = document.createElement("div");
    text.className = "lease-text";
    const name = document.createElement("strong");
    name.className = "lease-id";
    name.textContent = lease.sandbox_id;
    const meta = document.createElement("span");
    meta.className = "lease-meta";
    meta.textContent = (MODE_TEXT[lease.mode] || lease.mode) + " · until " + when(lease.expires_at) +
      " · last handed over " + (lease.last_injected_at ? when(lease.last_injected_at) : "not yet");
    text.append(name, meta);

    const end = document.createElement("button");
    end.type = "button";
    end.className = "danger lease-end";
    end.textContent = "End";
    end.setAttribute("aria-label", "End the grant of " + lease.sandbox_id);

    const ask = document.createElement("div");
    ask.className = "confirm-box lease-confirm";
    ask.hidden = true;
    const question = document.createElement("p");
    question.textContent = "End the grant of " + lease.sandbox_id + "? It loses your Claude login now.";
    const yes = document.createElement("button");
    yes.type = "button";
    yes.className = "danger lease-end-yes";
    yes.textContent = "Yes, end it";
    const no = document.createElement("button");
    no.type = "button";
    no.className = "lease-end-no";
    no.textContent = "Keep it";
    const row = document.createElement("div");
    row.className = "row";
    row.append(yes, no);
    ask.append(question, row);

    end.addEventListener("click", () => { ask.hidden = false; end.disabled = true; yes.focus(); });
    no.addEventListener("click", () => { ask.hidden = true; end.disabled = false; end.focus(); });
    yes.addEventListener("click", async () => {
      yes.disabled = no.disabled = true;
      try {
        await endGrant(lease.sandbox_id);
      } finally {
        yes.disabled = no.disabled = false;
      }
    });
    li.append(text, end, ask);
    return li;
  }

  function renderGrants(grants) {
    const list = $("grants-list");
    list.textContent = "";
    for (const lease of grants) {
      if (SANDBOX_ID.test(lease.sandbox_id)) list.appendChild(leaseItem(lease));
    }
    $("grants-empty").hidden = list.children.length > 0;
    $("grants-empty").textContent = "No sandbox holds your Claude login right now.";
  }

  async function refreshGrants(quiet) {
    if (!state.token) {
      $("grants-list").textContent = "";
      $("grants-empty").hidden = false;
      $("grants-empty").textContent = "Unknown — enter your ccbridge token.";
      return;
    }
    try {
      const data = await api("GET", "/v1/claude-code/grants");
      renderGrants(data.grants || []);
    } catch (err) {
      $("grants-list").textContent = "";
      $("grants-empty").hidden = false;
      $("grants-empty").textContent = err instanceof ApiError && FRIENDLY[err.slug] ? FRIENDLY[err.slug] : "Unknown.";
      if (!quiet) showError(err);
    }
  }

  async function endGrant(sandboxId) {
    if (!SANDBOX_ID.test(sandboxId)) return;
    try {
      await api("DELETE", "/v1/claude-code/grants/" + encodeURIComponent(sandboxId));
      show("success", "Ended: " + sandboxId + " no longer gets your Claude login.");
    } catch (err) {
      showError(err);
    }
    await refreshGrants(true);
  }

  // --- the caller token -----------------------------------------------------------------------
  function setCaller(token, fromLink) {
    state.token = token || null;
    $("caller-linked").hidden = !(fromLink && state.token);
    $("caller-form").hidden = Boolean(fromLink && state.token);
    state.connected = false;
    setUser(null);
    refreshStatus(true);
    refreshGrants(true);
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
    hideMessage();
    setCaller(token, false);
  });

  $("caller-change").addEventListener("click", () => {
    $("caller-linked").hidden = true;
    $("caller-form").hidden = false;
    $("caller-token").focus();
  });

  $("confirm-account").addEventListener("change", () => {
    state.confirmedFor = $("confirm-account").checked ? state.userId : null;
    updateButtons();
  });

  // --- connect --------------------------------------------------------------------------------
  $("connect-button").addEventListener("click", () => {
    if (!confirmed()) return; // never start a login for an account the person did not confirm
    whileBusy("connect-button", async () => {
      try {
        const accountType = document.querySelector("input[name=account-type]:checked").value;
        const started = await api("POST", "/v1/claude-code/login", {
          account_type: accountType,
          create_api_key: $("create-api-key").checked,
        });
        if (!confirmed()) return; // the account changed while the login was being made
        $("authorize-link").href = started.authorize_url;
        $("authorize-hint").hidden = false;
        window.open(started.authorize_url, "_blank", "noopener,noreferrer");
        show("info", "Approve in the new tab, then paste the code Claude shows into step 3.");
        $("paste-box").focus();
      } catch (err) {
        showError(err);
      }
    });
  });

  $("paste-box").addEventListener("input", updateButtons);

  $("paste-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!confirmed()) return;
    const pasted = $("paste-box").value.trim();
    if (!pasted) return;
    whileBusy("paste-submit", async () => {
      try {
        const done = await api("POST", "/v1/claude-code/exchange", { code: pasted });
        $("paste-box").value = "";
        $("authorize-hint").hidden = true;
        show("success", "Connected. Claude Code is ready in the sandboxes you allow.",
          "Access renews automatically; this login is valid until you disconnect or it expires.");
        renderStatus({ connected: true, state: "connected", scopes: done.scopes, expires_at: done.expires_at });
        refreshStatus(true);
      } catch (err) {
        showError(err);
      }
    });
  });

  // --- status and disconnect ------------------------------------------------------------------
  $("status-refresh").addEventListener("click", () => whileBusy("status-refresh", async () => {
    await refreshStatus(false);
    await refreshGrants(true);
  }));

  $("disconnect").addEventListener("click", () => {
    $("disconnect-question").textContent = "Disconnect Claude from the ccbridge account " + (state.userId || "") +
      "? Every sandbox loses your Claude login.";
    $("disconnect-confirm").hidden = false;
    $("disconnect-yes").focus();
  });

  $("disconnect-cancel").addEventListener("click", () => {
    $("disconnect-confirm").hidden = true;
    $("disconnect").focus();
  });

  $("disconnect-yes").addEventListener("click", () => {
    $("disconnect-confirm").hidden = true;
    whileBusy("disconnect", async () => {
      try {
        await api("DELETE", "/v1/claude-code");
        show("success", "Disconnected. Sandboxes will no longer get your Claude credentials.");
        renderStatus({ connected: false, state: "not_connected", scopes: [] });
      } catch (err) {
        showError(err);
      }
    });
  });

  $("grants-refresh").addEventListener("click", () => whileBusy("grants-refresh", () => refreshGrants(false)));

  setCaller(tokenFromFragment(), true);
})();
