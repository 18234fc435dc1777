"""gevent chat: the Gorilla WebSocket chat example, ported to gevent, Bottle and gunicorn."""

from .app import Chat, create_app
from .config import Config, ConfigError
from .transport.websocket import ChatWorker

__all__ = ["Chat", "ChatWorker", "Config", "ConfigError", "create_app"]
