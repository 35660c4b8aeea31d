"""Byte-level language modelling on the documentation text every CPython ships.

`pydoc_data.topics` holds the language reference's topics (prose and code, ~460 KB).
Topics, not windows, are split between train / validation / test (by a stable hash of
the topic name), so held-out text comes from documentation pages never trained on.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from trainer.data.base import DataError, Task, TaskSpec, split_rng

VOCAB = 257  # bytes shifted by one; 0 is padding
_SPLIT_OF_BUCKET = {0: "test", 1: "validation"}  # crc32(topic) % 10; the rest is train


@functools.lru_cache(maxsize=1)
def _corpus() -> dict[str, np.ndarray]:
  from pydoc_data.topics import topics  # part of the standard library
  parts: dict[str, list[bytes]] = {"train": [], "validation": [], "test": []}
  for name in sorted(topics):
    split = _SPLIT_OF_BUCKET.get(zlib.crc32(name.encode()) % 10, "train")
    parts[split].append(topics[name].encode("utf-8") + b"\n\n")
  return {k: np.frombuffer(b"".join(v), np.uint8).astype(np.int32) + 1 for k, v in parts.items()}


class PydocText(Task):

  def __init__(self, seq_len: int, seed: int):
    self.seed = seed
    self.text = _corpus()
    shortest = min(len(v) for v in self.text.values())
    if seq_len + 1 > shortest:
      raise DataError(f"task.seq_len={seq_len} is longer than the smallest text split ({shortest - 1} bytes)")
    counts = np.bincount(self.text["validation"], minlength=VOCAB)
    self.spec = TaskSpec(
        kind="lm", vocab_size=VOCAB, seq_len=seq_len, num_classes=VOCAB,
        chance=float(counts.max() / counts.sum()),
        chance_note="next-byte accuracy of always predicting the most frequent held-out byte (a space)")

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    t = self.spec.seq_len
    text = self.text[split]
    if split == "train":  # a random window: an endless stream of distinct examples
      start = int(split_rng(self.seed, split, index).integers(0, len(text) - t - 1))
    else:  # held-out windows tile the text in order, the same ones every evaluation
      start = (index * t) % (len(text) - t - 1)
    window = text[start:start + t + 1]
    return {
        "inputs": window[:-1].copy(),
        "targets": window[1:].copy(),
        "weights": np.ones(t, np.float32),
        "segment_ids": np.ones(t, np.int32),
        "positions": np.arange(t, dtype=np.int32),
    }

  def decode(self, example):
    text = bytes((example["inputs"] - 1).clip(0, 255).astype(np.uint8)).decode("utf-8", "replace")
    return {"text": text, "next_byte": chr(int(example["targets"][-1]) - 1)}
