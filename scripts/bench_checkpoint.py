"""What checkpoint integrity costs: the per-array checksums against the save and restore they guard.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/bench_checkpoint.py [--repeats 3]

For a few model sizes (the default text config's model, widened and deepened), it builds the
whole train state (params + AdamW moments + step + RNG) and times, after a warm-up:

* `checksums`: `Checkpointer.fingerprints` (the compiled checksum pass over every array and the
  finiteness check, fetched to the host): what each save and each restore adds;
* `save`: `Checkpointer.save` until it returns (its synchronous part, checksums included)
  and until the write has finished (`wait`);
* `restore`: `Checkpointer.restore` of that checkpoint, checksums verified.

Medians over `--repeats`. Wall-clock on this machine's file system: indicative only; the
checksum pass is device compute (one read of the state) and scales with the state's bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.experiment import Experiment  # noqa: E402

SIZES = ((128, 4), (512, 8), (1024, 12))  # (d_model, num_layers)


def _median(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sizes", default=",".join(f"{d}x{l}" for d, l in SIZES), help="d_model x num_layers, ...")
  args = parser.parse_args()
  sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s); medians of "
        f"{args.repeats}\n")
  print("| d_model x layers | params | state MiB | checksums ms | save returns ms | save done ms | restore ms |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for d_model, layers in sizes:
    root = tempfile.mkdtemp(prefix="seqmix-bench-ckpt-")
    try:
      cfg = load_config("configs/default.py", [f"model.d_model={d_model}", f"model.num_layers={layers}",
                                               f"model.num_heads={max(d_model // 64, 1)}", "keep_best=false",
                                               "mesh.data=1"])
      exp = Experiment(cfg, os.path.join(root, "run"))
      state = exp.fresh_state()
      ck = exp.checkpointer
      nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
      ck.fingerprints(state)  # compile
      t_sum = _median(lambda: ck.fingerprints(state), args.repeats)
      step = [0]
      returns, done = [], []
      for _ in range(args.repeats + 1):
        step[0] += 1
        t = time.perf_counter()
        ck.save(step[0], state, exp.meta(step[0]))
        returns.append(time.perf_counter() - t)
        ck.wait()
        done.append(time.perf_counter() - t)
      restore = _median(lambda: ck.restore(exp.abstract_state), args.repeats)
      print(f"| {d_model} x {layers} | {exp.num_params:,} | {nbytes / 2**20:.1f} | {t_sum * 1e3:.1f} | "
            f"{np.median(returns[1:]) * 1e3:.1f} | {np.median(done[1:]) * 1e3:.1f} | {restore * 1e3:.1f} |", flush=True)
      exp.close()
    finally:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
