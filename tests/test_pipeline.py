"""The grain input pipeline: the same batches whichever way they are produced (threads, no
read-ahead, worker processes), from any starting step, and a training run on worker processes."""

import jax
import numpy as np

from trainer.config import load_config
from trainer.experiment import Experiment


def _batches(tmp_path, start, count, *overrides):
  cfg = load_config("configs/listops.py:smoke", ["batch_size=8", "total_steps=20", *overrides])
  exp = Experiment(cfg, str(tmp_path / "none"), read_only=True)
  stream = exp.train_stream(start)
  try:
    return [jax.device_get(next(stream)) for _ in range(count)]
  finally:
    stream.close()


def test_threads_and_worker_processes_give_the_same_batches(tmp_path):
  want = _batches(tmp_path, 3, 4, "data.threads=0", "data.prefetch=0")  # made on demand, in order
  for how in (["data.threads=2", "data.prefetch=4"], ["data.workers=2", "data.prefetch=2"]):
    got = _batches(tmp_path, 3, 4, *how)
    for step, (a, b) in enumerate(zip(got, want), start=3):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{how} step {step} {key}")
  # A stream started later gives the same batches as the earlier one at those steps (resume).
  later = _batches(tmp_path, 5, 2, "data.workers=2")
  for a, b in zip(later, want[2:]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_training_on_worker_processes(tmp_path):
  from tests.helpers import train_losses
  from trainer import train as train_mod
  common = ["--config=configs/listops.py:smoke", "--config.total_steps=4", "--config.log_every=1",
            "--config.eval_every=0", "--config.checkpoint_every=0", "--config.batch_size=8",
            "--config.progress_bar=false", "--config.keep_best=false"]
  runs = {}
  for name, flags in (("threads", []), ("workers", ["--config.data.workers=2"])):
    wd = str(tmp_path / name)
    assert train_mod.main([*common, *flags, f"--workdir={wd}"]) == 0
    runs[name] = train_losses(wd)
  assert sorted(runs["workers"]) == [1, 2, 3, 4] and runs["workers"] == runs["threads"]
