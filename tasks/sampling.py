"""MeZO's data protocol: small seeded samples, so numbers compare with the papers.

MeZO (Malladi et al. 2023, section 3 and appendix) trains on 1000 examples, selects on
500 and reports on 1000, all drawn at random: train and dev from the dataset's original
training split (disjoint), test from its original validation split (the test splits of
GLUE/SuperGLUE have no labels). Where a split is smaller, the samples shrink: dev takes
at most half of the original training split, train takes up to `num_train` of the rest,
test up to `num_test` of the validation split.

Train and dev are consecutive slices of one permutation of the training split (train
first), so for one `sample_seed` a smaller train sample is a prefix of a larger one
(16 examples are among the 1000) and dev never overlaps train. Test is drawn with its own
seed, fixed by default, so runs that differ in `sample_seed` are scored on the same test
set. The permutation orders rows by a SHA-256 of (seed, index): the same on every
machine and Python version, unlike `random.shuffle`, whose algorithm is not promised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tasks.base import TaskError

ORIGINAL_SPLIT_OF = {"train": "train", "dev": "train", "test": "validation"}
"""Which original split of a dataset each sampled split is drawn from."""


@dataclass(frozen=True)
class Sampling:
    """How many examples each split gets, and the seeds that draw them."""

    num_train: int | None = 1000
    """Training examples (None: every row left after dev)."""
    num_dev: int | None = 500
    """Dev examples, from the original training split, disjoint from train (None: half)."""
    num_test: int | None = 1000
    """Test examples, from the original validation split (None: all of it)."""
    sample_seed: int = 0
    """Draws train and dev."""
    test_seed: int = 0
    """Draws test; fixed so that runs with different sample seeds share a test set."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_dev", "num_test"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TaskError(f"{name} must be a whole number or null, got {value!r}")
            if value is not None and value < 0:
                raise TaskError(f"{name} must be >= 0, got {value}")
        for name in ("sample_seed", "test_seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise TaskError(f"{name} must be a whole number, got {getattr(self, name)!r}")

    def indices(self, split: str, num_rows: int) -> list[int]:
        """Row indices of `split` ("train", "dev" or "test") into the original split that
        holds it (`ORIGINAL_SPLIT_OF`), which has `num_rows` rows."""
        if split not in ORIGINAL_SPLIT_OF:
            raise TaskError(f"split {split!r} is not one of {list(ORIGINAL_SPLIT_OF)}")
        if split == "test":
            return permutation(num_rows, self.test_seed)[: _capped(self.num_test, num_rows)]
        order = permutation(num_rows, self.sample_seed)
        dev_size = _capped(self.num_dev, num_rows // 2)
        train_size = _capped(self.num_train, num_rows - dev_size)
        if split == "train":
            return order[:train_size]
        return order[train_size : train_size + dev_size]

    def split_indices(self, num_train_rows: int, num_validation_rows: int) -> dict[str, list[int]]:
        """Row indices per split: "train" and "dev" index the original training split,
        "test" the original validation split."""
        sizes = {"train": num_train_rows, "validation": num_validation_rows}
        return {
            split: self.indices(split, sizes[original])
            for split, original in ORIGINAL_SPLIT_OF.items()
        }


def _capped(wanted: int | None, available: int) -> int:
    return available if wanted is None else min(wanted, available)


def permutation(n: int, seed: int) -> list[int]:
    """range(n) in an order fixed by `seed` alone (and the same for every n: the order
    of two indices never depends on how many rows there are)."""

    def key(index: int) -> bytes:
        return hashlib.sha256(f"{seed}:{index}".encode()).digest()

    return sorted(range(n), key=key)
