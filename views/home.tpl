<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chat</title>
<style>
  :root { color-scheme: light dark; --bg: #fff; --fg: #1b1b1b; --muted: #5f5f5f; --line: #d0d0d0;
          --panel: #f4f4f5; --accent: #2563eb; --on-accent: #fff; --nick: #1d4ed8; --own: #eef4ff;
          --ok: #15803d; --warn: #b45309; --bad: #b91c1c; }
  @media (prefers-color-scheme: dark) {
    :root { --bg: #16171a; --fg: #e6e6e6; --muted: #a0a0a0; --line: #33353a;
            --panel: #1f2125; --accent: #60a5fa; --on-accent: #0b1220; --nick: #93c5fd; --own: #1c2433;
            --ok: #4ade80; --warn: #fbbf24; --bad: #f87171; }
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

  header { display: flex; flex-wrap: wrap; align-items: center; gap: .25em 1em; padding: .5em 1em;
           border-bottom: 1px solid var(--line); background: var(--panel); }
  h1 { font-size: 1.1em; margin: 0 auto 0 0; }
  #me button { padding: .1em .5em; font-size: .85em; margin-left: .3em; }
  #status { font-size: .9em; color: var(--muted); }
  body[data-state="open"] #status { color: var(--ok); }
  body[data-state="reconnecting"] #status { color: var(--warn); }
  body[data-state="closed"] #status { color: var(--bad); }

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
  .badge { display: inline-block; min-width: 1.4em; padding: 0 .35em; margin-left: .3em; border-radius: 1em;
           background: var(--accent); color: var(--on-accent); font-size: .8em; text-align: center; }

  /* Every open room is laid out, the inactive ones invisible: each log keeps its own scroll
     position, and the scroll rules below can measure it whether it is shown or not. */
  #panels { position: relative; flex: 1 1 auto; min-height: 0; }
  .room { position: absolute; inset: 0; display: grid; grid-template-columns: 1fr auto; grid-template-rows: 1fr auto;
          visibility: hidden; }
  .room.active { visibility: visible; }
  /* overflow-anchor:none: we do our own scroll management, the browser must not also do it. */
  .log { grid-area: 1 / 1 / 2 / 2; min-height: 0; overflow-y: auto; overflow-anchor: none; padding: .5em 1em; }
  .line { white-space: pre-wrap; overflow-wrap: anywhere; padding: .1em .3em; border-left: 3px solid transparent; }
  .line time { color: var(--muted); font-size: .8em; font-variant-numeric: tabular-nums; }
  .line .nick { color: var(--nick); font-weight: 600; }
  .line.own { background: var(--own); border-left-color: var(--accent); }
  .line.sys { color: var(--muted); font-size: .85em; font-style: italic; }
  .line.gap { color: var(--warn); font-weight: 600; font-style: normal; margin: .3em 0;
              border-top: 1px dashed var(--warn); border-bottom: 1px dashed var(--warn); }
  .pending { grid-area: 2 / 1 / 3 / 2; list-style: none; margin: 0; padding: 0 1em; color: var(--muted); font-size: .9em; }
  .pending li { white-space: pre-wrap; overflow-wrap: anywhere; }
  .pending .state { font-style: italic; margin-left: .5em; }
  .members { grid-area: 1 / 2 / 3 / 3; width: 12em; overflow-y: auto; border-left: 1px solid var(--line); }
  .members ul { list-style: none; margin: 0; padding: 0 1em .5em; }
  .members li { overflow-wrap: anywhere; }
  .members .you { color: var(--muted); font-size: .85em; }

  #notice { min-height: 1.4em; padding: 0 1em; font-size: .85em; color: var(--bad); }
  #form { display: flex; gap: .5em; padding: .5em 1em calc(.5em + env(safe-area-inset-bottom));
          border-top: 1px solid var(--line); background: var(--panel); }
  #msg { flex: 1 1 auto; padding: .5em .6em; }

  /* A phone: rooms and members fold away above the log, the log takes the height. */
  @media (max-width: 699px) {
    #main { flex-direction: column; }
    #side { flex: 0 0 auto; max-height: 50vh; border-right: 0; border-bottom: 1px solid var(--line); }
    .room { grid-template-columns: 1fr; grid-template-rows: auto 1fr auto; }
    .members { grid-area: 1 / 1 / 2 / 2; width: auto; max-height: 40vh; border-left: 0; border-bottom: 1px solid var(--line); }
    .log { grid-area: 2 / 1 / 3 / 2; }
    .pending { grid-area: 3 / 1 / 4 / 2; }
  }
</style>
</head>
<body data-state="connecting">
<header>
  <h1>Chat</h1>
  <div id="me" hidden>You are <strong id="my-nick"></strong><button type="button" id="change-nick">Change</button></div>
  <div id="status" role="status">Connecting…</div>
</header>
<form id="nick-form" autocomplete="off" hidden>
  <label for="nick">Nickname</label>
  <input type="text" id="nick" maxlength="24" autocapitalize="none" spellcheck="false" aria-describedby="nick-error">
  <button type="submit" class="primary">Save</button>
  <button type="button" id="cancel-nick">Cancel</button>
  <div id="nick-error" class="error" aria-live="polite"></div>
</form>
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
   sent again with the same ref, and the server publishes a ref at most once. */
(function () {
  "use strict";
  var textLimit = {{max_message_size}};   // bytes of UTF-8; the welcome's limits.text replaces it
  var roomLimit = 16;                     // rooms at once; the welcome's limits.rooms replaces it
  var MAX_LINES = 1000;                   // per log
  var BOTTOM_TOLERANCE = 4;               // px: "at bottom" despite sub-pixel rounding
  var BASE_DELAY = 500, MAX_DELAY = 10000;
  var ROOMS_REFRESH = 30000;              // ms between `rooms` listings while connected
  var NO_RETRY = { 1008: "policy violation", 1009: "message too big" };
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
  function randomId(bytes) {
    var a = new Uint8Array(bytes);
    crypto.getRandomValues(a);   // (crypto.randomUUID needs https; this works on plain http too)
    return Array.prototype.map.call(a, function (b) { return (b < 16 ? "0" : "") + b.toString(16); }).join("");
  }
  // The session: made once, kept. Within a room a nick belongs to one session, so this page's
  // tabs and reconnects may hold the same nick at once, and nobody else can.
  var session = store.get("chat.session");
  if (!session) { session = randomId(16); store.set("chat.session", session); }
  var nick = store.get("chat.nick");      // as the user chose it (the welcome normalises it)

  var conn = null, welcomed = false, attempts = 0, stopped = false;
  var retryTimer = null, tickTimer = null, roomsTimer = null, noticeTimer = null;
  var rooms = new Map();                  // name → room state, in tab order
  var active = null;                      // name of the room shown
  var outbox = [];                        // lines said but not yet acknowledged, oldest first

  function setState(state, text) {
    document.body.dataset.state = state;  // test hook: connecting | open | reconnecting | closed
    statusEl.textContent = text;
  }

  function showNotice(text) {
    notice.textContent = text;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(function () { notice.textContent = ""; }, 4000);
  }

  function send(command) {
    if (conn && conn.readyState === WebSocket.OPEN) conn.send(JSON.stringify(command));
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
      members: new Map(),         // casefolded nick → nick as shown
      count: 0, unread: 0, carry: 0, retry: null
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
    select.appendChild(room.badge);
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
    panel.append(log, pending, members);
    panelsEl.appendChild(panel);
    Object.assign(room, { tab: tab, select: select, panel: panel, log: log, pendingList: pending });
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
    document.title = "#" + name + " – Chat";
    if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  }

  function closeRoom(name) {
    var room = rooms.get(name);
    if (!room || rooms.size === 1) return;
    if (welcomed && !room.failed) send({ type: "leave", room: name });
    clearTimeout(room.retry);
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

  // ---- The log: scroll rules and the line cap, as the v1 page had them, per room.

  // Follow new lines only if the reader was already at the bottom (measured BEFORE
  // appending); if they scrolled up, leave their position alone.
  function appendLine(room, div) {
    var log = room.log;
    var atBottom = log.scrollHeight - log.scrollTop - log.clientHeight <= BOTTOM_TOLERANCE;
    log.appendChild(div);
    // Cap the DOM; when the reader is scrolled up, shift scrollTop by the removed height so
    // the lines they are looking at don't jump. (Heights are fractional but scrollTop snaps
    // to device pixels, so carry the remainder to the next correction instead of drifting.)
    var removed = 0;
    while (log.childNodes.length > MAX_LINES) {
      removed += log.firstChild.getBoundingClientRect().height;
      log.removeChild(log.firstChild);
    }
    if (atBottom) {
      log.scrollTop = log.scrollHeight;
      room.carry = 0;
    } else if (removed) {
      var target = Math.max(0, log.scrollTop - removed + room.carry);
      log.scrollTop = target;
      room.carry = target - log.scrollTop;
    }
  }

  function sysLine(room, text, extra) {
    var div = document.createElement("div");
    div.className = "line sys" + (extra ? " " + extra : "");
    div.textContent = text;
    appendLine(room, div);
  }

  function sameNick(a, b) {
    // Nicks are ASCII after the server's NFKC normalisation, so lower case is their casefold.
    return a !== null && b !== null && a.toLowerCase() === b.toLowerCase();
  }

  // Only textContent, never HTML: what people type is shown as typed.
  function showMessage(room, m) {
    var div = document.createElement("div");
    div.className = "line msg" + (sameNick(m.nick, nick) ? " own" : "");
    div.dataset.seq = m.seq;
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
    text.textContent = m.text;
    div.append(text);
    appendLine(room, div);
    room.seq = m.seq;
    if (room.name !== active) {
      room.unread++;
      room.badge.textContent = room.unread;
      room.badge.hidden = false;
    }
  }

  // ---- Members

  function setMembers(room, nicks, count) {
    room.members = new Map(nicks.map(function (n) { return [n.toLowerCase(), n]; }));
    room.count = count;
    renderMembers(room);
  }

  function renderMembers(room) {
    var keys = Array.from(room.members.keys()).sort();
    room.memberList.replaceChildren.apply(room.memberList, keys.map(function (key) {
      var li = document.createElement("li");
      li.textContent = room.members.get(key);
      if (sameNick(key, nick)) {
        var you = document.createElement("span");
        you.className = "you";
        you.textContent = " (you)";
        li.appendChild(you);
      }
      return li;
    }));
    // Past 1,000 members the server lists only the first 1,000 and sends no presence.
    room.memberCount.textContent = "(" + room.count + (room.count > keys.length ? ", " + keys.length + " listed" : "") + ")";
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
    if (!entry.li) {
      entry.li = document.createElement("li");
      var text = document.createElement("span");
      text.className = "text";
      text.textContent = entry.text;
      var label = document.createElement("span");
      label.className = "state";
      entry.li.append(text, label);
      rooms.get(entry.room).pendingList.appendChild(entry.li);
    }
    entry.li.lastChild.textContent = state;
  }

  function dropEntry(entry) {
    clearTimeout(entry.timer);
    if (entry.li) entry.li.remove();
    outbox.splice(outbox.indexOf(entry), 1);
  }

  // ---- Events from the server

  var handlers = {
    welcome: function (ev) {
      welcomed = true;
      attempts = 0;                        // a welcomed connection resets the backoff
      nick = ev.nick;
      store.set("chat.nick", nick);
      textLimit = ev.limits.text;
      roomLimit = ev.limits.rooms;
      $("my-nick").textContent = nick;
      $("me").hidden = false;
      setState("open", "Connected");
      notice.textContent = "";
      rooms.forEach(join);
      send({ type: "rooms" });
      roomsTimer = setInterval(function () { send({ type: "rooms" }); }, ROOMS_REFRESH);
    },

    joined: function (ev) {
      var room = rooms.get(ev.room);
      if (!room) return;                   // left before the answer came
      // A join with a position that could not be honoured (another epoch: the server lost its
      // history; or lines it no longer keeps) leaves a hole in this log: say so where it is.
      if (room.epoch !== null && !ev.recovered) {
        sysLine(room, "You may have missed messages here (the chat could not replay all of them).", "gap");
      }
      var sameEpoch = room.epoch === ev.epoch;
      if (!sameEpoch) room.seq = 0;        // seqs count again from a new epoch
      room.epoch = ev.epoch;
      ev.messages.forEach(function (m) {
        if (m.seq > room.seq) showMessage(room, m);   // not shown yet (the replay may overlap)
      });
      // Live messages continue from the room's latest seq, even if history showed less.
      room.seq = Math.max(room.seq, ev.seq);
      room.joined = true;
      room.panel.dataset.joined = "yes";
      setMembers(room, ev.members, ev.member_count);
      outbox.forEach(function (entry) { if (entry.room === room.name) sendEntry(entry); });
    },

    message: function (m) {
      var room = rooms.get(m.room);
      // Before our `joined` (a rejoin in flight) the lines are in its replay: skip them here.
      if (!room || !room.joined) return;
      if (m.epoch !== room.epoch) { join(room); return; }  // a new history: rejoin, be told
      if (m.seq <= room.seq) return;                      // shown already
      if (m.seq > room.seq + 1) { join(room); return; }   // a gap: ask for what is missing
      showMessage(room, m);
    },

    ack: function (ev) {
      var entry = outbox.find(function (e) { return e.ref === ev.ref; });
      if (entry) dropEntry(entry);
    },

    presence: function (ev) {
      var room = rooms.get(ev.room);
      if (!room || !room.joined) return;   // the coming `joined` lists the members
      var who = ev.joined || ev.left;
      if (ev.joined) { room.members.set(who.toLowerCase(), who); room.count++; }
      else { room.members.delete(who.toLowerCase()); room.count = Math.max(0, room.count - 1); }
      renderMembers(room);
      sysLine(room, who + (ev.joined ? " joined" : " left"));
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
        count.textContent = r.members;
        var unit = document.createElement("span");
        unit.className = "visually-hidden";
        unit.textContent = r.members === 1 ? " member" : " members";
        count.appendChild(unit);
        button.append(name, count);
        button.addEventListener("click", function () { openRoom(r.room, true); foldRoomsOnPhone(); msg.focus(); });
        li.appendChild(button);
        return li;
      }));
    },

    left: function () { /* the tab is gone already */ },

    error: function (ev) {
      var room = ev.room ? rooms.get(ev.room) : null;
      var retry = ev.code === "unavailable" || ev.code === "rate_limited";
      if (ev.ref !== undefined) {          // it answers a say
        var entry = outbox.find(function (e) { return e.ref === ev.ref; });
        if (!entry) return;
        entry.sent = false;
        if (retry) {
          // Nothing was published: the same say, same ref, after a while.
          showPending(entry, "server busy, retrying…");
          entry.timer = setTimeout(function () { sendEntry(entry); }, backoff(entry.tries++));
        } else if (ev.code === "not_member" && room) {
          join(room);                      // the server forgot us there: the join resends it
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
    clearInterval(roomsTimer);
    rooms.forEach(function (room) {
      room.joined = false;
      room.panel.dataset.joined = "no";
      clearTimeout(room.retry);
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
    if (stopped) return;
    if (!nick) { setState("connecting", "Choose a nickname to start"); askNick(""); return; }
    setState(attempts ? "reconnecting" : "connecting", attempts ? "Reconnecting…" : "Connecting…");
    var proto = location.protocol === "https:" ? "wss://" : "ws://";
    var ws;
    try {
      ws = new WebSocket(proto + location.host + "/ws", "chat.v2");
    } catch (e) {
      scheduleReconnect(false);
      return;
    }
    conn = ws;
    ws.onopen = function () {
      // hello comes first, once per connection: a new nick needs a new connection.
      send({ type: "hello", nick: nick, session: session });
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
      if (stopped) return;
      // 1008/1009: the server rejected us on purpose; retrying would just repeat it.
      if (NO_RETRY[evt.code]) {
        setState("closed", "Connection closed: " + (evt.reason || NO_RETRY[evt.code]) + " (" + evt.code + ")");
        outbox.forEach(function (entry) { showPending(entry, "not sent"); });
        return;
      }
      scheduleReconnect(evt.code === 1001);
    };
  }

  // A new hello needs a new connection: close this one (the server lets our rooms go) and
  // connect at once; the welcome rejoins every open room from where its log ends.
  function reconnectNow() {
    var old = conn;
    conn = null;
    if (old) { old.close(1000, "new nickname"); disconnected(); }
    stopped = false;
    attempts = 0;
    connect();
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
      reconnectNow();
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

  // A room from the URL: /#room or /?room=room; lobby by default.
  function roomFromUrl() {
    var hash = location.hash.slice(1);
    try { hash = decodeURIComponent(hash); } catch (e) { /* a stray %: taken as typed */ }
    var wanted = hash || new URLSearchParams(location.search).get("room") || "lobby";
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
  $("refresh-rooms").addEventListener("click", function () { send({ type: "rooms" }); });
  roomsBox.addEventListener("toggle", function () { if (roomsBox.open) send({ type: "rooms" }); });
  window.addEventListener("hashchange", function () {
    var name = roomFromUrl();
    if (ROOM.test(name)) openRoom(name, true);
    else roomFailed("“" + name + "” is not a room name.");
  });

  // ---- Saying something

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

  if (nick) msg.focus();
  connect();
})();
</script>
</body>
</html>
