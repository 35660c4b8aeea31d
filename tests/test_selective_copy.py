"""The selective-copying task: answers are the scattered data tokens in order, splits disjoint."""

import numpy as np
import pytest

from trainer.data.base import DataError
from trainer.data.selective_copy import FIRST_DATA, MARKER, NOISE, SelectiveCopy


def test_answers_are_the_data_tokens_in_order_and_only_markers_are_scored():
  task = SelectiveCopy(64, 0, num_tokens=5, vocab=7)
  for i in range(20):
    ex = task.example("train", i)
    region = 64 - 5
    data = ex["inputs"][:region][ex["inputs"][:region] >= FIRST_DATA]
    assert len(data) == 5 and set(ex["inputs"][:region][ex["inputs"][:region] < FIRST_DATA]) <= {NOISE}
    np.testing.assert_array_equal(ex["inputs"][region:], MARKER)
    np.testing.assert_array_equal(ex["targets"][region:], data)
    np.testing.assert_array_equal(ex["weights"], np.r_[np.zeros(region), np.ones(5)])
    assert ex["inputs"].max() < task.spec.vocab_size


def test_spacing_varies_and_splits_are_disjoint():
  task = SelectiveCopy(64, 0, num_tokens=4, vocab=16)
  gaps = {tuple(np.diff(np.flatnonzero(task.example("train", i)["inputs"][:60] >= FIRST_DATA))) for i in range(30)}
  assert len(gaps) > 20  # not a fixed-lag pattern
  seen = {split: {task.example(split, i)["inputs"].tobytes() for i in range(200)} for split in ("train", "test")}
  assert not seen["train"] & seen["test"]


def test_bad_settings_name_the_value():
  with pytest.raises(DataError, match="num_tokens=40"):
    SelectiveCopy(64, 0, num_tokens=40)
