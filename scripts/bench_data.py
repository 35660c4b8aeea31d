"""Input pipeline throughput per task against the train step it feeds.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/bench_data.py [--batches 20]

For each task config (its default model and batch, unless shrunk by `--configs`), it
prints the batches/s of the grain pipeline alone (`trainer.data.pipeline.BatchStream`, the
object the train loop reads) made on demand in one thread (threads 0), by 2 threads, and
by 2 worker processes, beside the compiled train step's steps/s on this machine. The
first batches (pipeline start-up, worker start) are not timed. A pipeline faster than
the step keeps `train/data_wait_fraction` near 0. TFDS tasks run on
`tfds.testing.mock_data` (random records of the real features) unless `--data_dir` names
prepared data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.experiment import Experiment  # noqa: E402

CONFIGS = ("configs/default.py", "configs/listops.py:small", "configs/mqar.py", "configs/selective_copy.py",
           "configs/lra_pathfinder.py:small", "configs/lra_text.py:small")
# configs/lra_image.py runs with --data_dir only: TFDS's mock data encodes its random images through
# TensorFlow, which seqmix does not install.


def pipeline_rate(exp, batches: int, threads: int, workers: int, skip: int = 2) -> float:
  d = exp.cfg.data
  with d.unlocked():
    d.threads, d.workers = threads, workers
  stream = exp.train_stream(0)
  try:
    for _ in range(skip):
      next(stream)
    t0 = time.perf_counter()
    for _ in range(batches):
      jax.block_until_ready(next(stream))
    return batches / (time.perf_counter() - t0)
  finally:
    stream.close()


def step_rate(exp, steps: int) -> float:
  state = exp.fresh_state()
  step = exp.compiled_train_step()
  batches = [exp.train_batch(s) for s in range(steps + 1)]
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in batches[1:]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  return steps / (time.perf_counter() - t0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, default=20, help="timed batches per pipeline setting")
  p.add_argument("--steps", type=int, default=5, help="timed train steps")
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--data_dir", default="", help="prepared TFDS data (else mock data for TFDS tasks)")
  args = p.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores; "
        f"{args.batches} timed batches, {args.steps} timed steps")
  print(f"{'config':34s} {'batch':>5s} {'T':>5s} {'1 thread b/s':>12s} {'2 threads':>10s} {'2 procs':>8s} "
        f"{'train steps/s':>13s} {'ahead':>6s}")
  for spec in args.configs.split(","):
    over = []
    mock = None
    cfg = load_config(spec)
    if cfg.task.name == "tfds":
      if args.data_dir:
        over.append(f"task.tfds.data_dir={args.data_dir}")
      else:
        import tensorflow_datasets as tfds  # noqa: PLC0415
        mock = tfds.testing.mock_data(num_examples=4096)
        mock.__enter__()
    cfg = load_config(spec, over)
    with tempfile.TemporaryDirectory() as wd:
      exp = Experiment(cfg, os.path.join(wd, "run"), read_only=True)
      one = pipeline_rate(exp, args.batches, 0, 0)
      two = pipeline_rate(exp, args.batches, 2, 0)
      # Worker processes do not inherit the mock: TFDS tasks on mock data are threads only.
      procs = pipeline_rate(exp, args.batches, 0, 2) if mock is None else float("nan")
      steps = step_rate(exp, args.steps)
    if mock is not None:
      mock.__exit__(None, None, None)
    best = np.nanmax([one, two, procs])
    print(f"{spec:34s} {cfg.batch_size:5d} {cfg.task.seq_len:5d} {one:12.1f} {two:10.1f} {procs:8.1f} "
          f"{steps:13.2f} {best / steps:5.1f}x", flush=True)


if __name__ == "__main__":
  main()
