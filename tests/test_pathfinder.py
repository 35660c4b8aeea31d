"""Checks of the Pathfinder generator against facts read off its images independently.

Labels are recomputed by a breadth-first flood fill over 8-connected non-background
pixels, starting from the pixels of one marker, with the markers found by their
intensity; snakes are counted as 8-connected components. Neither uses the generator's
internals, so a bug that let snakes touch or flipped a label would show here.
"""

from __future__ import annotations

import collections
import itertools
import json
import math

import numpy as np
import pytest

from trainer.data.base import SPLIT_BUCKETS, SPLITS, DataError, hash_bucket
from trainer.data.pathfinder import MARKER, SNAKE, Pathfinder, image_of, render_png

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]

# -- an independent reader of the images --------------------------------------------------


def picture(example) -> np.ndarray:
  """The [r, r] intensities, straight from the tokens (token = intensity + 1)."""
  inputs = np.asarray(example["inputs"], np.int64)
  r = math.isqrt(inputs.size)
  assert r * r == inputs.size
  assert inputs.min() >= 1 and inputs.max() <= 256, "token 0 is padding and never produced"
  return (inputs - 1).reshape(r, r)


def components(mask: np.ndarray) -> list[set[tuple[int, int]]]:
  """8-connected components of a boolean image, by breadth-first search."""
  r, c = mask.shape
  seen = np.zeros_like(mask, bool)
  out = []
  for start in map(tuple, np.argwhere(mask)):
    if seen[start]:
      continue
    seen[start] = True
    comp, queue = {start}, collections.deque([start])
    while queue:
      y, x = queue.popleft()
      for dy, dx in NEIGHBOURS:
        q = (y + dy, x + dx)
        if 0 <= q[0] < r and 0 <= q[1] < c and mask[q] and not seen[q]:
          seen[q] = True
          comp.add(q)
          queue.append(q)
    out.append(comp)
  return out


def flood(mask: np.ndarray, starts) -> set[tuple[int, int]]:
  """Pixels of `mask` reachable from `starts` through 8-neighbours inside `mask`."""
  r, c = mask.shape
  reached = set(starts)
  queue = collections.deque(reached)
  while queue:
    y, x = queue.popleft()
    for dy, dx in NEIGHBOURS:
      q = (y + dy, x + dx)
      if 0 <= q[0] < r and 0 <= q[1] < c and mask[q] and q not in reached:
        reached.add(q)
        queue.append(q)
  return reached


def markers_of(image: np.ndarray) -> list[set[tuple[int, int]]]:
  marks = components(image == MARKER)
  assert len(marks) == 2, f"expected two markers, found {len(marks)}"
  return marks


def connected(image: np.ndarray) -> bool:
  a, b = markers_of(image)
  return bool(flood(image > 0, a) & b)


def pixels_per_paddle(length: int) -> tuple[int, int]:
  """Fewest and most pixels a paddle of `length` adds to its chain.

  A paddle runs `length` pixels in some direction between floored real positions, so it
  steps at least floor(length / sqrt(2) - 1) + 1 and at most `length` pixels along its
  major axis, one pixel per step.
  """
  return math.floor(length / math.sqrt(2) - 1) + 1, length


