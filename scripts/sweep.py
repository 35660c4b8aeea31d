"""Train one config with several mixers side by side and print a table of held-out results.

    python scripts/sweep.py --config=configs/mqar.py --mixers=attention,linear,mamba \
        --parallel=4 --deadline_s=480 [--set total_steps=1000 ...]

Each mixer is a separate `python -m trainer.train` run in `--workdir_root/<config>-<mixer>`
(several at once with `--parallel`; on one GPU each process gets an equal share of its
memory; an existing workdir resumes, as trainer.train does). A run still going at the deadline is stopped and reported as such. The table
gives each run's last held-out accuracy and loss, its steps, training steps/s and wall
time, read from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_metrics(workdir: str) -> dict:
  """The last value of every metric in the run's metrics.jsonl, plus `curve`: [(step, held-out accuracy)]."""
  out, curve = {}, []
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        row = json.loads(line)
        out.update(row)
        if "eval/accuracy" in row:
          curve.append((row.get("step"), row["eval/accuracy"]))
  except FileNotFoundError:
    pass
  out["curve"] = curve
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--mixers", required=True, help="comma-separated mixer names")
  p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--deadline_s", type=float, default=3600.0)
  p.add_argument("--workdir_root", default="runs/sweep")
  args = p.parse_args(argv)
  mixers = args.mixers.split(",")
  env = dict(os.environ)
  if args.parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.parallel:.3f}")
  stem = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
  os.makedirs(args.workdir_root, exist_ok=True)
  start = time.time()
  pending = list(mixers)
  running: dict[str, tuple[subprocess.Popen, float, str]] = {}
  results = {}
  while pending or running:
    while pending and len(running) < args.parallel:
      m = pending.pop(0)
      wd = os.path.join(args.workdir_root, f"{stem}-{m}")
      cmd = [sys.executable, "-m", "trainer.train", f"--config={args.config}", f"--workdir={wd}",
             f"--config.model.mixer={m}", "--config.progress_bar=false"] + [f"--config.{s}" for s in args.set]
      log = open(os.path.join(args.workdir_root, f"{stem}-{m}.log"), "w")
      running[m] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.time(), wd)
    time.sleep(1.0)
    if time.time() - start > args.deadline_s:
      # Stop every late run at once (each saves a checkpoint on SIGTERM), then kill stragglers:
      # one shared grace period, so the table prints soon after the deadline.
      for proc, _, _ in running.values():
        proc.terminate()
      grace = time.time() + 20
      for proc, _, _ in running.values():
        try:
          proc.wait(max(0.1, grace - time.time()))
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
      for m, (proc, t0, wd) in running.items():
        results[m] = ("stopped at deadline", time.time() - t0, last_metrics(os.path.join(ROOT, wd)))
      for m in pending:
        results[m] = ("not started (deadline)", 0.0, {"curve": []})
      running, pending = {}, []
      break
    for m, (proc, t0, wd) in list(running.items()):
      if proc.poll() is None:
        continue
      results[m] = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}", time.time() - t0,
                    last_metrics(os.path.join(ROOT, wd)))
      del running[m]
  print(f"\n{args.config} {' '.join(args.set)}")
  print("| mixer | held-out accuracy | held-out loss | steps | steps/s | wall s | status | accuracy by step |")
  print("|---|---|---|---|---|---|---|---|")
  for m in mixers:
    status, wall, met = results[m]
    acc, loss = met.get("eval/accuracy"), met.get("eval/loss")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"| {m} | {fmt(acc, '.4f')} | {fmt(loss, '.3f')} | {met.get('step', '-')} | "
          f"{fmt(met.get('train/steps_per_sec'), '.1f')} | {wall:.0f} | {status} | "
          f"{' '.join(f'{s}:{a:.3f}' for s, a in met['curve'])} |", flush=True)
  for m in mixers:
    if results[m][0].startswith("exit"):
      with open(os.path.join(args.workdir_root, f"{stem}-{m}.log")) as f:
        tail = f.read().strip().splitlines()[-3:]
      print(f"{m} ({results[m][0]}): " + " / ".join(tail), flush=True)


if __name__ == "__main__":
  main()
