"""Prometheus metrics: what an operator watches (README, "Metrics").

Off unless CHAT_METRICS_TOKEN is set; then GET /metrics answers with the bearer token only.
Under gunicorn, any worker's answer covers every worker: prometheus_client's multiprocess
mode, with a directory per start of the server that gunicorn.conf.py makes (before anything
imports prometheus_client) and removes, marking each worker that exits. Counting never costs
a fan-out more than a few additions: deliveries are counted per burst, not per send.
"""

from __future__ import annotations

import hmac
import os
from typing import Literal

# Seconds from a line's arrival at the hub to the end of its fan-out: from a lone line to a
# thousand sockets (milliseconds) to a fan-out to ten thousand under load (a second or more).
FANOUT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REDIS_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The chat's metrics, each moved by the code it is named for."""

    def __init__(self, token: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # (a `_created` series per counter says nothing an operator needs)
        self._token = token.encode()
        # This app's own registry (a second app in one process would clash in the global one);
        # under gunicorn's workers, the per-process files are what a scrape reads.
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(
            name: str, doc: str, labels: tuple[str, ...] = (), mode: Literal["livesum", "liveall"] = "livesum"
        ) -> Gauge:
            # Under gunicorn: summed over the live workers, or one series per worker ("liveall").
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, registry=registry, buckets=buckets)

        self.connections = gauge("chat_connections", "Open WebSocket connections.", ("protocol",))
        self.accepted = counter("chat_connections_accepted", "WebSocket connections accepted.", ("protocol",))
        self.closed = counter("chat_connections_closed", "WebSocket connections closed, by close code.", ("code",))
        self.refused = counter(
            "chat_handshakes_refused",
            "WebSocket handshakes refused, by reason (origin, capacity, shutdown, bad_request).",
            ("reason",),
        )
        self.received = counter("chat_messages_received", "Messages received from clients.", ("protocol",))
        self.deliveries = counter(
            "chat_deliveries", "Messages handed to connections: one per message per connection it reached."
        )
        self.dropped = counter("chat_slow_clients_dropped", "Connections dropped because their send queue was full.")
        self.rate_closes = counter("chat_rate_limit_closes", "Connections closed for sending faster than allowed.")
        self.inbox = gauge("chat_hub_inbox_depth", "Requests waiting in a worker's hub inbox.", mode="liveall")
        self.fanout = histogram(
            "chat_fanout_seconds", "Time from a line's arrival at the hub to the end of its fan-out.", FANOUT_BUCKETS
        )
        self.rooms = gauge("chat_rooms", "Rooms the workers hold.")
        self.members = gauge("chat_room_members", "Members present in rooms (counted per room, per worker).")
        self.greenlets = gauge(
            "chat_greenlets", "Greenlets the chat runs: handlers, write pumps, hub, broker.", mode="liveall"
        )
        self.broker_up = gauge(
            "chat_broker_up", "1 while the worker reaches Redis, 0 while it is away.", mode="liveall"
        )
        self.redis_seconds = histogram(
            "chat_redis_roundtrip_seconds", "Round trips to Redis to publish a batch of lines.", REDIS_BUCKETS
        )
        self.outbox_lost = counter("chat_outbox_lost", "Lines given up because the Redis outbox was full.")
        self.auth_refused = counter(
            "chat_auth_refused", "Tokens refused (token mode), by reason (bad_token, token_expired).", ("reason",)
        )
        self.moderation = counter(
            "chat_moderation_actions", "Moderation commands carried out, by kind (kick, ban, ... delete).", ("action",)
        )
        self.api_requests = counter(
            "chat_api_requests", "Server API requests, by method and HTTP status.", ("method", "status")
        )
        self.limit_refused = counter(
            "chat_limit_refused",
            "Connections refused by a limit: ip_connections, ip_rate (handshakes), user_connections (hellos).",
            ("limit",),
        )

    def authorized(self, header: str) -> bool:
        """Whether an Authorization header carries the token (compared in constant time)."""
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._token)

    def exposition(self) -> tuple[bytes, str]:
        """The text format for a scrape: every worker's metrics under gunicorn, else this process's."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _Off:
    """A metric that counts nothing: what every metric is while metrics are off."""

    def labels(self, *args: object, **kwargs: object) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


class NoMetrics:
    """Metrics while CHAT_METRICS_TOKEN is unset: every metric is there and counts nothing."""

    def __getattr__(self, name: str) -> _Off:
        return _OFF


_OFF = _Off()
