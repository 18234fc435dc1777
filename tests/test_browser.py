"""The chat page in a real browser: headless Chromium, driven by Playwright, against gunicorn.

Needs Debian's Chromium (`apt-get install -y chromium`) and the `playwright` package (Playwright's
own browser download is not used). Without them these tests skip; under CI=true they fail instead.
Synchronisation is Playwright's auto-waiting (expect) or polls with deadlines, never sleeps.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import websocket
from conftest import unavailable
from support import V2Client, connect, free_port, wait_until
from token_app import TokenApp

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Locator, Page, WebSocketRoute
    from support import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # The name the nginx test serves the page under, as a real deployment would.
    "--host-resolver-rules=MAP chat.example.test 127.0.0.1",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT_MS = 10_000
# After a server restart or a cut the page's backoff may be a few seconds into its schedule.
RECONNECT_TIMEOUT_MS = 20_000

# Token mode (docs/protocol.md, "Signed identity"): the key the test servers verify with, and
# the app's backend signs with.
TOKEN_KEY = ("k1", "a-test-secret-of-more-than-32-characters")
TOKEN_ENV = {"CHAT_AUTH": "token", "CHAT_TOKEN_KEYS": ":".join(TOKEN_KEY)}


def make_token(sub: str, name: str | None = None, **claims: Any) -> str:
    """A token for `sub`, as the app's backend signs one (chatapp.token.make's arguments)."""
    from chatapp.token import make

    return make(TOKEN_KEY, sub, name, **claims)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        unavailable("playwright not installed: pip install -r requirements-dev.txt")
    if not CHROMIUM.exists():
        unavailable("Chromium not found: apt-get install -y chromium")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def open_page(browser: Browser, start_server: Any) -> Iterator[Callable[..., Page]]:
    """open_page(server, url=None, nick=None, room="lobby", route=None, **context_options) opens
    the chat in a fresh browser context (so a session of its own), chooses a nick as a user
    does, and waits until the page is connected and in `room` (room=None: connected only).
    route: a handler for Playwright's route_web_socket, to play a misbehaving server.

    Token mode (CHAT_AUTH=token), where there is no nick to choose: token="…" opens the page
    with the token in its URL (url + "#token=…"); signed_in=True lets the page get its own from
    the server's CHAT_TOKEN_URL, `cookies` (for the context's add_cookies) being the app's
    sign-in. wait=False: open the page and wait for nothing.

    Depends on start_server so that the pages close before the servers stop. A script error
    on any page fails the test.
    """
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def open_(
        server: ServerProcess,
        url: str | None = None,
        nick: str | None = None,
        room: str | None = "lobby",
        route: Callable[[WebSocketRoute], None] | None = None,
        token: str | None = None,
        signed_in: bool = False,
        cookies: list[dict[str, str]] | None = None,
        wait: bool = True,
        **options: Any,
    ) -> Page:
        context = browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        if cookies:
            context.add_cookies(cookies)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        record_frames(page)
        if route is not None:  # the test stands between the page and the server
            page.route_web_socket("**/ws", route)
        if token is not None:
            url = (url or server.url + "/") + "#token=" + token
        page.goto(url or server.url)
        if token is None and not signed_in:
            choose_nick(page, nick or f"user{len(contexts)}")
        if not wait:
            return page
        wait_open(page)
        if room is not None:
            wait_joined(page, room)
        return page

    yield open_
    for context in contexts:
        context.close()
    FRAMES.clear()
    assert not errors, f"script errors on the page: {errors}"


# Every WebSocket frame each page sent (>) and received (<), with the time, for explained().
FRAMES: dict[Page, list[str]] = {}


def record_frames(page: Page) -> None:
    frames = FRAMES[page] = []

    def note(text: str) -> None:
        frames.append(f"{time.monotonic():.3f} {text}")

    def on_socket(ws: Any) -> None:
        note(f"open {ws.url}")
        ws.on("framesent", lambda frame: note(f"> {frame}"))
        ws.on("framereceived", lambda frame: note(f"< {frame}"))
        ws.on("close", lambda _: note("closed"))

    page.on("websocket", on_socket)


def sent_commands(page: Page, kind: str) -> list[dict[str, Any]]:
    """The commands of this type the page has sent, oldest first."""
    sent = (json.loads(line.split(" > ", 1)[1]) for line in FRAMES.get(page, []) if " > " in line)
    return [command for command in sent if command.get("type") == kind]


@contextmanager
def explained(page: Page) -> Iterator[None]:
    """A failing assertion inside says which frames the page sent and received last."""
    try:
        yield
    except AssertionError as error:
        frames = "\n".join(FRAMES.get(page, [])[-80:])
        raise AssertionError(f"{error}\nthe page's last frames (> sent, < received):\n{frames}") from None


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(target)


def choose_nick(page: Page, nick: str) -> None:
    """Type a nickname into the page's nick form and press Enter."""
    page.fill("#nick", nick)
    page.press("#nick", "Enter")


def wait_open(page: Page, timeout: float = TIMEOUT_MS) -> None:
    expect(page.locator("body")).to_have_attribute("data-state", "open", timeout=timeout)
    expect(page.locator("#status")).to_have_text("Connected")


def wait_joined(page: Page, room: str = "lobby", timeout: float = TIMEOUT_MS) -> None:
    expect(page.locator(f"#room-{room}")).to_have_attribute("data-joined", "yes", timeout=timeout)


def say(page: Page, text: str) -> None:
    """Type a line into the page and press Enter, as a user does (it goes to the room shown)."""
    page.fill("#msg", text)
    page.press("#msg", "Enter")


def open_room(page: Page, room: str) -> None:
    """Open (or create) a room with the page's room form, unfolding it first if folded."""
    if not page.locator("#room-input").is_visible():
        page.click("#rooms-box summary")
    page.fill("#room-input", room)
    page.press("#room-input", "Enter")
    wait_joined(page, room)


def show_room(page: Page, room: str) -> None:
    page.click(f"#tab-{room}")
    expect(page.locator(f"#room-{room}")).to_be_visible()


def lines(page: Page, room: str = "lobby") -> Locator:
    """The chat lines (not the quiet join and leave lines) of a room's log, oldest first."""
    return page.locator(f"#log-{room} .line.msg")


def texts(page: Page, room: str = "lobby") -> Locator:
    return page.locator(f"#log-{room} .line.msg .text")


def expect_last_line(page: Page, text: str, room: str = "lobby") -> None:
    expect(texts(page, room).last).to_have_text(text)


def pending(page: Page, room: str = "lobby") -> Locator:
    """Lines the page has sent and the server has not acknowledged yet."""
    return page.locator(f"#room-{room} .pending li")


def expect_listed(page: Page, room: str, members: int) -> None:
    """Refresh the page's list of rooms until it shows the room with that many members: the
    server makes a listing at most once a second, so an answer may be a second old."""
    count = page.locator(f"#room-list li[data-room='{room}'] .count")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        page.click("#refresh-rooms")
        try:
            expect(count).to_have_text(f"{members} member{'' if members == 1 else 's'}", timeout=500)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def members(page: Page, room: str = "lobby") -> Locator:
    return page.locator(f"#room-{room} .members li")


@contextmanager
def sender(server: ServerProcess) -> Iterator[Callable[[list[str]], None]]:
    """A v1 WebSocket client that sends lines (much faster than typing them).

    One connection for the whole test: it stays open, so the test does not depend on how the
    server handles a client that connects, sends and leaves at once (not this file's subject).
    """
    ws = websocket.create_connection(server.ws_url, timeout=10)

    def send(lines: list[str]) -> None:
        for line in lines:
            ws.send(line)

    try:
        yield send
    finally:
        ws.close()


class Talker:
    """Someone else in the chat: a v2 client outside the browser, with a nick, in one room.

    A thread reads everything the server sends it into `events` (the server drops a client
    that does not read).
    """

    def __init__(self, server: ServerProcess, nick: str, room: str = "lobby") -> None:
        self.ws = connect(server, subprotocols=["chat.v2"])
        self.ws.settimeout(None)  # the reader waits as long as the test runs; teardown shuts it
        self.room = room
        self.events: list[dict[str, Any]] = []
        # Lines said so far (they are numbered by it in some tests).
        self.said = 0
        self._send({"type": "hello", "nick": nick, "session": f"talker-{nick}"})
        threading.Thread(target=self._read, daemon=True).start()
        self._send({"type": "join", "room": room})
        self.wait_for(lambda e: e["type"] == "joined" and e["room"] == room, f"{nick} to join {room}")

    def _send(self, command: dict[str, Any]) -> None:
        self.ws.send(json.dumps(command))

    def _read(self) -> None:
        try:
            while data := self.ws.recv():
                self.events.append(json.loads(data))
        except Exception:  # noqa: BLE001 - the connection ended (teardown shuts the socket)
            return

    def say(self, text: str) -> None:
        self._send({"type": "say", "room": self.room, "text": text, "ref": f"talker-{self.said}"})
        self.said += 1

    def texts(self) -> list[str]:
        """The lines this client received in its room, in order."""
        return [e["text"] for e in list(self.events) if e["type"] == "message" and e["room"] == self.room]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> None:
        wait_until(lambda: any(predicate(e) for e in list(self.events)), 10, what=what)

    def wait_heard(self, text: str) -> None:
        wait_until(lambda: text in self.texts(), 10, what=f"{text!r} to reach the talker")


