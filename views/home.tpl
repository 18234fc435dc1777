<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chat</title>
<style>
  :root { color-scheme: light dark; --bg: #fff; --fg: #1b1b1b; --muted: #666; --line: #d0d0d0;
          --panel: #f4f4f5; --accent: #2563eb; --on-accent: #fff; --ok: #15803d; --warn: #b45309; --bad: #b91c1c; }
  @media (prefers-color-scheme: dark) {
    :root { --bg: #16171a; --fg: #e6e6e6; --muted: #9a9a9a; --line: #33353a;
            --panel: #1f2125; --accent: #60a5fa; --on-accent: #0b1220; --ok: #4ade80; --warn: #fbbf24; --bad: #f87171; }
  }
  * { box-sizing: border-box; }
  html, body { height: 100%; margin: 0; }
  body { display: flex; flex-direction: column; height: 100vh; height: 100dvh; background: var(--bg); color: var(--fg);
         font: 16px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  header { display: flex; align-items: baseline; justify-content: space-between; gap: 1em;
           padding: .5em 1em; border-bottom: 1px solid var(--line); background: var(--panel); }
  h1 { font-size: 1.1em; margin: 0; }
  #status { font-size: .9em; color: var(--muted); }
  body[data-state="open"] #status { color: var(--ok); }
  body[data-state="reconnecting"] #status { color: var(--warn); }
  body[data-state="closed"] #status { color: var(--bad); }
  /* overflow-anchor:none: we do our own scroll management, the browser must not also do it. */
  #log { flex: 1 1 auto; min-height: 0; overflow-y: auto; overflow-anchor: none; padding: .5em 1em; }
  #log .line { white-space: pre-wrap; overflow-wrap: anywhere; padding: .1em 0; }
  #log .sys { color: var(--muted); font-style: italic; }
  #notice { min-height: 1.4em; padding: 0 1em; font-size: .85em; color: var(--bad); }
  form { display: flex; gap: .5em; padding: .5em 1em calc(.5em + env(safe-area-inset-bottom));
         border-top: 1px solid var(--line); background: var(--panel); }
  #msg { flex: 1 1 auto; min-width: 0; font: inherit; padding: .5em .6em; color: inherit; background: var(--bg);
         border: 1px solid var(--line); border-radius: 6px; }
  #msg:focus { outline: 2px solid var(--accent); outline-offset: -1px; }
  button { font: inherit; padding: .5em 1em; border: 0; border-radius: 6px; background: var(--accent); color: var(--on-accent); cursor: pointer; }
  .visually-hidden { position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; overflow: hidden;
                     clip: rect(0 0 0 0); white-space: nowrap; border: 0; }
</style>
</head>
<body data-state="connecting">
<header>
  <h1>Chat</h1>
  <div id="status" role="status">Connecting…</div>
</header>
<div id="log" role="log" aria-live="polite"></div>
<div id="notice" aria-live="polite"></div>
<form id="form" autocomplete="off">
  <label for="msg" class="visually-hidden">Message</label>
  <input type="text" id="msg" maxlength="{{max_message_size}}" placeholder="Type a message…" autofocus>
  <button type="submit">Send</button>
</form>
<script>
(function () {
  "use strict";
  var MAX_BYTES = {{max_message_size}};
  var MAX_LINES = 1000;
  var BOTTOM_TOLERANCE = 4;             // px: "at bottom" despite sub-pixel rounding
  var BASE_DELAY = 500, MAX_DELAY = 10000;
  var NO_RETRY = { 1008: "policy violation", 1009: "message too big" };

  var log = document.getElementById("log");
  var form = document.getElementById("form");
  var msg = document.getElementById("msg");
  var statusEl = document.getElementById("status");
  var notice = document.getElementById("notice");

  var conn = null, attempts = 0, retryTimer = null, tickTimer = null, noticeTimer = null, stopped = false;
  var scrollCarry = 0;
  var encoder = window.TextEncoder ? new TextEncoder() : null;

  function setState(state, text) {
    document.body.dataset.state = state;   // test hook: connecting | open | reconnecting | closed
    statusEl.textContent = text;
  }

  function showNotice(text) {
    notice.textContent = text;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(function () { notice.textContent = ""; }, 4000);
  }

  // Scroll rule: follow new lines only if the reader was already at the bottom
  // (measured BEFORE appending); if they scrolled up, leave their position alone.
  function appendLine(text, cls) {
    var atBottom = log.scrollHeight - log.scrollTop - log.clientHeight <= BOTTOM_TOLERANCE;
    var div = document.createElement("div");
    div.className = cls ? "line " + cls : "line";
    div.textContent = text;
    log.appendChild(div);
    // Cap the DOM; when the reader is scrolled up, shift scrollTop by the removed
    // height so the lines they are looking at don't jump.
    // (Heights are fractional but scrollTop snaps to device pixels, so carry the
    // remainder to the next correction instead of drifting by a bit each time.)
    var removed = 0;
    while (log.childNodes.length > MAX_LINES) {
      removed += log.firstChild.getBoundingClientRect().height;
      log.removeChild(log.firstChild);
    }
    if (atBottom) {
      log.scrollTop = log.scrollHeight;
      scrollCarry = 0;
    } else if (removed) {
      var target = Math.max(0, log.scrollTop - removed + scrollCarry);
      log.scrollTop = target;
      scrollCarry = target - log.scrollTop;
    }
  }

  function clearTimers() {
    clearTimeout(retryTimer); clearInterval(tickTimer);
    retryTimer = tickTimer = null;
  }

  // Backoff: 0.5 s doubling per failed attempt, capped at 10 s, with ±20% jitter
  // so many clients don't reconnect in lockstep after a server restart.
  // "immediate" (close 1001 = server going away/restarting) retries after a tiny jitter.
  function scheduleReconnect(immediate) {
    clearTimers();
    var delay = immediate ? Math.random() * 250
      : Math.min(MAX_DELAY, BASE_DELAY * Math.pow(2, attempts)) * (0.8 + Math.random() * 0.4);
    attempts++;
    var due = Date.now() + delay;
    function tick() {
      var s = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setState("reconnecting", "Reconnecting in " + s + " s…");
    }
    tick();
    tickTimer = setInterval(tick, 250);
    retryTimer = setTimeout(connect, delay);
  }

  function connect() {
    clearTimers();
    if (stopped) return;
    setState(attempts ? "reconnecting" : "connecting", attempts ? "Reconnecting…" : "Connecting…");
    var proto = location.protocol === "https:" ? "wss://" : "ws://";
    var ws;
    try {
      ws = new WebSocket(proto + location.host + "/ws");
    } catch (e) {
      scheduleReconnect(false);
      return;
    }
    conn = ws;
    ws.onopen = function () {
      attempts = 0;                      // successful open resets the backoff
      setState("open", "Connected");
      notice.textContent = "";
    };
    ws.onmessage = function (evt) {
      appendLine(String(evt.data));      // one chat line per message
    };
    ws.onclose = function (evt) {
      if (conn !== ws) return;
      conn = null;
      if (stopped) return;
      // 1008/1009: the server rejected us on purpose; retrying would just repeat it.
      if (NO_RETRY[evt.code]) {
        setState("closed", "Connection closed: " + (evt.reason || NO_RETRY[evt.code]) + " (" + evt.code + ")");
        return;
      }
      scheduleReconnect(evt.code === 1001);
    };
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = msg.value.trim();
    if (!text) return;
    // maxlength counts UTF-16 units; the server limit is UTF-8 bytes.
    var bytes = encoder ? encoder.encode(text).length : text.length;
    if (bytes > MAX_BYTES) {
      showNotice("Message too long (" + bytes + " of " + MAX_BYTES + " bytes).");
      return;
    }
    if (!conn || conn.readyState !== WebSocket.OPEN) {
      showNotice("Not connected — your message was kept; send it again once connected.");
      return;                            // keep the input as typed
    }
    conn.send(text);
    msg.value = "";
    notice.textContent = "";
    msg.focus();
  });

  if (!window.WebSocket) {
    appendLine("Your browser does not support WebSockets.", "sys");
    setState("closed", "Connection closed.");
    return;
  }

  // Coming back online: don't sit out the rest of a long backoff.
  window.addEventListener("online", function () { if (retryTimer) { attempts = 0; connect(); } });
  // Leaving the page: close cleanly without scheduling a retry (also lets bfcache work).
  window.addEventListener("pagehide", function () { stopped = true; clearTimers(); if (conn) conn.close(); });
  window.addEventListener("pageshow", function (e) { if (e.persisted) { stopped = false; attempts = 0; connect(); } });

  connect();
})();
</script>
</body>
</html>
