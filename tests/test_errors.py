"""Every user mistake: one sentence naming the bad value, exit 2, no traceback, workdir untouched."""

import os
import signal

import pytest

from tests.helpers import TINY, run_cli, train


def _snapshot(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      out[p] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("good") / "run")
  assert train(wd, "--config.eval_every=0") == 0
  return wd


@pytest.mark.parametrize("extra,needle", [
    (["--config.model.d_modle=64"], "unknown config key 'model.d_modle'; did you mean 'model.d_model'?"),
    (["--config.model.mixer=nope"], "model.mixer='nope' is not a known mixer; valid mixers:"),
    (["--config.task.name=nope"], "task.name='nope' is not valid; choose one of:"),
    (["--config.mesh.data=3"], "= 3 devices, but 8 are available"),
    (["--config.batch_size=12"], "batch_size=12 is not divisible by the data-parallel size 8"),
    (["--config.mesh.data=1", "--config.mesh.sequence=8", "--config.task.seq_len=36"],
     "task.seq_len=36 is not divisible by mesh.sequence=8"),
    (["--config.task.packing=true", "--config.model.mixer=sinkhorn"],
     "task.packing=true cannot train mixer 'sinkhorn': its sorted block is a soft mixture of whole blocks"),
    (["--config.model.attention_impl=cudnn"], "model.attention_impl='cudnn' needs an NVIDIA GPU, but this run's "
                                              "backend is 'cpu'"),
    (["--config.model.attention_impl=mgpu"], "model.attention_impl='mgpu' needs an NVIDIA GPU, but this run's "
                                             "backend is 'cpu'"),
    (["--config.model.d_model=48"], "was trained with a different config: model.d_model (32 -> 48); use the config "
                                    "it was trained with"),
    (["--config.model.d_model=48", "--config.allow_config_change=true"],
     "parameter 'encoder/blocks/0/mixer/key/kernel' has shape (32, 4, 8) in the checkpoint but (48, 4, 12) in this "
     "config"),
    (["--config.on_nonfinite=skip", "--config.allow_config_change=true"],
     "train-state array 'opt_state/1/0/count' is in the checkpoint but not in what this config builds"),
])
def test_bad_input_is_one_sentence_and_touches_nothing(good_run, capsys, extra, needle):
  before = _snapshot(good_run)
  assert train(good_run, "--config.total_steps=9", *extra) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and needle in err and "\n" not in err, err
  assert _snapshot(good_run) == before


def test_unwritable_workdir(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  assert train(str(blocker / "run")) == 2
  err = capsys.readouterr().err
  assert "is not writable" in err and str(blocker / "run") in err


def test_nonfinite_loss_stops_with_step_or_is_skipped(tmp_path, capsys):
  wd = str(tmp_path / "nan")
  boom = ["--config.optimizer.learning_rate=1e30", "--config.optimizer.grad_clip=0", "--config.optimizer.warmup_steps=0",
          "--config.eval_every=0", "--config.log_every=1"]
  assert train(wd, *boom) == 2
  err = capsys.readouterr().err
  assert "the training loss became nan at step" in err or "the training loss became inf at step" in err
  assert not os.path.exists(os.path.join(wd, "checkpoints", "6"))
  wd2 = str(tmp_path / "skip")
  assert train(wd2, *boom, "--config.on_nonfinite=skip") == 0


def test_cli_error_has_no_traceback(tmp_path):
  proc = run_cli("trainer.train", *TINY, f"--workdir={tmp_path}/w", "--config.model.mixer=nope", timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: model.mixer='nope'")


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  import subprocess, sys, time
  from tests.helpers import ROOT, train_losses
  wd = str(tmp_path / "pre")
  args = [*TINY, f"--workdir={wd}", "--config.total_steps=100000", "--config.log_every=1",
          "--config.checkpoint_every=0", "--config.eval_every=0"]
  proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(os.path.join(wd, "metrics.jsonl")) and
                                        len(train_losses(wd)) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "stopped by SIGTERM after step" in out
  saved = int(out.split("after step ")[1].split(";")[0])
  assert os.listdir(os.path.join(wd, "checkpoints")) == [str(saved)]
  assert train(wd, *args[3:], f"--config.total_steps={saved + 2}") == 0
  assert max(train_losses(wd)) == saved + 2
