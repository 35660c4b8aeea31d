"""Induction heads (Mamba, section 4.1): recall the token after the trigger's first occurrence.

    python -m trainer.train --config=configs/induction.py --workdir=runs/induction-mamba2 \
        --config.model.mixer=mamba2
    python scripts/eval_lengths.py --config=configs/induction.py --set model.mixer=mamba2 \
        --lengths=256,1024,4096,16384 runs/induction-mamba2

Trained at seq_len 256 (the Mamba paper trains at 256 and tests from 64 to 2^20 tokens),
vocab 16, two layers of d=64 with 2 heads in the default pre-norm block, rotary positions for
attention. Loss and accuracy on the last token only; chance 1/16.
A model that really learned the lookup keeps its accuracy at every evaluation length; exact
attention with rotary positions is expected to lose it beyond the trained length.
`:smoke` runs in seconds.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "induction"
  c.task.seq_len = 256
  c.task.induction.vocab = 16
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.positions = "rope"
  c.batch_size = 32
  c.total_steps = 2000
  c.eval_every = 250
  c.checkpoint_every = 500
  c.eval_examples = 512
  c.optimizer.learning_rate = 1e-3
  if arg == "smoke":
    c.task.seq_len = 32
    base.shrink_to_smoke(c)
    c.optimizer.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/induction.py takes no argument or 'smoke', not {arg!r}")
  return c
