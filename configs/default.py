"""The main job: a byte-level causal LM on CPython's bundled documentation text.

    ./scripts/train.sh        # = python -m trainer.train --config=configs/default.py --workdir=runs/default

About 3 minutes on 2 laptop CPU cores. The text (the `pydoc_data` topics every Python
installation ships: the language reference's prose and code) is split by topic into
train / validation / test, so the held-out metric is on documentation the model never saw.
Chance: next-byte accuracy of always predicting the most frequent byte (a space), printed
in the final summary; bits per byte of a uniform guess is 8.
`:smoke` shrinks it to a seconds-long run.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "text"
  c.task.seq_len = 128
  c.batch_size = 32
  c.total_steps = 300
  c.eval_every = 100
  c.checkpoint_every = 100
  if arg == "smoke":
    base.shrink_to_smoke(c)
    c.task.seq_len = 32
  elif arg:
    raise ValueError(f"configs/default.py takes no argument or 'smoke', not {arg!r}")
  return c
