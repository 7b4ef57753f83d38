"""Model locks: two widgets never run the same model at once, and a long holder hands the model
to a waiting widget between two batches."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class _ModelLock:
    """A model's re-entrant lock whose holder can hand it to a waiting thread between two batches."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self.waiting = 0
        """Threads blocked in acquire()."""
        self.turns = 0
        """How many times another thread than the last owner took it (a handover waits for this)."""

    def acquire(self, depth: int = 1) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += depth
                return
            self.waiting += 1
            try:
                self._cond.wait_for(lambda: self._owner is None)
            finally:
                self.waiting -= 1
            self._owner, self._depth = me, depth
            self.turns += 1
            self._cond.notify_all()  # a handing-over thread waits for this turn

    def release(self, all_levels: bool = False) -> int:
        """Release once (or entirely); returns the depth released."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a model lock this thread does not hold")
            n = self._depth if all_levels else 1
            self._depth -= n
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()
            return n

    def wait_turn(self, since: int, timeout: float) -> None:
        """Block until someone else took the lock after ``since`` turns, or nobody waits any more."""
        with self._cond:
            self._cond.wait_for(lambda: self.turns != since or self.waiting == 0, timeout)


_MODEL_LOCKS: dict[int, _ModelLock] = {}
_MODEL_LOCKS_GUARD = threading.Lock()
_HANDOVER_TIMEOUT_S = 1.0


class ModelHold:
    """The models a ``using()`` block holds; ``handover()`` lets a waiting thread run one batch."""

    def __init__(self, locks: list[_ModelLock]) -> None:
        self._locks = locks

    def handover(self) -> None:
        """Between two batches: if another thread waits for one of these models, release them all,
        let it take its turn, then take them back (in the global order: no deadlock)."""
        waited = [(lock, lock.turns) for lock in self._locks if lock.waiting]
        if not waited:
            return
        depths = [lock.release(all_levels=True) for lock in reversed(self._locks)][::-1]
        for lock, since in waited:
            lock.wait_turn(since, _HANDOVER_TIMEOUT_S)
        for lock, depth in zip(self._locks, depths):
            lock.acquire(depth)


@contextlib.contextmanager
def using(*models: Any) -> Iterator[ModelHold]:
    """Hold these models for one batch of work: widgets run on their own worker threads, and a
    bridge's hooks are shared state, so two widgets never run the same model at once. A long
    holder calls ``hold.handover()`` between batches so that others wait one batch at most."""
    with _MODEL_LOCKS_GUARD:
        locks = [_MODEL_LOCKS.setdefault(i, _ModelLock()) for i in sorted({id(m) for m in models})]
    taken: list[_ModelLock] = []
    try:
        for lock in locks:  # one global order (by id): no deadlock between two widgets
            lock.acquire()
            taken.append(lock)
        yield ModelHold(locks)
    finally:
        for lock in reversed(taken):
            lock.release()
