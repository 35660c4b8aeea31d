"""Length extrapolation: evaluate trained runs at several lengths and print one table.

    python scripts/eval_lengths.py --config=configs/induction.py --set model.mixer=mamba2 \
        --lengths=256,1024,4096,16384 runs/induction-mamba2 [--split=test] [--set eval_examples=256]

Each (run, length) is one `python -m trainer.evaluate` of the run's newest checkpoint with
`--config.task.seq_len=LENGTH`: the config plus `--set` must give the model the runs were
trained with (the settings given at training time: a model that differs is refused, named
below the table), written to RUN/eval_len_LENGTH.json, so the run's own
eval_results.json is left alone. Rows: runs; columns: lengths; cells: held-out accuracy
(`-` where the evaluation failed: its last error line is printed below the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate_at(config: str, workdir: str, length: int, split: str, overrides: list[str]) -> tuple[float | None, str]:
  """(held-out accuracy at `length`, "" or the failure's last line)."""
  out = os.path.join(workdir, f"eval_len_{length}.json")
  cmd = [sys.executable, "-m", "trainer.evaluate", f"--config={config}", f"--workdir={workdir}", f"--splits={split}",
         f"--output={out}", f"--config.task.seq_len={length}"] + [f"--config.{o}" for o in overrides]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode != 0:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return None, lines[-1] if lines else f"exit {proc.returncode}"
  with open(out) as f:
    return float(json.load(f)[f"{split}/accuracy"]), ""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="the config the runs were trained with")
  p.add_argument("--lengths", required=True, help="comma-separated evaluation lengths")
  p.add_argument("--split", default="test", choices=("validation", "test"))
  p.add_argument("--set", action="append", default=[], help="config override key=value for every evaluation")
  p.add_argument("workdirs", nargs="+", help="trained runs (their newest checkpoints)")
  args = p.parse_args(argv)
  lengths = [int(v) for v in args.lengths.split(",")]
  print(f"{args.config}, {args.split} accuracy by evaluation length")
  print("| run | " + " | ".join(f"T={t}" for t in lengths) + " |")
  print("|---|" + "---|" * len(lengths))
  errors = []
  for wd in args.workdirs:
    wd = os.path.abspath(wd)  # the evaluations run from the repository root
    cells = []
    for t in lengths:
      acc, err = evaluate_at(args.config, wd, t, args.split, args.set)
      cells.append("-" if acc is None else f"{acc:.3f}")
      if err:
        errors.append(f"{os.path.basename(os.path.normpath(wd))} at T={t}: {err}")
    print(f"| {os.path.basename(os.path.normpath(wd))} | " + " | ".join(cells) + " |", flush=True)
  for e in errors:
    print(e)
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
