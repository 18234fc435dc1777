"""Settings, read once from environment variables into one typed object."""

from __future__ import annotations

import ipaddress
import os
import re
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
    # "open": nicks are names; "token": the app's backend signs who each user is (a JWT).
    auth: str = "open"
    # Token keys: HMAC secrets by kid, and the path of a JWKS file of public keys.
    token_keys: tuple[tuple[str, str], ...] = ()
    token_jwks: str = ""
    # Checked when set: the token's audience and issuer.
    token_audience: str = ""
    token_issuer: str = ""
    # Seconds a connection whose token expired has to refresh it before it is closed (4001).
    token_grace: float = 30.0
    # Where the page gets a token (fetched with credentials), and where "sign in" links.
    token_url: str = ""
    login_url: str = ""
    # Rooms only users with a matching `rooms` claim may join (patterns: name, or prefix*).
    private_rooms: tuple[str, ...] = ("private-*",)
    # Connections one user may have open in the whole chat (token mode).
    max_connections_per_user: int = 20
    # Connections one address may have open, and handshakes it may make a second (bursts of
    # twice that), per worker.
    max_connections_per_ip: int = 200
    connect_rate_per_ip: float = 20.0
    # Proxies whose X-Forwarded-For is believed (CIDRs): loopback, like gunicorn's default.
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # The server API's bearer key (empty: the API is off, 404), and its requests a second per
    # worker (bursts of twice that).
    api_key: str = ""
    api_rate: float = 100.0

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
            auth=_choice(env, "CHAT_AUTH", ("open", "token")),
            token_keys=_token_keys(env),
            token_jwks=env.get("CHAT_TOKEN_JWKS", "").strip(),
            token_audience=env.get("CHAT_TOKEN_AUDIENCE", "").strip(),
            token_issuer=env.get("CHAT_TOKEN_ISSUER", "").strip(),
            token_grace=_float(env, "CHAT_TOKEN_GRACE", cls.token_grace, minimum=0.0),
            token_url=env.get("CHAT_TOKEN_URL", "").strip(),
            login_url=env.get("CHAT_LOGIN_URL", "").strip(),
            private_rooms=_patterns(env, "CHAT_PRIVATE_ROOMS", cls.private_rooms),
            max_connections_per_user=_int(
                env, "CHAT_MAX_CONNECTIONS_PER_USER", cls.max_connections_per_user, minimum=1
            ),
            max_connections_per_ip=_int(env, "CHAT_MAX_CONNECTIONS_PER_IP", cls.max_connections_per_ip, minimum=1),
            connect_rate_per_ip=_float(
                env, "CHAT_CONNECT_RATE_PER_IP", cls.connect_rate_per_ip, minimum=0.0, unit="handshakes per second"
            ),
            trusted_proxies=_networks(env, "CHAT_TRUSTED_PROXIES", cls.trusted_proxies),
            api_key=env.get("CHAT_API_KEY", "").strip(),
            api_rate=_float(env, "CHAT_API_RATE", cls.api_rate, minimum=0.0, unit="requests per second"),
        )
        if config.auth == "token" and not (config.token_keys or config.token_jwks):
            raise ConfigError("CHAT_AUTH=token needs CHAT_TOKEN_KEYS or CHAT_TOKEN_JWKS: keys to verify tokens with")
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
        port = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise ConfigError(f"REDIS_URL has a bad port: {url!r}") from None
    # "host:" would be taken to mean 6379: a variable cut short, not a choice.
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise ConfigError(f"REDIS_URL has a bad port: {url!r}")
    return url


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or choices[0]
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _token_keys(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """CHAT_TOKEN_KEYS: kid:secret,kid:secret (a secret may hold colons, not commas)."""
    keys = []
    for entry in env.get("CHAT_TOKEN_KEYS", "").split(","):
        if not entry.strip():
            continue
        kid, colon, secret = entry.strip().partition(":")
        if not colon or not kid or len(secret) < 32:
            # (RFC 7518 §3.2: an HS256 key of at least 256 bits)
            raise ConfigError("CHAT_TOKEN_KEYS must be kid:secret pairs, comma-separated, each secret 32+ characters")
        keys.append((kid, secret))
    if len({kid for kid, _ in keys}) != len(keys):
        raise ConfigError("CHAT_TOKEN_KEYS names a kid twice")
    return tuple(keys)


def _patterns(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Room patterns, comma-separated: a room name, or a prefix followed by *."""
    if name not in env:
        return default
    patterns = tuple(p.strip() for p in env[name].split(",") if p.strip())
    for pattern in patterns:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}|[a-z0-9_-]{0,31}\*", pattern):
            raise ConfigError(f"{name}: {pattern!r} is not a room name or a prefix followed by *")
    return patterns


def _networks(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if name not in env:
        return default
    networks = tuple(n.strip() for n in env[name].split(",") if n.strip())
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{name}: {network!r} is not an address or a CIDR") from None
    return networks


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
