"""Multi-query associative recall (Zoology): recall the value paired with each queried key.

    python -m trainer.train --config=configs/mqar.py --workdir=runs/mqar

Default: seq_len 256, 16 pairs, vocab 8192, a 2-layer d=128 model (Zoology's small
setting): an accelerator job (on 2 CPU cores ~0.65 steps/s, about 50 minutes for 2000
steps). Loss and accuracy are on query positions only, and the LM head computes logits
there only (the examples carry `score_positions`): [64, 16, 8192] instead of [64, 256, 8192],
which made a CPU step 2.5x faster. Chance is 1/4096. `:smoke` runs in seconds.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "mqar"
  c.task.seq_len = 256
  c.task.mqar.vocab_size = 8192
  c.task.mqar.num_pairs = 16
  c.model.num_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 2
  c.model.tie_embeddings = False
  c.batch_size = 64
  c.total_steps = 2000
  c.eval_every = 250
  c.checkpoint_every = 500
  c.eval_examples = 512
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.1
  if arg == "smoke":
    c.task.seq_len = 64
    c.task.mqar.vocab_size = 256
    c.task.mqar.num_pairs = 8
    base.shrink_to_smoke(c)
    c.optimizer.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/mqar.py takes no argument or 'smoke', not {arg!r}")
  return c
