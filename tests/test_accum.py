"""Gradient accumulation: k micro-batches in one compiled step equal the whole batch."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from trainer import steps
from trainer.config import load_config
from trainer.experiment import Experiment

# (config, overrides): an LM with packed rows (per-example weights differ between micro-batches),
# a padded classifier, an FSDP x tensor mesh, and ring attention over a sequence axis.
CASES = {
    "lm_packed": ("configs/default.py:smoke", ["task.packing=true", "task.seq_len=64"]),
    "classify_padded": ("configs/listops.py:smoke", []),
    "fsdp_tensor": ("configs/default.py:smoke", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
    "sequence_ring": ("configs/default.py:smoke", ["mesh.data=4", "mesh.sequence=2", "task.seq_len=64",
                                                   "parallel.sequence_strategy=ring"]),
}


def _experiment(tmp_path, name, k):
  config, extra = CASES[name]
  cfg = load_config(config, ["batch_size=32", "model.num_layers=2", f"optimizer.grad_accum_steps={k}", *extra])
  return Experiment(cfg, str(tmp_path / f"{name}-{k}"), read_only=True)


def _keep_gradients() -> optax.GradientTransformation:
  """An 'optimizer' whose state is the last gradients, exactly (params stay put)."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(np.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(lambda g: g * 0, grads), grads))


def _gradients(exp, k, state, batch):
  fn = steps.make_train_step(exp.fm, _keep_gradients(), exp.lr_schedule, k)
  with exp.tracing():
    new_state, metrics = jax.jit(fn)(state, batch)
  return jax.device_get(new_state["opt_state"]), jax.device_get(metrics)


@pytest.mark.parametrize("name", sorted(CASES))
def test_four_micro_batches_equal_the_whole_batch(tmp_path, name):
  exp1, exp4 = _experiment(tmp_path, name, 1), _experiment(tmp_path, name, 4)
  state = exp1.fresh_state()
  state = dict(state, opt_state=_keep_gradients().init(state["params"]))
  batch = exp1.train_batch(0)
  g1, m1 = _gradients(exp1, 1, state, batch)
  g4, m4 = _gradients(exp4, 4, state, batch)
  for key in ("loss", "accuracy", "weight_sum"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=2e-6, err_msg=key)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=2e-6)
  for n in g1:
    scale = float(np.abs(g1[n]).max())
    assert scale > 0, n
    np.testing.assert_allclose(g4[n], g1[n], rtol=1e-4, atol=1e-5 * scale, err_msg=n)


def test_the_compiled_step_does_not_grow_with_k(tmp_path):
  sizes = {}
  for k in (2, 4):
    exp = _experiment(tmp_path, "classify_padded", k)
    fn = steps.make_train_step(exp.fm, exp.tx, exp.lr_schedule, k)
    with exp.tracing():
      sizes[k] = len(jax.jit(fn).lower(exp.abstract_state, exp.batch_shapes).as_text())
  assert sizes[4] < 1.1 * sizes[2], sizes  # a scan: the program is the same size for any k


def test_micro_batches_that_do_not_divide_the_rows_are_refused(tmp_path):
  from trainer.config import UserError
  with pytest.raises(UserError, match="optimizer.grad_accum_steps=8 does not divide the 4 rows"):
    load = load_config("configs/default.py:smoke", ["batch_size=32", "optimizer.grad_accum_steps=8"])
    Experiment(load, str(tmp_path / "x"), read_only=True)
  with pytest.raises(UserError, match="batch_size=32 is not divisible by optimizer.grad_accum_steps=3"):
    load_config("configs/default.py:smoke", ["batch_size=32", "optimizer.grad_accum_steps=3"])


def test_flops_per_step_count_every_micro_batch(tmp_path):
  """XLA counts a loop body once; the reported FLOPs (and so MFU) must still be the whole step's."""
  flops = {k: _experiment(tmp_path, "classify_padded", k).compile_stats()["flops_per_step"] for k in (1, 4)}
  assert flops[1] > 0 and abs(flops[4] - flops[1]) < 0.05 * flops[1], flops


def test_running_statistics_get_one_update_per_step(tmp_path):
  """LMU's BatchNorm: with accumulation the running mean moves once per step, by the mean of the
  micro-batches' means, which for equal micro-batches of real tokens is the whole batch's mean."""
  exps = {}
  for k in (1, 4):
    cfg = load_config("configs/default.py:smoke", ["batch_size=32", "model.mixer=lmu", "model.positions=none",
                                                   f"optimizer.grad_accum_steps={k}"])
    exps[k] = Experiment(cfg, str(tmp_path / f"lmu-{k}"), read_only=True)
  state, batch = exps[1].fresh_state(), exps[1].train_batch(0)
  assert np.all(np.asarray(batch["segment_ids"]) > 0)  # every token real: equal micro-batches
  after = {}
  for k, exp in exps.items():
    with exp.tracing():
      new_state, _ = jax.jit(steps.make_train_step(exp.fm, exp.tx, exp.lr_schedule, k))(state, batch)
    after[k] = jax.device_get(new_state["extra"])
  means = [n for n in after[1] if n.endswith("/mean")]
  assert means
  for n in means:
    moved = np.abs(after[1][n] - np.asarray(state["extra"][n])).max()
    assert moved > 0, n
    np.testing.assert_allclose(after[4][n], after[1][n], rtol=1e-5, atol=1e-6 * moved, err_msg=n)
