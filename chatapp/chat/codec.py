"""The wire protocols at the edge: what a client's text frame means, and the frames it receives.

v1 is the Gorilla chat's plain text; v2 is one JSON object per frame, chosen with the
subprotocol `chat.v2` (docs/protocol.md). A codec knows no socket and no hub: text in,
commands out; events in, encoded frames out. The hub holds a connection's codec and asks it
for the frames that connection needs.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from typing import Any

from ..transport.frames import OP_TEXT, encode_frame
from .commands import (
    LOBBY,
    MAX_ID,
    MAX_PAGE,
    MAX_ROOMS_PER_CONN,
    NICK,
    PAGE,
    ROOM,
    Command,
    CommandError,
    Hello,
    History,
    Join,
    Leave,
    ListRooms,
    Moderate,
    Position,
    Refresh,
    Say,
    Typing,
    one_line,
)
from .message import ChatMessage
from .presence import Member

SUBPROTOCOL_V2 = "chat.v2"
# The moderation commands, and those that name a user.
MODERATION = ("kick", "ban", "unban", "mute", "unmute", "delete")
# Longest reason a moderator may give, in characters.
MAX_REASON = 200

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# One string as _dumps writes it (non-ASCII kept as it is).
_string = json.encoder.encode_basestring


def _string_or_null(value: str | None) -> str:
    return "null" if value is None else _string(value)


class V1Codec:
    """The seed's protocol: a text frame is one line said in the lobby; lines come back as text."""

    version = 1

    def __init__(self, text_limit: int) -> None:
        # The largest frame a client may send: the text limit itself.
        self.frame_limit = text_limit

    def decode(self, data: str) -> Say | None:
        line = one_line(data)
        return Say(LOBBY, line, None) if line else None

    @staticmethod
    def message_frame(message: ChatMessage) -> bytes:
        frame = message.v1_frame
        if frame is None:
            text = message.text
            if text is None:
                frame = b""  # A deletion, or a deleted line: v1 clients get nothing of it.
            else:
                text = text if message.nick is None else f"{message.nick}: {text}"
                frame = encode_frame(OP_TEXT, text.encode())
            message.v1_frame = frame
        return frame


