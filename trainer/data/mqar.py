"""Multi-query associative recall (MQAR), built as Zoology's `multiquery_ar` builds it.

A sequence opens with `num_pairs` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys
from [1, vocab_size // 2), distinct values from [vocab_size // 2, vocab_size)); every
key is then queried once, later in the sequence, and the model must output the value
paired with it at the query position. Query positions follow Zoology: key i sits at
``2 * num_pairs + 2 * gap_i``, where the gaps are distinct draws from
{0, ..., space - 1}, space = (seq_len - 2 * num_pairs) // 2, with probability
proportional to (gap + 1) ** (power_a - 1). Small power_a puts most queries right
after the pairs, as repeated bigrams cluster in real text.

One difference from Zoology's default: positions that are neither pairs nor queries
hold token 0 rather than random tokens (Zoology's `random_non_queries=True`), keeping
id 0 as the one filler/padding id of the framework.

Example `index` of a split is regenerated from `split_rng(seed, split, index,
salt=attempt)` for attempt 0, 1, ... until its inputs hash into the split's buckets,
which keeps the splits disjoint by construction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trainer.data.base import DataError, Task, TaskSpec, draw_in_split

# Test and validation own one bucket in ten, so the expected number of attempts is 10;
# reaching this bound means something is broken, not unlucky.
MAX_ATTEMPTS = 1000


class MQAR(Task):
  """Zoology-style MQAR as an `lm` task whose loss is only on the query positions."""

  def __init__(self, seq_len: int, seed: int, vocab_size: int = 8192, num_pairs: int = 16,
               power_a: float = 0.01):
    seq_len, seed, vocab_size, num_pairs = int(seq_len), int(seed), int(vocab_size), int(num_pairs)
    power_a = float(power_a)
    if num_pairs < 1:
      raise DataError(f"mqar num_pairs={num_pairs} must be at least 1")
    if num_pairs > vocab_size // 2 - 1:
      raise DataError(f"mqar num_pairs={num_pairs} needs that many distinct keys in [1, vocab_size // 2), "
                      f"but vocab_size={vocab_size} offers only {max(vocab_size // 2 - 1, 0)}; "
                      f"raise vocab_size to at least {2 * num_pairs + 2}")
    if 4 * num_pairs > seq_len:
      # The pairs take 2 * num_pairs tokens and, as in Zoology, queries sit only at even
      # offsets after them, so the query section needs 2 * num_pairs tokens too.
      raise DataError(f"mqar num_pairs={num_pairs} needs seq_len >= 4 * num_pairs = {4 * num_pairs} "
                      f"(pairs, then one query per key at even offsets), but task.seq_len={seq_len}")
    if not (math.isfinite(power_a) and power_a > 0):
      raise DataError(f"mqar power_a={power_a} must be a positive number")
    self.seed = seed
    self.num_pairs = num_pairs
    self.power_a = power_a
    self._half = vocab_size // 2
    self._space = (seq_len - 2 * num_pairs) // 2
    # Normalised in log space so a large power_a cannot overflow; the constant factor
    # power_a in Zoology's formula cancels in the normalisation.
    logw = (power_a - 1.0) * np.log(np.arange(1, self._space + 1, dtype=np.float64))
    w = np.exp(logw - logw.max())
    self._gap_p = w / w.sum()
    with np.errstate(divide="ignore"):
      self._gap_logp = np.log(self._gap_p)
    if np.count_nonzero(self._gap_p) < num_pairs:
      raise DataError(f"mqar power_a={power_a} is so large that fewer than num_pairs={num_pairs} "
                      "query gaps have non-zero probability; use a smaller power_a")
    num_values = vocab_size - self._half
    self.spec = TaskSpec(
        kind="lm", vocab_size=vocab_size, seq_len=seq_len, num_classes=vocab_size,
        chance=1.0 / num_values,
        chance_note=(f"1/{num_values}: each query's answer is a uniform draw from the {num_values} value ids "
                     "[vocab_size // 2, vocab_size), so a guess that ignores the pairs is right that often"))

  def _draw(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, seq_len = self.num_pairs, self.spec.seq_len
    keys = 1 + rng.choice(self._half - 1, size=n, replace=False)
    values = self._half + rng.choice(self.spec.vocab_size - self._half, size=n, replace=False)
    # n distinct gaps drawn one after another with probability proportional to p among those left
    # (what rng.choice(..., replace=False, p=p) does), via the Gumbel-top-k trick: the n largest
    # log p + Gumbel noise. Three times faster than rng.choice, the data generator's main cost.
    gaps = np.argpartition(-(self._gap_logp + rng.gumbel(size=self._space)), n - 1)[:n]
    query_pos = 2 * n + 2 * gaps
    inputs = np.zeros(seq_len, np.int32)
    inputs[0:2 * n:2] = keys
    inputs[1:2 * n:2] = values
    inputs[query_pos] = keys
    # The answer is the target at the query itself (Zoology shifts its labels the
    # same way); elsewhere the target is 0 and carries no weight.
    targets = np.zeros(seq_len, np.int32)
    targets[query_pos] = values
    weights = np.zeros(seq_len, np.float32)
    weights[query_pos] = 1.0
    # The only positions with a loss: the LM head computes logits there alone (a [B, 16, V]
    # product instead of [B, T, V]; see LanguageModel).
    return {"inputs": inputs, "targets": targets, "weights": weights,
            "segment_ids": np.ones(seq_len, np.int32), "positions": np.arange(seq_len, dtype=np.int32),
            "score_positions": np.sort(query_pos).astype(np.int32)}

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    return draw_in_split(self._draw, "mqar", self.seed, split, index, MAX_ATTEMPTS)

  def decode(self, example: dict[str, np.ndarray]) -> dict[str, Any]:
    inputs = np.asarray(example["inputs"])
    n = self.num_pairs
    pairs = [[int(inputs[2 * i]), int(inputs[2 * i + 1])] for i in range(n)]
    query_pos = np.flatnonzero(np.asarray(example["weights"]) > 0)
    queries = [[int(t), int(inputs[t]), int(example["targets"][t])] for t in query_pos]
    return {"pairs": pairs, "queries": queries, "query_fields": ["position", "key", "value"]}
