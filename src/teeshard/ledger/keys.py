"""API keys: made at random, stored and looked up only as a domain-separated SHA-256.

A key is 32 random bytes, so a plain (unsalted) hash cannot be reversed by
guessing, and the same hash works on chain, where no server secret can be kept.
"""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "tsk_"
_DOMAIN = b"teeshard/api-key/v1\x00"


def new_api_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    """Hex SHA-256 of the key; what every backend stores instead of the key."""
    if not api_key:
        raise ValueError("an API key cannot be empty")
    return hashlib.sha256(_DOMAIN + api_key.encode()).hexdigest()
