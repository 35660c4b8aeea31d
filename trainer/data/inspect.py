"""Prints examples of a configured task as JSON lines, to see what a model will be fed.

  python -m trainer.data.inspect --config=configs/NAME.py[:ARG] --split=test --num=5 \\
      [--config.task.seq_len=256 ...]

Each line is the task's `decode` view of one example plus its "index". For image tasks
(LRA Image, Pathfinder: any task whose tokens form a grid), `--png=DIR` also writes each
example as DIR/SPLIT_INDEX.png (grey level = token - 1, enlarged to ~256 pixels a side)
so a person can look at it. Examples come
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
  parser.add_argument("--png", default="", help="image tasks: also write each example as DIR/SPLIT_INDEX.png")
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


def write_png(inputs, grid: tuple[int, int], path: str) -> str:
  """Tokens (grey level + 1, 0 = padding) on an h x w grid -> a PNG, nearest-neighbour enlarged."""
  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  h, w = grid
  image = (np.asarray(inputs).reshape(h, w) - 1).clip(0, 255).astype(np.uint8)
  scale = max(1, 256 // max(h, w))
  Image.fromarray(np.kron(image, np.ones((scale, scale), np.uint8))).save(path, format="PNG")
  return path


def main(argv: list[str] | None = None) -> int:
  args, overrides = _parse(argv)
  try:
    cfg = load_config(args.config, overrides)
    task = make_task(cfg.task, cfg.seed, cfg.eval_examples, cfg.batch_size)
    if args.png and not any(task.spec.grid):
      raise UserError(f"--png draws image tasks, but task {cfg.task.name!r} is not laid out on a grid")
    if args.png:
      os.makedirs(args.png, exist_ok=True)
    for index in range(args.start, args.start + args.num):
      example = task.example(args.split, index)
      row = {"index": index, **task.decode(example)}
      if args.png:
        row["png"] = write_png(example["inputs"], task.spec.grid,
                               os.path.join(args.png, f"{args.split}_{index}.png"))
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
