"""The WebSocket transport: frames (RFC 6455), the socket under gevent-websocket, and one
connection's send queue and pumps.

The bottom layer: it knows bytes and frames, never the chat. It imports nothing of chatapp
but the leaf modules (config, metrics); the chat layer above holds its connections.
"""
