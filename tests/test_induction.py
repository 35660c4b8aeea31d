"""The induction-heads task, and evaluating a trained run at other lengths (scripts/eval_lengths.py)."""

import json
import os
import sys

import numpy as np
import pytest

from helpers import ROOT, train
from trainer.data.base import DataError
from trainer.data.induction import FIRST_DATA, TRIGGER, Induction

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import eval_lengths  # noqa: E402


def test_the_answer_follows_the_first_trigger_and_only_the_last_token_is_scored():
  task = Induction(40, 0, vocab=5)
  distances = set()
  for i in range(50):
    ex = task.example("train", i)
    x = ex["inputs"]
    where = np.flatnonzero(x == TRIGGER)
    assert len(where) == 2 and where[1] == 39 and where[0] <= 36, where  # twice: somewhere, and last
    assert ex["targets"][39] == x[where[0] + 1] >= FIRST_DATA and x.max() < task.spec.vocab_size
    np.testing.assert_array_equal(ex["weights"], np.r_[np.zeros(39), 1.0])
    assert task.decode(ex)["answer"] == x[where[0] + 1] - FIRST_DATA
    distances.add(task.decode(ex)["distance"])
  assert len(distances) > 20  # the lookup distance varies
  seen = {split: {task.example(split, i)["inputs"].tobytes() for i in range(200)} for split in ("train", "test")}
  assert not seen["train"] & seen["test"]


def test_bad_settings_name_the_value():
  with pytest.raises(DataError, match="vocab=1"):
    Induction(64, 0, vocab=1)
  with pytest.raises(DataError, match="got 3"):
    Induction(3, 0)


def test_a_run_is_evaluated_at_other_lengths_without_touching_its_results(tmp_path, capsys):
  wd = str(tmp_path / "induct")
  assert train(wd, "--config=configs/induction.py:smoke", "--config.total_steps=2", "--config.eval_every=0",
               "--config.checkpoint_every=2") == 0
  own = os.path.join(wd, "eval_results.json")
  before = open(own).read() if os.path.exists(own) else None
  code = eval_lengths.main(["--config=configs/induction.py:smoke", "--lengths=32,96", "--set", "eval_examples=8", wd])
  out = capsys.readouterr().out
  assert code == 0, out
  row = next(line for line in out.splitlines() if line.startswith("| induct |"))
  cells = [c.strip() for c in row.split("|")[2:-1]]
  assert len(cells) == 2 and all(0.0 <= float(c) <= 1.0 for c in cells), row
  for t in (32, 96):
    with open(os.path.join(wd, f"eval_len_{t}.json")) as f:
      res = json.load(f)
    assert res["seq_len"] == t and res["step"] == 2 and f"{res['test/accuracy']:.3f}" == cells[(32, 96).index(t)]
  assert (open(own).read() if os.path.exists(own) else None) == before
  # Another model with the same parameter shapes (linear attention) would load: it is refused, named.
  code = eval_lengths.main(["--config=configs/induction.py:smoke", "--lengths=32", "--set", "model.mixer=linear", wd])
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("| induct |"))
  assert code == 1 and row.split("|")[2].strip() == "-", out
  assert 'trained with a different model: model.layers ("attention" -> "linear"), model.mixer ("attention" -> "linear")' in out