class V2Codec:
    """JSON commands and events (docs/protocol.md)."""

    version = 2

    def __init__(self, text_limit: int, rate: float, token: bool = False) -> None:
        self.text_limit = text_limit
        # Whether hello carries a token (CHAT_AUTH=token).
        self.token = token
        # Room for JSON escaping of a whole text (\u00XX is 6 bytes) plus the other fields;
        # in token mode at least room for a token (8 KB) in a hello.
        self.frame_limit = max(6 * text_limit + 1024, 10240 if token else 0)
        self.limits = {
            "text": text_limit,
            "frame": self.frame_limit,
            "rooms": MAX_ROOMS_PER_CONN,
            "rate": int(rate) if rate == int(rate) else rate,
        }

    # Decoding: one text frame into one command, or a CommandError.

    def decode(self, data: str, identified: bool) -> Command:
        """The command in this frame. `identified`: whether this connection's hello was taken."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise CommandError("bad_message", "not JSON") from None
        if not isinstance(obj, dict):
            raise CommandError("bad_message", "a command is a JSON object")
        kind = obj.get("type")
        parse = _PARSERS.get(kind) if isinstance(kind, str) else None
        if parse is None:
            raise CommandError("bad_message", f"unknown type {kind!r}")
        if kind == "hello":
            if identified:
                raise CommandError("bad_message", "hello comes once")
        elif not identified:
            ref = _ref(obj) if kind == "say" or kind in MODERATION else None
            raise CommandError("not_hello", "say hello first", _named_room(obj), ref)
        return parse(self, obj)

    def _hello(self, obj: dict[str, Any]) -> Hello:
        session = obj.get("session")
        # (text that can be sent on as UTF-8: a lone surrogate could not be kept in Redis)
        if not isinstance(session, str) or not 0 < len(session) <= MAX_ID or not _unicode(session):
            raise CommandError("bad_message", f"session must be a string of 1 to {MAX_ID} characters")
        if self.token:
            return Hello("", session, _token(obj))
        nick = obj.get("nick")
        if not isinstance(nick, str):
            raise CommandError("bad_nick", "nick must be a string")
        nick = unicodedata.normalize("NFKC", nick)
        if not NICK.fullmatch(nick):
            raise CommandError(
                "bad_nick", "a nick is 1 to 24 letters, digits, _ . or -, starting with a letter, digit or _"
            )
        return Hello(nick, session)

    def _refresh(self, obj: dict[str, Any]) -> Refresh:
        if not self.token:
            raise CommandError("bad_message", "refresh is for token mode (CHAT_AUTH=token)")
        return Refresh(_token(obj))

    def _join(self, obj: dict[str, Any]) -> Join:
        room = _room(obj)
        since = obj.get("since")
        if since is None:
            return Join(room, None)
        epoch, seq = (since.get("epoch"), since.get("seq")) if isinstance(since, dict) else (None, None)
        if not isinstance(epoch, str) or type(seq) is not int or seq < 0:
            raise CommandError("bad_message", 'since must be {"epoch": string, "seq": integer >= 0}', room)
        return Join(room, Position(epoch, seq))

    def _say(self, obj: dict[str, Any]) -> Say:
        ref = _checked_ref(obj)
        room = _room(obj, ref)
        text = obj.get("text")
        if not isinstance(text, str) or not _unicode(text):
            raise CommandError("bad_message", "text must be a string of Unicode text", room, ref)
        if len(text.encode()) > self.text_limit:
            raise CommandError("too_long", f"text over {self.text_limit} bytes of UTF-8", room, ref)
        line = one_line(text)
        if not line:
            raise CommandError("bad_message", "text is empty", room, ref)
        return Say(room, line, ref)

    def _leave(self, obj: dict[str, Any]) -> Leave:
        return Leave(_room(obj))

    def _rooms(self, obj: dict[str, Any]) -> ListRooms:
        return ListRooms()

    def _typing(self, obj: dict[str, Any]) -> Typing:
        return Typing(_room(obj))

    def _history(self, obj: dict[str, Any]) -> History:
        room = _room(obj)
        before, limit = obj.get("before"), obj.get("limit", PAGE)
        if before is not None and (type(before) is not int or before < 1):
            raise CommandError("bad_message", "before must be an integer >= 1", room)
        if type(limit) is not int or not 0 < limit <= MAX_PAGE:
            raise CommandError("bad_message", f"limit must be an integer from 1 to {MAX_PAGE}", room)
        return History(room, before, limit)

    def _moderate(self, obj: dict[str, Any]) -> Moderate:
        action: str = obj["type"]
        ref = _checked_ref(obj)
        room = _room(obj, ref)
        if action == "delete":
            seq = obj.get("seq")
            if type(seq) is not int or seq < 1:
                raise CommandError("bad_message", "seq must be an integer >= 1", room, ref)
            return Moderate(action, room, seq=seq, ref=ref)
        user = obj.get("user")
        if not isinstance(user, str) or not 0 < len(user) <= MAX_ID or not user.isprintable():
            raise CommandError("bad_message", f"user must be a string of 1 to {MAX_ID} characters", room, ref)
        seconds = obj.get("seconds")
        if action in ("ban", "mute") and seconds is not None:
            if type(seconds) not in (int, float) or not 0 < seconds <= 10 * 365 * 86400:
                raise CommandError("bad_message", "seconds must be a number from 0 to ten years", room, ref)
        else:
            seconds = None
        reason = obj.get("reason")
        if reason is not None:
            if not isinstance(reason, str) or len(reason) > MAX_REASON or not _unicode(reason):
                why = f"reason must be a string of up to {MAX_REASON} characters"
                raise CommandError("bad_message", why, room, ref)
            reason = one_line(reason) or None
        return Moderate(action, room, user, 0, seconds, reason, ref)

    # Encoding: events into frames.

    @staticmethod
    def message_json(message: ChatMessage) -> bytes:
        encoded = message.v2_json
        if encoded is None:
            if message.target:
                event: dict[str, Any] = {
                    "type": "deleted", "room": message.room, "epoch": message.epoch, "seq": message.seq,
                    "time": message.time, "target": message.target, "by": message.nick,
                }
            elif message.text is not None:
                # Put together by hand, as the ack is: every line is encoded once, and the
                # encoder's walk of a dict cost half of it. Room and epoch need no escaping
                # (commands.ROOM, hex); the rest may.
                encoded = message.v2_json = (
                    f'{{"type":"message","room":"{message.room}","epoch":"{message.epoch}","seq":{message.seq:d},'
                    f'"time":{message.time:d},"nick":{_string_or_null(message.nick)},'
                    f'"user":{_string_or_null(message.user)},"text":{_string(message.text)}}}'
                ).encode()
                return encoded
            else:
                event = {
                    "type": "message", "room": message.room, "epoch": message.epoch, "seq": message.seq,
                    "time": message.time, "nick": message.nick, "user": message.user, "text": None,
                    "deleted": True,
                }
            encoded = message.v2_json = _dumps(event).encode()
        return encoded

    def message_frame(self, message: ChatMessage) -> bytes:
        return encode_frame(OP_TEXT, self.message_json(message))

    def welcome(self, nick: str, user: str | None = None, expires: float | None = None) -> bytes:
        event: dict[str, Any] = {"type": "welcome", "nick": nick}
        if user is not None:
            event["user"] = user
        if expires is not None:
            event["expires"] = int(expires * 1000)
        event["limits"] = self.limits
        return _event(event)

    @staticmethod
    def joined(
        room: str,
        epoch: str,
        seq: int,
        recovered: bool,
        messages: list[ChatMessage],
        members: list[Member],
        member_count: int,
    ) -> bytes:
        head = _dumps(
            {
                "type": "joined",
                "room": room,
                "epoch": epoch,
                "seq": seq,
                "recovered": recovered,
                "members": [member.nick for member in members],
                "users": [{"user": member.user, "nick": member.nick} for member in members],
                "member_count": member_count,
            }
        ).encode()
        replay = b",".join(V2Codec.message_json(message) for message in messages)
        return encode_frame(OP_TEXT, head[:-1] + b',"messages":[' + replay + b"]}")

    @staticmethod
    def ack(ref: str | None, room: str, seq: int) -> bytes:
        # Put together by hand: every v2 line has one, and the JSON encoder's walk of a dict
        # cost a third of the hub's own work per v2 line (bench/hub_line.py --v2: 10.0 -> 8.8
        # us). A room name needs no escaping (commands.ROOM); a ref may.
        ack = b'{"type":"ack","ref":%b,"room":"%b","seq":%d}' % (_string_or_null(ref).encode(), room.encode(), seq)
        return encode_frame(OP_TEXT, ack)

    @staticmethod
    def typing(room: str, member: Member) -> bytes:
        return _event({"type": "typing", "room": room, "nick": member.nick, "user": member.user})

    @staticmethod
    def history(room: str, epoch: str, messages: list[ChatMessage], more: bool) -> bytes:
        head = _dumps({"type": "history", "room": room, "epoch": epoch, "more": more}).encode()
        events = b",".join(V2Codec.message_json(message) for message in messages)
        return encode_frame(OP_TEXT, head[:-1] + b',"messages":[' + events + b"]}")

    @staticmethod
    def presence(room: str, change: str, member: Member) -> bytes:
        """change: "joined" or "left"."""
        return _event({"type": "presence", "room": room, "user": member.user, change: member.nick})

    @staticmethod
    def left(room: str, reason: str | None = None, **fields: object) -> bytes:
        event: dict[str, Any] = {"type": "left", "room": room}
        if reason is not None:
            event["reason"] = reason
            event.update(fields)
        return _event(event)

    @staticmethod
    def rooms(listing: list[tuple[str, int]]) -> bytes:
        return _event({"type": "rooms", "rooms": [{"room": room, "members": n} for room, n in listing]})

    @staticmethod
    def refreshed(expires: float) -> bytes:
        return _event({"type": "refreshed", "expires": int(expires * 1000)})

    @staticmethod
    def done(command: Moderate) -> bytes:
        event: dict[str, Any] = {"type": "done", "command": command.action, "room": command.room}
        if command.action == "delete":
            event["seq"] = command.seq
        else:
            event["user"] = command.user
        event["ref"] = command.ref
        return _event(event)

    @staticmethod
    def error(error: CommandError) -> bytes:
        event: dict[str, Any] = {"type": "error", "code": error.code, "message": error.message}
        if error.ref is not None:
            event["ref"] = error.ref
        if error.room is not None:
            event["room"] = error.room
        event.update(error.fields)
        return _event(event)


Codec = V1Codec | V2Codec

_PARSERS: dict[str, Callable[[V2Codec, dict[str, Any]], Command]] = {
    "hello": V2Codec._hello,
    "refresh": V2Codec._refresh,
    "join": V2Codec._join,
    "say": V2Codec._say,
    "leave": V2Codec._leave,
    "rooms": V2Codec._rooms,
    "typing": V2Codec._typing,
    "history": V2Codec._history,
    **{action: V2Codec._moderate for action in MODERATION},
}


def _event(event: dict[str, Any]) -> bytes:
    return encode_frame(OP_TEXT, _dumps(event).encode())


def _unicode(text: str) -> bool:
    """Whether text can be sent back as UTF-8: JSON's \ud800 escapes can make lone surrogates."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _named_room(obj: dict[str, Any]) -> str | None:
    """The room a command named, to echo in an error: any string that is short and can be sent back."""
    room = obj.get("room")
    return room if isinstance(room, str) and len(room) <= MAX_ID and _unicode(room) else None


def _ref(obj: dict[str, Any]) -> str | None:
    """A command's ref, to echo in an answer: a string of at most MAX_ID characters."""
    ref = obj.get("ref")
    return ref if isinstance(ref, str) and len(ref) <= MAX_ID and _unicode(ref) else None


def _checked_ref(obj: dict[str, Any]) -> str | None:
    ref = obj.get("ref")
    if ref is not None and _ref(obj) is None:
        raise CommandError("bad_message", f"ref must be a string of up to {MAX_ID} characters", _named_room(obj))
    return _ref(obj)


def _token(obj: dict[str, Any]) -> str:
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        raise CommandError("bad_token", "token must be a non-empty string")
    return token


def _room(obj: dict[str, Any], ref: str | None = None) -> str:
    room = obj.get("room")
    if not isinstance(room, str):
        raise CommandError("bad_message", "room must be a string", ref=ref)
    if not ROOM.fullmatch(room):
        raise CommandError(
            "bad_room", "a room is 1 to 32 of a-z, 0-9, _ or -, starting with a letter or digit", _named_room(obj), ref
        )
    return room
