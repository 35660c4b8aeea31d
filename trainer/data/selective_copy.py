"""Selective copying (Mamba, Gu & Dao 2023, section 4.1): copy scattered tokens in order.

A row of `seq_len` tokens holds `num_tokens` data tokens at random positions of its
first `seq_len - num_tokens` slots, noise everywhere else; the last `num_tokens` slots
are copy markers. At marker i the model must output the i-th data token (the loss is on
the markers only). The spacing between data tokens varies from example to example, so a
fixed-lag mixer (a convolution, an LTI SSM) cannot solve it; content-aware selection can.

Ids: 0 padding (unused), 1 noise, 2 marker, 3 .. 3 + vocab - 1 data. Splits are disjoint
by hash bucket, as in the other tasks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.data.base import DataError, Task, TaskSpec, draw_in_split

NOISE, MARKER, FIRST_DATA = 1, 2, 3
MAX_ATTEMPTS = 1000


class SelectiveCopy(Task):

  def __init__(self, seq_len: int, seed: int, num_tokens: int = 16, vocab: int = 16):
    seq_len, num_tokens, vocab = int(seq_len), int(num_tokens), int(vocab)
    if num_tokens < 1:
      raise DataError(f"selective_copy num_tokens={num_tokens} must be at least 1")
    if vocab < 2:
      raise DataError(f"selective_copy vocab={vocab} must be at least 2 data tokens")
    if 2 * num_tokens > seq_len:
      raise DataError(f"selective_copy num_tokens={num_tokens} needs task.seq_len >= {2 * num_tokens} "
                      f"(the data region and the markers), got {seq_len}")
    self.seed, self.num_tokens, self.vocab = int(seed), num_tokens, vocab
    self.spec = TaskSpec(kind="lm", vocab_size=FIRST_DATA + vocab, seq_len=seq_len, num_classes=FIRST_DATA + vocab,
                         chance=1.0 / vocab,
                         chance_note=f"1/{vocab}: each data token is uniform over the {vocab} data ids")

  def _draw(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t, n = self.spec.seq_len, self.num_tokens
    region = t - n
    where = np.sort(rng.choice(region, size=n, replace=False))
    data = FIRST_DATA + rng.integers(0, self.vocab, size=n)
    inputs = np.full(t, NOISE, np.int32)
    inputs[where] = data
    inputs[region:] = MARKER
    targets = np.zeros(t, np.int32)
    targets[region:] = data
    weights = np.zeros(t, np.float32)
    weights[region:] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights,
            "segment_ids": np.ones(t, np.int32), "positions": np.arange(t, dtype=np.int32)}

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    return draw_in_split(self._draw, "selective_copy", self.seed, split, index, MAX_ATTEMPTS)

  def decode(self, example: dict[str, np.ndarray]) -> dict[str, Any]:
    inputs = np.asarray(example["inputs"])
    region = self.spec.seq_len - self.num_tokens
    pos = [int(p) for p in np.flatnonzero(inputs[:region] >= FIRST_DATA)]
    return {"data_positions": pos, "data": [int(inputs[p]) - FIRST_DATA for p in pos],
            "answer": [int(x) - FIRST_DATA for x in example["targets"][region:]]}
