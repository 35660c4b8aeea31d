"""Long Range Arena ListOps: 10-way classification of nested MIN/MAX/MED/SM expressions.

    python -m trainer.train --config=configs/listops.py --workdir=runs/listops

The LRA setting (trees of 500-2000 tokens, seq_len 2048) is an accelerator job: many hours
on a laptop CPU. `:small` (trees of 50-500 tokens, seq_len 512) runs at ~0.31 steps/s on 2
CPU cores (about 80 minutes for its 1500 steps); `:smoke` runs in seconds. Chance (most frequent label) is printed at the end.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "listops"
  c.task.seq_len = 2048
  c.task.listops.min_len = 500
  c.task.listops.max_len = 2000
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.pooling = "mean"
  c.model.positions = "learned"
  c.batch_size = 32
  c.total_steps = 5000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_examples = 2048
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 500
  if arg == "small":
    c.task.seq_len = 512
    c.task.listops.min_len = 50
    c.task.listops.max_len = 500
    c.task.listops.max_depth = 6
    c.model.d_model = 128
    c.total_steps = 1500
    c.eval_every = 250
    c.checkpoint_every = 250
    c.eval_examples = 512
    c.optimizer.warmup_steps = 100
  elif arg == "smoke":
    c.task.seq_len = 64
    c.task.listops.min_len = 8
    c.task.listops.max_len = 64
    c.task.listops.max_depth = 4
    base.shrink_to_smoke(c)
    c.optimizer.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/listops.py takes no argument, 'small' or 'smoke', not {arg!r}")
  return c
