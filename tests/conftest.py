"""Fixtures: real chat servers in subprocesses, stopped at the end of each test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import NGINX, RedisClusterProcess, RedisProcess, ServerProcess, free_port, shut_client_sockets

# Settings every test server gets unless the test says otherwise: no flood control, and no
# limits per address (every test client comes from 127.0.0.1), which would get in the way of
# tests that send fast or open many connections (those limits have tests of their own).
TEST_ENV = {"CHAT_RATE_LIMIT": "0", "CHAT_MAX_CONNECTIONS_PER_IP": "1000000", "CHAT_CONNECT_RATE_PER_IP": "0"}


def unavailable(reason: str) -> None:
    """Skip locally; under CI=true (where .ci/run installs everything) a missing part fails."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(kind="gunicorn", **env) starts a server on a free port and returns it."""
    started: list[ServerProcess] = []

    def start(kind: str = "gunicorn", port: int | None = None, **env: str) -> ServerProcess:
        if kind == "nginx" and not Path(NGINX).exists():
            unavailable("nginx not found: apt-get install -y nginx")
        server = ServerProcess(
            kind=kind,
            port=port or free_port(),
            env={**TEST_ENV, **env},
            log_path=tmp_path / f"{kind}-{len(started)}.log",
        )
        started.append(server)
        return server.start()

    yield start
    shut_client_sockets()
    for server in started:
        server.stop()
        server.stop_proxy()
    # Whatever a test did to it, a server never crashes: no traceback in any log.
    for server in started:
        log = server.log()
        assert "Traceback" not in log, log[max(0, log.find("Traceback") - 500) :][:4000]


@pytest.fixture(params=["gunicorn", "stock", "wsgi", "nginx"])
def server_kind(request) -> str:
    """Each chat test runs under every way people start the chat: the Procfile, gevent-websocket's
    stock worker, `python wsgi.py`, and the Procfile behind nginx as the README configures it."""
    return request.param


@pytest.fixture(params=["gunicorn", "wsgi"])
def full_server_kind(request) -> str:
    """The start commands with our handler, for what the stock handler cannot do (refusals
    before the 101, handshake deadline, graceful close): the Procfile and `python wsgi.py`."""
    return request.param


@pytest.fixture
def server(start_server, server_kind) -> ServerProcess:
    return start_server(server_kind)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own; the test may stop and start it again."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server not found: apt-get install -y redis-server")
    server = RedisProcess(port=free_port(), workdir=tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis_cluster(tmp_path) -> Iterator[RedisClusterProcess]:
    """A Redis Cluster of three masters of this test's own."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server or redis-cli not found: apt-get install -y redis-server")
    cluster = RedisClusterProcess(workdir=tmp_path / "cluster").start()
    yield cluster
    cluster.stop()
