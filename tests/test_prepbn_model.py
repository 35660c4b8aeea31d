"""model.norm=prepbn: the BatchNorm statistics live in the train state and move with training."""

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
