"""Faults injected into real runs: concurrent writers, a full disk, damaged checkpoint data,
a non-finite stop during an asynchronous save, a killed run's metrics. Each loses nothing
beyond the steps since the last checkpoint and is reported in one sentence.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT, TINY, evaluate, metrics, run_cli, train, train_losses

FAST = ["--config.eval_every=0", "--config.log_every=1"]


def _steps(wd, sub="checkpoints"):
  root = os.path.join(wd, sub)
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def _tmp_dirs(wd):
  return glob.glob(os.path.join(wd, "*", "*.orbax-checkpoint-tmp*"))


def _error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("error: ")]


def _valid_jsonl(path):
  with open(path) as f:
    raw = f.read()
  assert raw.endswith("\n"), "metrics.jsonl ends in a torn line"
  return [json.loads(line) for line in raw.splitlines()]


# -- one writer per workdir ------------------------------------------------------------


def test_second_trainer_is_refused_with_the_holders_pid_and_host(tmp_path, capsys):
  from trainer.workdir import WorkdirLock
  wd = str(tmp_path / "run")
  assert train(wd, *FAST) == 0
  capsys.readouterr()
  holder = WorkdirLock(wd)
  assert holder.try_acquire() is None
  holder.announce()
  try:
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    assert train(wd, *FAST, "--config.total_steps=9") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --workdir=") and "is in use by another trainer" in err, err
    assert f"pid {os.getpid()} on host" in err and "\n" not in err
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
  finally:
    holder.release()
  assert train(wd, *FAST, "--config.total_steps=9") == 0  # released: the next trainer goes on
  assert max(train_losses(wd)) == 9


def test_stale_temporary_checkpoints_are_removed_on_the_next_start(tmp_path):
  wd = str(tmp_path / "run")
  assert train(wd, *FAST) == 0
  stale = os.path.join(wd, "checkpoints", "9.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(stale, "state"))
  assert train(wd, *FAST, "--config.total_steps=9") == 0
  assert not os.path.exists(stale) and not _tmp_dirs(wd)
  assert _steps(wd) == [6, 9]


def _spawn(wd, *extra):
  return subprocess.Popen([sys.executable, "-m", "trainer.train", *TINY, f"--workdir={wd}", *FAST, *extra],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("delay", ["together", "after_first_step", "during_saves"])
def test_concurrent_trainers_one_trains_the_other_is_refused(tmp_path, delay):
  wd = str(tmp_path / "run")
  args = ["--config.total_steps=30", "--config.checkpoint_every=1", "--config.keep_checkpoints=2"]
  first = _spawn(wd, *args)
  if delay != "together":
    deadline = time.time() + 120
    want = 1 if delay == "after_first_step" else 5
    while time.time() < deadline and not (os.path.exists(os.path.join(wd, "metrics.jsonl"))
                                          and len(train_losses(wd)) >= want):
      time.sleep(0.05)
  second = _spawn(wd, *args, "--config.seed=1")
  outs = [p.communicate(timeout=300) for p in (first, second)]
  codes = sorted(p.returncode for p in (first, second))
  assert codes == [0, 2], (codes, [o[1][-2000:] for o in outs])
  refused = next(err for p, (_, err) in zip((first, second), outs) if p.returncode == 2)
  assert len(_error_lines(refused)) == 1 and "is in use by another trainer (pid " in refused
  assert "Traceback" not in refused
  rows = [m["step"] for m in _valid_jsonl(os.path.join(wd, "metrics.jsonl")) if "train/loss" in m]
  assert rows == list(range(1, 31)), "metrics.jsonl holds another run's steps"
  assert not _tmp_dirs(wd)


@pytest.mark.slow
def test_a_killed_trainer_never_blocks_the_next(tmp_path):
  wd = str(tmp_path / "run")
  proc = _spawn(wd, "--config.total_steps=100000", "--config.checkpoint_every=2")
  deadline = time.time() + 120
  while time.time() < deadline and not (len(_steps(wd)) >= 1 and len(train_losses(wd)) >= 5):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  restart = max(_steps(wd))
  assert train(wd, *FAST, f"--config.total_steps={restart + 2}", "--config.checkpoint_every=2") == 0
  # Every step appears once: the killed run's rows past the restored checkpoint were superseded.
  steps = [m["step"] for m in metrics(wd) if "train/loss" in m]
  assert steps == list(range(1, restart + 3))


# -- metrics.jsonl ---------------------------------------------------------------------


def test_resume_repairs_a_torn_line_and_supersedes_rows_past_the_checkpoint(tmp_path):
  wd = str(tmp_path / "run")
  assert train(wd, *FAST, "--config.checkpoint_every=3") == 0
  # As if killed after step 6's rows were written but before its checkpoint finished.
  shutil.rmtree(os.path.join(wd, "checkpoints", "6"))
  shutil.rmtree(os.path.join(wd, "best_checkpoint"))
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "train/lo')
  assert train(wd, *FAST, "--config.checkpoint_every=3") == 0
  rows = _valid_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(wd, "metrics_superseded.jsonl")) as f:
    aside = f.read().splitlines()
  assert aside[-1] == '{"step": 7, "train/lo', "the torn line was not kept aside"
  superseded = [json.loads(line) for line in aside[:-1]]
  assert sorted({r["step"] for r in superseded if "train/loss" in r}) == [4, 5, 6]


def test_a_refused_metrics_write_leaves_whole_lines(tmp_path, monkeypatch):
  from trainer import metrics as metrics_mod
  path = tmp_path / "metrics.jsonl"
  writer = metrics_mod.MetricsWriter(str(tmp_path), True)
  writer.tb = None
  writer.write(1, {"a": 1.0})
  real_write = os.write

  def half_then_full(fd, data):  # the disk fills up half way through the line
    real_write(fd, data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(metrics_mod.os, "write", half_then_full)
  with pytest.raises(OSError) as e:
    writer.write(2, {"a": 2.0})
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
  monkeypatch.setattr(metrics_mod.os, "write", real_write)
  writer.write(3, {"a": 3.0})
  assert [r["step"] for r in _valid_jsonl(path)] == [1, 3]


# -- a full disk -----------------------------------------------------------------------


def _patched_full_disk(monkeypatch, where):
  """Makes one writer raise ENOSPC, as a full disk would."""
  from trainer import checkpoint, metrics as metrics_mod, workdir

  def full(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/the/full/path")

  if where == "checkpoint":
    real = checkpoint.Checkpointer.save

    def save(self, step, *a, **k):
      if step >= 4:
        full()
      return real(self, step, *a, **k)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  elif where == "metrics":
    real_write = metrics_mod.MetricsWriter.write

    def write(self, step, values):
      if step >= 4:
        full()
      return real_write(self, step, values)
    monkeypatch.setattr(metrics_mod.MetricsWriter, "write", write)
  elif where == "config":
    monkeypatch.setattr(workdir.json, "dump", full)


@pytest.mark.parametrize("where", ["checkpoint", "metrics", "config"])
def test_a_full_disk_is_one_sentence_naming_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, where):
  wd = str(tmp_path / "run")
  _patched_full_disk(monkeypatch, where)
  assert train(wd, *FAST, "--config.checkpoint_every=2") == 75
  err = capsys.readouterr().err
  lines = _error_lines(err)
  assert len(lines) == 1 and lines[0].startswith("error: no space left on device on "), err
  assert "writing /the/full/path" in lines[0] and "Traceback" not in err
  if where == "config":
    assert "there is no finished checkpoint" in lines[0]
    assert not glob.glob(os.path.join(wd, "*.tmp")), "a half-written config.json.tmp was left"
  else:
    assert "the last good checkpoint is step 2 in" in lines[0]
  monkeypatch.undo()
  assert not _tmp_dirs(wd)
  assert train(wd, *FAST, "--config.checkpoint_every=2") == 0  # space freed: the same command resumes
  assert [m["step"] for m in metrics(wd) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]


def _can_mount_tmpfs(path, size) -> bool:
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                        capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("size", ["300k", "700k"])
def test_a_real_full_disk(tmp_path, size):
  """A small tmpfs (a checkpoint of this model takes ~0.5 MiB; at 300k the first one does not
  fit, at 700k the first best and regular saves run out together; scripts/fault_matrix.py
  also fills 2-4 MiB disks mid-run): the run stops in one sentence, the metrics stay valid,
  and once the disk is larger the same command resumes."""
  mnt = str(tmp_path / "disk")
  if not _can_mount_tmpfs(mnt, size):
    pytest.skip("mounting a tmpfs needs root")
  try:
    wd = os.path.join(mnt, "run")
    args = [*TINY, f"--workdir={wd}", "--config.log_every=1", "--config.eval_every=4", "--config.total_steps=40",
            "--config.checkpoint_every=2", "--config.keep_checkpoints=40"]
    proc = run_cli("trainer.train", *args)
    assert proc.returncode == 75, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "no space left on device on " + mnt in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    last = max(_steps(wd), default=None)
    if last is None:
      assert "there is no finished checkpoint" in lines[0]
    else:
      assert f"the last good checkpoint is step {last} in" in lines[0]
    _valid_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert not _tmp_dirs(wd)
    subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
    proc = run_cli("trainer.train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if last is not None:
      assert f"resuming from step {last}" in proc.stdout
    steps = [m["step"] for m in _valid_jsonl(os.path.join(wd, "metrics.jsonl")) if "train/loss" in m]
    assert steps == list(range(1, 41))
  finally:
    subprocess.run(["umount", "-l", mnt], capture_output=True)


# -- damaged checkpoints ---------------------------------------------------------------


def _rewrite_array(wd, step, mutate):
  """Rewrites checkpoint `step` with one array changed but its recorded checksums kept: what a
  flipped bit in the array data that the storage format cannot notice would restore."""
  import orbax.checkpoint as ocp
  path = os.path.join(wd, "checkpoints", str(step))
  state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
  mutate(state)
  shutil.rmtree(os.path.join(path, "state"))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, "state"), state)
  ckpt.wait_until_finished()


def test_an_array_that_does_not_match_its_checksum_is_set_aside(tmp_path, caplog):
  wd = str(tmp_path / "run")
  assert train(wd, *FAST, "--config.checkpoint_every=3") == 0
  losses = train_losses(wd)

  def flip_one_bit(state):
    name = "encoder/blocks/0/mlp/up/kernel"
    w = np.array(state["params"][name])
    w.view(np.uint32).flat[17] ^= 1 << 9  # one bit of one weight: still a normal float
    state["params"][name] = w

  _rewrite_array(wd, 6, flip_one_bit)
  assert train(wd, *FAST, "--config.checkpoint_every=3", "--config.total_steps=8") == 0
  text = caplog.text
  assert "checkpoint 6" in text and "'params/encoder/blocks/0/mlp/up/kernel' does not match its checksum" in text
  assert [os.path.basename(p).split("-")[0] for p in glob.glob(os.path.join(wd, "unreadable_checkpoints", "*"))] == ["6"]
  after = train_losses(wd)
  assert after[4] == losses[4] and after[6] == losses[6], "steps 4-6 were not retrained from step 3 exactly"


def test_flipped_bytes_in_array_files_never_restore_silently(tmp_path, caplog):
  """Bytes flipped at several places of the array data: the damaged checkpoint is refused (by
  the storage format or by its checksums) and training goes on exactly as from an undamaged
  one, or the bytes were ones no restored array reads (the run goes on exactly the same)."""
  wd = str(tmp_path / "run")
  assert train(wd, *FAST, "--config.checkpoint_every=3") == 0
  pristine = str(tmp_path / "pristine")
  shutil.copytree(wd, pristine)
  assert train(wd, *FAST, "--config.checkpoint_every=3", "--config.total_steps=7") == 0
  want = train_losses(wd)[7]
  files = sorted(glob.glob(os.path.join(pristine, "checkpoints", "6", "state", "**", "d", "*"), recursive=True),
                 key=os.path.getsize)[-2:]
  assert files, "no array data files found"
  refused = 0
  for trial, (path, frac) in enumerate((p, f) for p in files for f in (0.1, 0.35)):
    work = str(tmp_path / f"t{trial}")
    shutil.copytree(pristine, work)
    target = os.path.join(work, os.path.relpath(path, pristine))
    offset = int(os.path.getsize(target) * frac)
    with open(target, "r+b") as f:
      f.seek(offset)
      b = f.read(4)
      f.seek(offset)
      f.write(bytes(x ^ 0x5A for x in b))
    caplog.clear()
    assert train(work, *FAST, "--config.checkpoint_every=3", "--config.total_steps=7") == 0
    refused += "checkpoint 6" in caplog.text and "unreadable" in caplog.text
    assert train_losses(work)[7] == want, f"a flip at byte {offset} of {path} changed the resumed run"
  assert refused >= 2, "no flip reached the restored arrays; the test damaged nothing it could detect"


def test_damaged_meta_is_set_aside(tmp_path, caplog):
  wd = str(tmp_path / "run")
  assert train(wd, *FAST, "--config.checkpoint_every=3") == 0
  meta = os.path.join(wd, "checkpoints", "6", "meta", "metadata")
  with open(meta) as f:
    m = json.load(f)
  m["data_position"] += 8  # valid JSON, wrong position: only the meta's checksum can tell
  with open(meta, "w") as f:
    json.dump(m, f)
  assert train(wd, *FAST, "--config.checkpoint_every=3", "--config.total_steps=7") == 0
  assert "its meta does not match its checksum" in caplog.text


def test_best_checkpoint_is_the_last_fallback(tmp_path, caplog, capsys):
  wd = str(tmp_path / "run")
  assert train(wd, "--config.log_every=1", "--config.eval_every=3", "--config.checkpoint_every=3") == 0
  best = _steps(wd, "best_checkpoint")
  assert best
  for s in _steps(wd):  # every regular checkpoint unreadable
    for f in glob.glob(os.path.join(wd, "checkpoints", str(s), "state", "**", "manifest.ocdbt"), recursive=True):
      os.remove(f)
  capsys.readouterr()
  assert train(wd, "--config.log_every=1", "--config.eval_every=3", "--config.checkpoint_every=3",
               "--config.total_steps=8") == 0
  assert f"resuming from best_checkpoint/{best[0]} instead" in caplog.text
  assert "starting from scratch" not in caplog.text
  assert f"resuming from step {best[0]}" in capsys.readouterr().out


def test_evaluate_falls_back_without_claiming_to_start_from_scratch(tmp_path, caplog):
  wd = str(tmp_path / "run")
  assert train(wd, *FAST, "--config.checkpoint_every=3") == 0
  for f in glob.glob(os.path.join(wd, "checkpoints", "6", "state", "**", "manifest.ocdbt"), recursive=True):
    os.remove(f)
  assert evaluate(wd) == 0
  assert "checkpoint 6" in caplog.text and "evaluating the previous one" in caplog.text
  assert "starting from scratch" not in caplog.text
  with open(os.path.join(wd, "eval_results.json")) as f:
    assert json.load(f)["step"] == 3
  assert os.path.isdir(os.path.join(wd, "checkpoints", "6")), "evaluate must not move checkpoints"


# -- non-finite values -----------------------------------------------------------------

BOOM = ["--config.optimizer.learning_rate=1e30", "--config.optimizer.grad_clip=0", "--config.optimizer.warmup_steps=0",
        "--config.eval_every=0", "--config.log_every=50"]


@pytest.mark.slow
def test_a_nonfinite_stop_during_an_async_save_is_one_sentence_and_keeps_the_last_finite_checkpoint(tmp_path):
  wd = str(tmp_path / "run")
  # Warm-up from 0 keeps the first steps finite, so there are finished checkpoints to keep.
  proc = run_cli("trainer.train", *TINY, f"--workdir={wd}", *BOOM, "--config.total_steps=40",
                 "--config.checkpoint_every=1", "--config.optimizer.warmup_steps=3")
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = _error_lines(proc.stderr)
  assert len(lines) == 1 and "Traceback" not in proc.stderr and "schedule new futures" not in proc.stderr, \
      proc.stderr[-3000:]
  saved = _steps(wd)
  assert saved, "the finite first steps' checkpoints are gone"
  assert not _tmp_dirs(wd), "an abandoned save was left behind"
  assert f"the last good checkpoint is step {saved[-1]}" in lines[0]
  # What was saved restores (checksums verified) and holds finite numbers only.
  from trainer.config import load_config
  from trainer.experiment import Experiment
  cfg = load_config("configs/default.py:smoke", ["batch_size=8", "optimizer.warmup_steps=3"]
                    + [a[len("--config."):] for a in BOOM if "warmup" not in a])
  exp = Experiment(cfg, wd, read_only=True)
  state, _ = exp.checkpointer.restore(exp.abstract_state)
  assert int(state["step"]) == saved[-1]
  _, bad = exp.checkpointer.fingerprints(state)
  assert not bad
  exp.close()


def test_skip_stops_after_max_skipped_consecutive_steps(tmp_path, capsys):
  wd = str(tmp_path / "run")
  assert train(wd, *BOOM, "--config.on_nonfinite=skip", "--config.max_skipped=3", "--config.total_steps=12") == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: on_nonfinite=skip skipped 3 consecutive steps") and "max_skipped=3" in err, err
  assert not any(n.isdigit() and int(n) > 3 for n in os.listdir(os.path.join(wd, "checkpoints")))


def test_an_out_of_memory_restore_sets_nothing_aside(tmp_path, monkeypatch):
  """An error that says nothing about the checkpoint (memory, the runtime) propagates: good
  checkpoints are never set aside for it, and training never restarts from scratch."""
  from trainer import checkpoint
  wd = str(tmp_path / "run")
  assert train(wd, *FAST, "--config.checkpoint_every=3") == 0

  def oom(self, state, meta):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

  monkeypatch.setattr(checkpoint.Checkpointer, "_verify", oom)
  with pytest.raises(RuntimeError, match="Out of memory"):
    train(wd, *FAST, "--config.checkpoint_every=3", "--config.total_steps=9")
  assert _steps(wd) == [3, 6] and not os.path.exists(os.path.join(wd, "unreadable_checkpoints"))
  assert [m["step"] for m in metrics(wd) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]
  monkeypatch.undo()
  assert train(wd, *FAST, "--config.checkpoint_every=3", "--config.total_steps=9") == 0  # the lock was released


def test_evaluate_warns_about_a_changed_config_instead_of_refusing(tmp_path, caplog):
  wd = str(tmp_path / "run")
  assert train(wd, *FAST) == 0
  assert evaluate(wd, "--config.batch_size=16") == 0  # the evaluation batch is the user's choice
  assert "was trained with a different config: batch_size (8 -> 16)" in caplog.text
