"""Train-step time of a local multi-process run (scripts/launch_local.sh), repeated.

  python scripts/bench_multiprocess.py --runs 2 -- --config=configs/default.py:smoke \
      --config.total_steps=200 --config.log_every=50

Each run starts `launch_local.sh N` in a fresh workdir and reads its metrics.jsonl: the mean
`train/step_seconds` over the log windows after the first (the first holds the warm-up), and
the run's `time/tokens_per_sec` (train steps only, real tokens). Prints one line per run and
the medians. `--root DIR` runs another checkout of the repository (its launch_local.sh, its
code) to compare two versions on the same machine; alternate them (`--root A`, `--root B`,
again) so that a change in the machine's load falls on both.

  python scripts/bench_multiprocess.py --checks 2000

times the two ways a multi-process run can decide, after a step, whether to stop for a
signal (trainer/train.py `_Preemption`), without training: N processes with
`jax.distributed` on CPU (gloo) each call `process_allgather` of a flag (the trainer's
fallback) and `reached_preemption_sync_point` (JAX's sync point) CHECKS
times; process 0 prints the microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one(root: str, processes: int, train_args: list[str]) -> dict:
  workdir = tempfile.mkdtemp(prefix="bench_mp_")
  try:
    t = time.time()
    r = subprocess.run(["bash", os.path.join(root, "scripts", "launch_local.sh"), str(processes),
                        f"--workdir={workdir}", "--config.progress_bar=false", *train_args],
                       cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
      sys.exit(f"run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    windows, total = [], None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        row = json.loads(line)
        if "train/step_seconds" in row:
          windows.append(row["train/step_seconds"])
        if "time/tokens_per_sec" in row:
          total = row["time/tokens_per_sec"]
    steady = windows[1:] or windows
    return {"step_ms": 1000 * sum(steady) / len(steady), "tokens_per_sec": total, "wall_s": time.time() - t}
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _checks_worker(process_id: int, processes: int, port: int, n: int) -> None:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", processes, process_id)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  flag = np.array(False)
  for _ in range(50):  # warm-up: compile the gather, connect gloo
    multihost_utils.process_allgather(flag)
  out = {}
  for name, fn in (("process_allgather", lambda i: multihost_utils.process_allgather(flag)),
                   ("reached_preemption_sync_point", multihost_utils.reached_preemption_sync_point)):
    multihost_utils.sync_global_devices(name)
    t = time.perf_counter()
    for i in range(1, n + 1):
      fn(i)
    out[name] = 1e6 * (time.perf_counter() - t) / n
  if process_id == 0:
    print(f"{processes} processes, {n} calls each: " + ", ".join(f"{k} {v:.1f} us/call" for k, v in out.items()),
          flush=True)


def _checks(processes: int, n: int) -> None:
  import socket  # noqa: PLC0415
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", str(i), "--processes",
                             str(processes), "--port", str(port), "--checks", str(n)], env=env)
           for i in range(processes)]
  codes = [p.wait() for p in procs]
  if any(codes):
    sys.exit(f"a worker failed: {codes}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default=ROOT, help="repository checkout to run (default: this one)")
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument("--checks", type=int, default=0, help="time the stop checks alone, this many calls")
  parser.add_argument("--_worker", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("train_args", nargs="*", help="after --: arguments for trainer.train")
  args = parser.parse_args(argv)
  if args._worker is not None:
    _checks_worker(args._worker, args.processes, args.port, args.checks)
    return 0
  if args.checks:
    for _ in range(args.runs):
      _checks(args.processes, args.checks)
    return 0
  train_args = args.train_args or ["--config=configs/default.py:smoke", "--config.total_steps=200",
                                   "--config.log_every=50"]
  results = []
  for i in range(args.runs):
    res = _one(os.path.abspath(args.root), args.processes, train_args)
    results.append(res)
    print(f"run {i + 1}: {res['step_ms']:.2f} ms/step after warm-up, {res['tokens_per_sec']:.0f} tokens/s "
          f"(train steps), {res['wall_s']:.0f} s wall", flush=True)
  print(f"median: {statistics.median(r['step_ms'] for r in results):.2f} ms/step, "
        f"{statistics.median(r['tokens_per_sec'] for r in results):.0f} tokens/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
