"""Socket.IO chat peer: rooms and nicks as python-socketio's docs lay them out, on gevent.

`socketio.Server(async_mode="gevent")` wrapped as WSGI (`socketio.WSGIApp`), run under
gunicorn with gevent-websocket's worker, the deployment python-socketio documents for
gevent; WebSocket is the only transport. Two events: `join` ({"room", "nick"}) enters the
room and keeps the nick in the client's session (answered with an ack); `say` ({"room",
"text"}) emits `message` ({"room", "nick", "text"}) to everyone in the room, the sender
included. Text is trimmed and newlines become spaces, at most 512 bytes, like the other
peers. Nothing is tuned: the server's defaults (pings every 25 s, handlers in a greenlet of
their own) as a user gets them.

    cd bench/peers && gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker \\
        -w 1 --bind 127.0.0.1:8003 socketio_peer:app
    # ws://127.0.0.1:8003/socket.io/?EIO=4&transport=websocket
"""
import socketio

MAX_MESSAGE = 512
sio = socketio.Server(async_mode="gevent", transports=["websocket"])
app = socketio.WSGIApp(sio)


@sio.event
def join(sid, data):
    sio.save_session(sid, {"nick": data["nick"]})
    sio.enter_room(sid, data["room"])
    return True


@sio.event
def say(sid, data):
    text = data["text"].replace("\n", " ").strip()
    if text and len(text.encode()) <= MAX_MESSAGE:
        nick = sio.get_session(sid)["nick"]
        sio.emit("message", {"room": data["room"], "nick": nick, "text": text}, to=data["room"])
