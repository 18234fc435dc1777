"""An app's backend as the chat page sees it in token mode (CHAT_TOKEN_URL): GET /token answers
{"token": …} to a browser signed in to the app (a cookie naming a session it knows) and 401
otherwise, with the CORS headers a page on another origin needs to read it with credentials.
GET /login is the app's sign-in page (CHAT_LOGIN_URL). Tokens are made when asked for, with
chatapp.token.make, so each one lives `ttl` seconds from then.
"""

from __future__ import annotations

import json
import threading
import time
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COOKIE = "app_session"


class TokenApp:
    def __init__(self, key: tuple[str, str], origins: list[str], ttl: float = 3600) -> None:
        self.key = key
        self.origins = set(origins)  # the chat pages' origins: the only ones CORS lets read
        self.ttl = ttl
        self.sessions: dict[str, dict[str, Any]] = {}  # cookie value -> make()'s arguments
        # Every GET /token: (time.monotonic(), the session cookie or None, the status answered).
        self.requests: list[tuple[float, str | None, int]] = []
        # Tokens to hand out before good ones (say, signed with a key the chat does not know).
        self.bad_tokens: list[str] = []
        self.always_bad: str | None = None
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/login":
                    page = b"<!DOCTYPE html><title>Sign in</title><h1>The app's sign-in page</h1>"
                    self._answer(200, page, "text/html")
                    return
                if self.path.split("?")[0] != "/token":
                    self._answer(404, b"{}")
                    return
                cookie = SimpleCookie(self.headers.get("Cookie", "")).get(COOKIE)
                session = cookie.value if cookie else None
                status, body = app.token_for(session)
                app.requests.append((time.monotonic(), session, status))
                self._answer(status, json.dumps(body).encode())

            def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                origin = self.headers.get("Origin")
                if origin in app.origins:
                    self.send_header("Access-Control-Allow-Origin", origin)
                    self.send_header("Access-Control-Allow-Credentials", "true")
                self.send_header("Vary", "Origin")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def login_url(self) -> str:
        return self.url + "/login"

    def sign_in(self, session: str, sub: str, name: str | None = None, **claims: Any) -> None:
        """From now on a browser with this session cookie is `sub` (make()'s keyword arguments)."""
        self.sessions[session] = {"sub": sub, "name": name, **claims}

    def cookie(self, session: str) -> dict[str, str]:
        """The session cookie, for a Playwright context's add_cookies()."""
        return {"name": COOKIE, "value": session, "url": self.url}

    def token_for(self, session: str | None) -> tuple[int, dict[str, Any]]:
        from chatapp.token import make

        if session is None or session not in self.sessions:
            return 401, {"error": "not signed in"}
        if self.always_bad is not None:
            return 200, {"token": self.always_bad}
        if self.bad_tokens:
            return 200, {"token": self.bad_tokens.pop(0)}
        claims = dict(self.sessions[session])
        return 200, {"token": make(self.key, claims.pop("sub"), claims.pop("name"), ttl=self.ttl, **claims)}

    def served(self, session: str | None) -> list[int]:
        """The statuses of the GET /token requests of one session so far (None: without one)."""
        return [status for _, s, status in list(self.requests) if s == session]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
