<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chat</title>
<style>
  :root { color-scheme: light dark; --bg: #fff; --fg: #1b1b1b; --muted: #5f5f5f; --line: #d0d0d0;
          --panel: #f4f4f5; --accent: #2563eb; --on-accent: #fff; --nick: #1d4ed8; --own: #eef4ff;
          --ok: #15803d; --warn: #b45309; --bad: #b91c1c; --on-bad: #fff; --mention: #fff5cc; }
  @media (prefers-color-scheme: dark) {
    :root { --bg: #16171a; --fg: #e6e6e6; --muted: #a0a0a0; --line: #33353a;
            --panel: #1f2125; --accent: #60a5fa; --on-accent: #0b1220; --nick: #93c5fd; --own: #1c2433;
            --ok: #4ade80; --warn: #fbbf24; --bad: #f87171; --on-bad: #1b1b1b; --mention: #3a3113; }
  }
  * { box-sizing: border-box; }
  [hidden] { display: none !important; }
  html, body { height: 100%; margin: 0; }
  body { display: flex; flex-direction: column; height: 100vh; height: 100dvh; background: var(--bg); color: var(--fg);
         font: 16px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  button, input { font: inherit; color: inherit; }
  input { min-width: 0; padding: .45em .6em; background: var(--bg); border: 1px solid var(--line); border-radius: 6px; }
  input:focus-visible, button:focus-visible, summary:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
  button { padding: .45em .9em; border: 1px solid var(--line); border-radius: 6px; background: var(--bg); cursor: pointer; }
  button.primary { border-color: var(--accent); background: var(--accent); color: var(--on-accent); }
  .error { min-height: 1.4em; font-size: .85em; color: var(--bad); }
  .visually-hidden { position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; overflow: hidden;
                     clip: rect(0 0 0 0); white-space: nowrap; border: 0; }

  /* One line, whatever the status says ("Reconnecting in 10 s…", a close's reason): a header
     that wrapped would push the log down and hide half of its newest line on a phone. What does
     not fit ends in an ellipsis (a screen reader reads the whole status all the same). */
  header { display: flex; flex-wrap: nowrap; align-items: center; gap: 1em; padding: .5em 1em;
           border-bottom: 1px solid var(--line); background: var(--panel); }
  h1 { flex: none; font-size: 1.1em; margin: 0 auto 0 0; }
  #me { display: flex; align-items: center; flex: 0 1 auto; min-width: 0; white-space: nowrap; }
  #me .you-are { white-space: pre; }
  #my-nick { min-width: 0; overflow: hidden; text-overflow: ellipsis; }
  #me button, #me .role { flex: none; }
  #me button { padding: .1em .5em; font-size: .85em; margin-left: .3em; }
  #status { flex: 0 1 auto; min-width: 0; overflow: hidden; white-space: nowrap; text-overflow: ellipsis;
            font-size: .9em; font-variant-numeric: tabular-nums; color: var(--muted); }
  body[data-state="open"] #status { color: var(--ok); }
  body[data-state="reconnecting"] #status { color: var(--warn); }
  body[data-state="closed"] #status { color: var(--bad); }
  body[data-state="signed-out"] #status { color: var(--warn); }
  .role { display: inline-block; padding: 0 .4em; margin-left: .4em; border: 1px solid var(--accent); border-radius: 1em;
          font-size: .75em; font-weight: 600; font-style: normal; color: var(--fg); vertical-align: middle; }

  #signin { padding: .6em 1em; border-bottom: 1px solid var(--line); background: var(--panel); }
  #signin h2 { font-size: 1em; margin: 0 0 .2em; }
  #signin p { margin: 0 0 .4em; }
  #signin .row { flex-wrap: wrap; }
  #signin a { color: var(--accent); font-weight: 600; }

  #nick-form { display: flex; flex-wrap: wrap; align-items: center; gap: .3em .5em; padding: .6em 1em;
               border-bottom: 1px solid var(--line); background: var(--panel); }
  #nick-form .error { flex-basis: 100%; }

  #main { flex: 1 1 auto; min-height: 0; display: flex; }
  #side { flex: 0 0 15em; overflow-y: auto; border-right: 1px solid var(--line); background: var(--panel); }
  #side summary, .members summary { padding: .5em 1em; cursor: pointer; font-weight: 600; }
  #room-form { padding: 0 1em; }
  #room-form label { display: block; font-size: .9em; }
  .row { display: flex; gap: .4em; align-items: center; }
  .row input { flex: 1 1 auto; }
  #side h2 { font-size: .9em; margin: 0 auto 0 0; }
  #side .row.head { padding: .3em 1em; }
  #room-list { list-style: none; margin: 0; padding: 0 .5em .5em; }
  #room-list button { display: flex; width: 100%; justify-content: space-between; border: 0; background: none; text-align: left; }
  #room-list button:hover { background: var(--bg); }
  #room-list .count { color: var(--muted); }

  #chat { flex: 1 1 auto; min-width: 0; display: flex; flex-direction: column; }
  #tabs { display: flex; overflow-x: auto; border-bottom: 1px solid var(--line); background: var(--panel); }
  .tab { display: flex; align-items: center; border-right: 1px solid var(--line); }
  .tab button { border: 0; border-radius: 0; background: none; color: var(--muted); white-space: nowrap; }
  .tab [role="tab"][aria-selected="true"] { color: var(--fg); background: var(--bg); box-shadow: inset 0 -3px 0 var(--accent); }
  .tab .close { padding: .45em .6em; }
  .tab:only-child .close { display: none; }
  .tab .note { margin-left: .3em; font-size: .8em; color: var(--bad); }
  .badge, .mentions { display: inline-block; min-width: 1.4em; padding: 0 .35em; margin-left: .3em; border-radius: 1em;
                      background: var(--accent); color: var(--on-accent); font-size: .8em; text-align: center; }
  /* Lines that name the user: a badge of their own, another colour and an "@". */
  .mentions { background: var(--bad); color: var(--on-bad); font-weight: 600; }

  /* Every open room is laid out, the inactive ones invisible: each log keeps its own scroll
     position, and the scroll rules below can measure it whether it is shown or not. */
  #panels { position: relative; flex: 1 1 auto; min-height: 0; }
  .room { position: absolute; inset: 0; display: grid; grid-template-columns: 1fr auto; grid-template-rows: 1fr auto;
          visibility: hidden; }
  .room.active { visibility: visible; }
  /* overflow-anchor:none: we do our own scroll management, the browser must not also do it. */
  /* The bottom padding is the typing line's place (below): it shows there without moving
     the newest line, the form or anything else. */
  .log { grid-area: 1 / 1 / 2 / 2; min-height: 0; overflow-y: auto; overflow-anchor: none; padding: .5em 1em 1.6em; }
  .line { white-space: pre-wrap; overflow-wrap: anywhere; padding: .1em .3em; border-left: 3px solid transparent; }
  .line time { color: var(--muted); font-size: .8em; font-variant-numeric: tabular-nums; }
  .line .nick { color: var(--nick); font-weight: 600; }
  .line.own { background: var(--own); border-left-color: var(--accent); }
  .line.mention { background: var(--mention); border-left-color: var(--bad); }
  .line mark { background: none; color: inherit; font-weight: 700; }
  .line a { color: var(--accent); text-decoration: underline; text-underline-offset: .15em; }
  .line a:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
  .line.sys { color: var(--muted); font-size: .85em; font-style: italic; }
  .line.gap { color: var(--warn); font-weight: 600; font-style: normal; margin: .3em 0;
              border-top: 1px dashed var(--warn); border-bottom: 1px dashed var(--warn); }
  .line.sys.removed { color: var(--bad); font-style: normal; }
  .line.sys button { margin-left: .5em; padding: 0 .5em; font-size: .95em; font-style: normal; }
  button[aria-disabled="true"] { opacity: .6; cursor: default; }
  /* Delete: in token mode every line has one, shown on one's own lines and in rooms one
     moderates (the class on the room, so that a refreshed token's `mod` applies at once). */
  .line .del { display: none; margin-left: .5em; padding: 0 .45em; font-size: .8em; color: var(--muted); }
  .line.own .del, .room.moderated .line .del { display: inline-block; }
  .room[data-removed] .line .del { display: none; }   /* out of the room: nothing to act on */
  /* With a mouse they wait for the pointer (or keyboard focus); on a touch screen they show. */
  @media (hover: hover) {
    .line .del { opacity: 0; }
    .line:hover .del, .line .del:focus-visible { opacity: 1; }
  }
  /* "alice is typing…": over the log's bottom padding, under its newest line; as wide as its
     text, so that the scroll bar and the lines above stay in reach (it takes no clicks). */
  .typing { grid-area: 1 / 1 / 2 / 2; align-self: end; justify-self: start; z-index: 1; max-width: calc(100% - 2.5em);
            margin: 0 1em .15em; padding: 0 .4em; overflow: hidden; white-space: nowrap; text-overflow: ellipsis;
            border-radius: 6px; background: var(--bg); color: var(--muted); font-size: .85em; font-style: italic;
            pointer-events: none; }
  .typing:empty { display: none; }
  .line.sys.start { text-align: center; margin-bottom: .3em; border-bottom: 1px solid var(--line); }
  .pending { grid-area: 2 / 1 / 3 / 2; list-style: none; margin: 0; padding: 0 1em; color: var(--muted); font-size: .9em; }
  .pending li { white-space: pre-wrap; overflow-wrap: anywhere; }
  .pending .state { font-style: italic; margin-left: .5em; }
  .members { grid-area: 1 / 2 / 3 / 3; width: 12em; overflow-y: auto; border-left: 1px solid var(--line); }
  .members ul { list-style: none; margin: 0; padding: 0 1em .5em; }
  .members li { overflow-wrap: anywhere; }
  .members .you { color: var(--muted); font-size: .85em; }
  .members .who { padding: 0; border: 0; background: none; text-align: left; overflow-wrap: anywhere;
                  text-decoration: underline dotted; text-underline-offset: .2em; }
  .members .who[aria-expanded="true"] { font-weight: 600; }
  .mod-panel { display: flex; flex-wrap: wrap; gap: .3em; margin: .3em 0 .5em; padding: .4em;
               border: 1px solid var(--line); border-radius: 6px; background: var(--bg); font-size: .9em; }
  .mod-panel label { flex: 1 1 100%; display: flex; flex-direction: column; }
  .mod-panel input, .mod-panel select { width: 100%; min-width: 0; font: inherit; color: inherit; background: var(--bg);
                                        border: 1px solid var(--line); border-radius: 6px; padding: .3em .4em; }
  .mod-panel button { flex: 1 1 auto; padding: .3em .5em; }

  /* No band when there is nothing to say (the log keeps the height); the live region stays. */
  #notice { padding: 0 1em; font-size: .85em; line-height: 1.6; color: var(--bad); }
  #form { display: flex; gap: .5em; padding: .5em 1em calc(.5em + env(safe-area-inset-bottom));
          border-top: 1px solid var(--line); background: var(--panel); }
  #msg { flex: 1 1 auto; padding: .5em .6em; }

  /* A phone: rooms and members fold away above the log, the log takes the height. */
  @media (max-width: 699px) {
    #main { flex-direction: column; }
    #side { flex: 0 0 auto; max-height: 50vh; border-right: 0; border-bottom: 1px solid var(--line); }
    .room { grid-template-columns: 1fr; grid-template-rows: auto 1fr auto; }
    .members { grid-area: 1 / 1 / 2 / 2; width: auto; max-height: 40vh; border-left: 0; border-bottom: 1px solid var(--line); }
    .log, .typing { grid-area: 2 / 1 / 3 / 2; }
    #me .you-are { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
    .pending { grid-area: 3 / 1 / 4 / 2; }
  }