def check_image(task: Pathfinder, example) -> None:
  """Every fact about one example that the image itself determines."""
  image = picture(example)
  label = int(example["label"])
  assert set(np.unique(image)) <= {0, SNAKE, MARKER}
  # 1. The label is the flood-fill connectivity of the two markers.
  assert label == int(connected(image)), "label disagrees with the markers' connectivity"
  # 2. Snakes never touch: one component per snake, two long ones in both classes.
  comps = components(image > 0)
  assert len(comps) == task.num_distractors + 2, (len(comps), label)
  marks = markers_of(image)
  lo, hi = pixels_per_paddle(task.paddle_length)
  disk = max(len(m) for m in marks)
  long_rng = (1 + task.contour_length * lo, 1 + task.contour_length * hi)
  short_rng = (1 + task.distractor_length * lo, 1 + task.distractor_length * hi)
  marked = [c for c in comps if any(m <= c for m in marks)]
  plain = [c for c in comps if not any(m <= c for m in marks)]
  assert len(marked) == 2 - label
  for c in marked:
    assert long_rng[0] <= len(c) <= long_rng[1] + 2 * disk, (len(c), long_rng)
  sizes = sorted(len(c) for c in plain)
  want_long = 1 if label else 0
  for s in sizes[:len(sizes) - want_long]:
    assert short_rng[0] <= s <= short_rng[1], (s, short_rng)
  if want_long:
    assert long_rng[0] <= sizes[-1] <= long_rng[1], (sizes[-1], long_rng)
  # A snake never touches itself: every unmarked snake is a simple 8-path, two ends with
  # one neighbour and every other pixel with two.
  for c in plain:
    degrees = collections.Counter(sum((y + dy, x + dx) in c for dy, dx in NEIGHBOURS) for y, x in c)
    assert degrees == {1: 2, 2: len(c) - 2}, degrees


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task32() -> Pathfinder:
  return Pathfinder(seq_len=1024, seed=0, resolution=32)


@pytest.fixture(scope="module")
def examples32(task32):
  return {split: [task32.example(split, i) for i in range(100)] for split in SPLITS}


# -- tests --------------------------------------------------------------------------------


def test_spec_and_example_layout(task32, examples32):
  spec = task32.spec
  assert (spec.kind, spec.vocab_size, spec.seq_len) == ("classify", 257, 1024)
  assert (spec.num_classes, spec.chance, spec.grid) == (2, 0.5, (32, 32))
  assert spec.chance_note and ". " not in spec.chance_note
  ex = examples32["train"][0]
  assert set(ex) == {"inputs", "segment_ids", "positions", "label"}
  for key in ("inputs", "segment_ids", "positions", "label"):
    assert ex[key].dtype == np.int32, key
  assert ex["inputs"].shape == ex["segment_ids"].shape == ex["positions"].shape == (1024,)
  assert ex["label"].shape == ()
  np.testing.assert_array_equal(ex["segment_ids"], np.ones(1024))
  np.testing.assert_array_equal(ex["positions"], np.arange(1024))
  np.testing.assert_array_equal(image_of(ex), picture(ex))
  batch = task32.batch("train", [0, 1])
  assert batch["inputs"].shape == (2, 1024) and batch["label"].shape == (2,)


def test_labels_are_marker_connectivity_and_snakes_never_touch_32(task32, examples32):
  for split in SPLITS:
    for ex in examples32[split]:
      check_image(task32, ex)


def test_labels_are_marker_connectivity_and_snakes_never_touch_64_128():
  task64 = Pathfinder(seq_len=64 * 64, seed=1, resolution=64)
  for i in range(20):
    check_image(task64, task64.example(SPLITS[i % 3], i))
  task128 = Pathfinder(seq_len=128 * 128, seed=2, resolution=128)
  labels = set()
  for split, i in [("train", 0), ("train", 1), ("train", 2), ("train", 3), ("validation", 0), ("test", 0)]:
    ex = task128.example(split, i)
    check_image(task128, ex)
    labels.add(int(ex["label"]))
  assert labels == {0, 1}


def test_crowded_settings_still_never_touch():
  # Many distractors at a small resolution: the regime where contact would happen first.
  task = Pathfinder(seq_len=1024, seed=3, resolution=32, num_distractors=12, max_turn=1.4)
  for i in range(40):
    check_image(task, task.example("train", i))


def test_labels_balanced(examples32):
  labels = [int(ex["label"]) for split in SPLITS for ex in examples32[split]]
  assert len(labels) == 300
  assert 0.4 <= np.mean(labels) <= 0.6


