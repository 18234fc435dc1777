"""Chat tokens: verifying the JWTs an app's backend signs (CHAT_AUTH=token), and making them
for operators and tests:

    python -m chatapp.token --sub 42 --name alice --rooms 'team-*' --mod '*' --ttl 3600

signs with the first key of CHAT_TOKEN_KEYS (or --key kid:secret) and prints the token.
Verification uses PyJWT's own call with the algorithm fixed by the key the token's `kid`
names, never by the token (docs/protocol.md, "Signed identity").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from .chat.commands import CommandError
from .chat.identity import MAX_PATTERNS, Identity
from .config import Config, ConfigError

# A token is at most this long (characters of its compact form).
MAX_TOKEN = 8192
# Seconds of clock difference forgiven when checking exp, nbf and iat.
LEEWAY = 5
MAX_SUB = 64
MAX_NAME = 64
# A room pattern: a room name, or a prefix followed by *.
PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}|[a-z0-9_-]{0,31}\*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def bad_token(why: str) -> CommandError:
    return CommandError("bad_token", why)


class Verifier:
    """Checks tokens against the configured keys: HMAC secrets and a JWKS file of public keys."""

    def __init__(self, config: Config) -> None:
        """Raises ConfigError when the JWKS file cannot be read or holds an unusable key."""
        # kid -> (key, the one algorithm tokens under it may use)
        self.keys: dict[str, tuple[Any, str]] = {kid: (secret.encode(), "HS256") for kid, secret in config.token_keys}
        if config.token_jwks:
            self.keys.update(_jwks(config.token_jwks))
        self.audience = config.token_audience or None
        self.issuer = config.token_issuer or None

    def verify(self, token: object) -> Identity:
        """The identity a token vouches for; CommandError bad_token or token_expired if none."""
        if not isinstance(token, str) or not token:
            raise bad_token("token must be a non-empty string")
        if len(token) > MAX_TOKEN:
            raise bad_token(f"token over {MAX_TOKEN} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise bad_token("not a JWT") from None
        kid = header.get("kid")
        if kid is None and len(self.keys) == 1:
            kid = next(iter(self.keys))
        if not isinstance(kid, str) or kid not in self.keys:
            raise bad_token("unknown key id (kid)")
        key, algorithm = self.keys[kid]
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise CommandError("token_expired", "the token has expired: get a new one") from None
        except jwt.ImmatureSignatureError:
            raise bad_token("the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise bad_token("wrong audience (aud)") from None
        except jwt.InvalidIssuerError:
            raise bad_token("wrong issuer (iss)") from None
        except jwt.MissingRequiredClaimError as error:
            raise bad_token(f"the {error.claim} claim is missing") from None
        except jwt.InvalidAlgorithmError:
            raise bad_token(f"wrong algorithm: tokens under this key are {algorithm}") from None
        except jwt.InvalidSignatureError:
            raise bad_token("bad signature") from None
        except jwt.InvalidTokenError as error:
            raise bad_token(f"invalid token ({type(error).__name__})") from None
        return identity(claims)


def identity(claims: dict[str, Any]) -> Identity:
    """The chat's identity from verified claims; bad_token when one is invalid."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB or not sub.isprintable():
        raise bad_token(f"sub must be a string of 1 to {MAX_SUB} printable characters")
    name = claims.get("name", sub)
    if not isinstance(name, str):
        raise bad_token("name must be a string")
    name = unicodedata.normalize("NFKC", name).strip()
    if not 0 < len(name) <= MAX_NAME or _CONTROL.search(name):
        raise bad_token(f"name must be 1 to {MAX_NAME} characters, without control characters")
    exp = claims["exp"]
    if not isinstance(exp, int | float):
        raise bad_token("exp must be a number")
    return Identity(sub, name, _patterns(claims, "rooms"), _patterns(claims, "mod"), float(exp))


