"""Straightforward gevent chat peer: a line-by-line port of gorilla's chat example.

Bottle + gevent-websocket under gevent's WSGIServer, no tuning (no TCP_NODELAY).
One hub greenlet reads register/unregister/broadcast ops from an unbuffered
Channel; each connection has its request greenlet reading and a writer
greenlet draining a Queue(256). Like the Go original, the hub drops a client
whose queue is full (here: shuts its socket down). Messages are trimmed,
newlines become spaces, max 512 bytes. Under the open-loop flood (run.py's
scenario d) every client's queue fills and all are dropped: that is this
design's result, not a bench fault.

    python bench/peers/straightforward.py --port 8001   # ws://127.0.0.1:8001/ws
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402

import bottle  # noqa: E402
import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from gevent.queue import Channel, Full, Queue  # noqa: E402
from geventwebsocket import WebSocketError  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

MAX_MESSAGE = 512
hub_ops = Channel()
app = bottle.Bottle()


def hub():
    clients = {}  # send queue -> websocket
    while True:
        op, arg = hub_ops.get()
        if op == "register":
            clients[arg[0]] = arg[1]
        elif op == "unregister":
            clients.pop(arg, None)
        else:
            for queue, ws in list(clients.items()):
                try:
                    queue.put_nowait(arg)
                except Full:
                    del clients[queue]
                    try:
                        ws.handler.socket.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


def writer(ws, queue):
    try:
        while True:
            ws.send(queue.get())
    except WebSocketError:
        pass


@app.route("/ws")
def chat():
    ws = bottle.request.environ.get("wsgi.websocket")
    if ws is None:
        bottle.abort(400, "expected a WebSocket upgrade")
    queue = Queue(256)
    hub_ops.put(("register", (queue, ws)))
    write_greenlet = gevent.spawn(writer, ws, queue)
    try:
        while (message := ws.receive()) is not None:
            if len(message) > MAX_MESSAGE:
                break
            if isinstance(message, str):
                hub_ops.put(("broadcast", message.replace("\n", " ").strip()))
    except WebSocketError:
        pass
    finally:
        hub_ops.put(("unregister", queue))
        write_greenlet.kill()
    return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    gevent.spawn(hub)
    WSGIServer(("127.0.0.1", args.port), app, handler_class=WebSocketHandler, log=None).serve_forever()


if __name__ == "__main__":
    main()
