"""Fixtures: real chat servers in subprocesses, stopped at the end of each test."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
from support import RedisProcess, ServerProcess, free_port

# Settings every test server gets unless the test says otherwise: no flood control, which
# would get in the way of tests that send fast (the rate limit has its own test).
TEST_ENV = {"CHAT_RATE_LIMIT": "0"}


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., ServerProcess]]:  # type: ignore[no-untyped-def]
    """start_server(kind="gunicorn", **env) starts a server on a free port and returns it."""
    started: list[ServerProcess] = []

    def start(kind: str = "gunicorn", port: int | None = None, **env: str) -> ServerProcess:
        server = ServerProcess(
            kind=kind,
            port=port or free_port(),
            env={**TEST_ENV, **env},
            log_path=tmp_path / f"{kind}-{len(started)}.log",
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(params=["gunicorn", "wsgi"])
def server_kind(request) -> str:  # type: ignore[no-untyped-def]
    """Each test using it runs once through gunicorn and once through `python wsgi.py`."""
    return request.param


@pytest.fixture
def server(start_server, server_kind) -> ServerProcess:  # type: ignore[no-untyped-def]
    return start_server(server_kind)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisProcess]:  # type: ignore[no-untyped-def]
    """A redis-server of this test's own; the test may stop and start it again."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found: apt-get install -y redis-server")
    server = RedisProcess(port=free_port(), workdir=tmp_path).start()
    yield server
    server.stop()
