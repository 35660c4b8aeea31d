"""Packed vs padded training throughput on variable-length examples (task.packing).

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/bench_packing.py [--steps 4]

ListOps with trees of 64-2048 tokens (mean ~740) in rows of T=2048, a 2-layer classifier
(d_model 256 by default),
the real compiled train step of `trainer.experiment.Experiment`. For padded rows (one
example per row) and packed rows (task.packing=true), it prints the median step time
and the throughput in examples/s and in real (non-padding) tokens/s (`flash:per_row`: flash with `model.flash.per_row=true`,
each row skipping its own padding and cross-example blocks). Data generation is
timed separately: it overlaps with compute in a real input pipeline. It also prints the
packing statistics (token fill, examples skipped, mean length trained on vs considered).
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

BASE = ["task.seq_len=2048", "task.listops.min_len=64", "task.listops.max_len=2048", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=4", "model.attention_impl=flash", "eval_examples=8"]


def run(packing: bool, mixer: str, batch: int, steps: int, window: int, d_model: int) -> dict:
  name, _, flag = mixer.partition(":")  # "flash:per_row": rows one by one, each skipping its own blocks
  over = BASE + [f"batch_size={batch}", f"model.mixer={name}", f"task.packing={packing}",
                 f"task.packing_window={window}", f"model.d_model={d_model}"] + ([f"model.{name}.{flag}=true"] if flag else [])
  cfg = load_config("configs/listops.py", over)
  with tempfile.TemporaryDirectory() as wd:
    exp = Experiment(cfg, os.path.join(wd, "none"), read_only=True)
    state = exp.fresh_state()
    step = exp.compiled_train_step()
    t0 = time.perf_counter()
    batches = [exp.train_batch(s) for s in range(steps + 1)]
    data_s = (time.perf_counter() - t0) / (steps + 1)
    state, _ = step(state, batches[0])  # warm-up
    jax.block_until_ready(state)
    times = []
    for b in batches[1:]:
      t0 = time.perf_counter()
      state, m = step(state, b)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    host = [jax.device_get(b) for b in batches[1:]]
    examples = np.mean([b["label_weights"].sum() if packing else len(b["label"]) for b in host])
    tokens = np.mean([(b["segment_ids"] != 0).sum() for b in host])
    sec = float(np.median(times))
    out = {"step_s": sec, "data_s": data_s, "examples_per_s": examples / sec, "tokens_per_s": tokens / sec,
           "examples_per_row": examples / batch}
    if packing:
      out["stats"] = exp.task.stats(steps)
    return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--window", type=int, default=3)
  p.add_argument("--mixers", default="flash,flash:per_row,linear")
  p.add_argument("--d_model", type=int, default=256)
  args = p.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  batch {args.batch} rows x 2048, "
        f"2 layers d={args.d_model} 4 heads, "
        f"{args.steps} timed steps, packing window {args.window}")
  print(f"{'mixer':14s} {'rows':7s} {'step s':>8s} {'data s':>8s} {'ex/row':>7s} {'examples/s':>11s} "
        f"{'tokens/s':>10s} {'packed/padded':>14s}")
  for mixer in args.mixers.split(","):
    padded = run(False, mixer, args.batch, args.steps, args.window, args.d_model)
    packed = run(True, mixer, args.batch, args.steps, args.window, args.d_model)
    for name, r in (("padded", padded), ("packed", packed)):
      ratio = r["tokens_per_s"] / padded["tokens_per_s"]
      print(f"{mixer:14s} {name:7s} {r['step_s']:8.3f} {r['data_s']:8.3f} {r['examples_per_row']:7.2f} "
            f"{r['examples_per_s']:11.2f} {r['tokens_per_s']:10.0f} {ratio:13.2f}x")
    s = packed["stats"]
    print(f"{'':14s} packing: token fill {s['fill']:.2f}, examples skipped {s['skipped']:.2f}, mean length "
          f"trained on {s['mean_len_trained']:.0f} vs {s['mean_len_all']:.0f} considered")


if __name__ == "__main__":
  main()
