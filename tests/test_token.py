"""Token verification on its own (chatapp/token.py), fuzzed: whatever a client sends as a token,
the answer is an identity or a clear refusal, never a crash; and the CLI an operator uses."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ROOT

from chatapp.chat.commands import CommandError
from chatapp.chat.identity import MAX_PATTERNS
from chatapp.config import Config
from chatapp.token import MAX_NAME, MAX_SUB, Verifier

SECRET = "a-test-secret-long-enough-for-hs256-and-hs384-both-of-them-ok"
VERIFIER = Verifier(Config.from_env({"CHAT_AUTH": "token", "CHAT_TOKEN_KEYS": f"k1:{SECRET}"}))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
claims = st.fixed_dictionaries(
    {},
    optional={
        "sub": json_values | st.text(min_size=1, max_size=70),
        "name": json_values | st.text(max_size=70),
        "exp": st.integers(min_value=0, max_value=2**40) | json_values,
        "nbf": st.integers(min_value=0, max_value=2**40),
        "rooms": json_values | st.lists(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,5}\*?", fullmatch=True), max_size=5),
        "mod": json_values | st.lists(st.sampled_from(["*", "tea", "team-*", "Bad!"]), max_size=3),
    },
)


def check(token: str) -> None:
    """The one property: an Identity within the rules, or a CommandError of a token code."""
    try:
        identity = VERIFIER.verify(token)
    except CommandError as error:
        assert error.code in ("bad_token", "token_expired")
        assert SECRET not in error.message
        return
    assert 0 < len(identity.user) <= MAX_SUB and 0 < len(identity.name) <= MAX_NAME
    assert len(identity.rooms) <= MAX_PATTERNS and len(identity.mod) <= MAX_PATTERNS
    assert identity.expires > time.time() - 10


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_any_string_is_an_identity_or_a_clear_refusal(token: str) -> None:
    """Random strings, and random base64: refused with bad_token, nothing raised past it."""
    check(token)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(claims, st.sampled_from(["HS256", "HS384", "none"]), st.sampled_from(["k1", "k2", None]))
def test_signed_claims_of_any_shape(payload: dict, algorithm: str, kid: str | None) -> None:
    """Tokens signed with the right secret (or another algorithm, or another kid) holding claims
    of any type: each an identity that keeps the rules, or a clear refusal."""
    headers = {"kid": kid} if kid else {}
    try:
        token = jwt.encode(payload, SECRET if algorithm != "none" else None, algorithm=algorithm, headers=headers)
    except (TypeError, ValueError, jwt.InvalidTokenError):
        return  # (PyJWT itself refuses to make it: nothing to send)
    check(token)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "jku"]), json_values), claims)
def test_forged_headers(header: dict, payload: dict) -> None:
    """Hand-made headers (any alg, kid of any type), unsigned: refused."""

    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    check(f"{part(header)}.{part(payload)}.{part('sig')}")


def test_the_cli_makes_a_token_the_server_takes() -> None:
    """python -m chatapp.token signs with CHAT_TOKEN_KEYS' first key; the token verifies with
    the claims asked for."""
    env = {"CHAT_TOKEN_KEYS": f"k1:{SECRET}", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "chatapp.token", "--sub", "42", "--name", "alice",
               "--rooms", "team-*", "--mod", "*", "--ttl", "60"]
    token = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    identity = VERIFIER.verify(token)
    assert (identity.user, identity.name, identity.rooms, identity.mod) == ("42", "alice", ("team-*",), ("*",))
    assert 50 < identity.expires - time.time() <= 60


def test_the_cli_without_a_key_says_so() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatapp.token", "--sub", "42"], cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "CHAT_TOKEN_KEYS" in result.stderr


@pytest.mark.parametrize("keys", ["k1:short", "nocolon", "k1:" + "x" * 40 + ",k1:" + "y" * 40])
def test_bad_keys_are_a_clear_startup_error(keys: str) -> None:
    with pytest.raises(ValueError, match="CHAT_TOKEN_KEYS"):
        Config.from_env({"CHAT_AUTH": "token", "CHAT_TOKEN_KEYS": keys})


def test_token_mode_needs_a_key() -> None:
    with pytest.raises(ValueError, match="CHAT_TOKEN_KEYS or CHAT_TOKEN_JWKS"):
        Config.from_env({"CHAT_AUTH": "token"})
