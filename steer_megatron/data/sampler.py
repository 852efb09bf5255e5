"""Seeded, resumable order over a prompt list.

Epoch e visits every example once in the permutation drawn from (seed, e), so the order
does not depend on how many batches were taken or how big they were; the state is just
(epoch, position). A resumed run that loads the state sees exactly the same prompts next.
"""
from __future__ import annotations

import random
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")


class ResumableSampler(Generic[T]):
    def __init__(self, items: Sequence[T], *, seed: int, shuffle: bool = True):
        if not items:
            raise ValueError("ResumableSampler needs at least one item")
        self.items = items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            # str seeds hash deterministically in random.Random (unlike hash()), across processes
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[T]:
        """The next `size` items; a batch that reaches the end of an epoch continues into the next."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        out: list[T] = []
        while len(out) < size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(out), len(self._order) - self.position)
            out.extend(self.items[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_items": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("num_items", len(self.items))):
            if state[key] != mine:
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this run has {key}={mine!r}: "
                    f"resuming would not continue the same order (same data files, filters and data.seed needed)"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
