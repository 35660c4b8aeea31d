"""Non-param model state: PRepBN statistics and data-dependent initialisation (Mixer.prepare)."""

import jax
import numpy as np

from trainer.config import load_config
from trainer.experiment import Experiment


def test_prepbn_statistics_are_train_state_updated_by_the_train_step_only(tmp_path):
  cfg = load_config("configs/listops.py:smoke", ["model.mixer=sla", "model.norm=prepbn", "mesh.data=4",
                                                 "batch_size=8", "mesh.fsdp=2"])
  exp = Experiment(cfg, str(tmp_path / "none"), read_only=True)
  state = exp.fresh_state()
  names = [n for n in state["extra"] if "running_mean" in n or "running_var" in n]
  assert len(names) == 2 * 2 * cfg.model.num_layers  # mean and var of both norms of every block
  assert not any(n in state["params"] for n in names)
  before = jax.device_get(state["extra"])
  new_state, metrics = exp.compiled_train_step()(state, exp.train_batch(0))
  after = jax.device_get(new_state["extra"])
  assert np.isfinite(float(metrics["loss"]))
  assert all(not np.allclose(before[n], after[n]) for n in names)
  # evaluation reads the running statistics and leaves them alone
  out = exp.compiled_eval_step()(new_state, exp.train_batch(1))
  assert np.isfinite(float(out["nll_sum"]))


def test_fresh_ecoformer_run_learns_its_hash_on_the_first_batch(tmp_path):
  """Mixer.prepare: EcoFormer's hash (extra state, not params) is fitted once, on a fresh run."""
  cfg = load_config("configs/mqar.py:smoke", ["model.mixer=ecoformer", "model.ecoformer.hash_iters=5",
                                              "model.ecoformer.hash_tokens=64", "model.ecoformer.anchors=8"])
  exp = Experiment(cfg, str(tmp_path / "none"), read_only=True)
  fresh = exp.fresh_state()
  prepared, meta = exp.restore_or_init()
  assert meta is None
  names = [n for n in fresh["extra"] if "hash" in n]
  assert names and not any(n in fresh["params"] for n in names)
  moved = [n for n in names if not np.allclose(jax.device_get(fresh["extra"][n]), jax.device_get(prepared["extra"][n]))]
  assert moved, "prepare left the random hash in place"
  for n in fresh["params"]:  # parameters untouched
    np.testing.assert_array_equal(jax.device_get(fresh["params"][n]), jax.device_get(prepared["params"][n]))
  # other mixers: nothing to prepare, the state is returned as is
  plain = Experiment(load_config("configs/mqar.py:smoke", []), str(tmp_path / "none2"), read_only=True)
  s = plain.fresh_state()
  assert plain.prepared(s) is s


def test_a_bidirectional_model_that_cannot_see_order_is_refused(tmp_path):
  from trainer.config import UserError
  import pytest
  with pytest.raises(UserError, match="model.positions=learned"):
    Experiment(load_config("configs/listops.py:smoke", ["model.mixer=linear", "model.positions=rope"]), str(tmp_path / "a"),
               read_only=True)
  # learned positions, an order-aware mixer, or a causal LM are fine
  Experiment(load_config("configs/listops.py:smoke", ["model.mixer=linear", "model.positions=learned"]),
             str(tmp_path / "b"), read_only=True)
  Experiment(load_config("configs/listops.py:smoke", ["model.mixer=sla", "model.positions=none"]), str(tmp_path / "c"),
             read_only=True)
  Experiment(load_config("configs/mqar.py:smoke", ["model.mixer=linear"]), str(tmp_path / "d"), read_only=True)
