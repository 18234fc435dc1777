"""Settings from the environment: defaults, parsing, and clear errors naming the variable."""

from __future__ import annotations

import pytest

from chatapp.config import Config, ConfigError


def test_defaults() -> None:
    """An empty environment gives the documented defaults."""
    config = Config.from_env({})
    assert (config.max_message_size, config.pong_wait, config.ping_period) == (512, 60.0, 25.0)
    assert (config.max_connections, config.rate_limit, config.history) == (10000, 10.0, 50)
    assert config.redis_url == "" and config.allowed_origins == ()


def test_values_are_parsed() -> None:
    """Variables override defaults; origins are split, trimmed and lower-cased."""
    config = Config.from_env(
        {"CHAT_MAX_MESSAGE_SIZE": "1024", "CHAT_ALLOWED_ORIGINS": " https://A.example/ ,http://b:8000"}
    )
    assert config.max_message_size == 1024
    assert config.allowed_origins == ("https://a.example", "http://b:8000")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CHAT_MAX_MESSAGE_SIZE": "big"}, "CHAT_MAX_MESSAGE_SIZE"),
        ({"CHAT_PONG_WAIT": "-1"}, "CHAT_PONG_WAIT"),
        ({"CHAT_PING_PERIOD": "70"}, "CHAT_PING_PERIOD"),
        ({"CHAT_HISTORY": "300"}, "CHAT_HISTORY"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    """A malformed or inconsistent value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=named):
        Config.from_env(env)


@pytest.mark.parametrize(
    "url",
    ["localhost:6379", "http://127.0.0.1:6379", "redis://", "redis://127.0.0.1:", "redis://:secret@127.0.0.1:/0",
     "redis://127.0.0.1:0", "redis://127.0.0.1:65536", "redis://127.0.0.1:port"],
)
def test_a_bad_redis_url_is_refused(url: str) -> None:
    """A REDIS_URL that names no Redis a client could reach is a clear error at start, not a
    guess: an empty port (a variable cut short) is not taken to mean 6379."""
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Config.from_env({"REDIS_URL": url})


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1", "redis://:secret@redis.example:6380/2", "rediss://[::1]:6379", "unix:///run/redis.sock"]
)
def test_a_good_redis_url_is_kept(url: str) -> None:
    assert Config.from_env({"REDIS_URL": f" {url} "}).redis_url == url


def test_errors_name_the_unit() -> None:
    """A rate is asked for in messages per second, a wait in seconds."""
    with pytest.raises(ConfigError, match="CHAT_RATE_LIMIT must be a number of messages per second"):
        Config.from_env({"CHAT_RATE_LIMIT": "fast"})
    with pytest.raises(ConfigError, match="CHAT_WRITE_WAIT must be a number of seconds"):
        Config.from_env({"CHAT_WRITE_WAIT": "soon"})
