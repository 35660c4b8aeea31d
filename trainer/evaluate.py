"""Evaluate a saved checkpoint on the held-out splits:
`python -m trainer.evaluate --config=configs/NAME.py[:ARG] --workdir=DIR [--step=N | --best]`.

Writes DIR/eval_results.json (or `--output`) with validation and test loss/accuracy, the step,
the evaluated length and the task's chance level. Never writes checkpoints. Evaluating at
another length than trained (`--config.task.seq_len=N`) tests length extrapolation
(`scripts/eval_lengths.py` makes the table); the checkpoint's other settings must match.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from trainer import launch
from trainer.config import UserError, load_config, split_override_args


def run(argv) -> int:
  from trainer.experiment import Experiment
  from trainer.workdir import check_workdir, write_json

  parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/default.py", help="configs/NAME.py[:ARG]")
  parser.add_argument("--workdir", default="runs/default", help="the training run's directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
  parser.add_argument("--best", action="store_true",
                      help="evaluate the best checkpoint (DIR/best_checkpoint, chosen by held-out accuracy during training)")
  parser.add_argument("--splits", default="validation,test", help="comma-separated held-out splits")
  parser.add_argument("--output", default=None,
                      help="where to write the results (default: WORKDIR/eval_results.json), e.g. one file per "
                           "evaluated length with --config.task.seq_len")
  launch.add_flags(parser)
  rest, overrides = split_override_args(list(argv))
  args = parser.parse_args(rest)
  launch.initialize(args)
  cfg = load_config(args.config, overrides)
  if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    raise UserError(f"--workdir={args.workdir!r} holds no checkpoints; train first with python -m trainer.train "
                    f"--config={args.config} --workdir={args.workdir}")
  exp = Experiment(cfg, args.workdir, read_only=True)
  check_workdir(args.workdir)  # eval_results.json goes there
  if args.best and args.step is not None:
    raise UserError(f"--best and --step={args.step} name two checkpoints; pass one of them")
  if args.best:
    restored = exp.checkpointer.restore_best(exp.abstract_state, check_config=exp.check_config)
    if restored is None:
      raise UserError(f"--workdir={args.workdir!r} holds no readable best checkpoint (best_checkpoint/ is written "
                      f"at each evaluation when keep_best=true)")
  else:
    restored = exp.checkpointer.restore(exp.abstract_state, args.step, check_config=exp.check_config)
  if restored is None:
    raise UserError(f"no readable checkpoint in {exp.checkpointer.root}")
  state, meta = restored
  step = int(jax.device_get(state["step"]))
  results = {"step": step, "task": cfg.task.name, "seq_len": exp.task.spec.seq_len, "chance_accuracy": exp.task.spec.chance,
             "chance_note": exp.task.spec.chance_note}
  for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
    if split not in ("validation", "test"):
      raise UserError(f"--splits entry {split!r} is not a held-out split; use validation and/or test")
    results.update(exp.evaluate(state, split))
  if jax.process_index() == 0:
    path = args.output or os.path.join(args.workdir, "eval_results.json")
    write_json(path, results)
    for k, v in results.items():
      print(f"{k}: {v}")
    print(f"-> {path}")
  exp.close()
  return 0


def main(argv=None) -> int:
  return launch.run_entry(lambda: run(sys.argv[1:] if argv is None else argv))

if __name__ == "__main__":
  sys.exit(main())
