"""The arena's overhead: a one-cell arena against the same `trainer.train` command, wall time.

    python scripts/bench_arena.py [--config=configs/default.py] [--mixer=attention] [--repeats=2] [--set KEY=VALUE ...]

Runs the cell's own `trainer.train` command (fresh workdir) and `python -m trainer.arena --task=CONFIG
--mixers=MIXER` (fresh root) alternately, `--repeats` times each, on an otherwise idle machine, and
prints each wall time (process start to exit, everything included: the arena's config check,
its subprocess, its report and plots) and the arena's overhead in percent of the trainer's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--mixer", default="attention")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--set", action="append", default=[])
  args = p.parse_args(argv)
  from trainer import arena
  a = arena.adhoc_arena(argparse.Namespace(task=args.config, mixers=args.mixer, grid=[]))
  a["set"] = args.set
  tmp = tempfile.mkdtemp(prefix="bench_arena_")
  times = {"trainer.train": [], "trainer.arena": []}
  try:
    for i in range(args.repeats):
      a["root"] = os.path.join(tmp, f"arena{i}")
      cell = arena.cells(arena.check_arena(a))[0]
      train_cmd = [sys.executable] + cell.argv(os.path.join(tmp, f"train{i}"))
      arena_cmd = [sys.executable, "-m", "trainer.arena", f"--task={args.config}", f"--mixers={args.mixer}",
                   f"--root={a['root']}", "--quiet"] + [x for s in args.set for x in ("--set", s)]
      for name, cmd in (("trainer.train", train_cmd), ("trainer.arena", arena_cmd)):
        t = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times[name].append(time.time() - t)
        print(f"{name} run {i}: {times[name][-1]:.1f} s", flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  base = statistics.mean(times["trainer.train"])
  print(f"\n{args.config} {args.mixer} {' '.join(args.set)}")
  print("| command | wall s (each run) | mean | vs trainer.train |")
  print("|---|---|---|---|")
  for name, ts in times.items():
    print(f"| {name} | {' '.join(f'{t:.1f}' for t in ts)} | {statistics.mean(ts):.1f} | "
          f"{(statistics.mean(ts) / base - 1) * 100:+.1f}% |")


if __name__ == "__main__":
  main()
