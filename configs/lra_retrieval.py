"""Long Range Arena Retrieval: do two ACL Anthology Network papers cite each other? (byte level)

    python -m trainer.train --config=configs/lra_retrieval.py --workdir=runs/lra_retrieval \\
        --config.task.retrieval.data_dir=/path/to/lra_release/tsv_data

needs the LRA release's AAN TSV files (README: "Real data"). Settings from the LRA
repository's matching/configs/base_match_config.py: 4,000 bytes per document, batch 32,
5,000 steps, Adam (b2 0.98), weight decay 0.1, `constant * linear_warmup * rsqrt_decay` with
constant 0.05 and 8,000 warm-up steps (longer than the run: the rate climbs linearly to
0.05 * 5000 / 8000^1.5 = 3.5e-4 at the last step; we reproduce that with a linear warm-up
to 0.05 / sqrt(8000) over 8,000 steps, cut at 5,000), 4 layers, width 128, 4 heads, MLP 512,
dropout 0.1. Both documents go through one shared encoder.

Deviations: LRA's head is concat[u, v] -> MLP; ours is the dual encoder's [u, v, u*v, u-v]
-> MLP (the interaction features of the original dual-encoder setting). LRA pools the
first byte ("CLS" without a prepended token) and uses sinusoidal positions; we mean-pool
and learn the positions. An accelerator job; `:small` (1,024 bytes, 2 layers of width 64)
and `:smoke` are the CPU variants. Chance is the majority label of the eval file.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "retrieval"
  c.task.seq_len = 4000
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.dropout = 0.1
  c.model.positions = "learned"
  c.model.pooling = "mean"
  c.model.norm = "layernorm"
  c.batch_size = 32
  c.total_steps = 5000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_examples = 18_089  # the whole eval file of the release
  c.optimizer.learning_rate = 0.05 / 8000 ** 0.5
  c.optimizer.schedule = "constant"  # never reached: the warm-up is longer than the run
  c.optimizer.warmup_steps = 8000
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.98
  return base.lra_size(c, arg, "lra_retrieval.py", small_d_model=64)
