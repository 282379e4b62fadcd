from __future__ import annotations

import time

import pytest
import torch

from teeshard.model.sampling import SamplingParams
from teeshard.model.transformer import KVCache
from teeshard.node import SessionLimits, SessionStore
from teeshard.node.errors import BadRequestError, OverloadedError, UnknownSessionError


def open_session(store: SessionStore, sid: str, max_len: int) -> None:
    def allocate(length: int) -> KVCache:
        return KVCache.allocate(1, 1, length, 4, torch.float32, torch.device("cpu"))

    store.open(sid, max_len, allocate, "float32", SamplingParams(), False)


def test_admission_by_session_count_and_token_budget() -> None:
    store = SessionStore(SessionLimits(max_sessions=2, max_cached_tokens=100), max_len_cap=64)
    open_session(store, "a", 60)
    with pytest.raises(OverloadedError, match="budget exhausted: 60 of 100"):
        store.admit("b", 41)
    open_session(store, "b", 40)
    with pytest.raises(OverloadedError, match="2 open sessions"):
        store.admit("c", 1)
    store.close("a")
    open_session(store, "c", 60)
    assert store.reserved_tokens == 100


def test_bad_opens() -> None:
    store = SessionStore(SessionLimits(), max_len_cap=64)
    open_session(store, "a", 8)
    with pytest.raises(BadRequestError, match="already open"):
        store.admit("a", 8)
    with pytest.raises(BadRequestError, match="exceeds the model's context of 64"):
        store.admit("b", 65)


def test_idle_sessions_are_evicted() -> None:
    store = SessionStore(SessionLimits(idle_timeout_s=10), max_len_cap=64)
    open_session(store, "old", 8)
    open_session(store, "fresh", 8)
    now = time.monotonic()
    store.get("old").last_used = now - 11
    assert store.evict_idle(now) == ["old"]
    with pytest.raises(UnknownSessionError):
        store.get("old")
    assert store.evicted_total == 1
