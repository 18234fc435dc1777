"""refs.py alone: the fields every worker must compute alike, and when the earlier layout is
kept too (the integration tests are in test_redis_v2.py)."""

from __future__ import annotations

from chatapp.engines.redis import refs
from chatapp.engines.redis.refs import REF_PERIOD, EarlierWorkers, session_prefix


def test_a_sessions_prefix_is_the_same_in_every_worker_and_every_release() -> None:
    """Workers compute it apart, in processes of their own and in later releases: it must be
    a digest of the session alone (these values are what Redis already holds)."""
    assert session_prefix("a") == "sEVM0m7c4_O1Q"
    assert session_prefix("9f2c0b1e4d6a48c3b5e7f9a1c2d3e4f5") == "sMlXgbQ14--Hy"
    assert session_prefix("é" * 64).startswith("s") and len(session_prefix("é" * 64)) == 13


def test_earlier_workers_are_assumed_until_a_heartbeat_says_and_remembered_two_periods(monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(refs, "monotonic", lambda: clock[0])
    earlier = EarlierWorkers()
    assert earlier.may_have_refs()  # (no heartbeat yet)
    earlier.seen(False)
    assert not earlier.may_have_refs()
    earlier.seen(True)
    clock[0] += 2 * REF_PERIOD - 1
    earlier.seen(False)  # (gone: its refs live on)
    assert earlier.may_have_refs()
    clock[0] += 1
    assert not earlier.may_have_refs()

