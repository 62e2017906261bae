"""Helpers for the TFDS builder tests: record-by-record comparison of two prepared data sets, no network."""
from __future__ import annotations

import socket
from typing import Any

import numpy as np

from medvlp_jax.data import schema
import sources_testlib as tl


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_data(ours: str, theirs: str) -> dict[str, list[dict[str, Any]]]:
    """Every record of ``theirs`` (e.g. a TFDS version directory) equals ``ours`` field by field, by index.

    Both are read through ``schema.read_info`` and ``schema.feature_spec`` (``sources_testlib.read_all``,
    which also checks shard counts and indices 0..n-1). Splits that ``ours`` holds empty may be absent from
    ``theirs`` (TFDS writes no empty split). The info keys of ``ours`` (class names, the converter's extra
    info) must be in ``theirs`` with the same values.

    Returns:
      the records of ``theirs``, per split.
    """
    a, b = tl.read_all(ours), tl.read_all(theirs)
    assert set(b) == {s for s, recs in a.items() if recs}, (sorted(a), sorted(b))
    for split, recs in b.items():
        assert len(recs) == len(a[split]), (split, len(recs), len(a[split]))
        for x, y in zip(a[split], recs):
            assert x.keys() == y.keys()
            for k in x:
                assert _same(x[k], y[k]), f"split {split!r}, index {x['index']}, field {k!r} differs"
    info_a, info_b = schema.read_info(ours), schema.read_info(theirs)
    for k, v in info_a.items():
        if k != "splits":
            assert info_b.get(k) == v, (k, v, info_b.get(k))
    return b


class NetworkCalled(AssertionError):
    pass


def forbid_network(monkeypatch) -> list[str]:
    """Makes every socket connect / name lookup raise (and records it); returns the list of attempts."""
    attempts: list[str] = []

    def refuse(kind):
        def f(*args, **kwargs):
            attempts.append(f"{kind}{args[1:] if kind == 'connect' else args}")
            raise NetworkCalled(f"network access attempted: {kind} {args!r}")
        return f

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts
