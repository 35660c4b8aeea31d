"""Prints examples of a configured task as JSON lines, to see what a model will be fed.

  python -m trainer.data.inspect --config=configs/NAME.py[:ARG] --split=test --num=5 \\
      [--config.task.seq_len=256 ...]

Each line is the task's `decode` view of one example plus its "index". Examples come
from the same `make_task(cfg.task, cfg.seed, cfg.eval_examples, cfg.batch_size)` the trainer uses, so what is printed is
exactly what training and evaluation read for that config and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from trainer.config import UserError, load_config
from trainer.data.base import SPLITS, DataError
from trainer.data.tasks import make_task

_OVERRIDE_PREFIX = "--config."


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="python -m trainer.data.inspect",
      description="Print examples of the configured task as JSON lines.",
      epilog="Any --config.KEY=VALUE (or --config.KEY VALUE) argument overrides that config field.")
  parser.add_argument("--config", required=True, help="config file, as path.py or path.py:ARG")
  parser.add_argument("--split", default="test", choices=SPLITS)
  parser.add_argument("--num", type=int, default=5, help="how many examples to print")
  parser.add_argument("--start", type=int, default=0, help="index of the first example")
  args, unknown = parser.parse_known_args(argv)
  overrides = []
  rest = iter(unknown)
  for arg in rest:
    if not arg.startswith(_OVERRIDE_PREFIX):
      parser.error(f"unrecognized argument {arg!r}; config overrides take the form --config.KEY=VALUE")
    body = arg[len(_OVERRIDE_PREFIX):]
    if "=" not in body:
      # Also accept `--config.KEY VALUE`, as the trainer's command line does.
      value = next(rest, None)
      if value is None:
        parser.error(f"override {arg!r} has no value; write {arg}=VALUE")
      body = f"{body}={value}"
    overrides.append(body)
  if args.num < 0 or args.start < 0:
    parser.error("--num and --start must be non-negative")
  return args, overrides


def main(argv: list[str] | None = None) -> int:
  args, overrides = _parse(argv)
  try:
    cfg = load_config(args.config, overrides)
    task = make_task(cfg.task, cfg.seed, cfg.eval_examples, cfg.batch_size)
    for index in range(args.start, args.start + args.num):
      row = {"index": index, **task.decode(task.example(args.split, index))}
      print(json.dumps(row), flush=True)
  except (UserError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except BrokenPipeError:
    # Piping into `head` closes stdout early, a normal way to stop; point stdout at
    # devnull so the interpreter's final flush does not report the closed pipe.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  return 0


if __name__ == "__main__":
  sys.exit(main())