</style>
</head>
<body data-state="connecting">
<header>
  <h1>Chat</h1>
  <div id="me" hidden><span class="you-are">You are </span><strong id="my-nick"></strong><span id="my-role" class="role" hidden>moderator</span><button type="button" id="change-nick">Change</button></div>
  <div id="status" role="status">Connecting…</div>
</header>
<form id="nick-form" autocomplete="off" hidden>
  <label for="nick">Nickname</label>
  <input type="text" id="nick" maxlength="24" autocapitalize="none" spellcheck="false" aria-describedby="nick-error">
  <button type="submit" class="primary">Save</button>
  <button type="button" id="cancel-nick">Cancel</button>
  <div id="nick-error" class="error" aria-live="polite"></div>
</form>
<section id="signin" aria-labelledby="signin-title" hidden>
  <h2 id="signin-title">Sign in to chat</h2>
  <p id="signin-why"></p>
  <div class="row">
    <a id="signin-link" href="" hidden>Sign in</a>
    <button type="button" id="signin-retry">Try again</button>
  </div>
</section>
<div id="main">
  <aside id="side">
    <details id="rooms-box">
      <summary>Rooms</summary>
      <form id="room-form" autocomplete="off">
        <label for="room-input">Open or create a room</label>
        <div class="row">
          <input type="text" id="room-input" maxlength="33" placeholder="room-name" autocapitalize="none"
                 spellcheck="false" aria-describedby="room-error">
          <button type="submit">Open</button>
        </div>
        <div id="room-error" class="error" aria-live="polite"></div>
      </form>
      <div class="row head"><h2>All rooms</h2><button type="button" id="refresh-rooms">Refresh</button></div>
      <ul id="room-list"></ul>
    </details>
  </aside>
  <div id="chat">
    <div id="tabs" role="tablist" aria-label="Open rooms"></div>
    <div id="panels"></div>
  </div>
</div>
<div id="notice" aria-live="polite"></div>
<form id="form" autocomplete="off">
  <label for="msg" class="visually-hidden">Message</label>
  <input type="text" id="msg" maxlength="{{max_message_size}}" placeholder="Type a message…">
  <button type="submit" class="primary">Send</button>
</form>
<script>
/* The chat page, speaking protocol v2 (subprotocol chat.v2, JSON; see the protocol document).

   One connection: hello → welcome, then a join per open room. Per room the page remembers the
   epoch and the last seq it has shown; that is its `since` when it joins again after a
   reconnect, and the rule that keeps every log free of duplicates and in order: a message
   is shown only if its seq follows the last one shown in the same epoch. Lines the user
   sends wait in the outbox, each with a `ref`, until their `ack`; after a reconnect they are
   sent again with the same ref, and the server publishes a ref at most once.

   Two ways to be someone (PAGE.auth, the server's CHAT_AUTH): "open", a nickname the user
   chooses; "token", a token the app's backend signed (hello carries it, the welcome names the
   user; see "Signed identity" in the protocol document). The token comes from PAGE.tokenUrl
   when the server has one, fetched again before it expires and handed over with `refresh` on
   the same connection; else from the URL: /#token=… (a fragment never reaches a server),
   optionally /#token=…&room=dev to open a room, or /?room=dev#token=…. The page then keeps
   it for the tab in sessionStorage, so that the address bar, history and a reload do not show
   it, and rewrites the fragment to the room shown (/#dev) as always. */
