"""asyncio chat peer: the `websockets` library's recommended broadcast server.

Every received text message is trimmed, newlines become spaces, and it is
sent to all connections with `websockets.broadcast` (no backpressure; max
message size 512 bytes). Only the /ws path is served.

    python bench/peers/websockets_peer.py --port 8002   # ws://127.0.0.1:8002/ws
"""
import argparse
import asyncio
from http import HTTPStatus

from websockets.asyncio.server import broadcast, serve

CLIENTS = set()


def only_ws_path(connection, request):
    if request.path != "/ws":
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
    return None


async def chat(websocket):
    CLIENTS.add(websocket)
    try:
        async for message in websocket:
            if isinstance(message, str):
                broadcast(CLIENTS, message.replace("\n", " ").strip())
    finally:
        CLIENTS.remove(websocket)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    async with serve(chat, "127.0.0.1", args.port, max_size=512, process_request=only_ws_path) as server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
