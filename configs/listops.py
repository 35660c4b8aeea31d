"""Long Range Arena ListOps: 10-way classification of nested MIN/MAX/MED/SM expressions.

    python -m trainer.train --config=configs/listops.py --workdir=runs/listops

Settings from the LRA repository's listops/configs/base_listops_config.py: trees of
500-2000 tokens (seq_len 2048 here, LRA 2000), batch 32, 5,000 steps, Adam (b2 0.98),
weight decay 0.1, `constant * linear_warmup * rsqrt_decay` with constant 0.05 and 1,000
warm-up steps (a peak of 0.05 / sqrt(1000) = 1.6e-3, then 1/sqrt(step) decay: our `rsqrt`
schedule), 6 layers, width 512, 8 heads, MLP 2048, dropout 0.1. Deviations: LRA pools a
prepended CLS token and uses sinusoidal positions; we mean-pool and learn the positions.

The LRA setting is an accelerator job: many hours on a laptop CPU. `:small` (trees of
50-500 tokens, seq_len 512, 4 layers of width 128, 1500 steps) runs at ~0.31 steps/s on
2 CPU cores (about 80 minutes); `:smoke` runs in seconds. Chance (most frequent label)
is printed at the end.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "listops"
  c.task.seq_len = 2048
  c.task.listops.min_len = 500
  c.task.listops.max_len = 2000
  c.model.num_layers = 6
  c.model.d_model = 512
  c.model.num_heads = 8
  c.model.mlp_ratio = 4
  c.model.dropout = 0.1
  c.model.norm = "layernorm"
  c.model.pooling = "mean"
  c.model.positions = "learned"
  c.batch_size = 32
  c.total_steps = 5000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_examples = 2048
  c.optimizer.learning_rate = 0.05 / 1000 ** 0.5
  c.optimizer.schedule = "rsqrt"
  c.optimizer.warmup_steps = 1000
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.98
  if arg in ("small", "smoke"):  # the CPU variants keep the settings they were measured with
    c.model.num_layers, c.model.num_heads, c.model.dropout, c.model.norm = 4, 4, 0.0, "rmsnorm"
    c.optimizer.learning_rate, c.optimizer.schedule, c.optimizer.weight_decay = 1e-3, "cosine", 0.05
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