(function () {
  "use strict";
  var PAGE = {{!page_config}};             // {auth: "open" | "token", tokenUrl, loginUrl}
  var TOKEN_MODE = PAGE.auth === "token";
  var textLimit = {{max_message_size}};   // bytes of UTF-8; the welcome's limits.text replaces it
  var roomLimit = 16;                     // rooms at once; the welcome's limits.rooms replaces it
  var MAX_LINES = 1000;                   // per log
  var BOTTOM_TOLERANCE = 4;               // px: "at bottom" despite sub-pixel rounding
  var BASE_DELAY = 500, MAX_DELAY = 10000;
  var ROOMS_REFRESH = 30000;              // ms between `rooms` listings while connected
  var ROOMS_AGAIN = 1200;                 // ms after a join: the server's listing may be a second old
  var HISTORY_PAGE = 50;                  // older lines asked for at a time
  var TOP_TRIGGER = 48;                   // px: this near the log's top, the older lines are asked for
  var HISTORY_WAIT = 10000;               // ms: an older-lines request unanswered this long is given up
  var TYPING_EVERY = 2000;                // ms: at most one `typing` per room this often (the server's rule)
  var TYPING_SHOWN = 5000;                // ms: "… is typing" after the last `typing` from that person
  var NO_RETRY = { 1008: "policy violation", 1009: "message too big" };
  var TOKEN_EXPIRED = 4001, DISCONNECTED = 4003;   // close codes: get a new token; the app said go
  var HELLO_TRIES = 2;                    // new tokens fetched for one refused hello, then "sign in"
  var TOKEN_MIN_LEFT = 30;                // s: a token kept for a new hello must have this much left
  var REFRESH_LEAD = 60000;               // ms before `expires` to refresh (a quarter of short tokens)
  var REFRESH_RETRY = 5000;               // ms between refreshes the token URL could not answer
  // How long a ban or a mute lasts: the moderator picks one of these (seconds; "" = no end).
  var DURATIONS = [["600", "10 minutes"], ["3600", "1 hour"], ["86400", "1 day"], ["", "no end"]];
  // The server's rules, checked here too so that a typo is explained before anything is sent.
  var NICK = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,23}$/;
  var ROOM = /^[a-z0-9][a-z0-9_-]{0,31}$/;
  var WIDE = window.matchMedia("(min-width: 700px)");

  var $ = function (id) { return document.getElementById(id); };
  var statusEl = $("status"), notice = $("notice"), form = $("form"), msg = $("msg");
  var nickForm = $("nick-form"), nickInput = $("nick"), nickError = $("nick-error");
  var tabsEl = $("tabs"), panelsEl = $("panels"), roomForm = $("room-form"), roomInput = $("room-input");
  var roomError = $("room-error"), roomList = $("room-list"), roomsBox = $("rooms-box");
  var encoder = new TextEncoder();

  // localStorage may be unavailable (privacy modes): then nothing is remembered, and that is all.
  var store = {
    get: function (key) { try { return localStorage.getItem(key); } catch (e) { return null; } },
    set: function (key, value) { try { localStorage.setItem(key, value); } catch (e) { /* not kept */ } }
  };
  // A token from the URL is kept for this tab only (sessionStorage), never across tabs.
  var tabStore = {
    get: function (key) { try { return sessionStorage.getItem(key); } catch (e) { return null; } },
    set: function (key, value) { try { sessionStorage.setItem(key, value); } catch (e) { /* not kept */ } }
  };
  function randomId(bytes) {
    var a = new Uint8Array(bytes);
    crypto.getRandomValues(a);   // (crypto.randomUUID needs https; this works on plain http too)
    return Array.prototype.map.call(a, function (b) { return (b < 16 ? "0" : "") + b.toString(16); }).join("");
  }
  // The session: made once, kept. Within a room a nick belongs to one session, so this page's
  // tabs and reconnects may hold the same nick at once, and nobody else can.
  var session = store.get("chat.session");
  if (!session) { session = randomId(16); store.set("chat.session", session); }
  // As the user chose it (the welcome normalises it); in token mode, the welcome's name.
  var nick = TOKEN_MODE ? null : store.get("chat.nick");

  var conn = null, welcomed = false, attempts = 0, stopped = false;
  var retryTimer = null, tickTimer = null, roomsTimer = null, noticeTimer = null;
  var roomsAgain = null, roomsAsked = 0;  // the listing asked again after a join; when it was last asked
  var lastJoined = 0;                     // when the last `joined` came
  var legacy = false;                     // this server knows neither `typing` nor `history` (an older one)
  var pace = null;                        // the server's rate limit as we count it (see `spare`), null: none
  var mentionRe = null;                   // "@" + our nick, not inside a longer word (set by the welcome)
  var hiddenMentions = 0;                 // lines naming us that came while the page was hidden
  var rooms = new Map();                  // name → room state, in tab order
  var active = null;                      // name of the room shown
  var outbox = [];                        // lines said but not yet acknowledged, oldest first
  var closeWhy = "";                      // the error that came just before a close (too_many_connections)

  // Token mode: the token the next hello or refresh gives, who it makes us, until when.
  var token = TOKEN_MODE && !PAGE.tokenUrl ? tabStore.get("chat.token") : null;
  var myUser = null, expires = 0, modPatterns = [];
  var helloTries = 0;                     // new tokens tried for this connection's hello
  var signedOut = false;                  // showing "Sign in to chat": connect no more by ourselves
  var connecting = 0;                     // which connect() a fetched token is for (a newer one wins)
  var refreshTimer = null, refreshing = null;   // refreshing: the token a `refresh` in flight gives
  var refreshFetch = null;                // the connection a token fetch for `refresh` is for
  var modPending = new Map();             // ref → the moderation command it was sent with

  function setState(state, text) {
    // Test hook: connecting | open | reconnecting | closed | signed-out (token mode).
    document.body.dataset.state = state;
    statusEl.textContent = text;
    statusEl.title = text;                 // the whole of it, when the header cuts it short
  }

  function showNotice(text) {
    notice.textContent = text;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(function () { notice.textContent = ""; }, 4000);
  }

  function send(command) {
    if (!conn || conn.readyState !== WebSocket.OPEN) return;
    conn.send(JSON.stringify(command));
    if (pace) take(pace);
  }

  // The server counts every command against limits.rate a second (bursts of twice that), and
  // closes a connection going at twice the rate: hints (typing, a listing asked again, older
  // lines) must never cost the user a line or the connection. We count as it does, and send a
  // hint only while at least one command more would still be within the rate.
  function startPace(rate) {
    pace = rate ? { rate: rate, burst: 2 * rate, tokens: 2 * rate - 1, last: Date.now() } : null;   // (-1: the hello)
  }

  function refill(bucket) {
    var now = Date.now();
    bucket.tokens = Math.min(bucket.burst, bucket.tokens + (now - bucket.last) / 1000 * bucket.rate);
    bucket.last = now;
  }

  function take(bucket) {
    refill(bucket);
    if (bucket.tokens >= 1) bucket.tokens -= 1;   // (a command over the rate is refused: it costs nothing)
  }

  function spare() {
    if (!pace) return true;
    refill(pace);
    return pace.tokens >= 2;
  }

  // A hint, if the rate allows: whether it went.
  function hint(command) {
    if (!spare()) return false;
    send(command);
    return true;
  }

  function backoff(attempt) {
    return Math.min(MAX_DELAY, BASE_DELAY * Math.pow(2, attempt)) * (0.8 + Math.random() * 0.4);
  }

  // ---- Rooms: a tab, a log, a member list and the lines waiting to be acknowledged, each.

  function openRoom(name, show) {
    var room = rooms.get(name);
    if (!room) {
      if (rooms.size >= roomLimit) {
        roomFailed("You can have at most " + roomLimit + " rooms open; leave one first.");
        return;
      }
      room = makeRoom(name);
      rooms.set(name, room);
      if (welcomed) join(room);
    }
    if (show) activate(name);
  }

  function makeRoom(name) {
    var room = {
      name: name,
      epoch: null, seq: 0,        // where this log ends: the `since` of the next join
      joined: false,              // true from our `joined` until the connection ends
      failed: null,               // why the server refused to let us in (an error's message)
      removed: null,              // kicked | banned | forbidden: out until the user joins again
      members: new Map(),         // memberKey → {user, nick}
      count: 0, unread: 0, mentions: 0, carry: 0, retry: null,
      modTarget: null, modPanel: null,  // the member whose moderation controls are open, and they
      // Following the newest line: true while the reader is at the bottom (their scrolling says
      // so, nothing else), and pinTop the scrollTop we last saw there. See "The log" below.
      pinned: true, pinTop: 0,
      // Older lines (the `history` command): the oldest seq of this epoch the log has, the line
      // they go after (a new epoch's gap marker; null: the log's top), one request at a time.
      oldest: null, historyAt: null, historyPending: false, historyDone: false, historyRetry: null, startLine: null,
      hushed: null,               // the log's live region is quiet until this timer (older lines went in)
      typers: new Map(),          // memberKey → {nick, timer}: who is typing here, oldest first
      typingSent: 0               // when we last said `typing` here (ms)
    };
    var tab = document.createElement("div");
    tab.className = "tab";
    tab.dataset.room = name;
    tab.setAttribute("role", "presentation");
    var select = document.createElement("button");
    select.type = "button";
    select.id = "tab-" + name;
    select.setAttribute("role", "tab");
    select.setAttribute("aria-controls", "room-" + name);
    select.textContent = "#" + name;
    room.badge = document.createElement("span");
    room.badge.className = "badge";
    room.badge.hidden = true;
    room.mentionBadge = document.createElement("span");
    room.mentionBadge.className = "mentions";
    room.mentionBadge.hidden = true;
    room.note = document.createElement("span");   // "removed", "banned": the tab says we are out
    room.note.className = "note";
    room.note.hidden = true;
    select.append(room.badge, room.mentionBadge, room.note);
    select.addEventListener("click", function () { activate(name); });
    var close = document.createElement("button");
    close.type = "button";
    close.className = "close";
    close.textContent = "×";
    close.setAttribute("aria-label", "Leave " + name);
    close.addEventListener("click", function () { closeRoom(name); });
    tab.append(select, close);
    tabsEl.appendChild(tab);

    var panel = document.createElement("section");
    panel.className = "room";
    panel.id = "room-" + name;
    panel.dataset.room = name;
    panel.dataset.joined = "no";          // test hook: "yes" once the server let us in
    panel.setAttribute("role", "tabpanel");
    panel.setAttribute("aria-labelledby", select.id);
    var log = document.createElement("div");
    log.className = "log";
    log.id = "log-" + name;
    log.setAttribute("role", "log");
    log.setAttribute("aria-live", "polite");
    log.tabIndex = 0;                     // scrollable by keyboard
    log.addEventListener("scroll", function () { scrolled(room); });
    if (resized) resized.observe(log);    // whatever changes its height, a reader at the bottom stays there
    var typing = document.createElement("div");
    typing.className = "typing";
    var pending = document.createElement("ul");
    pending.className = "pending";
    pending.setAttribute("aria-label", "Not yet delivered");
    var members = document.createElement("details");
    members.className = "members";
    members.open = WIDE.matches;          // folded on a phone
    var summary = document.createElement("summary");
    summary.textContent = "Members ";
    room.memberCount = document.createElement("span");
    room.memberCount.className = "count";
    summary.appendChild(room.memberCount);
    room.memberList = document.createElement("ul");
    members.append(summary, room.memberList);
    panel.append(log, typing, pending, members);
    panelsEl.appendChild(panel);
    Object.assign(room, { tab: tab, select: select, panel: panel, log: log, typingLine: typing, pendingList: pending,
                          membersBox: members });
    panel.classList.toggle("moderated", moderates(name));
    return room;
  }

  function activate(name) {
    var room = rooms.get(name);
    if (!room) return;
    active = name;
    rooms.forEach(function (r) {
      r.panel.classList.toggle("active", r === room);
      r.select.setAttribute("aria-selected", r === room ? "true" : "false");
      r.select.tabIndex = r === room ? 0 : -1;
    });
    room.unread = 0;
    room.badge.hidden = true;
    room.mentions = 0;
    room.mentionBadge.hidden = true;
    $("my-role").hidden = !moderates(name);
    $("my-role").title = "You moderate #" + name;
    updateTitle();
    if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
    loadOlderAtTop(room);                  // a log too short to scroll fills itself
  }

  // "#lobby – Chat"; while the page is hidden, "(2) #lobby – Chat": lines naming the user since.
  function updateTitle() {
    document.title = (hiddenMentions ? "(" + hiddenMentions + ") " : "") + (active ? "#" + active + " – " : "") + "Chat";
  }

  function closeRoom(name) {
    var room = rooms.get(name);
    if (!room || rooms.size === 1) return;
    if (welcomed && !room.failed) send({ type: "leave", room: name });
    clearTimeout(room.retry);
    clearTimeout(room.historyRetry);
    clearTimeout(room.hushed);
    clearTypers(room);
    if (resized) resized.unobserve(room.log);
    outbox = outbox.filter(function (entry) {
      if (entry.room === name) clearTimeout(entry.timer);
      return entry.room !== name;
    });
    room.tab.remove();
    room.panel.remove();
    rooms.delete(name);
    if (active === name) activate(rooms.keys().next().value);
  }

  function join(room) {
    room.joined = false;
    room.failed = null;
    room.panel.dataset.joined = "no";
    // Without a position the server sends the recent history; with one, what came after it.
    var command = { type: "join", room: room.name };
    if (room.epoch !== null) command.since = { epoch: room.epoch, seq: room.seq };
    send(command);
  }

  // On a phone the rooms fold away once one is chosen: the log needs the height.
  function foldRoomsOnPhone() {
    if (!WIDE.matches && !roomError.textContent) roomsBox.open = false;
  }

  function roomFailed(text) {
    roomsBox.open = true;
    roomError.textContent = text;
    roomInput.focus();
  }

  // ---- The log: scroll rules and the line cap, per room.
  //
  // A reader at the bottom follows the newest line; one who scrolled up stays where they are.
  // "At the bottom" is what the reader's own scrolling said last (room.pinned), not what a
  // measurement says when a line comes: the log also changes height with nobody scrolling
  // (the "not yet delivered" row under it, a notice, a phone's keyboard), and a reader at the
  // bottom must stay there through all of that. A ResizeObserver on each log puts them back
  // after any such change; appendLine does after each line.

  var resized = window.ResizeObserver ? new ResizeObserver(function (entries) {
    entries.forEach(function (entry) {
      var room = rooms.get(entry.target.parentNode.dataset.room);
      if (room) stick(room);
    });
  }) : null;

  function atBottom(log) {
    return log.scrollHeight - log.scrollTop - log.clientHeight <= BOTTOM_TOLERANCE;
  }

  // Whether the reader follows the newest line. Only scrolling up leaves the bottom, and only
  // that makes scrollTop smaller than where we last pinned it: a log grown shorter keeps its
  // scrollTop, one grown taller is clamped to its (new) bottom, lines added below change nothing.
  function following(room) {
    var log = room.log;
    if (atBottom(log)) room.pinned = true;
    else if (log.scrollTop < room.pinTop - 1) room.pinned = false;
    return room.pinned;
  }

  // Change what sits under a log (a "not yet delivered" row, "… is typing") without losing
  // a reader at the bottom: measured before, put back at once after. (Left to the
  // ResizeObserver, a row that goes and another that comes before it runs look like the
  // reader scrolling up: the browser moved scrollTop down when the log grew.)
  function underLog(room, change) {
    if (!room) return change();
    var follow = following(room);
    change();
    if (follow) stick(room);
  }

  // To the bottom, if the reader follows.
  function stick(room) {
    if (!room.pinned) return;
    var log = room.log;
    log.scrollTop = log.scrollHeight;
    room.pinTop = log.scrollTop;
    room.carry = 0;
  }

  // The reader scrolled (or the log did, to the bottom or clamped): follow or not; at the top,
  // the older lines.
  function scrolled(room) {
    if (following(room)) stick(room);
    loadOlderAtTop(room);
  }

  // Follow new lines only if the reader was already at the bottom (measured BEFORE
  // appending); if they scrolled up, leave their position alone.
  function appendLine(room, div) {
    var log = room.log;
    var follow = following(room);
    speak(room);                           // (after older lines came in quietly: this one is news)
    log.appendChild(div);
    // Cap the DOM; when the reader is scrolled up, shift scrollTop by the removed height so
    // the lines they are looking at don't jump. (Heights are fractional but scrollTop snaps
    // to device pixels, so carry the remainder to the next correction instead of drifting.)
    var removed = 0;
    while (log.childNodes.length > MAX_LINES) {
      removed += log.firstChild.getBoundingClientRect().height;
      forgotten(room, log.firstChild);
      log.removeChild(log.firstChild);
    }
    if (follow) {
      stick(room);
    } else if (removed) {
      var target = Math.max(0, log.scrollTop - removed + room.carry);
      log.scrollTop = target;
      room.carry = target - log.scrollTop;
    }
  }

  // A line the cap takes off the top: the log's history starts later now, and the older
  // lines can be asked for again.
  function forgotten(room, div) {
    if (div === room.startLine) room.startLine = null;
    if (div === room.historyAt) room.historyAt = null;
    if (div.dataset.seq && div.dataset.epoch === room.epoch) {
      room.oldest = Math.max(room.oldest, Number(div.dataset.seq) + 1);
      room.historyDone = false;
    }
  }

  // Older lines go above the ones shown (after a new epoch's marker: `historyAt`), and the
  // reader's view does not move: the first line they can see stays where it is on the screen
  // (overflow-anchor is off: we do it). A reader at the bottom stays at the bottom.
  function prependLines(room, nodes) {
    if (!nodes.length) return;
    var log = room.log;
    var follow = following(room);
    var anchor = firstSeen(log);
    var was = anchor ? anchor.getBoundingClientRect().top : 0;
    var at = room.historyAt && room.historyAt.isConnected ? room.historyAt.nextSibling : log.firstChild;
    var fragment = document.createDocumentFragment();
    fragment.append.apply(fragment, nodes);
    hush(room);
    log.insertBefore(fragment, at);
    if (follow) {
      stick(room);
    } else if (anchor) {
      var target = log.scrollTop + anchor.getBoundingClientRect().top - was + room.carry;
      log.scrollTop = target;
      room.carry = target - log.scrollTop;
    }
  }

  // The log is a live region: a screen reader reads what is added to it. Fifty older lines
  // are not news: the region is quiet while they go in, and speaks again soon after.
  function hush(room) {
    room.log.setAttribute("aria-live", "off");
    clearTimeout(room.hushed);
    room.hushed = setTimeout(function () { speak(room); }, 1000);
  }

  function speak(room) {
    if (room.log.getAttribute("aria-live") === "polite") return;
    clearTimeout(room.hushed);
    room.log.setAttribute("aria-live", "polite");
  }

  // The first line the reader can see (at least its bottom edge), or null.
  function firstSeen(log) {
    var top = log.getBoundingClientRect().top;
    return Array.prototype.find.call(log.children, function (line) {
      return line.getBoundingClientRect().bottom > top;
    }) || null;
  }

  function sysLine(room, text, extra) {
    var div = document.createElement("div");
    div.className = "line sys" + (extra ? " " + extra : "");
    div.textContent = text;
    appendLine(room, div);
    return div;
  }

  // A button that has done its work, or waits for an answer: aria-disabled, not disabled,
  // which would drop the keyboard's focus to the top of the page.
  function setBusy(button, busy) {
    if (busy) button.setAttribute("aria-disabled", "true");
    else button.removeAttribute("aria-disabled");
  }

  function isBusy(button) {
    return button.getAttribute("aria-disabled") === "true";
  }

  // A button at the end of a quiet line (join again, unban…): its name says what and whom.
  function lineButton(div, label, name, action) {
    var button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.setAttribute("aria-label", name);
    button.addEventListener("click", function () {
      if (isBusy(button)) return;
      if (!welcomed) { showNotice("Not connected: try again once connected."); return; }
      setBusy(button, true);               // once is enough
      action();
    });
    div.append(" ", button);
    return button;
  }

  function sameNick(a, b) {
    // Nicks are ASCII after the server's NFKC normalisation, so lower case is their casefold.
    return a !== null && b !== null && a.toLowerCase() === b.toLowerCase();
  }

  // Whether a line is this user's: by user in token mode (names need not be unique), by nick
  // in open mode.
  function isOwn(m) {
    return TOKEN_MODE ? m.user !== null && m.user !== undefined && m.user === myUser : sameNick(m.nick, nick);
  }

  // An event of the room's sequence (a line, a tombstone, a deletion), in order: show it.
  // isNew: live, or replayed after a reconnect (not the history a first join shows).
  function showEvent(room, ev, isNew) {
    if (ev.type === "deleted") {
      removeLine(room, ev.epoch, ev.target, ev.by);
    } else if (isTombstone(ev)) {
      // A tombstone (a deleted line, in a replay): nothing to show, but it counts.
    } else {
      showMessage(room, ev, isNew);
      return;
    }
    room.seq = ev.seq;
  }

  function isTombstone(ev) {
    return ev.text === null || ev.deleted === true;
  }

  // A deleted line gives way to a quiet note in its place, so replies to it still make sense
  // and nothing jumps; a line not shown (before this log began, past the cap) needs nothing.
  function removeLine(room, epoch, target, by) {
    var line = Array.prototype.find.call(room.log.querySelectorAll(".line.msg"), function (div) {
      return div.dataset.epoch === epoch && Number(div.dataset.seq) === target;
    });
    if (!line) return;
    var note = document.createElement("div");
    note.className = "line sys deleted";
    note.textContent = "Message deleted" + (by ? " by " + by : "") + ".";
    var hadFocus = line.contains(document.activeElement);
    line.replaceWith(note);
    if (hadFocus) room.log.focus();       // not lost to the page's top
  }

  function showMessage(room, m, isNew) {
    var div = messageLine(room, m);
    appendLine(room, div);
    room.seq = m.seq;
    if (m.nick !== null) stopTyping(room, memberKey(m.user, m.nick));   // their line is here
    if (room.name !== active) {
      room.unread++;
      room.badge.textContent = room.unread;
      room.badge.hidden = false;
    }
    if (isNew && div.classList.contains("mention")) mentioned(room);
  }

  // A line naming the user: counted on its room's tab unless shown, and in the page's title
  // while the page is hidden.
  function mentioned(room) {
    if (room.name !== active) {
      room.mentions++;
      room.mentionBadge.textContent = "@" + room.mentions;
      room.mentionBadge.title = room.mentions === 1 ? "A line names you" : room.mentions + " lines name you";
      room.mentionBadge.hidden = false;
    }
    if (document.hidden) {
      hiddenMentions++;
      updateTitle();
    }
  }

  // Only textContent and DOM calls, never HTML: what people type is shown as typed.
  function messageLine(room, m) {
    var own = isOwn(m);
    var div = document.createElement("div");
    div.className = "line msg" + (own ? " own" : "");
    div.dataset.seq = m.seq;
    div.dataset.epoch = m.epoch;
    var when = new Date(m.time);
    var time = document.createElement("time");
    time.dateTime = when.toISOString();
    time.title = when.toLocaleString();
    time.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    div.append(time, " ");                // spaces, not margins: screen readers read them
    if (m.nick !== null) {                // null: said by a v1 client, who has no nick
      var who = document.createElement("span");
      who.className = "nick";
      who.textContent = m.nick;
      div.append(who, " ");
    }
    var text = document.createElement("span");
    text.className = "text";
    if (richText(text, m.text, !own)) div.classList.add("mention");
    div.append(text);
    // Token mode: delete, shown on one's own lines and, by the room's class, to its moderators.
    if (TOKEN_MODE) div.append(deleteButton(room, m, div));
    return div;
  }

  // ---- Links and mentions in a line's text

  var URL_RE = /https?:\/\/[^\s<>"]+/gi;
  var WORD_CHAR = /[\p{L}\p{N}_]/u;
  var TRAILING = ".,;:!?'\"*…“”‘’«»";       // punctuation after a URL is the sentence's

  // The text as nodes into `parent`: a link for each http(s) URL, <mark> on "@us" (if
  // `mentions`), text nodes for the rest. Returns whether it names us.
  function richText(parent, text, mentions) {
    var at = 0, named = false, match;
    URL_RE.lastIndex = 0;
    while ((match = URL_RE.exec(text)) !== null) {
      var start = match.index;
      if (start > 0 && WORD_CHAR.test(text.charAt(start - 1))) continue;   // "xhttp://…": a word
      var url = trimUrl(match[0]);
      var href = linkHref(url);
      if (!href) continue;
      named = addMentions(parent, text.slice(at, start), mentions) || named;
      var a = document.createElement("a");
      a.href = href;
      a.textContent = url;
      a.target = "_blank";
      a.rel = "noopener noreferrer";      // the page opened gets no hold on this one, nor its address
      parent.appendChild(a);
      at = start + url.length;
      URL_RE.lastIndex = at;              // what was trimmed off is text
    }
    return addMentions(parent, text.slice(at), mentions) || named;
  }

  // "https://example.com/a_(b))." → "https://example.com/a_(b)": a closing bracket stays when
  // the URL opened it.
  function trimUrl(url) {
    for (;;) {
      var last = url.slice(-1);
      if (TRAILING.indexOf(last) >= 0 || (last === ")" && unbalanced(url, "(", ")"))
          || (last === "]" && unbalanced(url, "[", "]"))) {
        url = url.slice(0, -1);
      } else {
        return url;
      }
    }
  }

  function unbalanced(url, open, close) {
    return url.split(open).length < url.split(close).length;
  }

  // The address a link goes to: http and https only, with a host; null when it is no link.
  function linkHref(text) {
    var url;
    try { url = new URL(text); } catch (e) { return null; }
    return (url.protocol === "http:" || url.protocol === "https:") && url.hostname ? url.href : null;
  }

  // "@alice" names alice in any case, but not inside a longer word: not in "bob@alice",
  // "@alice_2" or "@alice.b" (a nick may hold . and -), yes in "@Alice," or "(@alice)".
  function mentionPattern(name) {
    var escaped = name.replace(/[\^$\\.*+?()[\]{}|\/]/g, "\\$&");
    return new RegExp("(^|[^\\p{L}\\p{N}_.-])(@" + escaped + ")(?![\\p{L}\\p{N}_]|[.-][\\p{L}\\p{N}_])", "giu");
  }

  function addMentions(parent, text, mentions) {
    var at = 0, named = false, match;
    if (mentions && mentionRe) {
      mentionRe.lastIndex = 0;
      while ((match = mentionRe.exec(text)) !== null) {
        var start = match.index + match[1].length;
        if (start > at) parent.append(text.slice(at, start));
        var mark = document.createElement("mark");
        mark.textContent = match[2];
        parent.appendChild(mark);
        at = start + match[2].length;
        named = true;
      }
    }
    if (text.length > at) parent.append(text.slice(at));
    return named;
  }

  function deleteButton(room, m, div) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "del";
    button.textContent = "Delete";
    button.setAttribute("aria-label", isOwn(m) ? "Delete your message" : "Delete message from " + (m.nick || "an old client"));
    button.addEventListener("click", function () {
      if (isBusy(button)) return;
      if (!welcomed || !room.joined) { showNotice("Not connected: try again once connected."); return; }
      setBusy(button, true);               // until the `deleted` replaces the line, or an error
      moderate({ type: "delete", room: room.name, seq: m.seq }, { button: button, div: div });
    });
    return button;
  }

  // ---- "… is typing"

  // Said while the user types in the room shown, at most every TYPING_EVERY ms (the server
  // passes on no more than that); deleting the draft says nothing.
  function typed() {
    var room = rooms.get(active);
    if (!room || !welcomed || !room.joined || legacy || !msg.value.trim()) return;
    var now = Date.now();
    if (now - room.typingSent < TYPING_EVERY) return;
    if (hint({ type: "typing", room: room.name })) room.typingSent = now;
  }

  // Someone is typing in a room: shown until TYPING_SHOWN after the last `typing` from them,
  // their line, or their leaving.
  function typingHeard(room, user, name) {
    if (isMe({ user: user, nick: name })) return;
    var key = memberKey(user, name);
    var typer = room.typers.get(key) || { nick: name, timer: null };
    clearTimeout(typer.timer);
    typer.timer = setTimeout(function () { stopTyping(room, key); }, TYPING_SHOWN);
    room.typers.set(key, typer);          // (a Map keeps the first place: shown in the order they began)
    renderTyping(room);
  }

  function stopTyping(room, key) {
    var typer = room.typers.get(key);
    if (!typer) return;
    clearTimeout(typer.timer);
    room.typers.delete(key);
    renderTyping(room);
  }

  function clearTypers(room) {
    room.typers.forEach(function (typer) { clearTimeout(typer.timer); });
    room.typers.clear();
    renderTyping(room);
  }

  // "alice is typing…", "alice and bob are typing…", "alice, bob and carol are typing…",
  // "alice, bob and 3 others are typing…". Empty: the line takes no space (CSS :empty).
  function renderTyping(room) {
    var names = Array.from(room.typers.values(), function (typer) { return typer.nick; });
    var text = "";
    if (names.length === 1) text = names[0] + " is typing…";
    else if (names.length === 2) text = names[0] + " and " + names[1] + " are typing…";
    else if (names.length === 3) text = names[0] + ", " + names[1] + " and " + names[2] + " are typing…";
    else if (names.length > 3) text = names[0] + ", " + names[1] + " and " + (names.length - 2) + " others are typing…";
    if (room.typingLine.textContent !== text) underLog(room, function () { room.typingLine.textContent = text; });
  }

  // ---- Older lines: asked for when the reader reaches the top of a log, a page at a time,
  // one request per room in flight, until the server says it keeps no more.

  function loadOlderAtTop(room) {
    if (room.name !== active || !welcomed || !room.joined || legacy) return;
    if (room.historyPending || room.historyDone || room.oldest === null || room.oldest <= 1) return;
    if (room.log.scrollTop > TOP_TRIGGER) return;
    clearTimeout(room.historyRetry);
    if (!hint({ type: "history", room: room.name, before: room.oldest, limit: HISTORY_PAGE })) {
      room.historyRetry = setTimeout(function () { loadOlderAtTop(room); }, 1000 / pace.rate);   // when it allows
      return;
    }
    room.historyPending = true;
    // An answer that never comes (an error that names no room, say) must not stop the paging.
    room.historyRetry = setTimeout(function () { olderLinesFailed(room, true); }, HISTORY_WAIT);
  }

  // The answer: its lines go above the log's (oldest first, as a replay: tombstones show
  // nothing, a deletion takes its line away); without `more`, the log starts here.
  function olderLines(room, ev) {
    if (!room.historyPending) return;     // not asked (a room closed and opened again meanwhile)
    room.historyPending = false;
    clearTimeout(room.historyRetry);
    // Another history than the log's (the server lost it): rejoin, as for a live event of
    // another epoch; the answer tells.
    if (ev.epoch !== room.epoch) {
      if (room.joined) join(room);
      return;
    }
    var events = ev.messages.filter(function (m) { return m.seq < room.oldest; });
    var nodes = [];
    events.forEach(function (m) {
      if (m.type === "deleted") {
        nodes = nodes.filter(function (div) { return Number(div.dataset.seq) !== m.target; });
      } else if (m.type === "message" && !isTombstone(m)) {
        nodes.push(messageLine(room, m));
      }
    });
    if (events.length) room.oldest = events[0].seq;
    if (!ev.more || !events.length) {     // (nothing older and `more`: not asked again either)
      room.historyDone = true;
      room.startLine = document.createElement("div");
      room.startLine.className = "line sys start";
      room.startLine.textContent = "Start of the kept history of #" + room.name + ".";
      nodes.unshift(room.startLine);
    }
    prependLines(room, nodes);
    loadOlderAtTop(room);                  // still at the top (all tombstones, a short log): on
  }

  // An error answering our `history` (not_member, rate_limited, unavailable…): the next
  // scroll to the top asks again; a busy server is asked again by itself, a little later.
  function olderLinesFailed(room, retry) {
    room.historyPending = false;
    clearTimeout(room.historyRetry);
    if (retry) room.historyRetry = setTimeout(function () { loadOlderAtTop(room); }, backoff(1));
  }

  // ---- Members

  // A member is a user in token mode (two may share a name), a casefolded nick in open mode.
  function memberKey(user, name) {
    return user !== null && user !== undefined ? "u:" + user : "n:" + name.toLowerCase();
  }

  function isMe(member) {
    return TOKEN_MODE ? member.user === myUser : sameNick(member.nick, nick);
  }

  // joined.users pairs each member's user and name; a server without it sends names only.
  function setMembers(room, ev) {
    var users = ev.users || ev.members.map(function (n) { return { user: null, nick: n }; });
    room.members = new Map(users.map(function (u) { return [memberKey(u.user, u.nick), u]; }));
    room.count = ev.member_count;
    renderMembers(room);
  }

  function renderMembers(room) {
    // Re-rendering (a presence, a refresh) must not take the keyboard's place away: a member's
    // button is made anew, the panel is moved (which blurs what is focused in it).
    var focused = room.memberList.contains(document.activeElement) ? document.activeElement : null;
    var refocus = focused && focused.classList.contains("who") ? focused.dataset.member : null;
    var mod = moderates(room.name);
    if (room.modTarget && (!mod || !room.members.has(room.modTarget))) closeModPanel(room, false);
    var entries = Array.from(room.members.entries()).sort(function (a, b) {
      var x = a[1].nick.toLowerCase(), y = b[1].nick.toLowerCase();
      return x < y ? -1 : x > y ? 1 : a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0;
    });
    room.memberList.replaceChildren.apply(room.memberList, entries.map(function (entry) {
      var key = entry[0], member = entry[1];
      var li = document.createElement("li");
      var me = isMe(member);
      if (mod && !me && member.user !== null) {
        li.appendChild(memberButton(room, key, member));
        if (room.modTarget === key) li.appendChild(room.modPanel);
      } else {
        li.append(member.nick);
      }
      if (me) {
        var you = document.createElement("span");
        you.className = "you";
        you.textContent = " (you)";
        li.appendChild(you);
        if (mod) li.append(" ", roleBadge(room.name));
      }
      return li;
    }));
    if (refocus) {
      var again = Array.prototype.find.call(room.memberList.querySelectorAll(".who"), function (b) {
        return b.dataset.member === refocus;
      });
      if (again) again.focus();
    } else if (focused && focused.isConnected && focused !== document.activeElement) {
      focused.focus();                     // in the panel, moved along with its member
    } else if (focused && !focused.isConnected) {
      room.membersBox.querySelector("summary").focus();   // the panel closed: its member left
    }
    // Past 1,000 members the server lists only the first 1,000 and sends no presence.
    var keys = room.members.size;
    room.memberCount.textContent = "(" + room.count + (room.count > keys ? ", " + keys + " listed" : "") + ")";
  }

  function roleBadge(name) {
    var badge = document.createElement("span");
    badge.className = "role";
    badge.textContent = "moderator";
    badge.title = "You moderate #" + name;
    return badge;
  }

  // ---- Moderation (token mode). The page reads its own token's `mod` patterns to know where
  // to offer the controls; the server decides (an error `forbidden` otherwise).

  function tokenClaims(t) {
    try {
      var part = t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");   // base64url → base64
      var bytes = Uint8Array.from(atob(part), function (c) { return c.charCodeAt(0); });
      var claims = JSON.parse(new TextDecoder().decode(bytes));
      return claims && typeof claims === "object" ? claims : {};
    } catch (e) {
      return {};                           // not ours to judge: the server says bad_token
    }
  }

  function patternsOf(claim) {
    if (typeof claim === "string") return [claim];
    return Array.isArray(claim) ? claim.filter(function (p) { return typeof p === "string"; }) : [];
  }

  // A pattern is a room name, or a prefix followed by *.
  function moderates(name) {
    return modPatterns.some(function (p) {
      return p === name || (p.slice(-1) === "*" && name.indexOf(p.slice(0, -1)) === 0);
    });
  }

  // After a welcome or a refresh: the token's `mod` may have changed; every room follows.
  function applyRoles() {
    modPatterns = TOKEN_MODE && token ? patternsOf(tokenClaims(token).mod) : [];
    rooms.forEach(function (room) {
      room.panel.classList.toggle("moderated", moderates(room.name));
      renderMembers(room);
    });
    $("my-role").hidden = !(active && moderates(active));
  }

  function memberButton(room, key, member) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "who";
    button.dataset.member = key;
    button.textContent = member.nick;
    button.setAttribute("aria-label", "Moderate " + member.nick);
    button.setAttribute("aria-expanded", room.modTarget === key ? "true" : "false");
    button.setAttribute("aria-controls", "mod-" + room.name);
    button.addEventListener("click", function () {
      if (room.modTarget === key) closeModPanel(room, true);
      else openModPanel(room, key);
    });
    return button;
  }

  // One panel per room, shown under the member it acts on: a reason, a duration, the actions.
  function modPanel(room) {
    if (room.modPanel) return room.modPanel;
    var panel = document.createElement("div");
    panel.className = "mod-panel";
    panel.id = "mod-" + room.name;
    panel.setAttribute("role", "group");
    var reasonLabel = document.createElement("label");
    reasonLabel.append("Reason (optional)");
    var reason = document.createElement("input");
    reason.type = "text";
    reason.className = "reason";
    reason.maxLength = 200;
    reasonLabel.append(reason);
    var forLabel = document.createElement("label");
    forLabel.append("Ban or mute for");
    var duration = document.createElement("select");
    duration.className = "duration";
    DURATIONS.forEach(function (d) {
      var option = document.createElement("option");
      option.value = d[0];
      option.textContent = d[1];
      duration.appendChild(option);
    });
    forLabel.append(duration);
    panel.append(reasonLabel, forLabel);
    ["kick", "ban", "mute", "unmute"].forEach(function (command) {
      var button = document.createElement("button");
      button.type = "button";
      button.dataset.command = command;
      button.textContent = command.charAt(0).toUpperCase() + command.slice(1);
      button.addEventListener("click", function () { modAction(room, command); });
      panel.appendChild(button);
    });
    panel.addEventListener("keydown", function (e) {
      if (e.key === "Escape") { closeModPanel(room, true); e.preventDefault(); }
    });
    room.modPanel = panel;
    return panel;
  }

  function openModPanel(room, key) {
    var panel = modPanel(room);
    var member = room.members.get(key);
    room.modTarget = key;
    panel.setAttribute("aria-label", "Moderate " + member.nick);
    panel.querySelector(".reason").value = "";
    panel.querySelectorAll("button").forEach(function (b) {
      b.setAttribute("aria-label", b.textContent + " " + member.nick);
    });
    room.membersBox.open = true;
    renderMembers(room);
    panel.querySelector(".reason").focus();
  }

  function closeModPanel(room, focusMember) {
    var key = room.modTarget;
    room.modTarget = null;
    if (room.modPanel) room.modPanel.remove();
    var button = Array.prototype.find.call(room.memberList.querySelectorAll(".who"), function (b) {
      return b.dataset.member === key;
    });
    if (button) {
      button.setAttribute("aria-expanded", "false");
      if (focusMember) button.focus();
    }
  }

  function modAction(room, command) {
    var member = room.members.get(room.modTarget);
    if (!member) return;
    var panel = room.modPanel;
    var reason = panel.querySelector(".reason").value.trim();
    var select = panel.querySelector(".duration");
    var sent = { type: command, room: room.name, user: member.user };
    var what = { nick: member.nick };
    if (reason && (command === "kick" || command === "ban")) sent.reason = reason;
    if (command === "ban" || command === "mute") {
      if (select.value) sent.seconds = Number(select.value);
      what.duration = select.value ? "for " + select.selectedOptions[0].textContent : "with no end";
    }
    if (!welcomed || !room.joined) { showNotice("Not connected: try again once connected."); return; }
    moderate(sent, what);
    closeModPanel(room, true);
  }

  // Every moderation command carries a ref: its `done` or error says which one it answers.
  function moderate(command, what) {
    command.ref = "mod-" + randomId(6);
    what.command = command;
    modPending.set(command.ref, what);
    send(command);
  }

  var DONE = {
    kick: function (w) { return "You removed " + w.nick + " from the room."; },
    ban: function (w) { return "You banned " + w.nick + " from the room " + w.duration + "."; },
    unban: function (w) { return "You lifted " + w.nick + "’s ban."; },
    mute: function (w) { return "You muted " + w.nick + " " + w.duration + "."; },
    unmute: function (w) { return "You unmuted " + w.nick + "."; }
  };
  var UNDO = { ban: "unban", mute: "unmute" };

  function moderated(ev, what) {
    var room = rooms.get(ev.room);
    var command = what.command;
    if (!room || command.type === "delete") return;   // the `deleted` event shows a delete
    var line = sysLine(room, DONE[command.type](what), "mod");
    var undo = UNDO[command.type];
    if (undo) {
      var label = undo.charAt(0).toUpperCase() + undo.slice(1);
      lineButton(line, label, label + " " + what.nick, function () {
        moderate({ type: undo, room: room.name, user: command.user }, { nick: what.nick });
      });
    }
  }

  function moderationFailed(ev, what) {
    if (what.button) setBusy(what.button, false);
    var command = what.command;
    var subject = command.type === "delete" ? "delete the message" : command.type + " " + what.nick;
    showNotice("Could not " + subject + ": " + ev.message + ".");
  }

  // "until 14:05", "until 3 Jan, 14:05", or "with no end" (until null).
  function untilText(until) {
    if (until === null || until === undefined) return "with no end";
    var when = new Date(until);
    var time = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (when.toDateString() === new Date().toDateString()) return "until " + time;
    return "until " + when.toLocaleDateString([], { day: "numeric", month: "short" }) + ", " + time;
  }

  // The server took this connection out of a room (`left` with a reason), or would not let it
  // in (banned, forbidden): the tab stays and says so; joining again is the user's choice.
  function removedFrom(room, reason, text) {
    room.joined = false;
    room.removed = reason;
    room.failed = { kicked: "a moderator removed you", banned: "you are banned here" }[reason] || "you may not join it";
    room.panel.dataset.joined = "no";
    room.panel.dataset.removed = reason;  // test hook
    room.note.textContent = { kicked: "removed", banned: "banned", forbidden: "no access" }[reason] || reason;
    room.note.hidden = false;
    closeModPanel(room, false);
    room.members = new Map();
    room.count = 0;
    renderMembers(room);
    clearTypers(room);
    room.historyPending = false;
    var line = sysLine(room, text, "removed");
    lineButton(line, "Join again", "Join #" + room.name + " again", function () { join(room); });
    outbox.forEach(function (entry) {
      if (entry.room === room.name && !entry.sent) showPending(entry, "not sent: you are not in this room");
    });
  }

  // ---- The outbox: each line keeps its ref until acknowledged, and is resent with it.

  function sendEntry(entry) {
    var room = rooms.get(entry.room);
    clearTimeout(entry.timer);
    entry.timer = null;
    if (entry.sent || !welcomed || !room || !room.joined) return;  // sent when its room is joined
    send({ type: "say", room: entry.room, text: entry.text, ref: entry.ref });
    entry.sent = true;
    showPending(entry, "sending…");
  }

  function showPending(entry, state) {
    var room = rooms.get(entry.room);
    underLog(room, function () {
      if (!entry.li) {
        entry.li = document.createElement("li");
        var text = document.createElement("span");
        text.className = "text";
        text.textContent = entry.text;
        var label = document.createElement("span");
        label.className = "state";
        entry.li.append(text, label);
        room.pendingList.appendChild(entry.li);
      }
      entry.li.lastChild.textContent = state;
    });
  }

  function dropEntry(entry) {
    clearTimeout(entry.timer);
    if (entry.li) underLog(rooms.get(entry.room), function () { entry.li.remove(); });
    outbox.splice(outbox.indexOf(entry), 1);
  }

  // ---- Events from the server

  // A line or a deletion, live: shown only if it is the next of its room's sequence.
  function sequenced(ev) {
    var room = rooms.get(ev.room);
    // Before our `joined` (a rejoin in flight) the events are in its replay: skip them here.
    if (!room || !room.joined) return;
    if (ev.epoch !== room.epoch) { join(room); return; }  // a new history: rejoin, be told
    if (ev.seq <= room.seq) return;                      // shown already
    if (ev.seq > room.seq + 1) { join(room); return; }   // a gap: ask for what is missing
    showEvent(room, ev, true);
  }

  // ---- The listing of rooms

  function askRooms() {
    roomsAsked = Date.now();
    send({ type: "rooms" });
  }

  function askRoomsAgain() {
    if (!roomsBox.open || !spare()) return;
    askRooms();
  }

  // After a join the listing has changed (a room made, one more member): ask now, unless a
  // listing was just asked for (the welcome's), and again when the server's listing, made at
  // most once a second, has caught up. Only while the listing is open: opening it asks too.
  function roomsAfterJoin() {
    lastJoined = Date.now();
    if (!roomsBox.open) return;
    if (Date.now() - roomsAsked > 1000) askRoomsAgain();
    clearTimeout(roomsAgain);
    roomsAgain = setTimeout(askRoomsAgain, ROOMS_AGAIN);
  }

  // A room we are in counts its members as they come and go: its listed count follows.
  function listCount(room) {
    var li = roomList.querySelector("li[data-room='" + room.name + "']");   // (a room name needs no quoting)
    if (li && room.joined) setCount(li.querySelector(".count"), room.count);
  }

  function setCount(count, members) {
    var unit = document.createElement("span");
    unit.className = "visually-hidden";
    unit.textContent = members === 1 ? " member" : " members";
    count.replaceChildren(String(members), unit);
  }

  var handlers = {
    welcome: function (ev) {
      welcomed = true;
      attempts = 0;                        // a welcomed connection resets the backoff
      helloTries = 0;
      nick = ev.nick;
      if (TOKEN_MODE) {
        myUser = ev.user;                  // the token's sub: who "own" and "(you)" are
        expires = ev.expires;
        applyRoles();
        scheduleRefresh();
      } else {
        store.set("chat.nick", nick);
      }
      mentionRe = mentionPattern(nick);
      textLimit = ev.limits.text;
      roomLimit = ev.limits.rooms;
      startPace(ev.limits.rate);
      $("my-nick").textContent = nick;
      $("me").hidden = false;
      setState("open", "Connected");
      notice.textContent = "";
      // A room we were put out of waits for the user's "Join again".
      rooms.forEach(function (room) { if (!room.removed) join(room); });
      askRooms();
      roomsTimer = setInterval(askRooms, ROOMS_REFRESH);
    },

    joined: function (ev) {
      var room = rooms.get(ev.room);
      if (!room) return;                   // left before the answer came
      // A join with a position that could not be honoured (another epoch: the server lost its
      // history; or lines it no longer keeps) leaves a hole in this log: say so where it is.
      var gap = null;
      if (room.epoch !== null && !ev.recovered) {
        gap = sysLine(room, "You may have missed messages here (the chat could not replay all of them).", "gap");
      }
      var rejoin = room.epoch !== null;    // what a rejoin brings came while we were away
      if (room.epoch !== ev.epoch) {
        room.seq = 0;                      // seqs count again from a new epoch
        // Older lines of this epoch go at the top of the log, or after the marker: above it
        // are lines of a history that is lost.
        room.oldest = ev.messages.length ? ev.messages[0].seq : ev.seq + 1;
        room.historyAt = gap;
        room.historyDone = room.oldest <= 1;
        room.historyPending = false;
        clearTimeout(room.historyRetry);
      }
      room.epoch = ev.epoch;
      // Lines, tombstones and deletions, as live: a deletion removes its line if shown here.
      ev.messages.forEach(function (m) {
        if (m.seq > room.seq) showEvent(room, m, rejoin);   // not shown yet (the replay may overlap)
      });
      // Live messages continue from the room's latest seq, even if history showed less.
      room.seq = Math.max(room.seq, ev.seq);
      room.joined = true;
      room.panel.dataset.joined = "yes";
      if (room.removed) {                  // in again after a kick (or a ban that ended)
        room.removed = null;
        room.note.hidden = true;
        delete room.panel.dataset.removed;
      }
      setMembers(room, ev);
      outbox.forEach(function (entry) { if (entry.room === room.name) sendEntry(entry); });
      listCount(room);
      roomsAfterJoin();
      loadOlderAtTop(room);                // the reader waits at the top, or the log is too short to scroll
    },

    message: function (m) { sequenced(m); },
    deleted: function (ev) { sequenced(ev); },   // in the room's sequence like a line

    ack: function (ev) {
      var entry = outbox.find(function (e) { return e.ref === ev.ref; });
      if (entry) dropEntry(entry);
    },

    presence: function (ev) {
      var room = rooms.get(ev.room);
      if (!room || !room.joined) return;   // the coming `joined` lists the members
      var who = ev.joined || ev.left;
      var key = memberKey(ev.user, who);
      if (ev.joined) {
        if (!room.members.has(key)) room.count++;
        room.members.set(key, { user: ev.user === undefined ? null : ev.user, nick: who });
      } else {
        if (room.members.delete(key)) room.count = Math.max(0, room.count - 1);
      }
      renderMembers(room);
      listCount(room);
      if (ev.left) stopTyping(room, key);
      sysLine(room, who + (ev.joined ? " joined" : " left"));
    },

    typing: function (ev) {
      var room = rooms.get(ev.room);
      if (room && room.joined && typeof ev.nick === "string") typingHeard(room, ev.user === undefined ? null : ev.user, ev.nick);
    },

    history: function (ev) {
      var room = rooms.get(ev.room);
      if (room && Array.isArray(ev.messages)) olderLines(room, ev);
    },

    rooms: function (ev) {
      roomList.replaceChildren.apply(roomList, ev.rooms.map(function (r) {
        var li = document.createElement("li");
        li.dataset.room = r.room;
        var button = document.createElement("button");
        button.type = "button";
        var name = document.createElement("span");
        name.className = "name";
        name.textContent = "#" + r.room;
        var count = document.createElement("span");
        count.className = "count";
        setCount(count, r.members);
        button.append(name, count);
        button.addEventListener("click", function () { openRoom(r.room, true); foldRoomsOnPhone(); msg.focus(); });
        li.appendChild(button);
        return li;
      }));
    },

    // Our own `leave` is answered when the tab is gone already; a reason means the server took
    // us out: kicked or banned by a moderator, or a private room a new token no longer allows.
    left: function (ev) {
      var room = rooms.get(ev.room);
      if (!room || !ev.reason) return;
      var why = ev.message ? ": " + ev.message : "";
      var text = ev.reason === "kicked" ? "A moderator removed you from #" + room.name + why + "."
        : ev.reason === "banned" ? "A moderator banned you from #" + room.name + " " + untilText(ev.until) + why + "."
        : "You may no longer be in #" + room.name + why + ".";
      removedFrom(room, ev.reason, text);
    },

    done: function (ev) {
      var what = modPending.get(ev.ref);
      if (!what) return;
      modPending.delete(ev.ref);
      moderated(ev, what);
    },

    refreshed: function (ev) {
      // Nothing visible changes: same connection, same rooms; only the clock and the roles.
      if (refreshing) { token = refreshing; refreshing = null; }
      expires = ev.expires;
      applyRoles();
      scheduleRefresh();
    },

    error: function (ev) {
      var room = ev.room ? rooms.get(ev.room) : null;
      var retry = ev.code === "unavailable" || ev.code === "rate_limited";
      if (modPending.has(ev.ref)) {        // it answers a moderation command
        var what = modPending.get(ev.ref);
        modPending.delete(ev.ref);
        moderationFailed(ev, what);
        return;
      }
      if (TOKEN_MODE && (ev.code === "bad_token" || ev.code === "token_expired")) {
        tokenRefused(ev);
        return;
      }
      // A command this server does not know: of ours, only `typing` and `history` can be that
      // (an older server: "unknown type", with no room and no ref). Neither is sent again on
      // this connection, and there is nothing to tell the user.
      if (ev.code === "bad_message" && !ev.room && ev.ref === undefined) {
        legacy = true;
        rooms.forEach(function (r) { r.historyPending = false; });
        return;
      }
      // While we are in the room, an error naming it and no ref answers our `history`.
      if (room && room.joined && room.historyPending && ev.ref === undefined) {
        olderLinesFailed(room, retry);
        return;
      }
      if (ev.ref !== undefined) {          // it answers a say
        var entry = outbox.find(function (e) { return e.ref === ev.ref; });
        if (!entry) return;
        entry.sent = false;
        if (retry) {
          // Nothing was published: the same say, same ref, after a while.
          showPending(entry, "server busy, retrying…");
          entry.timer = setTimeout(function () { sendEntry(entry); }, backoff(entry.tries++));
        } else if (ev.code === "not_member" && room && room.removed) {
          showPending(entry, "not sent: you are not in this room");   // kept for "Join again"
        } else if (ev.code === "not_member" && room) {
          join(room);                      // the server forgot us there: the join resends it
        } else if (ev.code === "muted" && room) {
          // Not published, and it would not be if sent again before the mute ends: keep the
          // text for later, say why where it was said.
          dropEntry(entry);
          if (!msg.value) msg.value = entry.text;
          sysLine(room, "A moderator muted you here " + untilText(ev.until) + ": your line was not sent.", "removed");
          showNotice("Not sent: you are muted in #" + room.name + " " + untilText(ev.until) + ".");
        } else {
          dropEntry(entry);
          if (!msg.value) msg.value = entry.text;   // back where it can be fixed
          showNotice("Not sent: " + ev.message);
        }
        return;
      }
      if (ev.code === "bad_nick") {        // refused hello: this connection waits for another one
        setState("connecting", "Choose another nickname");
        askNick(ev.message);
      } else if (ev.code === "nick_taken" && room) {
        room.failed = ev.message;
        sysLine(room, "You are not in this room: " + ev.message + ".");
        askNick("“" + nick + "” is taken in #" + room.name + " by someone else. Choose another nickname.");
      } else if (ev.code === "banned" && room && !room.joined) {   // answers our join
        removedFrom(room, "banned", "You are banned from #" + room.name + " " + untilText(ev.until) + ".");
      } else if (ev.code === "forbidden" && room && !room.joined) {
        removedFrom(room, "forbidden", "You may not join #" + room.name + ": " + ev.message + ".");
      } else if (ev.code === "too_many_connections") {
        closeWhy = ev.message;             // the close (1008) that follows says it
        showNotice(ev.message);
      } else if ((ev.code === "bad_room" || ev.code === "too_many_rooms") && room) {
        room.failed = ev.message;
        if (rooms.size > 1) closeRoom(room.name);
        roomFailed("Could not open #" + room.name + ": " + ev.message + ".");
      } else if (retry && room) {          // a join that could not be done now
        clearTimeout(room.retry);
        room.retry = setTimeout(function () { if (welcomed && !room.joined) join(room); }, backoff(1));
      } else if (!retry) {
        showNotice(ev.message);
      }
    }
  };

  // ---- The connection

  function clearTimers() {
    clearTimeout(retryTimer); clearInterval(tickTimer);
    retryTimer = tickTimer = null;
  }

  // Forget everything that belonged to the connection; keep the logs and the outbox.
  function disconnected() {
    welcomed = false;
    legacy = false;                        // the next server may know more
    pace = null;                           // (its welcome says its rate)
    clearInterval(roomsTimer);
    clearTimeout(roomsAgain);
    clearTimeout(refreshTimer);
    refreshing = null;
    modPending.forEach(function (what) { if (what.button) setBusy(what.button, false); });
    modPending.clear();                    // unanswered: the moderator may give them again
    rooms.forEach(function (room) {
      room.joined = false;
      room.panel.dataset.joined = "no";
      clearTimeout(room.retry);
      clearTimeout(room.historyRetry);
      room.historyPending = false;         // unanswered: asked again once the room is rejoined
      clearTypers(room);                   // who types is news of this connection
    });
    outbox.forEach(function (entry) {
      entry.sent = false;                  // unacknowledged: sent again on the next connection
      clearTimeout(entry.timer);
      showPending(entry, "waiting for the connection…");
    });
  }

  // Backoff: 0.5 s doubling per failed attempt, capped at 10 s, with ±20% jitter so many
  // clients don't reconnect in lockstep after a server restart. "immediate" (close 1001 =
  // server going away/restarting) retries after a tiny jitter.
  function scheduleReconnect(immediate) {
    clearTimers();
    var delay = immediate ? Math.random() * 250 : backoff(attempts);
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
    if (stopped || signedOut) return;
    if (!TOKEN_MODE && !nick) { setState("connecting", "Choose a nickname to start"); askNick(""); return; }
    setState(attempts ? "reconnecting" : "connecting", attempts ? "Reconnecting…" : "Connecting…");
    if (!TOKEN_MODE) { openSocket(); return; }
    // The token first, then the socket: no connection idles while the token URL answers.
    var ticket = ++connecting;
    obtainToken().then(function (got) {
      if (ticket !== connecting || stopped || signedOut) return;   // a newer connect() took over
      if (got.token) openSocket();
      else if (got.signIn !== undefined) signIn(got.signIn);
      else scheduleReconnect(false);       // the token URL is away: again later, backing off
    });
  }

  function openSocket() {
    var proto = location.protocol === "https:" ? "wss://" : "ws://";
    var ws;
    try {
      ws = new WebSocket(proto + location.host + "/ws", "chat.v2");
    } catch (e) {
      scheduleReconnect(false);
      return;
    }
    conn = ws;
    closeWhy = "";
    ws.onopen = function () {
      helloTries = 0;
      sayHello();                          // hello comes first, once per connection
    };
    ws.onmessage = function (evt) {
      if (conn !== ws) return;
      var ev;
      try { ev = JSON.parse(evt.data); } catch (e) { return; }
      var handle = handlers[ev.type];
      if (handle) handle(ev);
    };
    ws.onclose = function (evt) {
      if (conn !== ws) return;
      conn = null;
      disconnected();
      if (stopped || signedOut) return;
      // 4003: the app's backend ended this user's chat; coming back is for the user to decide.
      if (evt.code === DISCONNECTED) {
        setState("closed", "Disconnected by the app (" + evt.code + "). Reload the page to chat again.");
        outbox.forEach(function (entry) { showPending(entry, "not sent"); });
        return;
      }
      // 1008/1009: the server rejected us on purpose; retrying would just repeat it.
      if (NO_RETRY[evt.code]) {
        var why = closeWhy || evt.reason || NO_RETRY[evt.code];
        setState("closed", "Connection closed: " + why + " (" + evt.code + ")");
        outbox.forEach(function (entry) { showPending(entry, "not sent"); });
        return;
      }
      // 4001: the token ran out before a refresh: a new one (if the URL gives one), a new hello.
      if (evt.code === TOKEN_EXPIRED && PAGE.tokenUrl) token = null;
      scheduleReconnect(evt.code === 1001 || evt.code === TOKEN_EXPIRED);
    };
  }

  function sayHello() {
    send(TOKEN_MODE ? { type: "hello", token: token, session: session } : { type: "hello", nick: nick, session: session });
  }

  // Close this connection, if any, without a retry of its own.
  function hangUp(reason) {
    var old = conn;
    conn = null;
    if (old) { old.close(1000, reason); disconnected(); }
  }

  // A new hello needs a new connection: close this one (the server lets our rooms go) and
  // connect at once; the welcome rejoins every open room from where its log ends.
  function reconnectNow(reason) {
    hangUp(reason);
    stopped = false;
    attempts = 0;
    connect();
  }

  // ---- The token (token mode)

  // Seconds the token has left by its own `exp` (our clock); Infinity when it does not say.
  function tokenLeft(t) {
    var exp = tokenClaims(t).exp;
    return typeof exp === "number" ? exp - Date.now() / 1000 : Infinity;
  }

  // The token for a hello: the one we have while it lasts, else a new one from the token URL.
  // Resolves to {token}, {signIn: why} (nobody to be: stop and say so) or {} (try again later).
  function obtainToken() {
    if (!PAGE.tokenUrl) {
      if (token && tokenLeft(token) > 0) return Promise.resolve({ token: token });
      return Promise.resolve({ signIn: token ? "Your sign-in link has expired." : "Open the chat from the app to sign in." });
    }
    if (token && tokenLeft(token) > TOKEN_MIN_LEFT) return Promise.resolve({ token: token });
    return fetchToken().then(function (t) {
      token = t;
      return { token: t };
    }, function (error) {
      return error && error.signIn ? { signIn: "" } : {};
    });
  }

  // GET the token URL with the app's cookies (it may be another origin: CORS with
  // credentials): {"token": "…"}. 401 or 403: not signed in there. Rejects with {signIn}.
  function fetchToken() {
    return fetch(PAGE.tokenUrl, { credentials: "include", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 401 || response.status === 403) throw { signIn: true };
        if (!response.ok) throw { signIn: false };
        return response.json();
      })
      .then(function (body) {
        if (!body || typeof body.token !== "string" || !body.token) throw { signIn: false };
        return body.token;
      });
  }

  // Before `expires` (the server's clock, taken to agree with ours): a minute before the end of
  // a long token, a quarter of its life before the end of a short one.
  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    if (!PAGE.tokenUrl) return;           // a token from the URL cannot be renewed: it runs out
    var left = expires - Date.now();
    refreshTimer = setTimeout(refreshToken, Math.max(1000, left - Math.min(REFRESH_LEAD, left / 4)));
  }

  // A new token handed over on the same connection: nothing is left or joined again.
  function refreshToken() {
    clearTimeout(refreshTimer);
    var ws = conn;
    if (!welcomed || refreshFetch === ws) return;
    refreshFetch = ws;
    fetchToken().then(function (t) {
      refreshFetch = null;
      if (conn !== ws || !welcomed) return;   // gone: the next hello fetches its own
      refreshing = t;
      send({ type: "refresh", token: t });
    }, function (error) {
      refreshFetch = null;
      if (conn !== ws) return;
      // Signed out in the app: chat on until the token runs out; the close (4001) then finds
      // no token and says "sign in". Else the token URL is away for now: ask again soon.
      if (!(error && error.signIn)) refreshTimer = setTimeout(refreshToken, REFRESH_RETRY);
    });
  }

  // bad_token or token_expired. Before the welcome the hello was refused, and the connection
  // stays open for another: try new tokens, a few times only. After it, either our `refresh`
  // was refused or the connection's token just ran out.
  function tokenRefused(ev) {
    if (!welcomed) {
      var expired = ev.code === "token_expired";
      if (!PAGE.tokenUrl || helloTries >= HELLO_TRIES) {
        signIn(expired ? "Your sign-in has expired." : "The chat did not accept your sign-in: " + ev.message + ".");
        return;
      }
      helloTries++;
      token = null;
      var ws = conn;
      fetchToken().then(function (t) {
        if (conn !== ws) return;
        token = t;
        sayHello();
      }, function (error) {
        if (conn !== ws) return;
        if (error && error.signIn) { signIn(""); return; }
        hangUp("no token");
        scheduleReconnect(false);
      });
      return;
    }
    if (refreshing) {
      var offered = refreshing;
      refreshing = null;
      if (ev.code === "bad_token") {
        // The app now signs in someone else (or under another name): that needs a new hello.
        token = offered;
        reconnectNow("new identity");
      } else {
        refreshTimer = setTimeout(refreshToken, REFRESH_RETRY);   // a stale token: ask again
      }
      return;
    }
    // Our token just ran out: the server waits CHAT_TOKEN_GRACE seconds for a refresh.
    if (PAGE.tokenUrl) refreshToken();
    else showNotice("Your sign-in has expired: open the chat from the app again to go on.");
  }

  // Nobody to be: say so, link to the app's sign-in, and wait for the user (no retries).
  function signIn(why) {
    signedOut = true;
    connecting++;                          // a token fetch under way is for nothing now
    hangUp("sign in");
    clearTimers();
    $("signin-why").textContent = why;
    var link = $("signin-link");
    link.hidden = !PAGE.loginUrl;
    if (PAGE.loginUrl) link.href = PAGE.loginUrl;
    $("signin").hidden = false;
    setState("signed-out", "Sign in to chat");
  }

  $("signin-retry").addEventListener("click", function () {
    signedOut = false;
    $("signin").hidden = true;
    attempts = 0;
    connect();
  });

  // A token from the URL (#token=…): kept for the tab, a new hello with it.
  function takeToken(t, now) {
    token = t;
    tabStore.set("chat.token", t);
    signedOut = false;
    $("signin").hidden = true;
    if (now) reconnectNow("new token");
  }

  // ---- The nickname

  function askNick(error) {
    nickForm.hidden = false;
    if (!nickInput.value || error) nickInput.value = nick || "";
    nickError.textContent = error;
    nickInput.setAttribute("aria-invalid", error ? "true" : "false");
    $("cancel-nick").hidden = !welcomed;
    nickInput.focus();
    nickInput.select();
  }

  nickForm.addEventListener("submit", function (e) {
    e.preventDefault();
    var value = nickInput.value.normalize("NFKC").trim();
    if (!NICK.test(value)) {
      nickError.textContent = "A nickname is 1 to 24 letters, digits, _ . or -, starting with a letter, digit or _.";
      nickInput.setAttribute("aria-invalid", "true");
      nickInput.focus();
      return;
    }
    var changed = value !== nick;
    nick = value;
    store.set("chat.nick", nick);
    nickForm.hidden = true;
    nickError.textContent = "";
    nickInput.setAttribute("aria-invalid", "false");
    if (changed || !welcomed) {
      reconnectNow("new nickname");
    } else {
      rooms.forEach(function (room) { if (room.failed) join(room); });  // try the same nick again
    }
    msg.focus();
  });
  $("change-nick").addEventListener("click", function () { nickInput.value = nick; askNick(""); });
  $("cancel-nick").addEventListener("click", function () { nickForm.hidden = true; msg.focus(); });
  nickForm.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && welcomed) { nickForm.hidden = true; msg.focus(); }
  });

  // ---- Rooms: the URL, the form, the listing

  // The fragment: a room (/#dev), or parameters (/#token=…&room=dev: a token link).
  function urlParams() {
    var hash = location.hash.slice(1);
    if (hash.indexOf("=") >= 0) {
      var params = new URLSearchParams(hash);
      return { token: params.get("token"), room: params.get("room") };
    }
    try { hash = decodeURIComponent(hash); } catch (e) { /* a stray %: taken as typed */ }
    return { token: null, room: hash || null };
  }

  // A room from the URL: /#room, /#token=…&room=room or /?room=room; lobby by default.
  function roomFromUrl() {
    var wanted = urlParams().room || new URLSearchParams(location.search).get("room") || "lobby";
    return wanted.trim().toLowerCase();
  }

  roomForm.addEventListener("submit", function (e) {
    e.preventDefault();
    var name = roomInput.value.trim().toLowerCase().replace(/^#/, "");
    if (!ROOM.test(name)) {
      roomFailed("A room name is 1 to 32 of a-z, 0-9, _ or -, starting with a letter or digit.");
      return;
    }
    roomError.textContent = "";
    roomInput.value = "";
    openRoom(name, true);
    foldRoomsOnPhone();
    msg.focus();
  });
  // Tabs as the ARIA pattern has them: one tab stop, arrow keys move between rooms.
  tabsEl.addEventListener("keydown", function (e) {
    var step = { ArrowLeft: -1, ArrowRight: 1 }[e.key];
    if (!step) return;
    var names = Array.from(rooms.keys());
    var next = names[(names.indexOf(active) + step + names.length) % names.length];
    activate(next);
    rooms.get(next).select.focus();
    e.preventDefault();
  });
  $("refresh-rooms").addEventListener("click", askRooms);
  roomsBox.addEventListener("toggle", function () {
    if (!roomsBox.open) return;
    askRooms();
    // Opened right after a join (a phone folds it when a room is chosen): the listing may be a
    // second old; ask again when it has caught up.
    var since = Date.now() - lastJoined;
    clearTimeout(roomsAgain);
    if (since < ROOMS_AGAIN) roomsAgain = setTimeout(askRoomsAgain, ROOMS_AGAIN - since);
  });
  window.addEventListener("hashchange", function () {
    var params = urlParams();
    if (params.token !== null) {
      if (TOKEN_MODE && !PAGE.tokenUrl) takeToken(params.token, true);
      if (params.room === null) { activate(active); return; }   // (which takes the token off the URL)
    }
    var name = roomFromUrl();
    if (ROOM.test(name)) openRoom(name, true);
    else roomFailed("“" + name + "” is not a room name.");
  });

  // ---- Saying something

  msg.addEventListener("input", typed);
  // Back to the page: the lines naming the user have been seen (the title counted them).
  document.addEventListener("visibilitychange", function () {
    if (document.hidden || !hiddenMentions) return;
    hiddenMentions = 0;
    updateTitle();
  });

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = msg.value.trim();
    if (!text) return;
    // maxlength counts UTF-16 units; the server limit is UTF-8 bytes.
    var bytes = encoder.encode(text).length;
    if (bytes > textLimit) {
      showNotice("Message too long (" + bytes + " of " + textLimit + " bytes).");
      return;
    }
    if (!welcomed) {
      showNotice("Not connected — your message was kept; send it again once connected.");
      return;                              // keep the input as typed
    }
    var room = rooms.get(active);
    if (room.failed) {
      showNotice("You are not in #" + room.name + ": " + room.failed + ". Your message was kept.");
      return;
    }
    var entry = { ref: randomId(8), room: room.name, text: text, sent: false, tries: 0, timer: null, li: null };
    outbox.push(entry);
    showPending(entry, "sending…");
    sendEntry(entry);                      // now, or when the room's join is answered
    msg.value = "";
    notice.textContent = "";
    msg.focus();
  });

  // ---- Start

  // A token in the fragment is read before the first room's tab rewrites the fragment.
  var fromUrl = urlParams().token;
  if (TOKEN_MODE && !PAGE.tokenUrl && fromUrl) takeToken(fromUrl, false);
  $("change-nick").hidden = TOKEN_MODE;    // the token names the user

  var first = roomFromUrl();
  if (!ROOM.test(first)) {
    roomFailed("“" + first + "” is not a room name; here is the lobby.");
    first = "lobby";
  }
  openRoom(first, true);
  roomsBox.open = WIDE.matches;

  if (!window.WebSocket) {
    sysLine(rooms.get(first), "Your browser does not support WebSockets.");
    setState("closed", "Connection closed.");
    return;
  }

  // Coming back online: don't sit out the rest of a long backoff.
  window.addEventListener("online", function () { if (retryTimer) { attempts = 0; connect(); } });
  // Leaving the page: close cleanly without scheduling a retry (also lets bfcache work).
  window.addEventListener("pagehide", function () { stopped = true; clearTimers(); if (conn) conn.close(); });
  window.addEventListener("pageshow", function (e) { if (e.persisted) { stopped = false; attempts = 0; connect(); } });

  if (nick || TOKEN_MODE) msg.focus();
  connect();
})();
</script>
</body>
</html>
