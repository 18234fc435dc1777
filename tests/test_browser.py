"""The chat page in a real browser: headless Chromium, driven by Playwright, against gunicorn.

Needs Debian's Chromium (`apt-get install -y chromium`) and the `playwright` package (Playwright's
own browser download is not used). Without them these tests skip; under CI=true they fail instead.
Synchronisation is Playwright's auto-waiting (expect), never sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import websocket
from conftest import unavailable

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page
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
# After a server restart the page's backoff may be a few seconds into its schedule.
RECONNECT_TIMEOUT_MS = 20_000

LINES = "#log .line"


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
    """open_page(server, **context_options) opens the chat in a fresh browser context, connected.

    Depends on start_server so that the pages close before the servers stop.
    """
    contexts: list[BrowserContext] = []

    def open_(server: ServerProcess, url: str | None = None, **options: Any) -> Page:
        context = browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.goto(url or server.url)
        wait_open(page)
        return page

    yield open_
    for context in contexts:
        context.close()


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(target)


def wait_open(page: Page, timeout: float = TIMEOUT_MS) -> None:
    expect(page.locator("body")).to_have_attribute("data-state", "open", timeout=timeout)
    expect(page.locator("#status")).to_have_text("Connected")


def say(page: Page, text: str) -> None:
    """Type a line into the page and press Enter, as a user does."""
    page.fill("#msg", text)
    page.press("#msg", "Enter")


def expect_last_line(page: Page, text: str) -> None:
    expect(page.locator(LINES).last).to_have_text(text)


@contextmanager
def sender(server: ServerProcess) -> Iterator[Callable[[list[str]], None]]:
    """A plain WebSocket client that sends lines (much faster than typing them).

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


def scroll_metrics(page: Page) -> dict[str, float]:
    return page.eval_on_selector(
        "#log",
        "el => ({top: el.scrollTop, client: el.clientHeight, height: el.scrollHeight})",
    )


def test_line_typed_in_one_page_appears_in_both(start_server: Any, open_page: Any) -> None:
    """A line typed in one page (Enter) shows in both pages' logs, and the input is cleared."""
    server = start_server("gunicorn")
    alice, bob = open_page(server), open_page(server)

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

        reader.eval_on_selector("#log", "el => { el.scrollTop = 100; }")
        send([f"while scrolled up {i}" for i in range(20)])
        expect_last_line(reader, "while scrolled up 19")
        after = scroll_metrics(reader)
        assert abs(after["top"] - 100) <= 1, after
        assert after["height"] > before["height"]  # the lines did arrive, below

        reader.eval_on_selector("#log", "el => { el.scrollTop = el.scrollHeight; }")
        send([f"at the bottom {i}" for i in range(20)])
        expect_last_line(reader, "at the bottom 19")
        end = scroll_metrics(reader)
        assert end["top"] + end["client"] >= end["height"] - 2, end
        expect(reader.locator(LINES).last).to_be_in_viewport()


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
        expect(reader.locator(LINES)).to_have_count(1000)

        reader.eval_on_selector("#log", "el => { el.scrollTop = el.scrollHeight / 2; }")
        seen = reader.eval_on_selector("#log", probe)

        send([f"new {i}" for i in range(100)])
        expect_last_line(reader, "new 99")
    expect(reader.locator(LINES)).to_have_count(1000)
    expect(reader.locator(LINES).first).to_have_text("old 100")
    now = reader.eval_on_selector("#log", probe)
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
        expect(page.locator("#log img")).to_have_count(0)
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
    expect(reader.locator(LINES).filter(has_text="é")).to_have_count(0)


def test_rate_limit_close_is_final(start_server: Any, open_page: Any) -> None:
    """When the server closes with 1008 (flooding), the page says why and does not retry."""
    server = start_server("gunicorn", CHAT_RATE_LIMIT="1")
    page, other = open_page(server), open_page(server)

    # Submit the form 3 times in one go: at 1 message/s with a burst of 2, the third is refused
    # and the server closes with 1008. Only 3, so that nothing is left unread on the server's
    # socket: a server that closes with unread data sends a TCP reset, which can destroy the
    # close frame in flight (the browser then sees 1006). That is the server's matter.
    page.evaluate(
        """() => {
            const msg = document.getElementById('msg'), form = document.getElementById('form');
            for (let i = 0; i < 3; i++) { msg.value = 'flood ' + i; form.requestSubmit(); }
        }"""
    )

    # A retry would have set "reconnecting" in the same close handler: "closed" means none.
    expect(page.locator("body")).to_have_attribute("data-state", "closed")
    expect(page.locator("#status")).to_contain_text("(1008)")
    expect(page.locator("#status")).to_contain_text("rate limit")
    # The two allowed lines reach the others, the third never does. (Not asserted on the
    # flooder's own log: its connection may be closed before the hub echoes them back to it.)
    expect(other.locator(LINES)).to_have_text(["flood 0", "flood 1"])
    expect(other.locator("body")).to_have_attribute("data-state", "open")


def test_input_maxlength_is_the_server_limit(start_server: Any, open_page: Any) -> None:
    """#msg's maxlength is the server's CHAT_MAX_MESSAGE_SIZE, so typing stops at the limit."""
    server = start_server("gunicorn", CHAT_MAX_MESSAGE_SIZE="100")
    page = open_page(server)

    expect(page.locator("#msg")).to_have_attribute("maxlength", "100")
    page.fill("#msg", "x" * 150)
    expect(page.locator("#msg")).to_have_value("x" * 100)


def test_screenshots_of_a_conversation(start_server: Any, open_page: Any) -> None:
    """Two pages mid-conversation, a phone and a desktop, are captured to tests/artifacts/."""
    server = start_server("gunicorn")
    phone = open_page(
        server,
        viewport={"width": 420, "height": 760},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    desktop = open_page(server, viewport={"width": 1000, "height": 700})

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
            expect_last_line(p, text)
    phone.fill("#msg", "typing a reply…")

    ARTIFACTS.mkdir(exist_ok=True)
    for name, page in (("phone", phone), ("desktop", desktop)):
        path = ARTIFACTS / f"two-pages-{name}.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size > 5 * 1024, f"{path} is only {path.stat().st_size} bytes"
    # The layout holds: nothing wider than the phone's screen, the form at the bottom.
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = phone.locator("#form").bounding_box()
    assert box is not None and abs(box["y"] + box["height"] - 760) <= 1, box


# WCAG 2 contrast ratio between an element's text colour and the background it is drawn on
# (its own, or the nearest ancestor's that is not transparent).
CONTRAST = r"""el => {
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


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_is_readable_in_both_color_schemes(
    start_server: Any, open_page: Any, scheme: str
) -> None:
    """Lines, input, status and Send button have WCAG AA contrast (4.5:1), light and dark."""
    server = start_server("gunicorn")
    page = open_page(server, color_scheme=scheme)
    say(page, "contrast")
    expect_last_line(page, "contrast")
    for selector in ("#log .line", "#msg", "#status", "#form button"):
        ratio = page.eval_on_selector(selector, CONTRAST)
        assert ratio >= 4.5, f"{selector} in {scheme} mode: contrast {ratio:.2f}:1"
