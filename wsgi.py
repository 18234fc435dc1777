"""The WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`, or `python wsgi.py --addr HOST:PORT`."""

from __future__ import annotations

if __name__ == "__main__":
    # Before anything else imports socket: every blocking call must yield to the gevent hub.
    from gevent import monkey

    monkey.patch_all()

import gc
import logging
import sys

from chatapp import ConfigError, create_app

logging.basicConfig(
    level=logging.INFO, format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
)

try:
    app = create_app()
except ConfigError as error:
    sys.exit(f"gevent chat: bad configuration: {error}")

# The cyclic garbage collector, set for a server that keeps many objects and makes many more
# that die young (bench/README.md, "The garbage collector"): what start-up made is never
# scanned again, and a young collection waits for 5,000 new objects instead of 700; a full
# one comes every 33 young ones (by default 121), after about twice as many new objects as by
# default, so the cycles closed connections leave do not pile up (a soak's memory stays flat).
gc.freeze()
gc.set_threshold(5_000, 10, 2)


def main() -> None:
    import argparse
    import signal

    import gevent
    from gevent.pool import Pool
    from gevent.pywsgi import WSGIServer

    from chatapp.transport.websocket import ChatHandler, cap_receive_buffer

    parser = argparse.ArgumentParser(description="Serve the chat with gevent's WSGI server.")
    parser.add_argument("--addr", default="localhost:8080", help="http service address")
    host, _, port = parser.parse_args().addr.rpartition(":")
    config = app.chat.config
    server = WSGIServer(
        (host, int(port)),
        app,
        spawn=Pool(),  # A pool, so that stop() waits for open connections to close.
        handler_class=ChatHandler.configured(config.handshake_timeout),
    )
    server.init_socket()
    cap_receive_buffer(server.socket, app.chat.v2.frame_limit)  # v2 frames are the largest

    def stop() -> None:
        logging.info("SIGTERM: closing connections")
        server.close()  # Stop accepting; then let open connections say goodbye.
        ChatHandler.close_idle_connections()
        app.chat.shutdown()
        server.stop(timeout=config.write_wait)

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(stop))
    logging.info("serving the chat on http://%s:%s", host, port)
    server.serve_forever()


if __name__ == "__main__":
    main()
