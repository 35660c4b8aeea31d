"""Experiment tracking: Weights & Biases (offline mode, the real package) and TensorBoard's hparams."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct

import pytest

from tests.helpers import train, train_losses


def _offline(monkeypatch, tmp_path):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
  monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def _offline_runs(workdir) -> list[str]:
  return sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))


def test_wandb_offline_run_is_written_and_a_resumed_run_keeps_its_id(monkeypatch, tmp_path):
  """Offline W&B: the run directory holds the logged rows (and the samples table); the resumed
  invocation writes a second directory under the same run id."""
  pytest.importorskip("wandb")  # installed with the test extra
  _offline(monkeypatch, tmp_path)
  wd = str(tmp_path / "run")
  flags = ["--config.logging.wandb=true", "--config.logging.wandb_project=seqmix-test", "--config.log_every=1",
           "--config.eval_every=0", "--config.checkpoint_every=2", "--config.logging.samples=1",
           "--config.logging.sample_tokens=4"]
  assert train(wd, "--config.total_steps=2", *flags) == 0
  with open(os.path.join(wd, "wandb_run.json")) as f:
    run_id = json.load(f)["id"]
  first = _offline_runs(wd)
  assert len(first) == 1 and first[0].endswith(run_id), first
  # The run's record holds what was logged (W&B's own binary format; our step and loss keys).
  records = glob.glob(os.path.join(first[0], "*.wandb"))
  assert records and os.path.getsize(records[0]) > 0
  with open(records[0], "rb") as f:
    raw = f.read()
  assert b"train/loss" in raw and b"seqmix-test" in raw and b"samples" in raw
  assert train(wd, "--config.total_steps=4", *flags) == 0
  runs = _offline_runs(wd)
  assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs
  assert sorted(train_losses(wd)) == [1, 2, 3, 4]


def test_wandb_without_the_package_is_refused_before_anything_is_written(monkeypatch, tmp_path, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
  wd = str(tmp_path / "run")
  assert train(wd, "--config.logging.wandb=true") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "logging.wandb" in err[0] and "seqmix[tracking]" in err[0], err
  assert not os.path.exists(wd)


def _events(path):
  """Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  with open(path, "rb") as f:
    raw = f.read()
  out, i = [], 0
  while i < len(raw):
    (n,) = struct.unpack("<Q", raw[i:i + 8])
    event = event_pb2.Event()
    event.ParseFromString(raw[i + 12:i + 12 + n])
    out.append(event)
    i += 12 + n + 4
  return out


def test_tensorboard_hparams_hold_the_config_and_the_final_metrics(tmp_path):
  wd = str(tmp_path / "run")
  assert train(wd, "--config.total_steps=2", "--config.eval_every=0", "--config.model.d_model=48") == 0
  files = glob.glob(os.path.join(wd, "tensorboard", "hparams", "events.out.tfevents.*"))
  assert len(files) == 1, files
  from tensorboardX.proto import plugin_hparams_pb2
  hparams, scalars = {}, {}
  for event in _events(files[0]):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == "hparams" and value.tag == "_hparams_/session_start_info":
        data = plugin_hparams_pb2.HParamsPluginData()
        data.ParseFromString(value.metadata.plugin_data.content)
        hparams = {k: v for k, v in data.session_start_info.hparams.items()}
      elif value.HasField("simple_value"):
        scalars[value.tag] = value.simple_value
  assert hparams["model.d_model"].number_value == 48
  assert hparams["task.name"].string_value == "text"
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    final = [json.loads(line) for line in f if "eval/accuracy" in line][-1]
  assert scalars["hparams/validation/accuracy"] == pytest.approx(final["eval/accuracy"], rel=1e-6)


def test_eval_samples_are_the_models_greedy_continuations(tmp_path):
  """`logging.samples`: at each evaluation, the openings of the first validation examples and
  their greedy continuations (cached decoding, compiled once); the last evaluation's first
  continuation equals a plain greedy loop over the whole growing sequence with the final
  checkpoint (no cache)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tests.helpers import TINY, metrics
  from trainer.config import load_config, split_override_args
  from trainer.experiment import Experiment
  from trainer.generate import decode_tokens

  wd = str(tmp_path / "run")
  flags = ["--config.total_steps=4", "--config.eval_every=2", "--config.logging.samples=2",
           "--config.logging.sample_tokens=4", "--config.keep_best=false"]
  assert train(wd, *flags) == 0
  rows = [r for r in metrics(wd) if "samples" in r]
  assert [r["step"] for r in rows] == [2, 4] and all(len(r["samples"]) == 2 for r in rows)

  rest, overrides = split_override_args([*TINY, *flags])
  cfg = load_config(rest[0].split("=", 1)[1], overrides)
  exp = Experiment(cfg, wd, read_only=True)
  state, _ = exp.checkpointer.restore(exp.abstract_state, None, check_config=exp.check_config)
  model = exp.fm.module(state["params"], state["extra"])
  for i, got in enumerate(rows[-1]["samples"][:1]):  # the first one by the plain loop (eager: slow)
    example = exp.task.example("validation", i)
    ids = list(example["inputs"][:16])  # P = min(32, seq_len 32 / 2, lengths) = 16
    assert got["prompt"] == decode_tokens("text", ids)
    new = []
    for _ in range(4):
      t = len(ids)
      logits = model({"inputs": jnp.asarray([ids], jnp.int32), "segment_ids": jnp.ones((1, t), jnp.int32),
                      "positions": jnp.arange(t, dtype=jnp.int32)[None]}, step=state["step"])
      nxt = int(np.argmax(np.asarray(jax.device_get(logits))[0, -1, 1:])) + 1  # id 0 (padding) is never sampled
      ids.append(nxt)
      new.append(nxt)
    assert got["continuation"] == decode_tokens("text", new)
  exp.close()


def test_a_wandb_run_that_cannot_start_is_one_sentence(monkeypatch, tmp_path, capsys):
  """W&B refusing to start (no login, a bad entity, no network) stops the run with one error
  line naming logging.wandb and what to do, exit code 2."""
  from trainer import metrics as metrics_lib

  def refuse(cfg, workdir):
    raise RuntimeError("No API key configured. Use `wandb login` to log in.")

  monkeypatch.setattr(metrics_lib, "open_wandb_run", refuse)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, real=importlib.util.find_spec:
                      object() if name == "wandb" else real(name, *a))
  assert train(str(tmp_path / "run"), "--config.logging.wandb=true") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: logging.wandb=true") and "No API key" in err[0], err
  assert "WANDB_MODE=offline" in err[0]
