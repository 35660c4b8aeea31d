"""Induction heads (Olsson et al. 2022; the Mamba paper's section 4.1 and Table 2): recall the
token that followed a trigger the one earlier time the trigger appeared.

A row of `seq_len` tokens is uniform noise over `vocab` data ids, except that the trigger
token appears twice: once at a random position p (not among the last three), followed by the
answer at p + 1, and once as the last token. At the last token the model must output the
answer (the loss is on that position only). Solving it needs content-based lookup and a copy
(a two-layer "induction head"), at any distance; trained at one length, it is the standard
test of length extrapolation (`--config.task.seq_len` at evaluation).

Ids: 0 padding (unused), 1 trigger, 2 .. 2 + vocab - 1 data. Splits are disjoint by hash
bucket, as in the other tasks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.data.base import DataError, Task, TaskSpec, draw_in_split

TRIGGER, FIRST_DATA = 1, 2
MAX_ATTEMPTS = 1000


class Induction(Task):

  def __init__(self, seq_len: int, seed: int, vocab: int = 16):
    seq_len, vocab = int(seq_len), int(vocab)
    if vocab < 2:
      raise DataError(f"induction vocab={vocab} must be at least 2 data tokens")
    if seq_len < 4:
      raise DataError(f"induction needs task.seq_len >= 4 (trigger, answer, a gap, the final trigger), got {seq_len}")
    self.seed, self.vocab = int(seed), vocab
    self.spec = TaskSpec(kind="lm", vocab_size=FIRST_DATA + vocab, seq_len=seq_len, num_classes=FIRST_DATA + vocab,
                         chance=1.0 / vocab, chance_note=f"1/{vocab}: the answer is uniform over the {vocab} data ids")

  def _draw(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = self.spec.seq_len
    inputs = (FIRST_DATA + rng.integers(0, self.vocab, size=t)).astype(np.int32)
    p = int(rng.integers(0, t - 3))  # the first trigger; its answer at p + 1 < t - 2
    answer = FIRST_DATA + int(rng.integers(0, self.vocab))
    inputs[p], inputs[p + 1], inputs[t - 1] = TRIGGER, answer, TRIGGER
    targets = np.zeros(t, np.int32)
    targets[t - 1] = answer
    weights = np.zeros(t, np.float32)
    weights[t - 1] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights,
            "segment_ids": np.ones(t, np.int32), "positions": np.arange(t, dtype=np.int32)}

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    return draw_in_split(self._draw, "induction", self.seed, split, index, MAX_ATTEMPTS)

  def decode(self, example: dict[str, np.ndarray]) -> dict[str, Any]:
    inputs = np.asarray(example["inputs"])
    p = int(np.flatnonzero(inputs == TRIGGER)[0])
    return {"trigger_position": p, "distance": len(inputs) - 1 - p,
            "answer": int(example["targets"][-1]) - FIRST_DATA}
