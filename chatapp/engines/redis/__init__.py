"""The Redis engine: every worker and host one chat (engine.py), its link to Redis (link.py),
the per-room state machine that orders what Redis delivers (follower.py), and the Lua
scripts that run in Redis (lua/)."""

from .engine import RedisEngine

__all__ = ["RedisEngine"]
