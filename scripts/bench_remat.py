"""Remat policies (`model.remat`) and scanned blocks (`model.scan_blocks`): memory, step time, compile time.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/bench_remat.py [--steps 2]

Table 1: a 12-layer d=512 causal LM (8 heads, MLP 4x) at T=4096, batch 1, the real
compiled train step of `trainer.experiment.Experiment`, for every policy: the compiled
step's temporaries (deterministic on CPU) and the median time of `--steps` train steps
after one warm-up step, each as a ratio to `none`. `--attention_impl` picks the attention
(default flash: O(T) memory, so the [T, T] scores do not dominate every policy). A policy
whose step needs more than `--max_run_gib` of temporaries is compiled but not run.

Table 2: compile time of the train step against depth, blocks unrolled or scanned
(`--depths`, T=512, d=256), and the size of the lowered program.
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

from layers import remat  # noqa: E402
from trainer import steps  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.experiment import Experiment  # noqa: E402


def _experiment(over: list[str], wd: str) -> Experiment:
  cfg = load_config("configs/default.py", ["batch_size=1", "eval_examples=1", "model.num_heads=8",
                                           "model.num_kv_heads=8", "mesh.data=1", *over])
  return Experiment(cfg, os.path.join(wd, "none"), read_only=True)


def policy_row(policy: str, args) -> dict:
  over = [f"task.seq_len={args.seq_len}", f"model.num_layers={args.layers}", f"model.d_model={args.d_model}",
          f"model.remat={policy}", f"model.attention_impl={args.attention_impl}",
          f"model.scan_blocks={args.scan}"]
  with tempfile.TemporaryDirectory() as wd:
    exp = _experiment(over, wd)
    t0 = time.perf_counter()
    stats = exp.compile_stats()
    compile_s = time.perf_counter() - t0
    if stats["temp_bytes"] > args.max_run_gib * 2**30:  # compile-only row: too large to run here
      return {"temp": stats["temp_bytes"], "step_s": float("nan"), "compile_s": compile_s, "loss": float("nan")}
    step = exp.compiled_train_step()
    state = exp.fresh_state()
    batches = [exp.train_batch(s) for s in range(args.steps + 1)]
    state, m = step(state, batches[0])  # warm-up
    jax.block_until_ready(m)
    times = []
    for b in batches[1:]:
      t0 = time.perf_counter()
      state, m = step(state, b)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    return {"temp": stats["temp_bytes"], "step_s": float(np.median(times)), "compile_s": compile_s,
            "loss": float(m["loss"])}


def depth_row(layers: int, scan: bool) -> dict:
  over = ["task.seq_len=512", f"model.num_layers={layers}", "model.d_model=256", f"model.scan_blocks={scan}",
          "model.attention_impl=flash"]
  with tempfile.TemporaryDirectory() as wd:
    exp = _experiment(over, wd)
    t0 = time.perf_counter()
    exp.compile_stats()
    seconds = time.perf_counter() - t0
    fn = steps.make_train_step(exp.fm, exp.tx, exp.lr_schedule)
    with exp.tracing():
      lowered = exp._lower(jax.jit(fn, in_shardings=(exp.state_shardings, exp.batch_shardings)))  # noqa: SLF001
    return {"compile_s": seconds, "hlo_chars": len(lowered.as_text())}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--attention_impl", default="flash")
  p.add_argument("--scan", default="false", choices=["false", "true"])
  p.add_argument("--policies", default=",".join(remat.CHOICES))
  p.add_argument("--max_run_gib", type=float, default=8.0,
                 help="policies whose step needs more temporaries than this are compiled, not run")
  p.add_argument("--depths", default="4,12,24")
  p.add_argument("--tables", default="policies,depth")
  args = p.parse_args()
  tables = args.tables.split(",")
  if "policies" in tables:
    print(f"{args.layers}-layer d={args.d_model} LM, T={args.seq_len}, batch 1, attention_impl={args.attention_impl}, "
          f"scan_blocks={args.scan}, {jax.devices()[0].platform}, {len(jax.devices())} device(s)\n")
    print("| model.remat | temporaries (MiB) | vs none | step (s) | vs none | loss after warm-up + steps |")
    print("|---|---|---|---|---|---|")
    base = None
    for policy in args.policies.split(","):
      r = policy_row(policy, args)
      base = base or r
      if r["step_s"] != r["step_s"]:  # nan: compiled only
        timed = f"not run (> {args.max_run_gib:g} GiB) | | "
      else:
        timed = f"{r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} | {r['loss']:.4f}"
      print(f"| {policy} | {r['temp'] / 2**20:.0f} | {r['temp'] / base['temp']:.2f} | {timed} |", flush=True)
  if "depth" in tables:
    print("\ncompile time of the train step (T=512, d=256, flash), blocks unrolled or scanned\n")
    print("| layers | unrolled compile (s) | unrolled HLO (kchars) | scanned compile (s) | scanned HLO (kchars) |")
    print("|---|---|---|---|---|")
    for layers in (int(x) for x in args.depths.split(",")):
      u, s = depth_row(layers, False), depth_row(layers, True)
      print(f"| {layers} | {u['compile_s']:.1f} | {u['hlo_chars'] / 1e3:.0f} | {s['compile_s']:.1f} | "
            f"{s['hlo_chars'] / 1e3:.0f} |", flush=True)


if __name__ == "__main__":
  main()
