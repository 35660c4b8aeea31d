"""Multi-query associative recall (Zoology): recall the value paired with each queried key.

    python -m trainer.train --config=configs/mqar.py --workdir=runs/mqar

Default: seq_len 256, 16 pairs, vocab 8192 (Zoology's small setting), batch 64, 1500 steps
(~30 minutes on 2 CPU cores for `attention`). The model: two layers of d=128, the first an
ungated 5-tap causal convolution (`conv`; a short conv in layer 0 is Zoology's protocol), the
second `model.mixer`; tied input/output embeddings. Both choices matter (BENCHMARKS.md): without the
conv layer attention must first form a two-layer induction head, and with untied embeddings
it must learn a separate output row for each of the 4096 values; with both, exact attention
went from chance at step 250 to 0.97 at step 750. Loss and accuracy are on query positions
only, and the LM head computes logits there only (the examples carry `score_positions`):
[64, 16, 8192] instead of [64, 256, 8192]. Chance is 1/4096. `--config.model.mixer_schedule=`
(empty) trains `model.mixer` in both layers. `mamba` and `mamba2` get Zoology's layout for them,
both layers the mixer with no conv layer in front (`model.schedule_for.<mixer>`; their blocks
have their own short convolution). `:smoke` (one layer, no conv) runs in seconds.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "mqar"
  c.task.seq_len = 256
  c.task.mqar.vocab_size = 8192
  c.task.mqar.num_pairs = 16
  c.model.num_layers = 2
  c.model.mixer_schedule = "conv,mixer"
  # Zoology's layout for Mamba: its blocks carry their own short conv, so every layer is the mixer.
  c.model.schedule_for.mamba = ""
  c.model.schedule_for.mamba2 = ""
  c.model.conv.gate = False
  c.model.conv.kernel = 5
  c.model.d_model = 128
  c.model.num_heads = 2
  c.model.tie_embeddings = True
  c.batch_size = 64
  c.total_steps = 1500
  c.eval_every = 250
  c.checkpoint_every = 500
  c.eval_examples = 512
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.1
  if arg == "smoke":
    c.model.mixer_schedule = ""
    c.task.seq_len = 64
    c.task.mqar.vocab_size = 256
    c.task.mqar.num_pairs = 8
    base.shrink_to_smoke(c)
    c.optimizer.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/mqar.py takes no argument or 'smoke', not {arg!r}")
  return c
