"""The `seqmix` console script: a thin alias for the module entry points.

    seqmix train --config=configs/default.py --workdir=runs/default
    seqmix eval  --config=configs/default.py --workdir=runs/default
    seqmix inspect --config=configs/listops.py --split=test --num=3
    seqmix generate --config=configs/default.py --workdir=runs/default --prompt="def "
    seqmix arena --config=configs/arena/cpu.py
"""

from __future__ import annotations

import sys

COMMANDS = {"train": "trainer.train", "eval": "trainer.evaluate", "evaluate": "trainer.evaluate",
            "inspect": "trainer.data.inspect", "generate": "trainer.generate",
            "arena": "trainer.arena"}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in COMMANDS:
    got = repr(argv[0]) if argv else "nothing"
    print(f"error: seqmix takes a command ({', '.join(COMMANDS)}), got {got}", file=sys.stderr)
    return 2
  import importlib
  import os
  from trainer.workdir import EXIT_IO
  code = importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
  if code == EXIT_IO:  # a full disk: leave without waiting for failing background writers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code


if __name__ == "__main__":
  sys.exit(main())
