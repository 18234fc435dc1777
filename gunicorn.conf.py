"""gunicorn settings; each comes from the environment with a default that runs locally."""

import logging
import os
import sys

from chatapp.config import Config, ConfigError

try:
    _config = Config.from_env()
except ConfigError as error:
    sys.exit(f"gevent chat: bad configuration: {error}")

# Platforms give the port in PORT; 8080 locally.
bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"

# gevent-websocket's worker, with our handler (chatapp/websocket.py).
worker_class = "chatapp.websocket.ChatWorker"

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
