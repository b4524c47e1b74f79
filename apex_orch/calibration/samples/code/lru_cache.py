"""A least-recently-used cache with a fixed capacity and optional time-to-live.

Lookups and inserts are O(1): a dict maps keys to nodes of a doubly linked list
that keeps entries in recency order (most recent at the head).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Node(Generic[K, V]):
    key: K
    value: V
    stored_at: float
    prev: "_Node[K, V] | None" = field(default=None, repr=False)
    next: "_Node[K, V] | None" = field(default=None, repr=False)


class LRUCache(Generic[K, V]):
    def __init__(self, capacity: int, ttl: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._map: dict[K, _Node[K, V]] = {}
        self._head: _Node[K, V] | None = None
        self._tail: _Node[K, V] | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        node = self._map.get(key)  # type: ignore[arg-type]
        return node is not None and not self._expired(node)

    def __iter__(self) -> Iterator[K]:
        node = self._head
        while node is not None:
            yield node.key
            node = node.next

    def get(self, key: K, default: V | None = None) -> V | None:
        node = self._map.get(key)
        if node is None or self._expired(node):
            if node is not None:
                self._remove(node)
            self.misses += 1
            return default
        self._move_to_front(node)
        self.hits += 1
        return node.value

    def put(self, key: K, value: V) -> None:
        node = self._map.get(key)
        now = self._clock()
        if node is not None:
            node.value, node.stored_at = value, now
            self._move_to_front(node)
            return
        node = _Node(key, value, now)
        self._map[key] = node
        self._push_front(node)
        if len(self._map) > self.capacity:
            assert self._tail is not None
            self._remove(self._tail)

    def pop(self, key: K) -> V:
        node = self._map[key]
        self._remove(node)
        return node.value

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    # -- linked list plumbing
    def _expired(self, node: _Node[K, V]) -> bool:
        return self.ttl is not None and self._clock() - node.stored_at > self.ttl

    def _push_front(self, node: _Node[K, V]) -> None:
        node.prev, node.next = None, self._head
        if self._head is not None:
            self._head.prev = node
        self._head = node
        if self._tail is None:
            self._tail = node

    def _unlink(self, node: _Node[K, V]) -> None:
        if node.prev is not None:
            node.prev.next = node.next
        else:
            self._head = node.next
        if node.next is not None:
            node.next.prev = node.prev
        else:
            self._tail = node.prev
        node.prev = node.next = None

    def _move_to_front(self, node: _Node[K, V]) -> None:
        if node is not self._head:
            self._unlink(node)
            self._push_front(node)

    def _remove(self, node: _Node[K, V]) -> None:
        self._unlink(node)
        del self._map[node.key]


def memoize(capacity: int = 128, ttl: float | None = None):
    """Decorator: cache a function's results by its positional arguments."""
    def decorate(fn):
        cache: LRUCache[tuple, object] = LRUCache(capacity, ttl)
        sentinel = object()

        def wrapper(*args):
            found = cache.get(args, sentinel)  # type: ignore[arg-type]
            if found is not sentinel:
                return found
            result = fn(*args)
            cache.put(args, result)
            return result

        wrapper.cache = cache  # type: ignore[attr-defined]
        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        return wrapper
    return decorate


# ---------------------------------------------------------------- tests (pytest)

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_evicts_least_recently_used():
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1      # "a" is now the most recent
    cache.put("c", 3)               # evicts "b"
    assert "b" not in cache
    assert list(cache) == ["c", "a"]


def test_ttl_expiry():
    clock = FakeClock()
    cache: LRUCache[str, str] = LRUCache(10, ttl=5, clock=clock)
    cache.put("token", "abc")
    clock.now = 4.9
    assert cache.get("token") == "abc"
    clock.now = 5.1
    assert cache.get("token") is None
    assert len(cache) == 0


def test_memoize_counts_hits():
    calls = []

    @memoize(capacity=4)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert [square(3), square(3), square(4)] == [9, 9, 16]
    assert calls == [3, 4]
    assert square.cache.hit_rate() == 1 / 3
