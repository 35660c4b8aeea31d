"""Packing (task.packing): rows of several examples, per-example loss, segment-respecting mixers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.models import ModelSpec, build_model
from trainer.data.listops import ListOps
from trainer.data.packing import PackedTask, real_length
from trainer.data.text import PydocText

from helpers import metrics, run_cli


def _listops(batch=4, window=3):
  return PackedTask(ListOps(256, 0, min_len=60, max_len=200, max_depth=6, max_args=5), window, 24, batch)


def test_rows_hold_whole_examples_with_their_own_ids_positions_and_labels():
  task = _listops()
  inner = task.inner
  rows, placed = task._train_block(0)
  assert placed >= 4 and len(rows) == 4 and max(len(r) for r in rows) >= 2
  for r, ids in enumerate(rows):
    row = task.example("train", r)
    at = 0
    for s, i in enumerate(ids):
      ex = inner.example("train", i)
      n = real_length(ex)
      np.testing.assert_array_equal(row["inputs"][at:at + n], ex["inputs"][:n])
      np.testing.assert_array_equal(row["segment_ids"][at:at + n], s + 1)
      np.testing.assert_array_equal(row["positions"][at:at + n], np.arange(n))
      assert row["label"][s] == ex["label"] and row["label_weights"][s] == 1.0
      at += n
    np.testing.assert_array_equal(row["segment_ids"][at:], 0)  # the rest is padding
    assert row["label_weights"][len(ids):].sum() == 0
    assert at <= 256


def test_train_batches_are_a_pure_function_of_the_step():
  a, b = _listops(), _listops()
  for r in (0, 5, 9):
    for k, v in a.example("train", r).items():
      np.testing.assert_array_equal(v, b.example("train", r)[k])
  # consecutive batches use disjoint stream examples
  k = a.batch_size * a.window
  ids0 = {i for row in a._train_block(0)[0] for i in row}
  ids1 = {i for row in a._train_block(1)[0] for i in row}
  assert max(ids0) < k <= min(ids1)


def test_held_out_rows_cover_every_example_once():
  task = _listops()
  rows = task.eval_rows("validation")
  assert sorted(i for row in rows for i in row) == list(range(24))
  assert len(rows) < 24  # several examples per row
  total = sum(task.example("validation", r)["label_weights"].sum() for r in range(len(rows) + 2))
  assert total == 24  # rows past the packed set are empty


def test_skipping_keeps_the_length_distribution():
  stats = PackedTask(ListOps(2048, 0, min_len=64, max_len=2048), 3, 8, 16).stats(4)
  assert stats["fill"] > 0.85
  assert abs(stats["mean_len_trained"] - stats["mean_len_all"]) < 0.05 * stats["mean_len_all"]


def test_lm_tasks_pack_targets_and_weights():
  task = PackedTask(PydocText(64, 0), 2, 8, 2)
  row = task.example("train", 0)
  assert set(row) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  assert row["segment_ids"].max() >= 1


@pytest.mark.parametrize("mixer,pooling", [("attention", "mean"), ("attention", "cls"), ("flash", "mean"),
                                           ("local", "mean"), ("linear", "mean")])
def test_packed_logits_equal_each_example_alone(mixer, pooling):
  """The classifier's logits for segment s of a packed row equal the logits of that example
  in a row of its own: nothing crosses a segment boundary (positions restart too)."""
  task = _listops(batch=2)
  spec = ModelSpec(kind="classify", vocab_size=task.spec.vocab_size, num_classes=10, max_len=256, d_model=32,
                   num_heads=4, num_kv_heads=4, mlp_ratio=2, mlp="gelu", norm="rmsnorm", positions="rope",
                   mixers=(mixer, mixer), dropout=0.0, pooling=pooling, tie_embeddings=False, dtype="float32",
                   mixer_options=(("local", (("window", 16),)), ("flash", (("block_k", 16), ("block_q", 16))),
                                  ("linear", (("chunk", 8),))))
  model = build_model(spec, seed=0)
  forward = nnx.jit(lambda m, batch: m(batch))
  packed = task.batch("train", [0, 1])
  logits = forward(model, {k: jnp.asarray(v) for k, v in packed.items()})  # [2, S, C]
  rows = task._train_block(0)[0]
  for r, ids in enumerate(rows[:2]):
    alone = task.inner.batch("train", ids)
    want = forward(model, {k: jnp.asarray(v) for k, v in alone.items()})  # [n, C]
    np.testing.assert_allclose(logits[r, :len(ids)], want, rtol=2e-4, atol=2e-4)


def test_packed_training_run_end_to_end(tmp_path):
  wd = str(tmp_path / "run")
  r = run_cli("trainer.train", "--config=configs/listops.py:smoke", f"--workdir={wd}", "--config.task.packing=true",
              "--config.progress_bar=false", "--config.eval_examples=40")
  assert r.returncode == 0, r.stderr[-2000:]
  evals = [m for m in metrics(wd) if "eval/accuracy" in m]
  assert evals and evals[-1]["eval/examples"] == 40
  assert all(np.isfinite(m["train/loss"]) for m in metrics(wd) if "train/loss" in m)
