"""The Bottle application: the page, the WebSocket endpoint, and the hub behind them."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import bottle

from .addresses import Addresses
from .api import ServerApi
from .chat.codec import SUBPROTOCOL_V2, Codec, V1Codec, V2Codec
from .chat.commands import CommandError, Hello, Refresh, Say
from .chat.engine import Engine
from .chat.hub import Hub
from .chat.peer import FLOODING, OVER, WITHIN, Peer
from .config import Config, ConfigError
from .engines.memory import MemoryEngine
from .metrics import Metrics, NoMetrics
from .token import Verifier
from .transport import frames
from .transport.conn import Conn
from .transport.frames import ProtocolFailure
from .transport.websocket import ChatWebSocket

if TYPE_CHECKING:
    from .engines.redis import RedisEngine

log = logging.getLogger(__name__)

# Seconds a refused connection has to answer our close frame.
CLOSE_WAIT = 2.0

VIEWS = Path(__file__).resolve().parent.parent / "views"
# Where the page opens its WebSocket.
WS_PATH = "/ws"


class Refusal(NamedTuple):
    """A handshake the chat refuses: an HTTP status before the 101, a close code after it."""

    status: int
    close_code: int
    reason: str
    # Seconds the client should wait before it tries again (429, 503), if there is a rule.
    retry_after: float | None = None


# A WSGI environ, and the start_response a WSGI app is given.
Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def peer_of(environ: Environ, client: str) -> str:
    """The client's address for the logs, and the proxy's when it came through one."""
    peer = f"{environ.get('REMOTE_ADDR', '?')}:{environ.get('REMOTE_PORT', '?')}"
    return peer if client == environ.get("REMOTE_ADDR") else f"{client} via {peer}"


def offers_v2(environ: Environ) -> bool:
    """Whether the handshake offers the subprotocol chat.v2 (RFC 6455 §4.2.2: else no header, v1)."""
    offered = environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")
    return SUBPROTOCOL_V2 in (token.strip() for token in offered.split(","))


class Chat:
    """What the routes serve: the page, and WebSocket connections joined by one hub."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics(config.metrics_token) if config.metrics_token else NoMetrics()
        # What carries the chat: Redis for many workers and hosts, else this worker alone.
        self.engine: Engine
        self.redis: RedisEngine | None = None
        if config.redis_url:
            # (redis-py is imported only then: in the worker, after gevent has patched the world)
            from .engines.redis import RedisEngine

            try:
                self.engine = self.redis = RedisEngine(config, self.metrics)
            except ValueError as error:
                raise ConfigError(f"REDIS_URL: {error}") from None
        else:
            self.engine = MemoryEngine(
                history=config.history,
                recovery_window=config.recovery_window,
                max_rooms=config.max_rooms,
                history_bytes=config.history_bytes,
                max_connections_per_user=config.max_connections_per_user,
            )
            self.metrics.broker_up.set(1)  # (this worker alone: nothing to be away)
        self.hub = Hub(
            self.engine,
            inbox_size=config.hub_inbox_size,
            ping_period=config.ping_period,
            pong_wait=config.pong_wait,
            metrics=self.metrics,
            private_rooms=config.private_rooms,
            token_grace=config.token_grace,
            token_mode=config.auth == "token",
        )
        # The door for the app's backend (off without CHAT_API_KEY).
        self.api = ServerApi(self.hub, config, self.metrics)
        # Token mode: what verifies hellos and refreshes (None in open mode).
        self.verifier = Verifier(config) if config.auth == "token" else None
        # Client addresses (trusted proxies) and the per-address limits.
        self.addresses = Addresses(
            config.trusted_proxies, config.max_connections_per_ip, config.connect_rate_per_ip
        )
        # The codecs every connection shares: they hold only the limits.
        self.v1 = V1Codec(config.max_message_size)
        self.v2 = V2Codec(config.max_message_size, config.rate_limit, token=config.auth == "token")
        self._received_v1, self._received_v2 = (self.metrics.received.labels(v) for v in ("v1", "v2"))
        # Open WebSocket connections in this process, for the connection cap.
        self.connections = 0
        self.shutting_down = False
        # Whether the log has said once that the stock gevent-websocket handler is serving us.
        self._stock_handler_noted = False
        # What the page needs of the config, as a JSON object in its script ("</" escaped).
        page_config = json.dumps({"auth": config.auth, "tokenUrl": config.token_url, "loginUrl": config.login_url})
        self._page: str = bottle.template(
            "home",
            template_lookup=[str(VIEWS)],
            max_message_size=config.max_message_size,
            page_config=page_config.replace("</", "<\\/"),
        )

    def serve_home(self) -> str:
        bottle.response.content_type = "text/html; charset=utf-8"
        return self._page

    def serve_health(self) -> dict[str, object]:
        """For the platform and operators: 200 "ok", or 503 "degraded" while Redis is away."""
        healthy = self.engine.healthy()
        bottle.response.status = 200 if healthy else 503
        return {
            "status": "ok" if healthy else "degraded",
            "broker": "redis" if self.redis is not None else "in-process",
            "connections": self.connections,
            "pid": os.getpid(),
        }

    def serve_metrics(self) -> bytes:
        """Prometheus' text format, for a scraper that has the token (off: 404, wrong: 401)."""
        metrics = self.metrics
        if not isinstance(metrics, Metrics):
            raise bottle.HTTPError(404, "metrics are off (set CHAT_METRICS_TOKEN)")
        # (From the environ: request.get_header() would leave a cycle, the environ and its
        # headers, for the collector: a scrape's socket and buffers waited minutes for it.)
        if not metrics.authorized(bottle.request.environ.get("HTTP_AUTHORIZATION", "")):
            raise bottle.HTTPError(401, "metrics need Authorization: Bearer <CHAT_METRICS_TOKEN>")
        body, bottle.response.content_type = metrics.exposition()
        return body

    def serve_plain_ws(self) -> str:
        """/ws without an upgrade (upgrades never reach Bottle, see ChatApp)."""
        raise bottle.HTTPError(400, "this endpoint speaks WebSocket only (Upgrade: websocket)")

    def serve_ws(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        """Upgrade to a WebSocket, then run the connection until it ends (Gorilla's serveWs)."""
        ws = environ["wsgi.websocket"]
        address = self.addresses.client(environ)
        refusal = self._refusal(environ, address)
        if refusal is None:
            refusal = self._over_limit(address, environ)
        if isinstance(ws, ChatWebSocket):
            if refusal is not None:
                error = bottle.HTTPError(refusal.status, refusal.reason)
                headers = [("Content-Type", "text/plain; charset=utf-8")]
                if refusal.retry_after is not None:
                    headers.append(("Retry-After", str(max(1, math.ceil(refusal.retry_after)))))
                start_response(error.status_line, headers)
                return [plain_text(error).encode()]
            codec = self.v2 if offers_v2(environ) else self.v1
            ws.accept(codec.frame_limit, SUBPROTOCOL_V2 if codec is self.v2 else None)
        else:
            codec = self.v2 if self._stock_chose_v2(ws) else self.v1
            ws = self._adopt_stock(ws, codec)
            if refusal is not None:
                ws.refuse(refusal.close_code, refusal.reason, CLOSE_WAIT)
                return []
        try:
            self._serve(ws, codec, environ, address)
        finally:
            self.addresses.release(address)
        return []

    def _serve(self, ws: ChatWebSocket, codec: Codec, environ: Environ, address: str) -> None:
        """Run an accepted connection until it ends."""
        config = self.config
        conn = Conn(
            ws,
            send_queue_size=config.send_queue_size,
            send_queue_bytes=config.send_queue_bytes,
            write_wait=config.write_wait,
            address=peer_of(environ, address),
            metrics=self.metrics,
        )
        peer = Peer(conn, codec, config.rate_limit)
        ws.forget_request()
        protocol = f"v{codec.version}"
        metrics = self.metrics
        metrics.accepted.labels(protocol).inc()
        metrics.connections.labels(protocol).inc()
        self.connections += 1
        self.hub.register(peer)
        try:
            # (a partial, not a closure over what it reads: an idle connection holds one object)
            conn.read_pump(partial(self._on_message, peer))
        finally:
            self.hub.unregister(peer)
            conn.wait_closed(timeout=2 * config.write_wait + 5)
            self.connections -= 1
            metrics.connections.labels(protocol).dec()
            metrics.closed.labels(str(conn.close_code)).inc()

    def _on_message(self, peer: Peer, data: str | bytes) -> None:
        """What the read pump does with each message of a connection: decode it, pace it, hand
        it to the hub."""
        v1, limit, hub = not peer.v2, self.config.rate_limit, self.hub
        (self._received_v1 if v1 else self._received_v2).inc()
        if isinstance(data, bytes):
            raise ProtocolFailure(frames.CLOSE_UNSUPPORTED_DATA, "text messages only")
        pace = peer.spend() if limit else WITHIN
        if pace is not WITHIN and (v1 or pace is FLOODING):
            self.metrics.rate_closes.inc()
            raise ProtocolFailure(frames.CLOSE_POLICY_VIOLATION, f"rate limit: {limit:g} messages/s")
        if peer.waiting:
            peer.wait_turn()
        if v1:
            say = self.v1.decode(data)
            if say is not None:
                hub.say(peer, say)
            return
        try:
            command = self.v2.decode(data, peer.greeted)
            if pace is OVER:
                raise CommandError(
                    "rate_limited",
                    f"over {limit:g} messages/s: not done",
                    getattr(command, "room", None),
                    getattr(command, "ref", None),
                )
            if isinstance(command, Say):
                hub.say(peer, command)
                return
            verifier = self.verifier
            if isinstance(command, Hello | Refresh) and verifier is not None:
                command = self._verified(command, verifier)
            if isinstance(command, Hello):
                peer.greeted = True  # (what comes after it is carried out after it, in the hub)
            hub.command(peer, command)
        except CommandError as error:
            log.debug("%r: %s", peer, error)
            hub.reply(peer, V2Codec.error(error))

    def _verified(self, command: Hello | Refresh, verifier: Verifier) -> Hello | Refresh:
        """A hello or refresh with the identity its token vouches for (in the read pump: the
        signature's cost stays off the hub); the refusal, counted, if none."""
        assert command.token is not None
        try:
            identity = verifier.verify(command.token)
        except CommandError as error:
            self.metrics.auth_refused.labels(error.code).inc()
            log.info("token refused: %s", error.message)
            raise
        if isinstance(command, Hello):
            return Hello(identity.name, command.session, None, identity)
        return Refresh("", identity)

    def _refusal(self, environ: Environ, address: str) -> Refusal | None:
        """Why this handshake must be refused, or None (origin, shutdown, capacity, v1 in token
        mode)."""
        if not self._origin_allowed(environ):
            origin, host = environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST")
            log.info(
                "refused WebSocket from origin %r to Host %r (%s); if only a reverse proxy makes them "
                "differ, have it pass the browser's Host (nginx: proxy_set_header Host $http_host;), "
                "else list the origin in CHAT_ALLOWED_ORIGINS",
                origin, host, peer_of(environ, address),
            )
            self.metrics.refused.labels("origin").inc()
            return Refusal(403, frames.CLOSE_POLICY_VIOLATION, "cross-origin WebSocket refused")
        if self.shutting_down:
            self.metrics.refused.labels("shutdown").inc()
            return Refusal(503, frames.CLOSE_GOING_AWAY, "server shutting down")
        if self.connections >= self.config.max_connections:
            log.warning("refused WebSocket: %d connections open (CHAT_MAX_CONNECTIONS)", self.connections)
            self.metrics.refused.labels("capacity").inc()
            return Refusal(503, frames.CLOSE_TRY_AGAIN_LATER, "server full, try again later", 5.0)
        if self.verifier is not None and not offers_v2(environ):
            self.metrics.refused.labels("v1_in_token_mode").inc()
            return Refusal(403, frames.CLOSE_POLICY_VIOLATION, "this chat needs signed identity: speak chat.v2")
        return None

    def _over_limit(self, address: str, environ: Environ) -> Refusal | None:
        """A per-address limit this handshake would pass (counted, when not), or None."""
        over = self.addresses.admit(address)
        if over is None:
            return None
        limit, wait = over
        log.info("refused WebSocket from %s: %s", peer_of(environ, address), limit)
        self.metrics.limit_refused.labels(limit).inc()
        why = "too many connections from your address" if limit == "ip_connections" else "connecting too fast"
        return Refusal(429, frames.CLOSE_TRY_AGAIN_LATER, why, wait)

    @staticmethod
    def _stock_chose_v2(stock: Any) -> bool:
        """Whether the stock handler's 101 named chat.v2 (it asks app_protocol(), see create_app)."""
        headers = getattr(stock.handler, "response_headers", None) or []  # as gevent keeps them: bytes
        return (b"Sec-WebSocket-Protocol", SUBPROTOCOL_V2.encode()) in headers

    def _adopt_stock(self, stock: Any, codec: Codec) -> ChatWebSocket:
        """Serve a connection gevent-websocket's stock handler has already answered with 101."""
        if not self._stock_handler_noted:
            self._stock_handler_noted = True
            log.warning(
                "served by gevent-websocket's stock handler: the chat works, but refusals (origin, "
                "capacity) come as close frames after the 101, connections get no handshake timeout "
                "and no close frame on SIGTERM. For all of it start `gunicorn -c gunicorn.conf.py "
                "wsgi:app` (the Procfile's command), or at least `gunicorn -k chatapp.ChatWorker`"
            )
        return ChatWebSocket.adopt(stock, codec.frame_limit)

    def _origin_allowed(self, environ: Environ) -> bool:
        """Like Gorilla's Upgrader: a browser's Origin must name the host it asked."""
        origin: str | None = environ.get("HTTP_ORIGIN")
        if origin is None:
            return True  # Not a browser: origin checks protect browsers' users only.
        allowed = self.config.allowed_origins
        origin = origin.strip().rstrip("/").lower()
        if "*" in allowed or origin in allowed:
            return True
        host: str = environ.get("HTTP_HOST", "")
        return urlsplit(origin).netloc == host.lower()

    def shutdown(self) -> None:
        """Refuse new connections and close the open ones with 1001 after their queues flush."""
        self.shutting_down = True
        self.hub.shutdown(frames.CLOSE_GOING_AWAY, "server going away")


def plain_text(error: bottle.HTTPError) -> str:
    """An error as one short line of text: "404 Not Found: <reason>"."""
    return f"{error.status_line}: {error.body}\n"


def plain_error(error: bottle.HTTPError) -> str:
    """Bottle's errors, as plain_text."""
    bottle.response.content_type = "text/plain; charset=utf-8"
    return plain_text(error)


class ChatApp(bottle.Bottle):
    """Bottle routes the page and plain requests; a WebSocket upgrade to /ws goes straight to
    the chat. (Bottle keeps its request and response in six greenlet-locals: for a
    WebSocket, whose greenlet lives as long as the connection, 2.5 KB an idle connection
    would hold and never use.)"""

    chat: Chat

    def __call__(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ.get("wsgi.websocket") is not None and environ.get("PATH_INFO") == WS_PATH:
            return self.chat.serve_ws(environ, start_response)
        body: list[bytes] = super().__call__(environ, start_response)
        return body


def create_app(config: Config | None = None) -> ChatApp:
    """Build the app and start its hub; call it in the serving process, after gevent patches.

    The returned app carries the Chat as `app.chat`, for the server to shut it down.
    """
    chat = Chat(config or Config.from_env())
    app = ChatApp()
    app.route("/", "GET", chat.serve_home)
    app.route(WS_PATH, "GET", chat.serve_plain_ws)
    app.route("/healthz", "GET", chat.serve_health)
    app.route("/metrics", "GET", chat.serve_metrics)
    app.route("/api/openapi.json", "GET", chat.api.serve_document)
    app.route("/api/<method>", "POST", chat.api.serve)
    app.route("/api/<method>", ["GET", "PUT", "DELETE", "PATCH", "HEAD"], chat.api.refuse_method)
    app.default_error_handler = plain_error
    app.chat = chat
    # gevent-websocket's stock handler asks the application which subprotocol it speaks.
    app.app_protocol = lambda path: SUBPROTOCOL_V2 if path == WS_PATH else None
    chat.hub.start()
    if chat.redis is not None:
        # Follow the lobby before taking connections, so that a v1 client hears every line said
        # after it connected; if Redis does not answer in time, start degraded.
        chat.redis.wait_ready()
    return app
