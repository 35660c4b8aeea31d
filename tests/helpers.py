"""Shared test helpers: run the entry points in-process or as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A seconds-long run on 8 fake devices: data-parallel over all 8 by default.
TINY = ["--config=configs/default.py:smoke", "--config.batch_size=8", "--config.progress_bar=false"]


def train(workdir, *extra) -> int:
  from trainer import train as train_mod
  return train_mod.main([*TINY, f"--workdir={workdir}", *extra])


def evaluate(workdir, *extra) -> int:
  from trainer import evaluate as eval_mod
  return eval_mod.main([*TINY, f"--workdir={workdir}", *extra])


def run_cli(module: str, *args, timeout=300, env_extra=None) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir) -> dict[int, float]:
  return {m["step"]: m["train/loss"] for m in metrics(workdir) if "train/loss" in m}