def test_deterministic_and_seeded(task32):
  again = Pathfinder(seq_len=1024, seed=0, resolution=32)
  other = Pathfinder(seq_len=1024, seed=1, resolution=32)
  # Out-of-order access gives the same rows: examples depend on (seed, split, index) only.
  for split, i in [("test", 7), ("train", 3), ("validation", 0), ("train", 0), ("test", 7)]:
    a, b = task32.example(split, i), again.example(split, i)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert all(not np.array_equal(task32.example("train", i)["inputs"], other.example("train", i)["inputs"])
             for i in range(20))
  assert all(not np.array_equal(task32.example("train", i)["inputs"], task32.example("test", i)["inputs"])
             for i in range(20))


def test_splits_disjoint_and_buckets_respected(examples32):
  for split in SPLITS:
    for ex in examples32[split]:
      assert hash_bucket(picture(ex).astype(np.uint8).tobytes()) in SPLIT_BUCKETS[split]
  # Two one-paddle snakes in a 4x4 image: few enough images that, without the bucket
  # filter, the same image would land in two splits many times over.
  task = Pathfinder(seq_len=16, seed=0, resolution=4, contour_length=1, paddle_length=2, num_distractors=0,
                    marker_radius=0)
  seen = {split: [picture(task.example(split, i)).astype(np.uint8).tobytes() for i in range(300)]
          for split in SPLITS}
  for split, rows in seen.items():
    assert all(hash_bucket(row) in SPLIT_BUCKETS[split] for row in rows)
    assert len(set(rows)) < 300  # the space is small enough to repeat within a split
  for a, b in itertools.combinations(SPLITS, 2):
    assert not set(seen[a]) & set(seen[b]), (a, b)


def test_decode_is_json_and_matches_the_image(task32, examples32):
  for ex in examples32["validation"][:10]:
    view = task32.decode(ex)
    json.dumps(view)
    image = picture(ex)
    assert view["label"] == int(ex["label"]) and view["resolution"] == 32
    assert view["connected"] == connected(image) == bool(ex["label"])
    chars = np.array([list(row) for row in view["ascii"]])
    assert chars.shape == (32, 32)
    np.testing.assert_array_equal(chars == ".", image == 0)
    np.testing.assert_array_equal(chars == "#", image == SNAKE)
    np.testing.assert_array_equal(chars == "o", image == MARKER)


def test_render_png_round_trips(task32, tmp_path):
  from PIL import Image
  ex = task32.example("train", 5)
  path = tmp_path / "pathfinder.png"
  render_png(ex, str(path), scale=3)
  with Image.open(path) as img:
    assert img.format == "PNG" and img.size == (96, 96)
    pixels = np.asarray(img.convert("L"))
  np.testing.assert_array_equal(pixels, np.kron(picture(ex), np.ones((3, 3))))


@pytest.mark.parametrize("kwargs, named", [
    (dict(seq_len=1000), "seq_len=1000"),
    (dict(seq_len=1000), "resolution=32"),
    (dict(seq_len=4096), "seq_len=4096"),
    (dict(seq_len=1024, num_distractors=200), "num_distractors=200"),  # fails the area bound
    (dict(seq_len=1024, num_distractors=40), "num_distractors=40"),  # passes it, fails the probe
    (dict(seq_len=1024, paddle_length=1), "paddle_length=1"),
    (dict(seq_len=1024, max_turn=2.0), "max_turn=2.0"),
    (dict(seq_len=1024, marker_radius=9), "marker_radius=9"),
    (dict(seq_len=1024, contour_length=0), "contour_length=0"),
])
def test_bad_settings_raise_one_sentence(kwargs, named):
  with pytest.raises(DataError, match=named) as info:
    Pathfinder(seed=0, resolution=32, **kwargs)
  message = str(info.value)
  assert ". " not in message and "\n" not in message, message


def test_bad_split_raises(task32):
  with pytest.raises(DataError, match="valid"):
    task32.example("valid", 0)
