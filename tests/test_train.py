"""End-to-end training: resume, evaluation, dry run, mesh changes, damaged checkpoints."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import evaluate, metrics, train, train_losses


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = ocp.StandardCheckpointer().restore(path)
  return {k: np.asarray(v) for k, v in tree["params"].items()}


def test_train_evaluate_and_rerun_when_complete(tmp_path, capsys):
  wd = str(tmp_path / "run")
  assert train(wd) == 0
  out = capsys.readouterr().out
  assert "held-out (validation" in out and "chance: accuracy" in out
  ms = metrics(wd)
  assert any("compile/temp_bytes" in m for m in ms) and any("eval/accuracy" in m for m in ms)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
  events = os.listdir(os.path.join(wd, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  assert os.listdir(os.path.join(wd, "best_checkpoint"))
  assert train(wd) == 0
  assert "already complete (6/6 steps" in capsys.readouterr().out
  assert evaluate(wd) == 0
  res = json.load(open(os.path.join(wd, "eval_results.json")))
  assert res["step"] == 6 and 0.0 <= res["test/accuracy"] <= 1.0 and res["validation/examples"] == 16
  assert evaluate(wd, "--step=3") == 0
  assert json.load(open(os.path.join(wd, "eval_results.json")))["step"] == 3


def test_resume_is_bit_exact(tmp_path):
  """2k steps straight == k steps, stop, resume k more: same params and same losses."""
  common = ["--config.total_steps=8", "--config.checkpoint_every=4", "--config.eval_every=0", "--config.log_every=1",
            "--config.model.dropout=0.1"]
  straight, split = str(tmp_path / "a"), str(tmp_path / "b")
  assert train(straight, *common) == 0
  assert train(split, *common[1:], "--config.total_steps=4") == 0
  assert train(split, *common) == 0
  a, b = _params(straight, 8), _params(split, 8)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  la, lb = train_losses(straight), train_losses(split)
  assert [la[s] for s in range(5, 9)] == [lb[s] for s in range(5, 9)]


def test_dry_run_reports_compiled_memory(tmp_path, capsys):
  wd = str(tmp_path / "dry")
  assert train(wd, "--dry_run") == 0
  stats = json.load(open(os.path.join(wd, "compile.json")))
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "flops_per_step"):
    assert stats[key] > 0, key
  assert stats["total_bytes"] >= stats["temp_bytes"]
  assert "FLOPs per step" in capsys.readouterr().out
  assert not os.path.exists(os.path.join(wd, "checkpoints"))


def test_restore_onto_a_different_mesh(tmp_path):
  """Saved on data=4 x tensor=2, continued on fsdp=2 x sequence=4: same losses as one mesh."""
  common = ["--config.total_steps=6", "--config.checkpoint_every=3", "--config.eval_every=0", "--config.log_every=1"]
  ref, moved = str(tmp_path / "ref"), str(tmp_path / "moved")
  assert train(ref, *common) == 0
  mesh_a = ["--config.mesh.data=4", "--config.mesh.tensor=2"]
  mesh_b = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.sequence=4"]
  assert train(moved, *common, "--config.total_steps=3", *mesh_a) == 0
  assert train(moved, *common, *mesh_b) == 0
  lr, lm = train_losses(ref), train_losses(moved)
  np.testing.assert_allclose([lm[s] for s in range(1, 7)], [lr[s] for s in range(1, 7)], rtol=1e-5)


def test_unreadable_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  wd = str(tmp_path / "run")
  assert train(wd, "--config.eval_every=0") == 0
  state_dir = os.path.join(wd, "checkpoints", "6", "state")
  for root, _, files in os.walk(state_dir):  # garble every file of the newest save
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")
  assert train(wd, "--config.eval_every=0", "--config.log_every=1") == 0
  assert "checkpoint 6" in caplog.text and "unreadable" in caplog.text
  assert max(train_losses(wd)) == 6 and 4 in train_losses(wd)  # steps 4..6 were redone from step 3


def test_relative_workdir(tmp_path, monkeypatch):
  """`./scripts/train.sh` passes runs/default: checkpoints (latest and best) work with relative paths."""
  from tests.helpers import ROOT
  from trainer import train as train_mod
  monkeypatch.chdir(tmp_path)
  cfg = os.path.join(ROOT, "configs", "default.py") + ":smoke"
  args = [f"--config={cfg}", "--config.batch_size=8", "--config.progress_bar=false", "--workdir=runs/rel"]
  assert train_mod.main(args) == 0
  assert sorted(os.listdir(tmp_path / "runs" / "rel" / "checkpoints")) == ["3", "6"]
  assert os.listdir(tmp_path / "runs" / "rel" / "best_checkpoint")


def test_throughput_counts_real_tokens_and_accounts_for_the_wall_time(tmp_path, capsys):
  """tokens/s counts the tokens of the examples (not padding) and the time split adds up: train
  steps + evaluation + checkpoints + data waits + compilation within the run's wall time."""
  from trainer.config import load_config
  from trainer.experiment import Experiment
  wd = str(tmp_path / "run")
  args = ["--config=configs/listops.py:smoke", "--config.batch_size=8", "--config.progress_bar=false",
          f"--workdir={wd}", "--config.log_every=1", "--config.total_steps=4"]
  from trainer import train as train_mod
  assert train_mod.main(args) == 0
  assert "of it in train steps" in capsys.readouterr().out
  rows = metrics(wd)
  got = {r["step"]: r["train/tokens"] for r in rows if "train/tokens" in r}
  cfg = load_config("configs/listops.py:smoke", ["batch_size=8"])
  exp = Experiment(cfg, str(tmp_path / "probe"), read_only=True)
  want = {s + 1: float(np.sum(np.asarray(exp.train_batch(s)["segment_ids"]) > 0)) for s in range(4)}
  assert got == want and all(w < 8 * cfg.task.seq_len for w in want.values()), (got, want)  # listops pads
  last = rows[-1]
  parts = sum(last[f"time/{k}_seconds"] for k in ("train", "eval", "checkpoint", "compile"))
  assert 0 < last["time/goodput"] < 1 and parts <= last["time/wall_seconds"] * 1.001


