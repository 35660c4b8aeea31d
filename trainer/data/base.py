"""What every task provides: a spec, and examples that are a pure function of (split, index).

Examples are generated on demand from `(seed, split, index)` alone, so the data
iterator state is just the step number, resume is exact, and each host generates
only the rows of a global batch that its devices hold.

Example dicts (numpy, one example, no batch axis):

* kind ``lm``:       inputs[T] int32, targets[T] int32, weights[T] float32,
                     segment_ids[T] int32 (0 = padding), positions[T] int32
* kind ``classify``: inputs[T], segment_ids[T], positions[T], label[] int32
* kind ``match``:    inputs[T], segment_ids[T], positions[T],
                     inputs2[T], segment_ids2[T], positions2[T], label[] int32
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np

SPLITS = ("train", "validation", "test")
KINDS = ("lm", "classify", "match")


class DataError(ValueError):
  """A user-caused problem with task settings or data."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  kind: str  # one of KINDS
  vocab_size: int  # token ids are in [0, vocab_size); 0 is the padding id
  seq_len: int  # T of every example
  num_classes: int  # label classes (classify/match); vocab_size for lm
  chance: float  # held-out accuracy of the best input-blind guess
  chance_note: str  # one sentence: how `chance` was computed
  grid: tuple[int, int] = (0, 0)  # (h, w) when the T tokens are an h x w image (row-major); (0, 0) = a line


def split_rng(seed: int, split: str, index: int, salt: int = 0) -> np.random.Generator:
  """Independent, reproducible generator for example `index` of `split`."""
  if split not in SPLITS:
    raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
  return np.random.default_rng([int(seed), SPLITS.index(split), int(index), int(salt)])


def hash_bucket(tokens: np.ndarray | bytes | str, buckets: int = 10) -> int:
  """Stable bucket of a token sequence; used to keep splits disjoint by construction."""
  if isinstance(tokens, str):
    data = tokens.encode()
  elif isinstance(tokens, bytes):
    data = tokens
  else:
    data = np.asarray(tokens, np.int64).tobytes()
  return zlib.crc32(data) % buckets


# Buckets of `hash_bucket(..., 10)` owned by each split: an example generated for one
# split is rejected (and regenerated) unless its hash falls in that split's buckets,
# so the same sequence can never appear in two splits.
SPLIT_BUCKETS = {"train": tuple(range(2, 10)), "validation": (1,), "test": (0,)}


def draw_in_split(draw, name: str, seed: int, split: str, index: int, attempts: int = 1000) -> dict:
  """Example `index` of `split` for a generated task: `draw(rng)` with the generators of
  `split_rng(seed, split, index, salt=0, 1, ...)` until the example's tokens hash into the
  split's buckets (so the splits are disjoint by construction)."""
  for attempt in range(attempts):
    ex = draw(split_rng(seed, split, index, salt=attempt))
    if hash_bucket(ex["inputs"]) in SPLIT_BUCKETS[split]:
      return ex
  raise DataError(f"{name} could not draw example {index} of split {split!r} in {attempts} attempts")


class Task:
  """Base class. Subclasses set `self.spec` and implement `example`."""

  spec: TaskSpec

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def num_examples(self, split: str) -> int | None:
    """Examples in a finite split (a data set on disk), None for an endless generated one.
    A finite split's held-out example `index >= num_examples` is a filler of zero weight."""
    del split
    return None

  def batch(self, split: str, indices) -> dict[str, np.ndarray]:
    """Stacks examples; row r is example `indices[r]`."""
    rows = [self.example(split, int(i)) for i in indices]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def decode(self, example: dict[str, np.ndarray]) -> dict[str, Any]:
    """Human-readable view of one example (used by `trainer.data.inspect`)."""
    raise NotImplementedError
