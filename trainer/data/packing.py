"""Padding-free variable length (ByteTransformer-style packing): several examples per row.

`task.packing=true` wraps a task so that each row holds several of its (right-padded)
examples back to back, each with its own segment id (1, 2, ...) and positions starting
at 0; the rest of the row is padding (segment id 0). Every mixer masks by segment id, so
examples in one row never see each other, and the loss is per example:

* kind ``lm``: targets/weights are concatenated with the inputs (token losses, as before);
* kind ``classify``: ``label`` becomes [S] (S = `task.packing_window`, the most examples
  a row can hold) with ``label_weights`` [S] marking the slots in use; the classifier
  pools each segment separately.

Rows stay a pure function of (split, row index), so the data state is still the step:

* train: the global batch of step s (rows [sB, (s+1)B)) is packed from the examples
  [s B W, (s+1) B W) of the underlying stream (W = `task.packing_window`, about the
  examples a row holds on average). They are placed in stream order, each into the first
  row with room (first fit). When all B rows are open and an example fits in none, the
  batch is complete and the rest of the block is skipped. Only that one example is
  skipped because of its length; the others are skipped because of their place in the
  stream, which is random. So the examples trained on keep the task's length
  distribution. `stats()` measures this, and scripts/bench_packing.py prints it.
* held-out splits: examples [0, n) are packed first-fit into as many rows as they need,
  with no example skipped. Packed and padded evaluation therefore score the same examples.
"""

from __future__ import annotations

import functools

import numpy as np

from trainer.data.base import DataError, Task, TaskSpec


def real_length(example: dict) -> int:
  """Tokens before the right padding."""
  seg = example["segment_ids"]
  nz = np.flatnonzero(seg)
  length = int(nz[-1]) + 1 if len(nz) else 0
  if length and not np.all(seg[:length] != 0):
    raise DataError("packing needs right-padded examples (padding only at the end of a row)")
  return length


class PackedTask(Task):
  """`inner`'s examples packed into rows of the same length."""

  PER_TOKEN = ("inputs", "targets", "weights")

  def __init__(self, inner: Task, window: int, eval_examples: int, batch_size: int):
    if inner.spec.kind not in ("lm", "classify"):
      raise DataError(f"task.packing=true supports language-model and classification tasks, not kind "
                      f"{inner.spec.kind!r}")
    if window < 1:
      raise DataError(f"task.packing_window={window} must be at least 1")
    self.inner, self.window, self.eval_examples = inner, int(window), int(eval_examples)
    self.batch_size = int(batch_size)
    # Most examples one row can hold: the label slots of a classification row.
    self.slots = max(1, min(self.inner.spec.seq_len, 4 * self.window))
    s = inner.spec
    self.spec = TaskSpec(kind=s.kind, vocab_size=s.vocab_size, seq_len=s.seq_len, num_classes=s.num_classes,
                         chance=s.chance, chance_note=s.chance_note)

  def _row(self, examples: list[dict]) -> dict:
    t = self.spec.seq_len
    keys = [k for k in self.PER_TOKEN if k in self.inner.example("validation", 0)]
    row = {k: np.zeros(t, np.float32 if k == "weights" else np.int32) for k in keys}
    row["segment_ids"] = np.zeros(t, np.int32)
    row["positions"] = np.zeros(t, np.int32)
    if self.spec.kind == "classify":
      row["label"] = np.zeros(self.slots, np.int32)
      row["label_weights"] = np.zeros(self.slots, np.float32)
    at = 0
    for i, ex in enumerate(examples):
      n = real_length(ex)
      for k in keys:
        row[k][at:at + n] = ex[k][:n]
      row["segment_ids"][at:at + n] = i + 1
      row["positions"][at:at + n] = np.arange(n)
      if self.spec.kind == "classify":
        row["label"][i], row["label_weights"][i] = ex["label"], 1.0
      at += n
    return row

  def _first_fit(self, split: str, ids, max_rows: int | None):
    """Packs examples `ids` in order into rows (lists of ids); returns (rows, ids placed)."""
    rows, room = [], []
    placed = 0
    for i in ids:
      n = real_length(self.inner.example(split, int(i)))
      if n > self.spec.seq_len:
        raise DataError(f"an example of {n} tokens does not fit task.seq_len={self.spec.seq_len}")
      r = next((r for r, free in enumerate(room) if free >= n and len(rows[r]) < self.slots), None)
      if r is None:
        if max_rows is not None and len(rows) == max_rows:
          break  # the batch is full: the rest of the block is skipped
        rows.append([])
        room.append(self.spec.seq_len)
        r = len(rows) - 1
      rows[r].append(int(i))
      room[r] -= n
      placed += 1
    return rows, placed

  @functools.lru_cache(maxsize=4)
  def _train_block(self, block: int):
    k = self.batch_size * self.window
    return self._first_fit("train", range(block * k, (block + 1) * k), self.batch_size)

  def num_examples(self, split: str) -> int | None:
    return self.inner.num_examples(split)

  @functools.lru_cache(maxsize=8)
  def eval_rows(self, split: str):
    """Held-out examples [0, eval_examples) (or the whole split if smaller) packed first fit,
    none skipped: example ids per row."""
    size = self.inner.num_examples(split)
    n = self.eval_examples if size is None else min(self.eval_examples, size)
    return self._first_fit(split, range(n), None)[0]

  def num_eval_rows(self, split: str) -> int:
    return len(self.eval_rows(split))

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    if split == "train":
      rows = self._train_block(index // self.batch_size)[0]
      ids = rows[index % self.batch_size] if index % self.batch_size < len(rows) else []
    else:
      rows = self.eval_rows(split)
      ids = rows[index] if index < len(rows) else []  # beyond the packed set: an empty row
    return self._row([self.inner.example(split, i) for i in ids])

  def stats(self, steps: int) -> dict:
    """Over the first `steps` train batches: token fill, examples skipped, and the mean
    length of the examples trained on beside that of all examples considered."""
    k = self.batch_size * self.window
    tokens = placed_n = 0
    placed_len, all_len = [], []
    for s in range(steps):
      rows, placed = self._train_block(s)
      lengths = [real_length(self.inner.example("train", s * k + j)) for j in range(k)]
      all_len += lengths
      placed_len += lengths[:placed]
      tokens += sum(lengths[:placed])
      placed_n += placed
    return {"fill": tokens / (steps * self.batch_size * self.spec.seq_len), "skipped": 1 - placed_n / (steps * k),
            "mean_len_trained": float(np.mean(placed_len)), "mean_len_all": float(np.mean(all_len)),
            "examples_per_row": placed_n / (steps * self.batch_size)}

  def decode(self, example):
    return {"segments": int(example["segment_ids"].max()), "tokens": int((example["segment_ids"] != 0).sum())}