def test_evaluation_time_is_not_counted_as_training(tmp_path, monkeypatch):
  """An evaluation that takes a second inside every log window: the windows' step time must not
  contain it (it would be >= 0.5 s per step here; a smoke step takes milliseconds)."""
  import time as time_mod
  from trainer.experiment import Experiment
  real = Experiment.evaluate

  def slow_evaluate(self, state, split):
    time_mod.sleep(1.0)
    return real(self, state, split)

  monkeypatch.setattr(Experiment, "evaluate", slow_evaluate)
  wd = str(tmp_path / "run")
  assert train(wd, "--config.log_every=2", "--config.eval_every=1", "--config.total_steps=4") == 0
  rows = [r for r in metrics(wd) if "train/step_seconds" in r]
  assert len(rows) == 2 and all(r["train/step_seconds"] < 0.25 for r in rows), rows
  # The step-4 row is written before step 4's evaluation, so it counts the three before it;
  # the run's closing timing row counts all four.
  assert rows[-1]["time/eval_seconds"] >= 3.0, rows[-1]
  final = [r for r in metrics(wd) if "time/goodput" in r]
  assert len(final) == 1 and final[0]["time/eval_seconds"] >= 4.0, final


def test_profile_traces_exactly_the_chosen_steps(tmp_path, capsys):
  import glob
  import gzip
  wd = str(tmp_path / "run")
  assert train(wd, "--config.profile.steps=2:4", "--config.profile.memory=true", "--config.eval_every=0") == 0
  assert "profile of train steps 3-4 written to" in capsys.readouterr().out
  runs = glob.glob(os.path.join(wd, "profile", "plugins", "profile", "*"))  # TensorBoard's profile plugin layout
  assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  with gzip.open(glob.glob(os.path.join(runs[0], "*.trace.json.gz"))[0]) as f:
    events = json.load(f)["traceEvents"]
  steps = [e for e in events if e.get("name", "").endswith("Execute (jit_train_step)")
           and not e["name"].startswith("[")]
  assert len(steps) == 2, [e["name"] for e in steps]  # steps 3 and 4, not 1-2 or 5-6
  assert os.path.getsize(os.path.join(wd, "profile", "memory_after_step_4.prof")) > 0
