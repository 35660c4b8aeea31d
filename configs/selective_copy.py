"""Selective copying (Mamba section 4.1): 16 data tokens scattered in noise, copied in order.

    python -m trainer.train --config=configs/selective_copy.py --workdir=runs/selcopy \
        --config.model.mixer=mamba

Default: seq_len 256 (the paper uses 4096), 16 tokens from 16 ids, a 2-layer d=64 model;
loss and accuracy on the 16 copy positions only; chance 1/16. `:smoke` runs in seconds.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "selective_copy"
  c.task.seq_len = 256
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.tie_embeddings = False
  c.batch_size = 64
  c.total_steps = 2000
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.eval_examples = 512
  c.optimizer.learning_rate = 1e-3
  if arg == "smoke":
    c.task.seq_len = 64
    c.task.selective_copy.num_tokens = 4
    base.shrink_to_smoke(c)
    c.optimizer.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/selective_copy.py takes no argument or 'smoke', not {arg!r}")
  return c
