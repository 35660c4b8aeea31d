"""Long Range Arena Pathfinder (32 x 32) and Path-X (128 x 128): are the two markers joined by a curve?

    python -m trainer.train --config=configs/lra_pathfinder.py --workdir=runs/lra_pathfinder
    python -m trainer.train --config=configs/lra_pathfinder.py:pathx --workdir=runs/lra_pathx

Images are generated locally and deterministically (trainer/data/pathfinder.py, contour
length 14: LRA's "hard" split); `python -m trainer.data.inspect --config=... --png=DIR`
draws some. Settings from the LRA repository's image/configs/pathfinder32/
base_pathfinder32_config.py with its Transformer overrides: batch 512, 200 epochs of
160,000 images = 62,400 steps, Adam (b2 0.98), learning rate 1e-3 with 312 warm-up steps
and cosine decay, no weight decay, 1 layer of width 128 with 4 heads and MLP 128, dropout
0.2, mean pooling. LRA's fixed sinusoidal positions were reported to leave the model at
chance and learned ones to reach ~70%; we learn them.

`:pathx` follows pathfinder128/base_pathfinder128_config.py: 16,384 tokens, batch 64,
500,000 steps, 2,500 warm-up steps, gradient clipping at 1.0, 1 layer of width 32, 2 heads,
MLP 32, dropout 0.1 (every LRA model failed it). `:64` is pathfinder64's (batch 256, 2 layers
of width 32, 4 heads, MLP 32). All three are accelerator jobs. `:small` (32 x 32 at the
easiest contour length, 6, 2 layers of width 64, batch 32) trains at 0.16 steps/s on 2 CPU
cores (scripts/bench_data.py), so its 1,500 steps take ~2.6 hours: not yet a CPU-sized run,
and its accuracy is not yet measured. `:smoke` (16 x 16) runs in seconds. Chance is 0.5
(balanced labels).
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "pathfinder"
  c.task.pathfinder.resolution = 32
  c.task.seq_len = 32 * 32
  c.task.pathfinder.contour_length = 14
  c.model.num_layers = 1
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.mlp_ratio = 1
  c.model.dropout = 0.2
  c.model.positions = "learned"
  c.model.pooling = "mean"
  c.model.norm = "layernorm"
  c.batch_size = 512
  c.total_steps = 62_400
  c.eval_every = 3120
  c.checkpoint_every = 3120
  c.eval_examples = 4096
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.end_lr_ratio = 0.0
  c.optimizer.warmup_steps = 312
  c.optimizer.weight_decay = 0.0
  c.optimizer.b2 = 0.98
  c.optimizer.grad_clip = 0.0
  if arg == "pathx":
    c.task.pathfinder.resolution = 128
    c.task.seq_len = 128 * 128
    c.model.d_model, c.model.num_heads, c.model.dropout = 32, 2, 0.1
    c.batch_size = 64
    c.total_steps = 500_000
    c.eval_every = c.checkpoint_every = 25_000
    c.optimizer.warmup_steps = 2500
    c.optimizer.grad_clip = 1.0
  elif arg == "64":
    c.task.pathfinder.resolution = 64
    c.task.seq_len = 64 * 64
    c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 32, 4
    c.batch_size = 256
  elif arg == "small":
    c.task.pathfinder.contour_length = 6
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.mlp_ratio = 2
    c.model.dropout = 0.0
    c.batch_size = 32
    c.total_steps = 1500
    c.eval_every = 250
    c.checkpoint_every = 250
    c.eval_examples = 512
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 100
  elif arg == "smoke":
    c.task.pathfinder.resolution = 16
    c.task.seq_len = 16 * 16
    c.task.pathfinder.contour_length = 4
    c.task.pathfinder.num_distractors = 1
    base.shrink_to_smoke(c)
    c.optimizer.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/lra_pathfinder.py takes no argument, 'pathx', '64', 'small' or 'smoke', not {arg!r}")
  return c