def _patterns(claims: dict[str, Any], claim: str) -> tuple[str, ...]:
    patterns = claims.get(claim, [])
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or len(patterns) > MAX_PATTERNS:
        raise bad_token(f"{claim} must be a list of at most {MAX_PATTERNS} room patterns")
    if not all(isinstance(p, str) and PATTERN.fullmatch(p) for p in patterns):
        raise bad_token(f"{claim} must hold room names or prefixes followed by *")
    return tuple(patterns)


def _jwks(path: str) -> dict[str, tuple[Any, str]]:
    """Public keys from a JWKS file, by kid, each with the algorithm its type fixes."""
    try:
        document = json.loads(Path(path).read_text())
        entries = document["keys"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"CHAT_TOKEN_JWKS: cannot read a JWKS from {path!r} ({error})") from None
    keys: dict[str, tuple[Any, str]] = {}
    for entry in entries:
        kid, kty = entry.get("kid"), entry.get("kty")
        if not isinstance(kid, str) or not kid:
            raise ConfigError(f"CHAT_TOKEN_JWKS: every key needs a kid ({path})")
        try:
            if kty == "RSA":
                keys[kid] = (RSAAlgorithm.from_jwk(entry), "RS256")
            elif kty == "EC" and entry.get("crv") == "P-256":
                keys[kid] = (ECAlgorithm.from_jwk(entry), "ES256")
            elif kty == "OKP" and entry.get("crv") == "Ed25519":
                keys[kid] = (OKPAlgorithm.from_jwk(entry), "EdDSA")
            else:
                raise ConfigError(f"CHAT_TOKEN_JWKS: key {kid!r}: only RSA, EC P-256 and Ed25519 keys are used")
        except jwt.InvalidKeyError as error:
            raise ConfigError(f"CHAT_TOKEN_JWKS: key {kid!r}: {error}") from None
        if "d" in entry:
            raise ConfigError(f"CHAT_TOKEN_JWKS: key {kid!r} is a private key: give the server public keys only")
    return keys


def make(
    key: tuple[str, str], sub: str, name: str | None = None, rooms: list[str] | None = None,
    mod: list[str] | None = None, ttl: float = 3600, **claims: Any,
) -> str:
    """A token signed with an HMAC key (kid, secret), as an app's backend makes one."""
    kid, secret = key
    payload: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), "iat": int(time.time()), **claims}
    if name is not None:
        payload["name"] = name
    if rooms:
        payload["rooms"] = rooms
    if mod:
        payload["mod"] = mod
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chatapp.token", description="Print a chat token (HS256).")
    parser.add_argument("--sub", required=True, help="the user's id in the app")
    parser.add_argument("--name", help="the name shown (default: the sub)")
    parser.add_argument("--rooms", action="append", default=[], help="a private-room pattern (repeat for more)")
    parser.add_argument("--mod", action="append", default=[], help="a moderated-room pattern (repeat for more)")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds the token is valid (default 3600)")
    parser.add_argument("--key", help="kid:secret to sign with (default: the first of CHAT_TOKEN_KEYS)")
    parser.add_argument("--aud", help="the aud claim (CHAT_TOKEN_AUDIENCE)")
    parser.add_argument("--iss", help="the iss claim (CHAT_TOKEN_ISSUER)")
    args = parser.parse_args(argv)
    try:
        keys = Config.from_env({"CHAT_TOKEN_KEYS": args.key}).token_keys if args.key else Config.from_env().token_keys
    except ConfigError as error:
        sys.exit(f"chatapp.token: {error}")
    if not keys:
        sys.exit("chatapp.token: no key: set CHAT_TOKEN_KEYS or give --key kid:secret")
    extra = {name: value for name, value in (("aud", args.aud), ("iss", args.iss)) if value}
    print(make(keys[0], args.sub, args.name, args.rooms, args.mod, args.ttl, **extra))


if __name__ == "__main__":
    main()
