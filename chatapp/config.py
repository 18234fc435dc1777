"""Settings, read once from environment variables into one typed object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting in the environment is malformed; the message names the variable."""


@dataclass(frozen=True)
class Config:
    # Largest message a client may send, in bytes (frames and fragments added up).
    max_message_size: int = 512
    # Time allowed to read the next frame (or pong) from the peer, in seconds.
    pong_wait: float = 60.0
    # Send pings to the peer with this period. Must be less than pong_wait; 25 s keeps
    # platform routers, which cut a connection idle for 55 s, from cutting ours.
    ping_period: float = 25.0
    # Time allowed to write a batch of messages to the peer, in seconds.
    write_wait: float = 10.0
    # Messages a connection may have queued for writing before the hub drops it as stuck.
    send_queue_size: int = 256
    # Bytes likewise: one v2 `joined` can carry hundreds of lines (an empty queue takes any one).
    send_queue_bytes: int = 1 << 20
    # Extra origins (scheme://host[:port]) allowed besides the request's own host.
    allowed_origins: tuple[str, ...] = ()
    # WebSocket connections one worker accepts; past it the handshake gets 503.
    max_connections: int = 10000
    # Time a new TCP connection has to complete its HTTP request, in seconds.
    handshake_timeout: float = 10.0
    # Messages per second one connection may send (burst: twice that); 0 turns it off.
    rate_limit: float = 10.0
    # Messages a v1 client receives when it connects, and a v2 joiner without `since`; 0: none.
    history: int = 50
    # Messages a room keeps for clients coming back with `since` (within history_bytes).
    recovery_window: int = 500
    # Rooms one worker holds; past it the least recently active room without members goes.
    max_rooms: int = 10000
    # Bytes of history one worker holds in all rooms; past it the oldest lines of the least
    # recently active rooms go first.
    history_bytes: int = 64 << 20
    # Redis for many workers and hosts; empty means one worker alone.
    redis_url: str = ""
    # Whether REDIS_URL names a node of a Redis Cluster.
    redis_cluster: bool = False
    # What every key of this chat in Redis starts with: two prefixes on one Redis are two chats.
    redis_prefix: str = "chat"
    # Seconds a quiet room's keys live in Redis after its last line, join or leave.
    room_ttl: int = 86400
    # Requests (register, unregister, broadcast) the hub's inbox holds before senders wait.
    hub_inbox_size: int = 1024
    # The bearer token GET /metrics asks for; empty turns metrics off (404).
    metrics_token: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build the config from CHAT_* and REDIS_URL, keeping defaults for unset ones."""
        env = os.environ if environ is None else environ
        config = cls(
            max_message_size=_int(env, "CHAT_MAX_MESSAGE_SIZE", cls.max_message_size, minimum=1),
            pong_wait=_float(env, "CHAT_PONG_WAIT", cls.pong_wait),
            ping_period=_float(env, "CHAT_PING_PERIOD", cls.ping_period),
            write_wait=_float(env, "CHAT_WRITE_WAIT", cls.write_wait),
            send_queue_size=_int(env, "CHAT_SEND_QUEUE_SIZE", cls.send_queue_size, minimum=1),
            send_queue_bytes=_int(env, "CHAT_SEND_QUEUE_BYTES", cls.send_queue_bytes, minimum=1024),
            allowed_origins=tuple(
                o.strip().rstrip("/").lower()
                for o in env.get("CHAT_ALLOWED_ORIGINS", "").split(",")
                if o.strip()
            ),
            max_connections=_int(env, "CHAT_MAX_CONNECTIONS", cls.max_connections, minimum=1),
            handshake_timeout=_float(env, "CHAT_HANDSHAKE_TIMEOUT", cls.handshake_timeout),
            rate_limit=_float(env, "CHAT_RATE_LIMIT", cls.rate_limit, minimum=0.0, unit="messages per second"),
            history=_int(env, "CHAT_HISTORY", cls.history, minimum=0),
            recovery_window=_int(env, "CHAT_RECOVERY_WINDOW", cls.recovery_window, minimum=1),
            max_rooms=_int(env, "CHAT_MAX_ROOMS", cls.max_rooms, minimum=1),
            history_bytes=_int(env, "CHAT_HISTORY_BYTES", cls.history_bytes, minimum=0),
            redis_url=_redis_url(env),
            redis_cluster=_flag(env, "CHAT_REDIS_CLUSTER"),
            redis_prefix=_prefix(env),
            room_ttl=_int(env, "CHAT_ROOM_TTL", cls.room_ttl, minimum=1),
            hub_inbox_size=_int(env, "CHAT_HUB_INBOX_SIZE", cls.hub_inbox_size, minimum=1),
            metrics_token=env.get("CHAT_METRICS_TOKEN", "").strip(),
        )
        if config.ping_period >= config.pong_wait:
            raise ConfigError(
                f"CHAT_PING_PERIOD ({config.ping_period}) must be less than "
                f"CHAT_PONG_WAIT ({config.pong_wait})"
            )
        if config.history >= config.send_queue_size:
            raise ConfigError(
                f"CHAT_HISTORY ({config.history}) must be less than "
                f"CHAT_SEND_QUEUE_SIZE ({config.send_queue_size}): history goes through the queue"
            )
        if config.history > config.recovery_window:
            raise ConfigError(
                f"CHAT_HISTORY ({config.history}) must be at most CHAT_RECOVERY_WINDOW "
                f"({config.recovery_window}): a room keeps no more than that"
            )
        return config


def _redis_url(env: Mapping[str, str]) -> str:
    url = env.get("REDIS_URL", "").strip()
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ConfigError(
            f"REDIS_URL must look like redis://[:password@]host:port[/db], got {url!r}"
        )
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise ConfigError(f"REDIS_URL has a bad port: {url!r}") from None
    return url


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _prefix(env: Mapping[str, str]) -> str:
    raw = env.get("CHAT_REDIS_PREFIX", "").strip() or "chat"
    if any(c in raw for c in "{}:") or not raw.isprintable():
        raise ConfigError(f"CHAT_REDIS_PREFIX must be printable, without {{, }} or :, got {raw!r}")
    return raw


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(
    env: Mapping[str, str], name: str, default: float, minimum: float = 0.001, unit: str = "seconds"
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of {unit}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value
