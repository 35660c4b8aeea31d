"""A process killed at arbitrary moments (often mid-save) never damages the last good checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TINY, train, train_losses


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_restorable_checkpoint(tmp_path):
  wd = str(tmp_path / "crash")
  # A checkpoint every step, written asynchronously: most moments of the run are mid-save.
  args = [*TINY, f"--workdir={wd}", "--config.total_steps=100000", "--config.checkpoint_every=1",
          "--config.keep_checkpoints=2", "--config.eval_every=0", "--config.log_every=1"]
  for delay in (0.0, 0.35, 0.7):
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    start_steps = len(train_losses(wd)) if os.path.exists(os.path.join(wd, "metrics.jsonl")) else 0
    deadline = time.time() + 120
    while time.time() < deadline:
      if os.path.exists(os.path.join(wd, "metrics.jsonl")) and len(train_losses(wd)) >= start_steps + 3:
        break
      time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  saved = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert saved, "no finalized checkpoint after three killed runs"
  # Resuming must find a readable checkpoint (the newest finalized one) and train on.
  target = max(saved) + 2
  assert train(wd, *args[3:], f"--config.total_steps={target}") == 0
  assert max(train_losses(wd)) == target
  assert not os.path.isdir(os.path.join(wd, "unreadable_checkpoints")), "a kill damaged a finalized checkpoint"
