"""Checks of the ListOps and MQAR generators against facts derived independently of them.

ListOps labels are recomputed by a recursive-descent parser over the decoded text,
so a shared bug in the generator's stack evaluator cannot hide; MQAR answers are
looked up from the pair section. Split disjointness is tested on settings so small
that, without the hash-bucket filter, the same sequence would almost surely land in
two splits.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from trainer.data.base import SPLIT_BUCKETS, SPLITS, DataError, hash_bucket
from trainer.data.listops import TOKENS, ListOps, evaluate
from trainer.data.mqar import MQAR

# -- an independent ListOps reader ------------------------------------------------------


def parse(text: str):
  """Parses decoded ListOps text into nested (operator, [args]) tuples and ints."""
  words = text.split()
  pos = 0

  def term():
    nonlocal pos
    word = words[pos]
    pos += 1
    if word.isdigit():
      assert len(word) == 1, word
      return int(word)
    assert word in ("[MIN", "[MAX", "[MED", "[SM"), word
    args = []
    while words[pos] != "]":
      args.append(term())
    pos += 1
    return (word[1:], args)

  tree = term()
  assert pos == len(words), "trailing tokens after the expression"
  return tree


def value(tree) -> int:
  if isinstance(tree, int):
    return tree
  op, args = tree
  vals = sorted(value(a) for a in args)
  if op == "MIN":
    return vals[0]
  if op == "MAX":
    return vals[-1]
  if op == "SM":
    total = 0
    for v in vals:
      total = (total + v) % 10
    return total
  assert op == "MED"
  # One formula for odd and even counts: for odd counts both indices hit the middle.
  lo, hi = vals[(len(vals) - 1) // 2], vals[len(vals) // 2]
  return math.floor((lo + hi) / 2)


def op_depth(tree) -> int:
  """Operator nesting: 0 for a digit, 1 for an operator over digits, ..."""
  if isinstance(tree, int):
    return 0
  return 1 + max(op_depth(a) for a in tree[1])


def arg_counts(tree):
  if isinstance(tree, int):
    return
  yield len(tree[1])
  for a in tree[1]:
    yield from arg_counts(a)


def ids_of(text: str) -> list[int]:
  return [TOKENS.index(w) for w in text.split()]


SMALL = dict(seq_len=128, min_len=20, max_len=120, max_depth=5, max_args=5)


@pytest.fixture(scope="module")
def small_listops() -> ListOps:
  return ListOps(seed=0, **SMALL)


# -- ListOps ----------------------------------------------------------------------------


def test_listops_labels_lengths_and_limits(small_listops):
  task = small_listops
  seen_depths, seen_args, labels = set(), set(), []
  for split in SPLITS:
    for i in range(60):
      ex = task.example(split, i)
      assert ex["inputs"].shape == (128,) and ex["inputs"].dtype == np.int32
      assert ex["label"].shape == () and ex["label"].dtype == np.int32
      n = int(ex["segment_ids"].sum())
      # Real tokens first, then padding, with positions counting the real tokens only.
      np.testing.assert_array_equal(ex["segment_ids"], (np.arange(128) < n).astype(np.int32))
      np.testing.assert_array_equal(ex["positions"][:n], np.arange(n))
      assert not ex["positions"][n:].any() and not ex["inputs"][n:].any()
      assert (ex["inputs"][:n] > 0).all()
      assert 20 < n < 120
      decoded = task.decode(ex)
      tree = parse(decoded["text"])
      assert len(decoded["text"].split()) == n
      assert decoded["label"] == int(ex["label"]) == value(tree)
      depth, counts = op_depth(tree), list(arg_counts(tree))
      assert 1 <= depth <= SMALL["max_depth"] - 1
      assert all(2 <= c <= SMALL["max_args"] for c in counts)
      seen_depths.add(depth)
      seen_args.update(counts)
      labels.append(value(tree))
  # The limits are reached, not just respected, and every operator and label occurs.
  assert SMALL["max_depth"] - 1 in seen_depths
  assert seen_args == set(range(2, SMALL["max_args"] + 1))
  assert len(set(labels)) == 10


def test_listops_tight_limits_hold():
  task = ListOps(seq_len=64, seed=3, min_len=8, max_len=60, max_depth=3, max_args=3)
  for i in range(150):
    tree = parse(task.decode(task.example("train", i))["text"])
    assert op_depth(tree) <= 2
    assert all(2 <= c <= 3 for c in arg_counts(tree))


def test_listops_median_of_even_count_truncates():
  cases = {
      "[MED 1 4 ]": 2,  # 2.5
      "[MED 3 8 1 6 ]": 4,  # middle 3 and 6 -> 4.5
      "[MED 9 8 ]": 8,  # 8.5
      "[MED 2 7 7 2 ]": 4,  # middle 2 and 7 -> 4.5
      "[MED 0 0 9 1 ]": 0,  # middle 0 and 1 -> 0.5
      "[MED 5 1 9 ]": 5,  # odd count: the middle value
      "[SM [MED 1 4 ] 9 ]": 1,  # (2 + 9) % 10
      "[MAX 2 9 [MIN 4 7 ] 0 ]": 9,
  }
  for text, want in cases.items():
    assert evaluate(ids_of(text)) == want, text
    assert value(parse(text)) == want, text
  for text in ("[MED 1 4 ]", "[MED 3 8 1 6 ]", "[MED 9 8 ]"):
    digits = [int(w) for w in text.split()[1:-1]]
    assert evaluate(ids_of(text)) == int(np.median(digits))


def test_listops_deterministic_and_seeded(small_listops):
  again = ListOps(seed=0, **SMALL)
  other = ListOps(seed=1, **SMALL)
  # Out-of-order access gives the same rows: examples depend on (seed, split, index) only.
  for split, i in [("test", 7), ("train", 3), ("validation", 0), ("train", 0), ("test", 7)]:
    a, b = small_listops.example(split, i), again.example(split, i)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  differ = [not np.array_equal(small_listops.example("train", i)["inputs"], other.example("train", i)["inputs"])
            for i in range(20)]
  assert all(differ)
  splits_differ = [not np.array_equal(small_listops.example("train", i)["inputs"],
                                      small_listops.example("test", i)["inputs"]) for i in range(20)]
  assert all(splits_differ)


def _sequences(task, split: str, n: int) -> list[bytes]:
  out = []
  for i in range(n):
    ex = task.example(split, i)
    ids = ex["inputs"][ex["segment_ids"] > 0] if "label" in ex else ex["inputs"]
    out.append(np.asarray(ids, np.int64).tobytes())
  return out


def test_listops_splits_disjoint():
  # At most 4 * (10**2 + 10**3) distinct trees, so 300 per split would collide across
  # splits many times over if the bucket filter were missing.
  task = ListOps(seq_len=8, seed=0, min_len=3, max_len=6, max_depth=2, max_args=3)
  seqs = {split: _sequences(task, split, 300) for split in SPLITS}
  for split, rows in seqs.items():
    assert all(hash_bucket(np.frombuffer(r, np.int64)) in SPLIT_BUCKETS[split] for r in rows)
    assert len(set(rows)) < 300  # the space is small enough to repeat within a split
  for a, b in itertools.combinations(SPLITS, 2):
    assert not set(seqs[a]) & set(seqs[b]), (a, b)


def test_listops_chance_matches_majority_label(small_listops):
  spec = small_listops.spec
  assert spec.kind == "classify" and spec.num_classes == 10 and spec.vocab_size == len(TOKENS) == 16
  labels = [int(small_listops.example("validation", i)["label"]) for i in range(400)]
  majority = np.bincount(labels, minlength=10).max() / len(labels)
  assert 0.1 <= spec.chance <= 1.0
  assert abs(spec.chance - majority) < 0.08
  assert "1000" in spec.chance_note


def test_listops_lra_chance_constant_matches_generator():
  # The LRA-setting constant was measured offline; a fresh 1000-tree estimate from the
  # current generator must agree with it (tolerance ~3 standard errors plus max-bias).
  task = ListOps(seq_len=2048, seed=5)
  assert task.spec.chance == 0.169 and "30,000" in task.spec.chance_note
  estimate, _ = task._estimate_chance()
  assert abs(estimate - task.spec.chance) < 0.045


@pytest.mark.parametrize("kwargs, named", [
    (dict(seq_len=1000), "max_len=2000"),
    (dict(seq_len=1000), "seq_len=1000"),
    (dict(seq_len=128, min_len=20, max_len=120, max_args=1), "max_args=1"),
    (dict(seq_len=128, min_len=20, max_len=120, max_depth=1), "max_depth=1"),
    (dict(seq_len=128, min_len=50, max_len=51), "min_len=50"),
    (dict(seq_len=128, min_len=0, max_len=120), "min_len=0"),
    (dict(seq_len=128, min_len=20, max_len=120, max_depth=2, max_args=3), "min_len=20"),
])
def test_listops_bad_settings_raise(kwargs, named):
  with pytest.raises(DataError, match=named):
    ListOps(seed=0, **kwargs)


def test_bad_split_raises(small_listops):
  with pytest.raises(DataError, match="valid"):
    small_listops.example("valid", 0)


# -- MQAR -------------------------------------------------------------------------------

MQ = dict(seq_len=64, vocab_size=64, num_pairs=8, power_a=0.01)


def test_mqar_queries_answer_from_pairs():
  task = MQAR(seed=0, **MQ)
  n, half = MQ["num_pairs"], MQ["vocab_size"] // 2
  for split in SPLITS:
    for i in range(50):
      ex = task.example(split, i)
      inputs, targets, weights = ex["inputs"], ex["targets"], ex["weights"]
      assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
      np.testing.assert_array_equal(ex["segment_ids"], np.ones(64, np.int32))
      np.testing.assert_array_equal(ex["positions"], np.arange(64))
      keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
      assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
      assert ((keys >= 1) & (keys < half)).all()
      assert ((values >= half) & (values < 64)).all()
      answer = dict(zip(keys.tolist(), values.tolist()))
      rest = inputs[2 * n:]
      query_pos = 2 * n + np.flatnonzero(rest)
      # Weight exactly at the queries; every key queried once, at an even offset.
      np.testing.assert_array_equal(np.flatnonzero(weights), query_pos)
      assert set(np.unique(weights).tolist()) <= {0.0, 1.0}
      assert sorted(inputs[query_pos].tolist()) == sorted(keys.tolist())
      assert ((query_pos - 2 * n) % 2 == 0).all()
      for t in query_pos:
        assert targets[t] == answer[int(inputs[t])]
      assert not np.delete(targets, query_pos).any()
      decoded = task.decode(ex)
      assert decoded["pairs"] == [[int(k), int(v)] for k, v in zip(keys, values)]
      assert [q[2] for q in decoded["queries"]] == [answer[q[1]] for q in decoded["queries"]]


def test_mqar_power_law_favours_near_queries():
  def mean_gap(power_a: float) -> float:
    task = MQAR(seq_len=512, seed=0, vocab_size=1024, num_pairs=4, power_a=power_a)
    gaps = [np.flatnonzero(task.example("train", i)["weights"]) - 8 for i in range(100)]
    return float(np.mean(np.concatenate(gaps))) / 2

  near, uniform = mean_gap(0.01), mean_gap(1.0)
  # Uniform gaps over 0..251 average ~125; the 0.01 power law is far more front-loaded.
  assert 100 < uniform < 150
  assert near < 0.6 * uniform


def test_mqar_deterministic_and_seeded():
  a, b, c = MQAR(seed=0, **MQ), MQAR(seed=0, **MQ), MQAR(seed=1, **MQ)
  for split, i in [("test", 4), ("train", 9), ("validation", 2), ("test", 4)]:
    x, y = a.example(split, i), b.example(split, i)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert all(not np.array_equal(a.example("train", i)["inputs"], c.example("train", i)["inputs"])
             for i in range(20))


def test_mqar_splits_disjoint():
  # 3*2 key orders, 4*3 value orders and 2 gap orders: 144 sequences in all, so 300 per
  # split would certainly overlap across splits without the bucket filter.
  task = MQAR(seq_len=8, seed=0, vocab_size=8, num_pairs=2)
  seqs = {split: _sequences(task, split, 300) for split in SPLITS}
  for split, rows in seqs.items():
    assert all(hash_bucket(np.frombuffer(r, np.int64)) in SPLIT_BUCKETS[split] for r in rows)
  for x, y in itertools.combinations(SPLITS, 2):
    assert not set(seqs[x]) & set(seqs[y]), (x, y)


def test_mqar_spec_and_chance():
  spec = MQAR(seed=0, **MQ).spec
  assert spec.kind == "lm" and spec.vocab_size == 64 and spec.seq_len == 64
  assert spec.chance == pytest.approx(1 / 32)
  assert MQAR(seq_len=256, seed=0).spec.chance == pytest.approx(1 / 4096)


@pytest.mark.parametrize("kwargs, named", [
    (dict(seq_len=64, num_pairs=0), "num_pairs=0"),
    (dict(seq_len=64, vocab_size=16, num_pairs=8), "vocab_size=16"),
    (dict(seq_len=30, num_pairs=8), "seq_len=30"),
    (dict(seq_len=64, power_a=0.0), "power_a=0.0"),
    (dict(seq_len=64, power_a=-1.0), "power_a=-1.0"),
    (dict(seq_len=64, power_a=float("nan")), "power_a=nan"),
])
def test_mqar_bad_settings_raise(kwargs, named):
  with pytest.raises(DataError, match=named):
    MQAR(seed=0, **kwargs)
