"""gunicorn settings; each comes from the environment with a default that runs locally."""

import logging
import os
import shutil
import sys
import tempfile

# Metrics across workers (CHAT_METRICS_TOKEN): prometheus_client's multiprocess mode keeps each
# worker's values in files of a directory it must know before anything imports it. One fresh
# directory per start of the server, removed when it stops.
_metrics_dir = ""
if os.environ.get("CHAT_METRICS_TOKEN", "").strip():
    _metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chat-metrics-")

from chatapp.config import Config, ConfigError  # noqa: E402 (after the directory is known)

try:
    _config = Config.from_env()
except ConfigError as error:
    sys.exit(f"gevent chat: bad configuration: {error}")

# Platforms give the port in PORT; 8080 locally.
bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"

# gevent-websocket's worker, with our handler (chatapp/websocket.py).
worker_class = "chatapp.transport.websocket.ChatWorker"

# One hub lives in each worker process. With Redis every worker is one chat: gunicorn takes
# the count from WEB_CONCURRENCY (default 1). Without Redis, two workers would split the chat
# in two: so exactly one, whatever WEB_CONCURRENCY asks.
if not _config.redis_url:
    workers = 1
    _asked = os.environ.get("WEB_CONCURRENCY", "").strip()
    if _asked and _asked != "1":
        logging.getLogger("gunicorn.error").warning(
            "WEB_CONCURRENCY=%s ignored: without REDIS_URL one worker is one chat room; "
            "running 1 worker",
            _asked,
        )

# With Redis, several workers share the port: each binds a listening socket of its own with
# SO_REUSEPORT (gunicorn does so, and the arbiter then holds none), and the kernel hands each
# new connection to one of them by its addresses' hash, evenly; on one shared socket
# whichever worker woke first took it (bench/README.md, "Connections over workers"). Without
# Redis there is one worker: no need.
reuse_port = bool(_config.redis_url)

# worker_connections: the worker sets it above CHAT_MAX_CONNECTIONS (gunicorn's default of
# 1000 would leave the 1001st connection unanswered instead of refused).

# On SIGTERM the worker closes every WebSocket with 1001 and exits; 20 s is ample for that
# and less than the platform's 30-second shutdown limit.
graceful_timeout = 20

# The platform collects stdout: access log and error log go there.
accesslog = "-"
errorlog = "-"

# The worker's heartbeat timeout; long-lived WebSockets do not count against it.
timeout = 30


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A worker is gone: its live gauges (connections, rooms...) leave the metrics."""
    if _metrics_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # type: ignore[no-untyped-def]
    if _metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
