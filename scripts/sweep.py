"""Train one config with several mixers side by side and print a table of held-out results.

    python scripts/sweep.py --config=configs/mqar.py --mixers=attention,linear,mamba \
        --parallel=4 --deadline_s=480 [--set total_steps=1000 ...] [--grid optimizer.learning_rate=1e-3,3e-3]

Each mixer (and each `--grid` value) is a separate `python -m trainer.train` run in
`--workdir_root/<config>-<mixer>[-<key>-<value>]` (several at once with `--parallel`; on one
GPU each process gets an equal share of its memory; an existing workdir resumes, as
trainer.train does). Runs still going at the deadline are stopped and reported as such. The
table gives each run's last held-out accuracy and loss, its steps, training steps/s, wall
time and accuracy at every evaluation, read from its metrics.jsonl; with `--grid`, also each
mixer's best run (Zoology reports the best learning rate per mixer). `steps to X` is the step
of the first evaluation at or above `--threshold` held-out accuracy (default 0.9): a slow
learner shows a late step there, a non-learner "not reached".
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


def steps_to(curve, threshold: float):
  """The step of the first evaluation with held-out accuracy >= threshold, or None."""
  return next((step for step, acc in curve if acc >= threshold), None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--mixers", required=True, help="comma-separated mixer names")
  p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  p.add_argument("--grid", default=None,
                 help="key=v1,v2,...: one run per mixer and value (e.g. optimizer.learning_rate=1e-3,3e-3, "
                      "Zoology's protocol); the table then also gives each mixer's best run")
  p.add_argument("--threshold", type=float, default=0.9,
                 help="held-out accuracy whose first evaluation step the table reports (steps-to-threshold)")
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--deadline_s", type=float, default=3600.0)
  p.add_argument("--workdir_root", default="runs/sweep")
  args = p.parse_args(argv)
  mixers = args.mixers.split(",")
  grid = [("", [])]  # (label suffix, extra overrides) per value
  if args.grid:
    key, sep, values = args.grid.partition("=")
    if not sep or not values:
      p.error(f"--grid={args.grid!r} must look like key=v1,v2")
    grid = [(f" {key.rsplit('.', 1)[-1]}={v}", [f"{key}={v}"]) for v in values.split(",")]
  runs = [(m + suffix, m, extra) for m in mixers for suffix, extra in grid]  # (label, mixer, overrides)
  env = dict(os.environ)
  if args.parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.parallel:.3f}")
  stem = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
  os.makedirs(args.workdir_root, exist_ok=True)
  start = time.time()
  pending = list(runs)
  running: dict[str, tuple[subprocess.Popen, float, str]] = {}
  results = {}
  name_of = lambda label: f"{stem}-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in label.replace(" ", "-"))
  while pending or running:
    while pending and len(running) < args.parallel:
      label, m, extra = pending.pop(0)
      wd = os.path.join(args.workdir_root, name_of(label))
      cmd = [sys.executable, "-m", "trainer.train", f"--config={args.config}", f"--workdir={wd}",
             f"--config.model.mixer={m}", "--config.progress_bar=false"] + [f"--config.{s}" for s in args.set + extra]
      log = open(os.path.join(args.workdir_root, name_of(label) + ".log"), "w")
      running[label] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.time(),
                        wd)
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
      for label, (proc, t0, wd) in running.items():
        results[label] = ("stopped at deadline", time.time() - t0, last_metrics(os.path.join(ROOT, wd)))
      for label, _, _ in pending:
        results[label] = ("not started (deadline)", 0.0, {"curve": []})
      running, pending = {}, []
      break
    for label, (proc, t0, wd) in list(running.items()):
      if proc.poll() is None:
        continue
      results[label] = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}", time.time() - t0,
                        last_metrics(os.path.join(ROOT, wd)))
      del running[label]
  print(f"\n{args.config} {' '.join(args.set)}")
  thr = f"steps to {args.threshold:g}"
  print(f"| run | held-out accuracy | held-out loss | steps | steps/s | wall s | status | accuracy by step | {thr} |")
  print("|---|---|---|---|---|---|---|---|---|")
  fmt = lambda v, f: "-" if v is None else format(v, f)
  reached = lambda met: ("not reached" if met["curve"] else "-") if steps_to(met["curve"], args.threshold) is None \
      else str(steps_to(met["curve"], args.threshold))
  for label, _, _ in runs:
    status, wall, met = results[label]
    acc, loss = met.get("eval/accuracy"), met.get("eval/loss")
    print(f"| {label} | {fmt(acc, '.4f')} | {fmt(loss, '.3f')} | {met.get('step', '-')} | "
          f"{fmt(met.get('train/steps_per_sec'), '.1f')} | {wall:.0f} | {status} | "
          f"{' '.join(f'{s}:{a:.3f}' for s, a in met['curve'])} | {reached(met)} |", flush=True)
  if len(grid) > 1:
    print(f"\nbest run per mixer over {args.grid}:")
    print(f"| mixer | best run | held-out accuracy | {thr} |")
    print("|---|---|---|---|")
    for m in mixers:
      # Highest held-out accuracy, ties to the lower held-out loss.
      scored = [(met["eval/accuracy"], -met.get("eval/loss", 0.0), label)
                for label, mm, _ in runs if mm == m for met in [results[label][2]] if "eval/accuracy" in met]
      acc, _, label = max(scored) if scored else (None, None, "-")
      print(f"| {m} | {label} | {fmt(acc, '.4f')} | {reached(results[label][2]) if scored else '-'} |")
  for label, _, _ in runs:
    if results[label][0].startswith("exit"):
      with open(os.path.join(args.workdir_root, name_of(label) + ".log")) as f:
        tail = f.read().strip().splitlines()[-3:]
      print(f"{label} ({results[label][0]}): " + " / ".join(tail), flush=True)

if __name__ == "__main__":
  main()
