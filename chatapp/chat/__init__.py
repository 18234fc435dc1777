"""The chat itself: messages and their ids, commands and the codecs that carry them, peers,
rooms, presence, and the hub that owns them.

The middle layer: it holds the transport's connections and imports from chatapp.transport
(and the leaf modules), never from chatapp.engines or the app. It reaches whatever carries
the chat (one worker alone, or Redis) only through the Engine interface in engine.py.
"""
