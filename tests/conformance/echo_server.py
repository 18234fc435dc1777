"""An echo WebSocket server on our WebSocket layer, for the Autobahn fuzzing client only.

Not a production route: it serves ws://127.0.0.1:PORT/ with the same handler, connection
and pumps as the chat, and sends every message back to its sender.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402
from gevent.queue import ShutDown  # noqa: E402

from chatapp.config import Config  # noqa: E402
from chatapp.transport import frames  # noqa: E402
from chatapp.transport.conn import Conn  # noqa: E402
from chatapp.transport.websocket import ChatHandler  # noqa: E402

config = Config.from_env()


def echo(environ: dict, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"WebSocket only\n"]
    ws.accept(config.max_message_size)
    conn = Conn(
        ws,
        send_queue_size=config.send_queue_size,
        send_queue_bytes=config.send_queue_bytes,
        write_wait=config.write_wait,
    )

    def send_back(data: str | bytes) -> None:
        if isinstance(data, str):
            frame = frames.encode_frame(frames.OP_TEXT, data.encode("utf-8"))
        else:
            frame = frames.encode_frame(frames.OP_BINARY, data)
        try:
            conn.send_message(frame)  # Waits while the write pump is behind: backpressure.
        except ShutDown:
            pass

    try:
        conn.read_pump(send_back)
    finally:
        conn.wait_closed(config.write_wait + 5)
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    WSGIServer(("127.0.0.1", port), echo, handler_class=ChatHandler, log=None).serve_forever()


if __name__ == "__main__":
    main()
