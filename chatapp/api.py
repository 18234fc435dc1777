"""The server API: the app's backend's door into the chat (docs/protocol.md, "Server API").

`POST /api/<method>` with a JSON body and `Authorization: Bearer <CHAT_API_KEY>`; the bodies
and answers are those openapi.json describes, the one description of the API: it is served at
GET /api/openapi.json, every body is checked against it, and the tests check every answer
against it (schemathesis). The hub carries each call out as it does a connection's commands.
"""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path
from typing import Any

import bottle
import gevent
from gevent.event import AsyncResult
from jsonschema import Draft202012Validator

from .chat.commands import NICK, ROOM, BackendCall, one_line
from .chat.hub import Hub
from .chat.ratelimit import TokenBucket
from .config import Config
from .metrics import Metrics, NoMetrics

log = logging.getLogger(__name__)

DOCUMENT = Path(__file__).resolve().parent / "openapi.json"
# The largest body taken, in bytes.
MAX_BODY = 65536
# Seconds a call may wait for its answer before it is 503 unavailable.
ANSWER_WAIT = 5.0


class ApiError(Exception):
    """An API refusal: an HTTP status and the JSON error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ServerApi:
    """What the /api routes serve."""

    def __init__(self, hub: Hub, config: Config, metrics: Metrics | NoMetrics) -> None:
        self.hub = hub
        self._key = config.api_key.encode()
        self.text_limit = config.max_message_size
        self.metrics = metrics
        self._bucket = TokenBucket(config.api_rate, 2 * config.api_rate) if config.api_rate else None
        self.rate = config.api_rate
        self.document = json.loads(DOCUMENT.read_text())
        self._document_bytes = json.dumps(self.document).encode()
        schemas = self.document["components"]["schemas"]
        # Each method's body check, from the description's own request schema.
        self._checks = {
            path.removeprefix("/api/"): Draft202012Validator(
                _resolved(operation["post"]["requestBody"]["content"]["application/json"]["schema"], schemas)
            )
            for path, operation in self.document["paths"].items()
            if "post" in operation
        }

    @property
    def on(self) -> bool:
        return bool(self._key)

    def serve_document(self) -> bytes:
        """GET /api/openapi.json, without the key (404 while the API is off)."""
        if not self.on:
            raise bottle.HTTPError(404, "the server API is off (set CHAT_API_KEY)")
        bottle.response.content_type = "application/json"
        return self._document_bytes

    def serve(self, method: str) -> bytes:
        """POST /api/<method>: the answer's JSON, with its status."""
        if not self.on:
            raise bottle.HTTPError(404, "the server API is off (set CHAT_API_KEY)")
        try:
            status, body = self._call(method)
        except ApiError as error:
            status, body = error.status, {"error": error.code, "message": error.message}
            log.info("server API %s: %d %s (%s)", method[:40], status, error.code, error.message)
        self.metrics.api_requests.labels(method if method in self._checks else "unknown", str(status)).inc()
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        return json.dumps(body).encode()

    def refuse_method(self, method: str) -> bytes:
        """Any other HTTP method on /api/<method>: 405."""
        if not self.on:
            raise bottle.HTTPError(404, "the server API is off (set CHAT_API_KEY)")
        bottle.response.status = 405
        bottle.response.set_header("Allow", "POST")
        bottle.response.content_type = "application/json"
        return json.dumps({"error": "bad_message", "message": "the server API takes POST only"}).encode()

    def _call(self, method: str) -> tuple[int, dict[str, Any]]:
        request = bottle.request
        if not self._authorized(request.environ.get("HTTP_AUTHORIZATION", "")):  # (not get_header: app.py)
            raise ApiError(401, "unauthorized", "Authorization: Bearer <CHAT_API_KEY> needed")
        check = self._checks.get(method)
        if check is None:
            raise ApiError(404, "bad_message", f"no method {method[:40]!r}")
        if self._bucket is not None and not self._bucket.take():
            bottle.response.set_header("Retry-After", str(max(1, round(1 / self.rate))))
            raise ApiError(429, "rate_limited", f"over {self.rate:g} requests a second")
        if request.content_type.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "bad_message", "the body must be application/json")
        if request.content_length > MAX_BODY:
            raise ApiError(413, "bad_message", f"the body is over {MAX_BODY} bytes")
        raw = request.body.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise ApiError(413, "bad_message", f"the body is over {MAX_BODY} bytes")
        body = self._body(raw, check)
        result = AsyncResult()
        self.hub.backend(BackendCall(method, body, lambda status, answer: result.set((status, answer))))
        try:
            answer: tuple[int, dict[str, Any]] = result.get(timeout=ANSWER_WAIT)
        except gevent.Timeout:
            raise ApiError(503, "unavailable", f"no answer within {ANSWER_WAIT:g} s") from None
        return answer

    def _authorized(self, header: str) -> bool:
        """Bearer and the key, exactly (compared in constant time)."""
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.encode(), self._key)

    def _body(self, raw: bytes, check: Draft202012Validator) -> dict[str, Any]:
        """The body, checked: JSON, an object, the room and nick rules, then the description."""
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "bad_message", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_message", "the body must be a JSON object")
        room, nick = body.get("room"), body.get("nick")
        if isinstance(room, str) and not ROOM.fullmatch(room):
            raise ApiError(400, "bad_room", "a room is 1 to 32 of a-z, 0-9, _ or -, starting with a letter or digit")
        if isinstance(nick, str) and not NICK.fullmatch(nick):
            raise ApiError(400, "bad_nick", "a nick is 1 to 24 letters, digits, _ . or -")
        error = next(iter(check.iter_errors(body)), None)
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "the body"
            raise ApiError(400, "bad_message", f"{where}: {error.message}"[:300])
        if "before" in body and "since" in body:
            raise ApiError(400, "bad_message", "before or since, not both")
        for field in ("seq", "limit", "before", "since"):  # (JSON Schema takes 2.0 for an integer)
            if field in body:
                body[field] = int(body[field])
        if "text" in body:
            text = one_line(body["text"])
            if not text:
                raise ApiError(400, "bad_message", "text is empty")
            if len(text.encode()) > self.text_limit:
                raise ApiError(400, "too_long", f"text over {self.text_limit} bytes of UTF-8")
            body["text"] = text
        return body


def _resolved(schema: Any, schemas: dict[str, Any]) -> Any:
    """A schema with its references to components/schemas put in place."""
    if isinstance(schema, dict):
        if set(schema) == {"$ref"}:
            return _resolved(schemas[schema["$ref"].rsplit("/", 1)[1]], schemas)
        return {key: _resolved(value, schemas) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_resolved(item, schemas) for item in schema]
    return schema