class CuttableProxy:
    """A TCP proxy between a page and the server that can fail like a network does.

    cut() ends every connection at once (no close frame: the page sees 1006) and keeps
    accepting; down() cuts and then refuses new connections until up(); hold(way) stops
    forwarding one way ("to_server" or "to_client") until release(way), which forwards what
    was held (a slow network), or the next cut, which drops it.
    """

    WAYS = ("to_server", "to_client")

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._cond = threading.Condition()
        # Open connections: (client socket, server socket).
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._refusing = False
        self._held = dict.fromkeys(self.WAYS, False)
        # Forwarding writes under way, per way: hold() waits for them to finish.
        self._in_flight = dict.fromkeys(self.WAYS, 0)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # stop()
            with self._cond:
                refusing = self._refusing
            try:
                if refusing:
                    raise OSError("down")
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            pair = (client, upstream)
            with self._cond:
                self._pairs.append(pair)
            threading.Thread(target=self._pump, args=(client, upstream, "to_server", pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "to_client", pair), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, way: str, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        try:
            while data := src.recv(65536):
                with self._cond:
                    while self._held[way] and pair in self._pairs:
                        self._cond.wait()
                    if pair not in self._pairs:
                        return  # cut: what was held is dropped
                    self._in_flight[way] += 1
                try:
                    dst.sendall(data)
                finally:
                    with self._cond:
                        self._in_flight[way] -= 1
                        self._cond.notify_all()
        except OSError:
            pass
        finally:
            self._close([pair])

    def _close(self, pairs: list[tuple[socket.socket, socket.socket]]) -> None:
        with self._cond:
            for pair in pairs:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            self._cond.notify_all()
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def hold(self, way: str) -> None:
        """From now until the next cut, forward nothing in this direction."""
        with self._cond:
            self._held[way] = True
            while self._in_flight[way]:
                self._cond.wait()

    def release(self, way: str) -> None:
        """Forward again in this direction, what was held first."""
        with self._cond:
            self._held[way] = False
            self._cond.notify_all()

    def cut(self) -> None:
        """End every open connection, dropping held bytes; forward normally again after."""
        with self._cond:
            pairs = list(self._pairs)
            self._held = dict.fromkeys(self.WAYS, False)
        self._close(pairs)

    def down(self) -> None:
        with self._cond:
            self._refusing = True
        self.cut()

    def up(self) -> None:
        with self._cond:
            self._refusing = False

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.listener.close()
        self.cut()


@pytest.fixture
def make_proxy(start_server: Any) -> Iterator[Callable[[ServerProcess], CuttableProxy]]:
    """make_proxy(server) starts a CuttableProxy in front of the server; stopped before the server."""
    proxies: list[CuttableProxy] = []

    def make(server: ServerProcess) -> CuttableProxy:
        proxy = CuttableProxy(server.port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def scroll_metrics(page: Page, room: str = "lobby") -> dict[str, float]:
    return page.eval_on_selector(
        f"#log-{room}",
        "el => ({top: el.scrollTop, client: el.clientHeight, height: el.scrollHeight})",
    )


def test_line_typed_in_one_page_appears_in_both(start_server: Any, open_page: Any) -> None:
    """A line typed in one page (Enter) shows in both pages' logs, and the input is cleared."""
    server = start_server("gunicorn")
    alice, bob = open_page(server, nick="alice"), open_page(server, nick="bob")

    say(alice, "hello from alice")

    for page in (alice, bob):
        expect_last_line(page, "hello from alice")
    expect(alice.locator("#msg")).to_have_value("")

    say(bob, "hi alice")
    for page in (alice, bob):
        expect_last_line(page, "hi alice")
    expect(bob.locator("#msg")).to_have_value("")


def test_chat_through_nginx_under_a_host_name(start_server: Any, open_page: Any) -> None:
    """Behind nginx with the README's block, pages served as http://chat.example.test:port chat."""
    server = start_server("nginx")
    url = f"http://chat.example.test:{server.port}/"
    alice, bob = open_page(server, url), open_page(server, url)
    say(alice, "through the proxy")
    for page in (alice, bob):
        expect_last_line(page, "through the proxy")
    assert "refused" not in server.log()


def test_scrolled_up_reader_is_not_yanked_down(start_server: Any, open_page: Any) -> None:
    """New lines keep a scrolled-up reader where they are, and follow a reader at the bottom."""
    server = start_server("gunicorn")
    reader = open_page(server)
    with sender(server) as send:
        send([f"fill {i}" for i in range(200)])
        expect_last_line(reader, "fill 199")
        before = scroll_metrics(reader)
        assert before["height"] > before["client"] * 3, before  # the log really overflows

        reader.eval_on_selector("#log-lobby", "el => { el.scrollTop = 100; }")
        send([f"while scrolled up {i}" for i in range(20)])
        expect_last_line(reader, "while scrolled up 19")
        after = scroll_metrics(reader)
        assert abs(after["top"] - 100) <= 1, after
        assert after["height"] > before["height"]  # the lines did arrive, below

        reader.eval_on_selector("#log-lobby", "el => { el.scrollTop = el.scrollHeight; }")
        send([f"at the bottom {i}" for i in range(20)])
        expect_last_line(reader, "at the bottom 19")
        end = scroll_metrics(reader)
        assert end["top"] + end["client"] >= end["height"] - 2, end
        expect(lines(reader).last).to_be_in_viewport()


def test_line_cap_keeps_the_view_still(start_server: Any, open_page: Any) -> None:
    """Past the 1000-line cap, old lines go but a scrolled-up reader's view does not move."""
    server = start_server("gunicorn")
    reader = open_page(server)
    # Which line is at the top of the log's view, and where it is on screen.
    probe = """el => {
        const box = el.getBoundingClientRect();
        const line = document.elementFromPoint(box.left + 20, box.top + 10).closest('.line');
        return {text: line.textContent, y: line.getBoundingClientRect().top};
    }"""
    with sender(server) as send:
        send([f"old {i}" for i in range(1000)])
        expect_last_line(reader, "old 999")
        expect(reader.locator("#log-lobby .line")).to_have_count(1000)

        reader.eval_on_selector("#log-lobby", "el => { el.scrollTop = el.scrollHeight / 2; }")
        seen = reader.eval_on_selector("#log-lobby", probe)

        send([f"new {i}" for i in range(100)])
        expect_last_line(reader, "new 99")
    expect(reader.locator("#log-lobby .line")).to_have_count(1000)
    expect(texts(reader).first).to_have_text("old 100")
    now = reader.eval_on_selector("#log-lobby", probe)
    assert now["text"] == seen["text"], (seen, now)
    assert abs(now["y"] - seen["y"]) <= 1, (seen, now)


def test_html_is_shown_as_text(start_server: Any, open_page: Any) -> None:
    """Markup sent by one user is shown to others as literal text and never runs."""
    server = start_server("gunicorn")
    mallory, victim = open_page(server), open_page(server)
    payload = "<img src=x onerror=window.__pwned=1>"

    say(mallory, payload)

    for page in (victim, mallory):
        expect_last_line(page, payload)
        expect(page.locator("#panels img")).to_have_count(0)
        assert page.evaluate("typeof window.__pwned") == "undefined"


def test_reconnects_after_server_restart(start_server: Any, open_page: Any) -> None:
    """When the server goes away the page says so, keeps the draft, and reconnects by itself."""
    # The browser keeps the page's HTTP connection alive, and the worker waits for idle
    # keep-alive connections (up to CHAT_HANDSHAKE_TIMEOUT) before it exits on SIGTERM: 1 s, not 10.
    fast_exit = {"CHAT_HANDSHAKE_TIMEOUT": "1"}
    old = start_server("gunicorn", **fast_exit)
    alice, bob = open_page(old), open_page(old)
    alice.evaluate("window.__sameDocument = true")  # proves no reload happened

    old.stop()  # SIGTERM: the server closes its clients with 1001

    for page in (alice, bob):
        expect(page.locator("#status")).to_contain_text("Reconnecting")
        expect(page.locator("body")).to_have_attribute("data-state", "reconnecting")
    say(alice, "typed during the outage")
    expect(alice.locator("#notice")).to_contain_text("Not connected")
    expect(alice.locator("#msg")).to_have_value("typed during the outage")

    start_server("gunicorn", port=old.port, **fast_exit)  # the same address the page knows

    for page in (alice, bob):
        wait_open(page, timeout=RECONNECT_TIMEOUT_MS)
    assert alice.evaluate("window.__sameDocument") is True, "the page reloaded"
    expect(alice.locator("#notice")).to_have_text("")
    alice.press("#msg", "Enter")  # send the kept draft
    for page in (alice, bob):
        expect_last_line(page, "typed during the outage")
    expect(alice.locator("#msg")).to_have_value("")


def test_too_big_message_is_not_sent(start_server: Any, open_page: Any) -> None:
    """A message over the server's byte limit is refused by the page, with a notice (no 1009)."""
    server = start_server("gunicorn", CHAT_MAX_MESSAGE_SIZE="100")
    writer, reader = open_page(server), open_page(server)
    say(writer, "fits")
    expect_last_line(reader, "fits")

    # 60 characters pass maxlength=100 (UTF-16 units), but they are 120 bytes of UTF-8.
    too_big = "é" * 60
    say(writer, too_big)

    expect(writer.locator("#notice")).to_contain_text("Message too long (120 of 100 bytes)")
    expect(writer.locator("#msg")).to_have_value(too_big)  # kept, to shorten
    expect(writer.locator("body")).to_have_attribute("data-state", "open")  # still connected

    say(writer, "still here")
    for page in (writer, reader):
        expect_last_line(page, "still here")
    expect(texts(reader).filter(has_text="é")).to_have_count(0)


def test_rate_limit_close_is_final(start_server: Any, open_page: Any) -> None:
    """When the server closes with 1008 (flooding), the page says why, keeps the lines, and does not retry."""
    server = start_server("gunicorn", CHAT_RATE_LIMIT="1")
    page, other = open_page(server), open_page(server)

    # Submit the form 10 times in one go. v2 counts every frame (at 1 message/s: bursts of 2,
    # closed past 4), so one of the first five is over twice the rate and the server closes
    # with 1008; it reads and discards the rest until the page answers its close frame.
    flood = [f"flood {i}" for i in range(10)]
    page.evaluate(
        """lines => {
            const msg = document.getElementById('msg'), form = document.getElementById('form');
            for (const line of lines) { msg.value = line; form.requestSubmit(); }
        }""",
        flood,
    )

    # A retry would have set "reconnecting" in the same close handler: "closed" means none.
    expect(page.locator("body")).to_have_attribute("data-state", "closed")
    expect(page.locator("#status")).to_contain_text("(1008)")
    expect(page.locator("#status")).to_contain_text("rate limit")
    # What was not acknowledged stays in view, marked as not sent.
    expect(pending(page).last).to_contain_text("flood 9")
    expect(pending(page).last).to_contain_text("not sent")

    # The other page is still in the chat. Its line comes after any flood line the server took
    # (within the rate: two at most, among the first five), so by then all of those are in.
    expect(other.locator("body")).to_have_attribute("data-state", "open")
    say(other, "after the flood")
    expect_last_line(other, "after the flood")
    heard = texts(other).all_text_contents()[:-1]
    assert len(heard) <= 2 and set(heard) <= set(flood[:5]), heard


def test_input_maxlength_is_the_server_limit(start_server: Any, open_page: Any) -> None:
    """#msg's maxlength is the server's CHAT_MAX_MESSAGE_SIZE, so typing stops at the limit."""
    server = start_server("gunicorn", CHAT_MAX_MESSAGE_SIZE="100")
    page = open_page(server)

    expect(page.locator("#msg")).to_have_attribute("maxlength", "100")
    page.fill("#msg", "x" * 150)
    expect(page.locator("#msg")).to_have_value("x" * 100)


def test_two_nicks_chat_in_two_rooms(start_server: Any, open_page: Any) -> None:
    """Two pages with different nicks chat in two rooms: each line in its room only, with its
    nick and local time, one's own lines marked; the rooms list counts the members."""
    server = start_server("gunicorn")
    alice = open_page(server, nick="alice")
    bob = open_page(server, server.url + "/?room=dev", nick="bob", room="dev")  # a room from the URL
    alice.evaluate("window.__sameDocument = true")
    alice.goto(server.url + "/#dev")  # the other form, typed into the address bar of an open page
    wait_joined(alice, "dev")
    expect(alice.locator("#room-dev")).to_be_visible()
    assert alice.evaluate("window.__sameDocument") is True, "the page reloaded"
    bob.click("#refresh-rooms")  # the listing: open a room from it
    bob.click("#room-list li[data-room='lobby'] button")
    wait_joined(bob, "lobby")
    expect(bob).to_have_url(server.url + "/?room=dev#lobby")  # a reload shows the room shown now

    show_room(bob, "dev")
    say(bob, "in dev only")
    expect_last_line(alice, "in dev only", "dev")  # (two pages' lines may otherwise cross)
    say(alice, "dev reply")  # alice has dev shown: she opened it last
    show_room(alice, "lobby")
    say(alice, "in the lobby")

    for page in (alice, bob):
        expect(texts(page, "dev")).to_have_text(["in dev only", "dev reply"])
        expect(texts(page, "lobby")).to_have_text(["in the lobby"])
        expect(lines(page, "dev").locator(".nick")).to_have_text(["bob", "alice"])
    expect(lines(alice, "dev").first).not_to_have_class("line msg own")
    expect(lines(alice, "dev").last).to_have_class("line msg own")
    expect(lines(bob, "dev").first).to_have_class("line msg own")
    expect(lines(bob, "lobby").first).not_to_have_class("line msg own")
    # An unread line in a room not shown is counted on its tab.
    expect(bob.locator("#tab-lobby .badge")).to_have_text("1")

    # The time is the message's, shown in local time.
    stamp = lines(bob, "dev").first.locator("time")
    when = datetime.fromisoformat(stamp.get_attribute("datetime").replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60, when
    shown = bob.evaluate(
        "iso => new Date(iso).toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'})",
        stamp.get_attribute("datetime"),
    )
    expect(stamp).to_have_text(shown)

    for room in ("dev", "lobby"):
        expect_listed(alice, room, 2)


def test_members_appear_and_disappear_live(start_server: Any, open_page: Any) -> None:
    """A room's member list follows joins and leaves as they happen, with a quiet line for each."""
    server = start_server("gunicorn")
    alice = open_page(server, nick="alice")
    expect(members(alice)).to_have_text(["alice (you)"])

    bob = open_page(server, nick="Bob")
    expect(members(alice)).to_have_text(["alice (you)", "Bob"])
    expect(members(bob)).to_have_text(["alice", "Bob (you)"])
    expect(alice.locator("#room-lobby .members summary")).to_have_text("Members (2)")
    expect(alice.locator("#log-lobby .line.sys").last).to_have_text("Bob joined")

    open_room(alice, "dev")
    open_room(bob, "dev")
    expect(members(alice, "dev")).to_have_text(["alice (you)", "Bob"])
    bob.click("#tabs .tab[data-room='dev'] .close")  # leave dev, stay in the lobby
    expect(bob.locator("#room-dev")).to_have_count(0)
    expect(members(alice, "dev")).to_have_text(["alice (you)"])
    expect(alice.locator("#log-dev .line.sys").last).to_have_text("Bob left")
    expect(members(alice)).to_have_text(["alice (you)", "Bob"])

    bob.context.close()  # Bob goes away altogether
    expect(members(alice)).to_have_text(["alice (you)"])
    expect(alice.locator("#room-lobby .members summary")).to_have_text("Members (1)")
    expect(alice.locator("#log-lobby .line.sys").last).to_have_text("Bob left")


def test_server_restart_shows_the_missed_messages_marker(start_server: Any, open_page: Any) -> None:
    """After a restart that lost the history, each page marks in its log that it may have missed lines."""
    fast_exit = {"CHAT_HANDSHAKE_TIMEOUT": "1"}
    old = start_server("gunicorn", **fast_exit)
    alice, bob = open_page(old, nick="alice"), open_page(old, nick="bob")
    say(bob, "before the restart")
    expect_last_line(alice, "before the restart")
    expect(alice.locator("#log-lobby .gap")).to_have_count(0)

    old.stop()
    start_server("gunicorn", port=old.port, **fast_exit)  # a new epoch: the history is gone

    for page in (alice, bob):
        wait_open(page, timeout=RECONNECT_TIMEOUT_MS)
        wait_joined(page)
        expect(page.locator("#log-lobby .gap")).to_have_count(1)
        expect(page.locator("#log-lobby .gap")).to_be_visible()
        expect(page.locator("#log-lobby .gap")).to_contain_text("may have missed messages")
    # The new history counts from seq 1 again, and its lines show, after the marker.
    say(bob, "after the restart")
    expect_last_line(alice, "after the restart")
    order = alice.eval_on_selector_all(
        "#log-lobby .line.gap, #log-lobby .line.msg",
        "els => els.map(e => e.classList.contains('gap') ? 'GAP' : e.querySelector('.text').textContent)",
    )
    assert order == ["before the restart", "GAP", "after the restart"], order
    for scheme in ("light", "dark"):
        alice.emulate_media(color_scheme=scheme)
        ratio = contrast(alice, "#log-lobby .gap")
        assert ratio >= 4.5, f"the marker in {scheme} mode: contrast {ratio:.2f}:1"


def test_cut_connection_loses_nothing(start_server: Any, open_page: Any, make_proxy: Any) -> None:
    """Lines said while the page is cut off, and while it rejoins, appear once each, in order."""
    server = start_server("gunicorn")
    proxy = make_proxy(server)
    page = open_page(server, proxy.url, nick="alice")
    bob = Talker(server, "bob")
    for _ in range(5):
        bob.say(f"line {bob.said}")
    expect(texts(page)).to_have_text([f"line {i}" for i in range(5)])

    proxy.down()  # every connection cut, new ones refused
    expect(page.locator("body")).to_have_attribute("data-state", "reconnecting")
    for _ in range(20):
        bob.say(f"line {bob.said}")
    bob.wait_heard("line 24")  # said, while the page was away

    # Bob keeps talking while the page comes back: some lines reach it in its join's
    # replay, the next ones live; the seam between them must neither drop nor repeat one.
    stop = threading.Event()

    def keep_talking() -> None:
        while not stop.is_set():
            bob.say(f"line {bob.said}")
            time.sleep(0.005)  # pacing, so that lines arrive during the rejoin

    talking = threading.Thread(target=keep_talking)
    talking.start()
    with explained(page):
        try:
            proxy.up()
            wait_open(page, timeout=RECONNECT_TIMEOUT_MS)
            wait_joined(page)
            at_join = bob.said
            wait_until(lambda: bob.said >= at_join + 20, 10, what="lines said after the rejoin")
        finally:
            stop.set()
            talking.join()
        bob.wait_heard(f"line {bob.said - 1}")

        expect(texts(page)).to_have_text([f"line {i}" for i in range(bob.said)])
        expect(page.locator("#log-lobby .gap")).to_have_count(0)  # nothing was missed


@pytest.mark.parametrize("lost", ["the ack", "the line"])
def test_unacknowledged_line_is_resent_once(start_server: Any, open_page: Any, make_proxy: Any, lost: str) -> None:
    """A line whose ack never came (or that never arrived) is sent again after the reconnect and
    appears exactly once, for the sender and for others."""
    server = start_server("gunicorn")
    proxy = make_proxy(server)
    page = open_page(server, proxy.url, nick="alice")
    bob = Talker(server, "bob")

    proxy.hold("to_client" if lost == "the ack" else "to_server")
    say(page, "did this arrive?")
    expect(pending(page)).to_have_text([re.compile(r"^did this arrive\?")])
    if lost == "the ack":
        bob.wait_heard("did this arrive?")  # published; only the answer to the page is held
    proxy.cut()  # what was held is gone

    with explained(page):
        # After the reconnect the page sends it again with the same ref and is acknowledged.
        expect(pending(page)).to_have_count(0, timeout=RECONNECT_TIMEOUT_MS)
        bob.say("after it")  # anything published by the resend comes before this line
        expect_last_line(page, "after it")
        bob.wait_heard("after it")
        assert bob.texts() == ["did this arrive?", "after it"], bob.texts()
        expect(texts(page)).to_have_text(["did this arrive?", "after it"])


def test_each_line_shows_once_and_in_order_whatever_arrives(start_server: Any, open_page: Any) -> None:
    """Lines delivered twice, late, or not at all (a gap in seqs) show once each and in order:
    a gap makes the page rejoin from its last seq, and a replay overlapping the log adds nothing."""
    server = start_server("gunicorn")
    sent: dict[int, str] = {}  # the lobby's messages as the server sent them, by seq
    faults = {"dropped": 0, "overlapped": 0}
    trace: list[str] = []  # what the page was sent, for the assertion messages

    def route(ws: WebSocketRoute) -> None:
        real = ws.connect_to_server()

        def from_server(frame: str | bytes) -> None:
            event = json.loads(frame)
            trace.append(f"{event['type']} {event.get('text') or event.get('seq') or ''}")
            if event["type"] == "message":
                sent[event["seq"]] = str(frame)
                if event["text"] == "four" and not faults["dropped"]:
                    faults["dropped"] += 1  # lost: the page gets five right after three
                    return
                ws.send(frame)
                if event["text"] == "two":
                    ws.send(frame)  # twice
                if event["text"] == "three":
                    ws.send(sent[min(sent)])  # an old line, late
                return
            if event["type"] == "joined" and event["messages"] and sent:
                # A replay that reaches further back than `since` asked: it overlaps the log.
                first = event["messages"][0]["seq"]
                event["messages"][:0] = [json.loads(sent[seq]) for seq in sorted(sent) if seq < first]
                faults["overlapped"] += 1
                frame = json.dumps(event)
            ws.send(frame)

        real.on_message(from_server)

    page = open_page(server, nick="alice", route=route)
    bob = Talker(server, "bob")
    words = ["one", "two", "three", "four", "five", "six"]
    for word in words:
        bob.say(word)
    try:
        expect(texts(page)).to_have_text(words)
        bob.say("seven")  # and live lines go on after the rejoin
        expect(texts(page)).to_have_text([*words, "seven"])
    except AssertionError as error:
        raise AssertionError(f"{error}\nthe page was sent: {trace}") from None
    assert faults["dropped"] == 1 and faults["overlapped"] >= 1, (faults, trace)


def test_unavailable_line_is_kept_and_resent_with_the_same_ref(start_server: Any, open_page: Any) -> None:
    """A line answered `unavailable` stays pending and is sent again with the same ref, after a
    growing backoff, until the server takes it; then it shows once."""
    server = start_server("gunicorn")
    says: list[tuple[float, dict[str, Any]]] = []  # when the page sent each say, and what
    broker_away = True

    def route(ws: WebSocketRoute) -> None:
        real = ws.connect_to_server()

        def from_page(frame: str | bytes) -> None:
            command = json.loads(frame)
            if command["type"] == "say":
                says.append((time.monotonic(), command))
                if broker_away:  # as a server whose Redis is away answers: nothing published
                    error = {"code": "unavailable", "message": "the broker is away", "ref": command["ref"]}
                    ws.send(json.dumps({"type": "error", **error, "room": command["room"]}))
                    return
            real.send(frame)

        ws.on_message(from_page)

    page = open_page(server, nick="alice", route=route)
    other = open_page(server, nick="bob")
    say(page, "while the broker is away")
    expect(pending(page)).to_contain_text("retrying")
    deadline = time.monotonic() + 10
    while len(says) < 3:  # a poll with a deadline; waiting lets Playwright run the route
        assert time.monotonic() < deadline, says
        page.wait_for_timeout(50)
    broker_away = False

    expect(pending(page)).to_have_count(0)
    say(other, "after it")
    for p in (page, other):
        expect(texts(p)).to_have_text(["while the broker is away", "after it"])
    assert {command["ref"] for _, command in says} == {says[0][1]["ref"]}, says
    assert {command["text"] for _, command in says} == {"while the broker is away"}, says
    gaps = [later - earlier for (earlier, _), (later, _) in zip(says, says[1:])]
    assert 0.3 < gaps[0] < gaps[1], gaps  # backoff, growing


def test_line_said_while_redis_is_away_is_resent_until_published_once(
    start_server: Any, open_page: Any, redis_server: Any
) -> None:
    """With Redis away the server answers a line `unavailable`: the page keeps it and sends it
    again, same ref, after a backoff; once Redis is back it is published, exactly once."""
    server = start_server("gunicorn", REDIS_URL=redis_server.url)
    alice, bob = open_page(server, nick="alice"), open_page(server, nick="bob")
    say(alice, "before")
    expect_last_line(bob, "before")

    redis_server.stop()
    say(alice, "while Redis is away")
    with explained(alice):
        expect(pending(alice)).to_contain_text("retrying")
        redis_server.start()
        expect(pending(alice)).to_have_count(0, timeout=30_000)
        say(bob, "after it")
        for page in (alice, bob):
            expect_last_line(page, "after it")
            expect(texts(page).filter(has_text="while Redis is away")).to_have_count(1)
    says = [command for command in sent_commands(alice, "say") if command["text"] == "while Redis is away"]
    assert len(says) >= 2 and len({command["ref"] for command in says}) == 1, says


def test_nick_taken_is_shown_inline_and_a_new_nick_is_remembered(start_server: Any, open_page: Any) -> None:
    """A nick someone else holds in the room is explained at the nick field; the new nick and
    the session are remembered across a reload."""
    server = start_server("gunicorn")
    alice = open_page(server, nick="alice")
    page = open_page(server, nick="ALICE", room=None)  # the same nick: nicks compare casefolded

    expect(page.locator("#nick-form")).to_be_visible()
    expect(page.locator("#nick-error")).to_contain_text("“ALICE” is taken in #lobby")
    expect(page.locator("#nick")).to_be_focused()
    expect(page.locator("#room-lobby")).to_have_attribute("data-joined", "no")
    say(page, "kept until I am in")
    expect(page.locator("#notice")).to_contain_text("You are not in #lobby")
    expect(page.locator("#msg")).to_have_value("kept until I am in")
    expect(members(alice)).to_have_text(["alice (you)"])

    page.fill("#nick", "bad nick!")
    page.press("#nick", "Enter")
    expect(page.locator("#nick-error")).to_contain_text("A nickname is 1 to 24 letters")

    choose_nick(page, "alicia")
    expect(page.locator("#nick-form")).to_be_hidden()
    expect(page.locator("#nick-error")).to_have_text("")
    wait_joined(page)
    expect(page.locator("#my-nick")).to_have_text("alicia")
    page.press("#msg", "Enter")  # the kept line, now that it can go
    expect_last_line(alice, "kept until I am in")
    expect(lines(alice).last.locator(".nick")).to_have_text("alicia")

    session = page.evaluate("localStorage.getItem('chat.session')")
    page.reload()
    expect(page.locator("#nick-form")).to_be_hidden()  # not asked again
    wait_open(page)
    wait_joined(page)
    expect(page.locator("#my-nick")).to_have_text("alicia")
    assert page.evaluate("localStorage.getItem('chat.session')") == session
    expect(members(alice)).to_have_text(["alice (you)", "alicia"])


def test_screenshots_of_a_conversation(start_server: Any, open_page: Any) -> None:
    """Two pages mid-conversation, a phone and a desktop, are captured to tests/artifacts/; on
    the phone the member list is folded and opens on demand."""
    server = start_server("gunicorn")
    phone_size = {"width": 390, "height": 760}
    phone = open_page(server, nick="sam", viewport=phone_size, device_scale_factor=2, is_mobile=True, has_touch=True)
    desktop = open_page(server, nick="robin", viewport={"width": 1000, "height": 700})
    for page in (phone, desktop):
        open_room(page, "deploys")

    conversation = [
        (phone, "hey, are you at your desk?"),
        (desktop, "yes — just got in. what's up?"),
        (phone, "the deploy went out last night; can you check the dashboard when you can?"),
        (desktop, "on it"),
        (desktop, "all green: error rate flat, p99 latency 180 ms, no restarts since 02:14"),
        (phone, "great, thanks! ✓"),  # no emoji: this machine may have no emoji font
        (phone, "a-very-long-word-without-spaces-" * 4 + "end"),
        (desktop, "<b>not bold</b> & not a tag"),
    ]
    for page, text in conversation:
        say(page, text)
        for p in (phone, desktop):
            expect_last_line(p, text, "deploys")
    phone.fill("#msg", "typing a reply…")
    expect_listed(desktop, "deploys", 2)

    members_list = phone.locator("#room-deploys .members ul")
    expect(members_list).to_be_hidden()  # folded on a phone
    expect(desktop.locator("#room-deploys .members ul")).to_be_visible()

    ARTIFACTS.mkdir(exist_ok=True)
    shots = [("two-pages-phone", phone), ("two-pages-desktop", desktop)]
    for name, page in shots:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    phone.click("#room-deploys .members summary")
    expect(members_list).to_be_visible()
    expect(members_list.locator("li")).to_have_text(["robin", "sam (you)"])
    phone.screenshot(path=str(ARTIFACTS / "two-pages-phone-members.png"))
    for name in ("two-pages-phone", "two-pages-desktop", "two-pages-phone-members"):
        path = ARTIFACTS / f"{name}.png"
        assert path.stat().st_size > 5 * 1024, f"{path} is only {path.stat().st_size} bytes"
    # The layout holds: nothing wider than the phone's screen, the form at the bottom.
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = phone.locator("#form").bounding_box()
    assert box is not None and abs(box["y"] + box["height"] - phone_size["height"]) <= 1, box


# WCAG 2 contrast ratio between an element's text colour and the background it is drawn on
# (its own, or the nearest ancestor's that is not transparent).
CONTRAST = r"""el => {
    if (!el.isConnected) return null;  // (replaced since it was found: a list re-rendered)
    const channels = c => c.match(/[\d.]+/g).map(Number);
    const lum = c => {
        const [r, g, b] = channels(c).slice(0, 3).map(v => {
            v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b;
    };
    let bg = el;
    const alpha = e => channels(getComputedStyle(e).backgroundColor)[3] ?? 1;
    while (alpha(bg) === 0 && bg.parentElement) bg = bg.parentElement;
    const fg = lum(getComputedStyle(el).color), back = lum(getComputedStyle(bg).backgroundColor);
    const [hi, lo] = [fg, back].sort((x, y) => y - x);
    return (hi + 0.05) / (lo + 0.05);
}"""


def contrast(page: Page, selector: str) -> float:
    """The contrast ratio of the selector's first element, tried again while the page
    replaces the element between finding it and reading its colours (lists re-render)."""
    deadline = time.monotonic() + 10
    while (ratio := page.eval_on_selector(selector, CONTRAST)) is None:
        assert time.monotonic() < deadline, f"{selector} kept being replaced"
    return ratio


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_is_readable_in_both_color_schemes(start_server: Any, open_page: Any, scheme: str) -> None:
    """Every kind of text on the page has WCAG AA contrast (4.5:1), light and dark."""
    server = start_server("gunicorn")
    page = open_page(server, nick="alice", color_scheme=scheme)
    other = open_page(server, nick="bob")  # "bob joined": a quiet line
    say(page, "contrast")
    expect_last_line(page, "contrast")  # before bob speaks: else the two lines may come either way round
    say(other, "from bob")
    expect_last_line(page, "from bob")
    open_room(page, "dev")
    say(other, "unread")  # counted on the lobby tab's badge
    expect(page.locator("#tab-lobby .badge")).to_have_text("1")
    expect_listed(page, "dev", 1)
    page.fill("#room-input", "Not a room!")
    page.press("#room-input", "Enter")
    page.fill("#msg", "é" * 300)  # 600 bytes: over the 512-byte limit
    page.press("#msg", "Enter")
    expect(page.locator("#notice")).to_contain_text("Message too long")

    selectors = [
        "#log-lobby .line.own .text",
        "#log-lobby .line.own time",
        "#log-lobby .line.own .nick",
        "#log-lobby .line:not(.own) .text",
        "#log-lobby .line:not(.own) .nick",
        "#log-lobby .line.sys",
        "#msg",
        "#status",
        "#form button",
        "#my-nick",
        "#change-nick",
        "#notice",
        "#room-error",
        "#tab-dev",
        "#tab-lobby",
        "#tab-lobby .badge",
        "#rooms-box summary",
        "#room-list .name",
        "#room-list .count",
        "#room-dev .members summary",
        "#room-dev .members li",
    ]
    for selector in selectors:
        expect(page.locator(selector).first).to_be_attached()
        ratio = contrast(page, selector)
        assert ratio >= 4.5, f"{selector} in {scheme} mode: contrast {ratio:.2f}:1"


# ---- Token mode (CHAT_AUTH=token): signed identity and moderation


@pytest.fixture
def token_app() -> Iterator[Callable[..., TokenApp]]:
    """token_app(origins, ttl=3600) starts an app's backend that hands out tokens (tests/token_app.py)."""
    apps: list[TokenApp] = []

    def start(origins: list[str], ttl: float = 3600) -> TokenApp:
        app = TokenApp(TOKEN_KEY, origins, ttl)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def start_token_chat(
    start_server: Any, token_app: Any, ttl: float = 3600, **env: str
) -> tuple[ServerProcess, TokenApp]:
    """A chat in token mode whose pages get their tokens from an app on another origin
    (CHAT_TOKEN_URL), tokens that live `ttl` seconds, and that app's CHAT_LOGIN_URL."""
    port = free_port()
    app = token_app([f"http://127.0.0.1:{port}"], ttl)
    server = start_server(
        "gunicorn", port=port, **TOKEN_ENV, CHAT_TOKEN_URL=app.token_url, CHAT_LOGIN_URL=app.login_url, **env
    )
    return server, app


def frames_of(page: Page, way: str) -> Iterator[tuple[float, dict[str, Any]]]:
    """(time, event) of every frame the page received (way "<") or sent (">"), oldest first."""
    for line in list(FRAMES.get(page, [])):
        when, rest = line.split(" ", 1)
        if rest.startswith(way + " "):
            yield float(when), json.loads(rest[2:])


def received(page: Page, kind: str) -> list[dict[str, Any]]:
    """The events of this type the page has received, oldest first."""
    return [event for _, event in frames_of(page, "<") if event.get("type") == kind]


def sockets_opened(page: Page) -> int:
    return sum(1 for line in list(FRAMES.get(page, [])) if line.split(" ", 1)[1].startswith("open "))


def moderate_member(
    page: Page, member: str, action: str, room: str = "lobby", reason: str = "", duration: str | None = None
) -> None:
    """As a moderator does with the mouse: the member's name, a reason, a duration, the action."""
    members_box = page.locator(f"#room-{room} .members")
    if not members_box.locator("ul").is_visible():  # folded on a phone
        members_box.locator("summary").click()
    members_box.get_by_role("button", name=f"Moderate {member}").click()
    if reason:
        page.fill(f"#mod-{room} .reason", reason)
    if duration is not None:
        page.select_option(f"#mod-{room} .duration", label=duration)
    page.locator(f"#mod-{room}").get_by_role("button", name=f"{action} {member}", exact=True).click()


def assert_contrast(page: Page, selectors: list[str]) -> None:
    """Each selector's first element has WCAG AA contrast (4.5:1), light and dark."""
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        for selector in selectors:
            expect(page.locator(selector).first).to_be_attached()
            ratio = contrast(page, selector)
            assert ratio >= 4.5, f"{selector} in {scheme} mode: contrast {ratio:.2f}:1"
    page.emulate_media(color_scheme="light")


def mod_lines(page: Page, room: str = "lobby") -> Locator:
    """The quiet lines telling a moderator what was done."""
    return page.locator(f"#log-{room} .line.mod")


def removed_lines(page: Page, room: str = "lobby") -> Locator:
    """The lines telling a user the server took them out of a room, or keeps them out or quiet."""
    return page.locator(f"#log-{room} .line.removed")


def test_token_url_signs_in_and_a_401_asks_to_sign_in(start_server: Any, open_page: Any, token_app: Any) -> None:
    """With CHAT_TOKEN_URL a page signed in to the app gets its token there (its cookie sent
    across origins), says hello with it, and chats under the token's name, without a nick
    form; a page not signed in (401) shows "Sign in to chat" with the app's sign-in link, opens
    no WebSocket and asks no more, until the user tries again."""
    server, app = start_token_chat(start_server, token_app)
    app.sign_in("s-alice", "u-alice", "Alice Liddell")
    app.sign_in("s-bob", "u-bob", "bob")
    alice = open_page(server, signed_in=True, cookies=[app.cookie("s-alice")])
    bob = open_page(server, signed_in=True, cookies=[app.cookie("s-bob")])

    for page, name in ((alice, "Alice Liddell"), (bob, "bob")):
        expect(page.locator("#my-nick")).to_have_text(name)
        expect(page.locator("#nick-form")).to_be_hidden()
        expect(page.locator("#change-nick")).to_be_hidden()
        expect(page.locator("#my-role")).to_be_hidden()  # nobody moderates here
    hello = sent_commands(alice, "hello")[0]
    assert "nick" not in hello and hello["token"] and hello["session"], hello
    assert app.served("s-alice") == [200], app.requests
    assert received(alice, "welcome")[0]["user"] == "u-alice"
    expect(members(alice)).to_have_text(["Alice Liddell (you)", "bob"])

    say(alice, "signed in")
    for page in (alice, bob):
        expect_last_line(page, "signed in")
        expect(lines(page).last.locator(".nick")).to_have_text("Alice Liddell")
    expect(lines(alice).last).to_have_class(re.compile(r"\bown\b"))
    expect(lines(bob).last).not_to_have_class(re.compile(r"\bown\b"))
    # One's own lines can be deleted (the button is there, for the pointer or the keyboard);
    # nobody else's, without moderating.
    expect(lines(alice).last.get_by_role("button", name="Delete your message")).to_have_css("display", "inline-block")
    expect(lines(bob).last.locator(".del")).to_be_hidden()

    stranger = open_page(server, signed_in=True, wait=False)  # no cookie: the app answers 401
    expect(stranger.locator("body")).to_have_attribute("data-state", "signed-out")
    expect(stranger.locator("#status")).to_have_text("Sign in to chat")
    expect(stranger.locator("#signin")).to_be_visible()
    expect(stranger.locator("#signin")).to_contain_text("Sign in to chat")
    expect(stranger.get_by_role("link", name="Sign in")).to_have_attribute("href", app.login_url)
    assert_contrast(stranger, ["#signin h2", "#signin-link", "#signin-retry", "#status"])
    stranger.wait_for_timeout(1500)  # (a negative: give a retry the time to happen)
    assert app.served(None) == [401], app.requests
    assert sockets_opened(stranger) == 0, FRAMES[stranger]

    # Signed in at the app meanwhile (another tab, say), the user tries again: in.
    app.sign_in("s-carol", "u-carol", "carol")
    stranger.context.add_cookies([app.cookie("s-carol")])
    stranger.get_by_role("button", name="Try again").click()
    wait_open(stranger)
    wait_joined(stranger)
    expect(stranger.locator("#signin")).to_be_hidden()
    expect(stranger.locator("#my-nick")).to_have_text("carol")
    expect(members(alice)).to_have_text(["Alice Liddell (you)", "bob", "carol"])


def test_token_is_refreshed_before_it_expires_on_the_same_connection(
    start_server: Any, open_page: Any, token_app: Any
) -> None:
    """A short-lived token (12 s) is fetched again and handed over with `refresh` before it
    expires, again and again, on the one WebSocket: the page never leaves "open", and lines
    flow on past the first token's end (where, unrefreshed, the server would have said
    token_expired and closed with 4001 after its 2 s of grace)."""
    server, app = start_token_chat(start_server, token_app, ttl=12, CHAT_TOKEN_GRACE="2")
    app.sign_in("s-alice", "u-alice", "alice")
    app.sign_in("s-bob", "u-bob", "bob")
    alice = open_page(server, signed_in=True, cookies=[app.cookie("s-alice")])
    bob = open_page(server, signed_in=True, cookies=[app.cookie("s-bob")])
    alice.evaluate(
        """() => {
            window.__states = [];
            new MutationObserver(() => window.__states.push(document.body.dataset.state))
                .observe(document.body, {attributes: true, attributeFilter: ["data-state"]});
        }"""
    )
    first_expiry = received(alice, "welcome")[0]["expires"] / 1000

    said: list[str] = []
    deadline = time.monotonic() + 45
    with explained(alice):
        while len(received(alice, "refreshed")) < 2:
            assert time.monotonic() < deadline, "the page did not refresh its token twice"
            said.append(f"line {len(said)}")
            say(alice, said[-1])
            expect_last_line(bob, said[-1])
            alice.wait_for_timeout(1000)  # a line a second, all along
        assert time.time() > first_expiry + 2, "past the first token's end and its grace"
        said.append("after the refreshes")
        say(alice, said[-1])
        expect(texts(bob)).to_have_text(said)

    refreshes = sent_commands(alice, "refresh")
    tokens = [sent_commands(alice, "hello")[0]["token"], *(r["token"] for r in refreshes)]
    assert len(set(tokens)) == len(tokens), "each refresh hands over a new token"
    expiries = [first_expiry * 1000] + [e["expires"] for e in received(alice, "refreshed")]
    assert expiries == sorted(expiries) and expiries[1] > expiries[0], expiries
    assert not received(alice, "error"), received(alice, "error")  # no token_expired
    assert sockets_opened(alice) == 1, "one WebSocket all along"
    assert alice.evaluate("window.__states") == [], "the status never changed"
    expect(alice.locator("#status")).to_have_text("Connected")
    assert app.served("s-alice") == [200] * (1 + len(refreshes)), app.requests


def test_refused_token_is_replaced_a_few_times_then_sign_in(start_server: Any, open_page: Any, token_app: Any) -> None:
    """A hello refused (bad_token, token_expired) gets a new token from the token URL and a new
    hello on the same connection; refused again and again, the page stops after a few tries
    and says to sign in."""
    server, app = start_token_chat(start_server, token_app)
    app.sign_in("s-alice", "u-alice", "alice")
    app.sign_in("s-bob", "u-bob", "bob")
    from chatapp.token import make

    forged = make(("k1", "not-the-chat-s-secret-but-32-characters-long"), "u-alice", "alice")
    expired = make_token("u-alice", "alice", ttl=-60)  # (beyond the server's 5 s of leeway)
    app.bad_tokens = [expired]
    alice = open_page(server, signed_in=True, cookies=[app.cookie("s-alice")])
    with explained(alice):
        assert [e["code"] for e in received(alice, "error")] == ["token_expired"]
        assert [h["token"] == expired for h in sent_commands(alice, "hello")] == [True, False]
        assert sockets_opened(alice) == 1, "a refused hello closes nothing"
    assert app.served("s-alice") == [200, 200], app.requests

    app.always_bad = forged
    bob = open_page(server, signed_in=True, cookies=[app.cookie("s-bob")], wait=False)
    expect(bob.locator("body")).to_have_attribute("data-state", "signed-out")
    expect(bob.locator("#signin-why")).to_contain_text("did not accept")
    bob.wait_for_timeout(1500)  # (a negative: give a retry the time to happen)
    with explained(bob):
        assert [e["code"] for e in received(bob, "error")] == ["bad_token"] * 3
        assert len(sent_commands(bob, "hello")) == 3
    assert app.served("s-bob") == [200] * 3, app.requests


def test_moderator_deletes_and_kicks(start_server: Any, open_page: Any, make_proxy: Any) -> None:
    """A moderator (mod ["*"]) is shown as one and has controls on the others' names and on
    every line, usable by keyboard. A deleted line disappears from every page, also from one
    that was offline then (its rejoin's replay deletes it); a kicked user's page says it was
    removed and why, keeps the tab, and may join again."""
    server = start_server("gunicorn", **TOKEN_ENV)
    proxy = make_proxy(server)
    mod = open_page(server, token=make_token("u-mod", "Morgan", mod=["*"]))
    alice = open_page(server, token=make_token("u-alice", "alice"))
    carol = open_page(server, proxy.url, token=make_token("u-carol", "<i>carol</i>"))  # names are text
    expect(carol).to_have_url(proxy.url + "#lobby")  # the token is off the address bar

    expect(mod.locator("#my-role")).to_be_visible()
    expect(alice.locator("#my-role")).to_be_hidden()
    expect(members(mod)).to_have_text(["<i>carol</i>", "alice", "Morgan (you) moderator"])
    expect(members(alice)).to_have_text(["<i>carol</i>", "alice (you)", "Morgan"])
    expect(alice.locator("#room-lobby .members button")).to_have_count(0)  # no controls for her

    say(alice, "a line to delete")
    expect_last_line(mod, "a line to delete")
    say(alice, "a line that stays")
    for page in (mod, alice, carol):
        expect(texts(page)).to_have_text(["a line to delete", "a line that stays"])
    expect(lines(carol).first.locator(".del")).to_be_hidden()  # not hers, not her room to moderate

    proxy.down()  # carol is offline while it happens
    expect(carol.locator("body")).to_have_attribute("data-state", "reconnecting")
    delete = lines(mod).first.get_by_role("button", name="Delete message from alice")
    delete.focus()
    mod.keyboard.press("Enter")
    for page in (mod, alice):
        expect(texts(page)).to_have_text(["a line that stays"])
        expect(page.locator("#log-lobby .line.deleted")).to_have_text(["Message deleted by Morgan."])
    expect(mod.locator("#log-lobby")).to_be_focused()  # the keyboard's place, not the page's top
    proxy.up()
    with explained(carol):
        wait_open(carol, timeout=RECONNECT_TIMEOUT_MS)
        wait_joined(carol)
        expect(texts(carol)).to_have_text(["a line that stays"])
        expect(carol.locator("#log-lobby .line.deleted")).to_have_count(1)
        assert "since" in sent_commands(carol, "join")[-1]  # it was the replay that deleted it
    expect(carol.locator("#panels i")).to_have_count(0)
    # A page that joins afresh: its replay holds the tombstone, shown as nothing at all.
    late = open_page(server, token=make_token("u-dave", "dave"))
    expect(texts(late)).to_have_text(["a line that stays"])
    expect(late.locator("#log-lobby .line.deleted")).to_have_count(0)
    replay = received(late, "joined")[-1]["messages"]
    assert {"type": "message", "seq": 1, "text": None, "deleted": True}.items() <= replay[0].items(), replay

    # The kick, by keyboard: the member's name opens the controls, the reason is typed, Tab
    # goes past the duration to Kick.
    who = mod.locator("#room-lobby .members").get_by_role("button", name="Moderate alice")
    who.focus()
    mod.keyboard.press("Enter")
    expect(who).to_have_attribute("aria-expanded", "true")
    expect(mod.locator("#mod-lobby .reason")).to_be_focused()
    mod.keyboard.type("off-topic, twice")
    mod.keyboard.press("Tab")
    mod.keyboard.press("Tab")
    expect(mod.get_by_role("button", name="Kick alice", exact=True)).to_be_focused()
    mod.keyboard.press("Enter")

    with explained(alice):
        expect(alice.locator("#room-lobby")).to_have_attribute("data-removed", "kicked")
        expect(removed_lines(alice).last).to_contain_text("A moderator removed you from #lobby: off-topic, twice.")
    expect(alice.locator("#tab-lobby")).to_contain_text("removed")  # the tab stays and says so
    expect(members(alice)).to_have_count(0)
    expect(mod_lines(mod).last).to_have_text("You removed alice from the room.")
    expect(members(mod)).to_have_text(["<i>carol</i>", "dave", "Morgan (you) moderator"])
    for page in (mod, carol):  # (for the moderator, before or after the `done`: either way)
        expect(page.locator("#log-lobby .line.sys").filter(has_text=re.compile("^alice left$"))).to_have_count(1)

    say(alice, "still here?")
    expect(alice.locator("#notice")).to_contain_text("You are not in #lobby: a moderator removed you")
    alice.get_by_role("button", name="Join #lobby again").click()  # a kick is not a ban
    wait_joined(alice)
    expect(alice.locator("#tab-lobby .note")).to_be_hidden()
    expect(members(mod)).to_have_text(["<i>carol</i>", "alice", "dave", "Morgan (you) moderator"])
    alice.press("#msg", "Enter")  # the kept line
    expect_last_line(mod, "still here?")


def test_banned_and_muted_users_are_told_why(start_server: Any, open_page: Any) -> None:
    """A moderator of the lobby only (mod ["lobby"]) mutes one user and bans another. The muted
    user's line is refused once, said to be, and kept; the banned user's page says why and
    until when, a join attempt, and a new page of theirs, say banned; unban lets them in."""
    server = start_server("gunicorn", **TOKEN_ENV)
    mod = open_page(server, token=make_token("u-mod", "Morgan", mod=["lobby"]))
    bob_token = make_token("u-bob", "bob")
    bob = open_page(server, token=bob_token)
    carol = open_page(server, token=make_token("u-carol", "carol"))

    open_room(mod, "dev")  # not a room Morgan moderates
    expect(mod.locator("#my-role")).to_be_hidden()
    expect(mod.locator("#room-dev .members button")).to_have_count(0)
    show_room(mod, "lobby")
    expect(mod.locator("#my-role")).to_be_visible()

    moderate_member(mod, "carol", "Mute")  # for the first duration offered: 10 minutes
    expect(mod_lines(mod).last).to_contain_text("You muted carol for 10 minutes.")
    say(carol, "can you hear me?")
    with explained(carol):
        expect(removed_lines(carol).last).to_contain_text("A moderator muted you here until")
        expect(carol.locator("#msg")).to_have_value("can you hear me?")  # kept, not resent
        expect(pending(carol)).to_have_count(0)
        errors = received(carol, "error")
        assert errors[-1]["code"] == "muted" and errors[-1]["ref"] == sent_commands(carol, "say")[-1]["ref"], errors
        assert errors[-1]["until"] > time.time() * 1000 + 500_000, errors
    carol.wait_for_timeout(1000)  # (a negative: give a resend the time to happen)
    assert len(sent_commands(carol, "say")) == 1
    mod.get_by_role("button", name="Unmute carol", exact=True).click()  # on the line saying it was done
    expect(mod_lines(mod).last).to_have_text("You unmuted carol.")
    carol.press("#msg", "Enter")
    expect_last_line(mod, "can you hear me?")

    moderate_member(mod, "bob", "Ban", reason="flooding", duration="1 hour")
    with explained(bob):
        expect(bob.locator("#room-lobby")).to_have_attribute("data-removed", "banned")
        until = received(bob, "left")[-1]["until"]
        assert abs(until / 1000 - (time.time() + 3600)) < 60, until
        # (the time; on another day than today, as an hour's ban from 23:00 on ends, the date too)
        shown = bob.evaluate("""ms => {
            const when = new Date(ms), time = when.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
            if (when.toDateString() === new Date().toDateString()) return time;
            return when.toLocaleDateString([], {day: 'numeric', month: 'short'}) + ', ' + time;
        }""", until)
        expect(removed_lines(bob).last).to_contain_text(f"A moderator banned you from #lobby until {shown}")
        expect(removed_lines(bob).last).to_contain_text(": flooding.")
    expect(bob.locator("#tab-lobby .note")).to_have_text("banned")
    expect(mod_lines(mod).last).to_contain_text("You banned bob from the room for 1 hour.")

    bob.get_by_role("button", name="Join #lobby again").click()
    with explained(bob):
        expect(removed_lines(bob).last).to_contain_text(f"You are banned from #lobby until {shown}.")
        assert received(bob, "error")[-1]["code"] == "banned"
    again = open_page(server, token=bob_token, room=None)  # bob in a new tab: kept out as well
    expect(again.locator("#room-lobby")).to_have_attribute("data-removed", "banned")
    expect(removed_lines(again).last).to_contain_text("You are banned from #lobby until")
    expect(again.locator("#tab-lobby .note")).to_have_text("banned")

    mod.get_by_role("button", name="Unban bob").click()
    expect(mod_lines(mod).last).to_have_text("You lifted bob’s ban.")
    bob.get_by_role("button", name="Join #lobby again").last.click()
    wait_joined(bob)
    expect(bob.locator("#tab-lobby .note")).to_be_hidden()


def test_close_codes_of_token_mode(start_server: Any, open_page: Any) -> None:
    """4001 (the token expired) makes the page say hello again on a new connection; 4003 (the
    app disconnected the user) ends it, said so, with no retry. A token in the URL that has
    expired is not even tried: "sign in"."""
    server = start_server("gunicorn", **TOKEN_ENV)
    routes: list[WebSocketRoute] = []

    def route(ws: WebSocketRoute) -> None:
        ws.connect_to_server()
        routes.append(ws)

    page = open_page(server, token=make_token("u-alice", "alice"), route=route)
    routes[-1].close(code=4001, reason="token expired")
    with explained(page):
        wait_open(page, timeout=RECONNECT_TIMEOUT_MS)
        wait_joined(page)
        assert len(routes) == 2 and len(sent_commands(page, "hello")) == 2

    routes[-1].close(code=4003, reason="disconnected")
    expect(page.locator("body")).to_have_attribute("data-state", "closed")
    expect(page.locator("#status")).to_contain_text("Disconnected by the app (4003)")
    page.wait_for_timeout(1500)  # (a negative: give a retry the time to happen)
    assert len(routes) == 2
    page.reload()  # as the page advises: the tab kept its token (not in the URL any more)
    wait_open(page)
    wait_joined(page)
    expect(page.locator("#my-nick")).to_have_text("alice")

    stale = open_page(server, token=make_token("u-alice", "alice", ttl=-60), wait=False)
    expect(stale.locator("body")).to_have_attribute("data-state", "signed-out")
    expect(stale.locator("#signin-why")).to_have_text("Your sign-in link has expired.")
    expect(stale.get_by_role("link", name="Sign in")).to_be_hidden()  # no CHAT_LOGIN_URL here
    assert sockets_opened(stale) == 0


def test_too_many_connections_is_shown_and_final(start_server: Any, open_page: Any) -> None:
    """Over CHAT_MAX_CONNECTIONS_PER_USER the server answers too_many_connections and closes with
    1008: the page says why, and does not retry."""
    server = start_server("gunicorn", **TOKEN_ENV, CHAT_MAX_CONNECTIONS_PER_USER="1")
    token = make_token("u-alice", "alice")
    first = open_page(server, token=token)
    second = open_page(server, token=token, wait=False)
    expect(second.locator("body")).to_have_attribute("data-state", "closed")
    expect(second.locator("#status")).to_contain_text("(1008)")
    with explained(second):
        error = received(second, "error")[-1]
        assert error["code"] == "too_many_connections", error
    expect(second.locator("#status")).to_contain_text(error["message"])
    second.wait_for_timeout(1000)  # (a negative: give a retry the time to happen)
    assert sockets_opened(second) == 1
    expect(first.locator("body")).to_have_attribute("data-state", "open")


def test_screenshots_of_moderation(start_server: Any, open_page: Any) -> None:
    """The moderator's view and a kicked user's view, desktop (1280x720) and phone (390x700),
    are captured to tests/artifacts/; on the phone nothing is wider than the screen and the
    moderation controls fit."""
    server = start_server("gunicorn", **TOKEN_ENV)
    desktop = {"viewport": {"width": 1280, "height": 720}}
    phone = {"viewport": {"width": 390, "height": 700}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
    mod_token = make_token("u-mod", "Morgan", mod=["*"])
    mod_desktop = open_page(server, token=mod_token, **desktop)
    mod_phone = open_page(server, token=mod_token, **phone)  # the same moderator, on a phone too
    sam = open_page(server, token=make_token("u-sam", "Sam Okafor"), **desktop)
    kim = open_page(server, token=make_token("u-kim", "kim"), **phone)
    for page in (mod_desktop, mod_phone, sam, kim):
        open_room(page, "support")

    conversation = [
        (sam, "the export has been stuck at 99% for an hour"),
        (mod_desktop, "which browser? I'll look at the logs"),
        (kim, "BUY CHEAP FOLLOWERS at totally-legit.example"),
        (sam, "firefox, on a laptop — " + "a-very-long-word-without-spaces-" * 3 + "end"),
        (kim, "BUY CHEAP FOLLOWERS at totally-legit.example!!!"),
    ]
    for page, text in conversation:
        say(page, text)
        expect_last_line(mod_desktop, text, "support")
    spam = lines(mod_desktop, "support").filter(has_text="BUY CHEAP FOLLOWERS at totally-legit.example!!!")
    spam.get_by_role("button", name="Delete message from kim").click()
    for page in (mod_desktop, mod_phone, sam, kim):
        expect(page.locator("#log-support .line.deleted")).to_have_count(1)

    # The moderator about to act on kim: controls open under her name.
    moderate_members = mod_desktop.locator("#room-support .members")
    moderate_members.get_by_role("button", name="Moderate kim").click()
    mod_desktop.fill("#mod-support .reason", "spam")
    mod_phone.locator("#room-support .members summary").click()
    mod_phone.locator("#room-support .members").get_by_role("button", name="Moderate kim").click()
    expect(mod_phone.locator("#mod-support")).to_be_visible()
    for button in mod_phone.locator("#mod-support button").all():
        button.scroll_into_view_if_needed()
        box = button.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box

    assert_contrast(
        mod_phone,
        [
            "#my-role",
            ".members .role",
            ".members .who",
            "#mod-support label",
            "#mod-support button",
            "#log-support .line .del",
            "#log-support .line.deleted",
        ],
    )

    ARTIFACTS.mkdir(exist_ok=True)
    shots = [("moderator-desktop", mod_desktop), ("moderator-phone", mod_phone)]
    for name, page in shots:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    mod_desktop.locator("#mod-support").get_by_role("button", name="Kick kim", exact=True).click()
    moderate_member(mod_desktop, "Sam Okafor", "Kick", room="support", reason="please take it to #help")
    for page in (kim, sam):
        expect(page.locator("#room-support")).to_have_attribute("data-removed", "kicked")
        expect(page.locator("#tab-support .note")).to_have_text("removed")
        expect(page.locator("#log-support .line .del")).to_have_count(4)
        for button in page.locator("#log-support .line .del").all():
            expect(button).to_be_hidden()  # out of the room: nothing to act on there
    assert_contrast(kim, ["#tab-support .note", "#log-support .line.sys.removed", "#log-support .line.sys button"])
    shots = [("kicked-desktop", sam), ("kicked-phone", kim)]
    for name, page in shots:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    for name in ("moderator-desktop", "moderator-phone", "kicked-desktop", "kicked-phone"):
        path = ARTIFACTS / f"{name}.png"
        assert path.stat().st_size > 5 * 1024, f"{path} is only {path.stat().st_size} bytes"
    for page in (mod_phone, kim):
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


# ---- Older lines, typing, links and mentions; the log's place through everything that resizes it

DESKTOP = {"viewport": {"width": 1280, "height": 720}}
PHONE = {"viewport": {"width": 390, "height": 700}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
SIZES = {"desktop": DESKTOP, "phone": PHONE}

# Which line is at the top of a log's view, and where it is on the screen.
TOP_LINE = """el => {
    const box = el.getBoundingClientRect();
    const line = [...el.children].find(line => line.getBoundingClientRect().bottom > box.top);
    return {text: (line.querySelector(".text") || line).textContent, y: line.getBoundingClientRect().top};
}"""


def frame_done(page: Page) -> None:
    """Wait until the page has drawn two frames (its scroll and resize handlers have run)."""
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def scroll_settled(page: Page, room: str = "lobby") -> None:
    """Wait until the log has not scrolled for 150 ms (a smooth scroll has ended)."""
    page.eval_on_selector(
        f"#log-{room}",
        """log => new Promise(done => {
            let timer = setTimeout(done, 150);
            log.addEventListener("scroll", () => { clearTimeout(timer); timer = setTimeout(done, 150); });
        })""",
    )


def assert_at_bottom(page: Page, room: str = "lobby") -> None:
    """The log is scrolled to its end and its newest line is wholly in view."""
    frame_done(page)
    metrics = scroll_metrics(page, room)
    assert metrics["top"] + metrics["client"] >= metrics["height"] - 2, metrics
    log = page.locator(f"#log-{room}").bounding_box()
    last = page.locator(f"#log-{room} .line").last.bounding_box()
    assert log is not None and last is not None
    assert log["y"] - 1 <= last["y"] and last["y"] + last["height"] <= log["y"] + log["height"] + 1, (log, last)


def set_hidden(page: Page, hidden: bool) -> None:
    """Make the page believe it is hidden (another tab in front) or shown again."""
    page.evaluate(
        """hidden => {
            Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
            Object.defineProperty(document, "visibilityState", {configurable: true,
                                  get: () => hidden ? "hidden" : "visible"});
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        hidden,
    )


def test_scroll_to_the_top_loads_older_lines_keeping_the_reader_s_place(
    start_server: Any, open_page: Any, make_proxy: Any
) -> None:
    """Scrolled to the top of a room's log, the page asks for the 50 older events before its
    oldest and puts their lines above, the line the reader was looking at staying where it was
    on the screen; deleted lines (tombstones) show as nothing. One request per room at a time,
    asked again after a reconnect; when no older ones are kept the log says it starts there,
    once, and asks no more. By keyboard too (Home), on a phone."""
    server = start_server("gunicorn", **TOKEN_ENV)
    proxy = make_proxy(server)
    old = V2Client(server, token=make_token("u-old", "oldtimer"))
    old.join("lobby")
    for i in range(130):  # seqs 1 to 130
        old.send(type="say", room="lobby", text=f"old {i}", ref=f"old-{i}")
    for _ in range(130):
        old.wait("ack")
    for seq in (41, 101):  # "old 40", "old 100": tombstones now; the deletions are seqs 131 and 132
        old.send(type="delete", room="lobby", seq=seq, ref=f"delete-{seq}")
        old.wait("done")
    kept = [f"old {i}" for i in range(130) if i not in (40, 100)]

    page = open_page(server, proxy.url, token=make_token("u-alice", "alice"), **DESKTOP)
    # The join's history: seqs 83 to 132, the lines old 82 to old 129 but old 100.
    expect(texts(page)).to_have_text(kept[-47:])
    assert sent_commands(page, "history") == []  # at the bottom: nothing asked

    with explained(page):
        seen = page.eval_on_selector("#log-lobby", "el => { el.scrollTop = 0; return (" + TOP_LINE + ")(el); }")
        assert seen["text"] == "old 82", seen
        expect(texts(page)).to_have_text(kept[-96:])
        line = lines(page).filter(has=page.locator(".text").filter(has_text=re.compile(r"^old 82$")))
        now = line.bounding_box()
        assert now is not None and abs(now["y"] - seen["y"]) <= 1, (seen, now)
        assert sent_commands(page, "history") == [{"type": "history", "room": "lobby", "before": 83, "limit": 50}]
        # Fifty older lines are not news: the live region was quiet while they went in, not for long.
        expect(page.locator("#log-lobby")).to_have_attribute("aria-live", "polite", timeout=3000)

        # The next page, its answer held: the reader at the top again and again, one request.
        proxy.hold("to_client")
        for top in (0, 3, 0):
            page.eval_on_selector("#log-lobby", "(el, top) => { el.scrollTop = top; }", top)
            frame_done(page)
        page.wait_for_timeout(300)
        assert [c["before"] for c in sent_commands(page, "history")] == [83, 33]
        # The connection goes with the answer: the rejoined page asks again, and shows it once.
        proxy.cut()
        wait_open(page, timeout=RECONNECT_TIMEOUT_MS)
        expect(texts(page)).to_have_text(kept)
        start = page.locator("#log-lobby .line.start")
        expect(start).to_have_text("Start of the kept history of #lobby.")
        assert page.locator("#log-lobby .line").first.get_attribute("class") == "line sys start"
        assert [c["before"] for c in sent_commands(page, "history")] == [83, 33, 33]
        page.eval_on_selector("#log-lobby", "el => { el.scrollTop = 0; }")
        frame_done(page)
        page.wait_for_timeout(300)  # (a negative: give a request the time to go)
        assert len(sent_commands(page, "history")) == 3
        expect(start).to_have_count(1)

    # On a phone, by keyboard: Home in the log, twice (the second once the first has done
    # scrolling: a key pressed while Chromium's smooth scroll still runs may go unheeded).
    phone = open_page(server, token=make_token("u-bob", "bob"), **PHONE)
    expect(texts(phone)).to_have_text(kept[-47:])
    phone.locator("#log-lobby").focus()
    phone.keyboard.press("Home")
    expect(texts(phone)).to_have_text(kept[-96:])
    scroll_settled(phone)
    phone.keyboard.press("Home")
    expect(texts(phone)).to_have_text(kept)
    expect(phone.locator("#log-lobby .line.start")).to_have_count(1)
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_typing_indicator_appears_in_the_other_page_and_goes(start_server: Any, open_page: Any) -> None:
    """Typing in one page shows "alice is typing…" under the room's log in the others (not in
    her own), both names when two type, gone at once when her line comes, and 5 s after the
    last `typing` otherwise. The page says `typing` at most every 2 s. On a phone the line
    moves nothing: neither the input nor the newest line, which it does not cover."""
    server = start_server("gunicorn")
    alice = open_page(server, nick="alice", **DESKTOP)
    bob = open_page(server, nick="bob", **PHONE)
    carol = Talker(server, "carol")
    for _ in range(30):
        carol.say(f"line {carol.said}")
    expect_last_line(bob, "line 29")
    assert_at_bottom(bob)
    indicator = bob.locator("#room-lobby .typing")
    expect(indicator).to_be_hidden()
    before = [bob.locator(selector).bounding_box() for selector in ("#msg", "#log-lobby .line >> nth=-1")]

    with explained(bob):
        alice.locator("#msg").press_sequentially("hello bob", delay=30)
        expect(indicator).to_have_text("alice is typing…")
        after = [bob.locator(selector).bounding_box() for selector in ("#msg", "#log-lobby .line >> nth=-1")]
        assert after == before, (before, after)
        shown, newest = indicator.bounding_box(), after[1]
        assert shown is not None and newest is not None
        assert shown["y"] >= newest["y"] + newest["height"] - 1, (shown, newest)  # under it, not over it
        carol._send({"type": "typing", "room": "lobby"})
        expect(indicator).to_have_text("alice and carol are typing…")
        expect(alice.locator("#room-lobby .typing")).to_have_text("carol is typing…")  # never herself

        alice.press("#msg", "Enter")
        expect_last_line(bob, "hello bob")
        expect(indicator).to_have_text("carol is typing…", timeout=1000)  # at once, not in 5 s
        carol_typed = time.monotonic()
        expect(indicator).to_be_hidden(timeout=8000)
        assert time.monotonic() - carol_typed > 4, "gone before its 5 s"

    # Typing on and on: a `typing` every 2 s at most, timed in the page (the frames' times here
    # are when this process heard of them, up to a few tens of ms late).
    alice.evaluate("""() => {
        window.typingSent = [];
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) {
            if (JSON.parse(data).type === "typing") window.typingSent.push(performance.now() / 1000);
            return send.call(this, data);
        };
    }""")
    started = time.monotonic()
    while time.monotonic() - started < 4.5:
        alice.locator("#msg").press_sequentially("more ", delay=40)
    sent = alice.evaluate("() => window.typingSent")
    assert 2 <= len(sent) <= 3, sent
    assert all(later - earlier >= 1.95 for earlier, later in zip(sent, sent[1:])), sent


@pytest.mark.parametrize("size", SIZES)
def test_reader_at_the_bottom_stays_there_while_own_lines_wait(
    start_server: Any, open_page: Any, make_proxy: Any, size: str
) -> None:
    """A reader at the bottom who types five lines fast while others talk ends at the bottom,
    the newest line on screen: the "not yet delivered" rows that come and go under the log
    (for long on a slow network: here the server's answers are held a moment) do not leave
    them behind."""
    server = start_server("gunicorn")
    proxy = make_proxy(server)
    page = open_page(server, proxy.url, nick="alice", **SIZES[size])
    bob = Talker(server, "bob")
    for _ in range(40):
        bob.say(f"line {bob.said}")
    expect_last_line(page, "line 39")
    assert_at_bottom(page)

    stop = threading.Event()

    def keep_talking() -> None:
        while not stop.is_set():
            bob.say(f"line {bob.said}")
            time.sleep(0.01)

    talking = threading.Thread(target=keep_talking)
    talking.start()
    try:
        for i in range(5):
            say(page, f"mine {i}")
            if i == 2:  # the network slows down: acks and lines wait, the rows stay
                proxy.hold("to_client")
        expect(pending(page).filter(has_text="mine 4")).to_have_count(1)  # (held: waiting for its ack)
        page.wait_for_timeout(200)
        proxy.release("to_client")
    finally:
        stop.set()
        talking.join()
    bob.say("the last line")
    with explained(page):
        expect_last_line(page, "the last line")
        expect(pending(page)).to_have_count(0)
        expect(texts(page).filter(has_text=re.compile(r"^mine \d$"))).to_have_count(5)
        assert_at_bottom(page)
        expect(lines(page).last).to_be_in_viewport()


def test_rooms_listing_follows_joins_without_a_refresh(start_server: Any, open_page: Any) -> None:
    """The listing of rooms shows a room the reader just made, and a second member in the
    lobby, within seconds and without a click on Refresh (the server's listing may be a
    second old when asked right after a join)."""
    server = start_server("gunicorn")
    alice = open_page(server, nick="alice")
    bob = open_page(server, nick="bob")

    def count(page: Page, room: str) -> Locator:
        return page.locator(f"#room-list li[data-room='{room}'] .count")

    for page in (alice, bob):
        expect(count(page, "lobby")).to_have_text("2 members", timeout=5000)
    open_room(alice, "fresh")
    expect(count(alice, "fresh")).to_have_text("1 member", timeout=5000)
    open_room(bob, "fresh")
    for page in (alice, bob):
        expect(count(page, "fresh")).to_have_text("2 members", timeout=5000)
    for page in (alice, bob):
        assert len(sent_commands(page, "rooms")) <= 6, sent_commands(page, "rooms")  # a few, not a stream


@pytest.mark.parametrize("size", SIZES)
def test_status_and_notice_take_no_room_from_the_log(
    start_server: Any, open_page: Any, make_proxy: Any, size: str
) -> None:
    """The header stays one line whatever the status says ("Reconnecting in N s…"), and an
    empty notice takes no space: no band above the form, the newest line in view throughout."""
    server = start_server("gunicorn")
    proxy = make_proxy(server)
    page = open_page(server, proxy.url, nick="alice", **SIZES[size])
    bob = Talker(server, "bob")
    for _ in range(40):
        bob.say(f"line {bob.said}")
    expect_last_line(page, "line 39")
    header = page.locator("header").bounding_box()
    assert header is not None

    # Cut off: the status counts the seconds to the next try, on the header's one line.
    proxy.down()
    expect(page.locator("#status")).to_contain_text(re.compile(r"Reconnecting in \d+ s"))
    frame_done(page)
    now = page.locator("header").bounding_box()
    assert now is not None and abs(now["height"] - header["height"]) <= 1, (header, now)
    assert_at_bottom(page)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    status_title = page.locator("#status").get_attribute("title")
    proxy.up()
    wait_open(page, timeout=RECONNECT_TIMEOUT_MS)

    # No notice: nothing between the rooms and the form.
    notice, form, chat = (page.locator(s).bounding_box() for s in ("#notice", "#form", "#main"))
    assert notice is not None and form is not None and chat is not None
    assert notice["height"] == 0, notice
    assert abs(chat["y"] + chat["height"] - form["y"]) <= 1, (chat, form)
    assert_at_bottom(page)

    # A notice takes its line, and the log keeps its newest line in view; then it goes again.
    page.fill("#msg", "é" * 300)  # 600 bytes: over the limit
    page.press("#msg", "Enter")
    expect(page.locator("#notice")).to_contain_text("Message too long")
    assert_at_bottom(page)
    expect(page.locator("#notice")).to_have_text("", timeout=6000)
    frame_done(page)
    notice = page.locator("#notice").bounding_box()
    assert notice is not None and notice["height"] == 0, notice
    assert_at_bottom(page)
    # A status cut short on the screen is there in full on hover.
    assert status_title is not None and status_title.startswith("Reconnecting in"), status_title


def test_links_are_clickable_for_http_and_https_only(start_server: Any, open_page: Any) -> None:
    """http and https URLs in a line are links (a new tab, no opener, no referrer), without
    the punctuation after them; javascript:, data: and the like stay text, and nothing in a
    line becomes markup."""
    server = start_server("gunicorn")
    alice, bob = open_page(server, nick="alice"), open_page(server, nick="bob")
    line = (
        "see https://example.com/a_(b)?q=1#x. and (http://x.test/path), "
        "not javascript:alert(1) nor data:text/html,hi nor xhttp://no.test nor javascript://x.test/%0aalert(1); "
        '"https://quoted.test/", HTTPS://LOUD.TEST/!'
    )
    say(bob, line)
    expect_last_line(alice, line)  # the text is the text, links and all
    links = lines(alice).last.locator("a")
    expect(links).to_have_text(
        ["https://example.com/a_(b)?q=1#x", "http://x.test/path", "https://quoted.test/", "HTTPS://LOUD.TEST/"]
    )
    hrefs = [a.get_attribute("href") for a in links.all()]
    assert hrefs == [
        "https://example.com/a_(b)?q=1#x",
        "http://x.test/path",
        "https://quoted.test/",
        "https://loud.test/",
    ]
    for a in links.all():
        expect(a).to_have_attribute("target", "_blank")
        expect(a).to_have_attribute("rel", "noopener noreferrer")
    links.first.focus()  # by keyboard too
    expect(links.first).to_be_focused()

    payload = 'https://evil.test/"><img src=x onerror=window.__pwned=1> javascript:window.__pwned=2'
    say(bob, payload)
    expect_last_line(alice, payload)
    expect(lines(alice).last.locator("a")).to_have_attribute("href", "https://evil.test/")
    expect(alice.locator("#panels img")).to_have_count(0)
    assert alice.evaluate("typeof window.__pwned") == "undefined"
    assert_contrast(alice, ["#log-lobby .line a"])


def test_mentions_are_highlighted_counted_and_put_in_the_title(start_server: Any, open_page: Any) -> None:
    """A line naming the reader ("@alice", any case, not inside a longer word) is highlighted,
    counted on its room's tab apart from the unread lines ("@1"), and while the page is hidden
    in the title: "(2) #dev – Chat", until the page is shown again."""
    server = start_server("gunicorn")
    alice, bob = open_page(server, nick="alice"), open_page(server, nick="bob")
    for text in ("hey @Alice, look", "mail bob@alice.test, or @alicette, or @alice.b", "(@alice)", "@alice-x"):
        say(bob, text)
        expect_last_line(alice, text)
    expect(lines(alice)).to_have_class(
        [re.compile(r"\bmention\b"), re.compile(r"^line msg$"), re.compile(r"\bmention\b"), re.compile(r"^line msg$")]
    )
    expect(lines(alice).first.locator("mark")).to_have_text("@Alice")
    expect(bob.locator("#log-lobby .line.mention")).to_have_count(0)
    say(alice, "I am @alice")  # one's own line: no highlight
    expect_last_line(bob, "I am @alice")
    expect(lines(alice).last).not_to_have_class(re.compile(r"\bmention\b"))
    expect(alice).to_have_title("#lobby – Chat")

    open_room(alice, "dev")
    say(bob, "@ALICE are you there?")
    expect(alice.locator("#tab-lobby .mentions")).to_have_text("@1")
    say(bob, "no mention")
    expect(alice.locator("#tab-lobby .badge")).to_have_text("2")
    expect(alice.locator("#tab-lobby .mentions")).to_have_text("@1")
    expect(alice).to_have_title("#dev – Chat")

    set_hidden(alice, True)
    say(bob, "@alice one")
    expect(alice).to_have_title("(1) #dev – Chat")
    say(bob, "still none")
    say(bob, "@alice two")
    expect(alice).to_have_title("(2) #dev – Chat")
    expect(alice.locator("#tab-lobby .mentions")).to_have_text("@3")
    expect(alice.locator("#tab-lobby .badge")).to_have_text("5")
    set_hidden(alice, False)
    expect(alice).to_have_title("#dev – Chat")

    assert_contrast(
        alice,
        [
            "#tab-lobby .mentions",
            "#log-lobby .line.mention .text",
            "#log-lobby .line.mention .nick",
            "#log-lobby .line.mention time",
        ],
    )
    show_room(alice, "lobby")
    expect(alice.locator("#tab-lobby .mentions")).to_be_hidden()
    expect(alice.locator("#tab-lobby .badge")).to_be_hidden()
    expect(alice).to_have_title("#lobby – Chat")
