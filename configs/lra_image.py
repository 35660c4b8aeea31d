"""Long Range Arena Image: CIFAR-10 as 1,024 grey-level tokens (`cifar10` through TFDS).

    python -m trainer.train --config=configs/lra_image.py --workdir=runs/lra_image \\
        --config.task.tfds.data_dir=/path/to/tensorflow_datasets

needs `cifar10` prepared in that directory (README: "Real data"). Settings from the LRA
repository's image/configs/cifar10/base_cifar10_config.py: splits train[:90%] /
train[90%:] / test, batch 256, 200 epochs of 45,000 images = 35,000 steps, Adam (b2 0.98),
no weight decay, learning rate 5e-4 with 175 warm-up steps and cosine decay, 1 layer of
width 32 with 1 head and MLP 64, dropout 0.3, learned positions. Pixels become grey levels
as `tf.image.rgb_to_grayscale` makes them, token = level + 1 (LRA uses the level itself,
so its black pixels read as padding; ours do not). The grid is 32 x 32, which 2-D mixers
(`swin`, `sla`) take from the task when their `grid` is left at (0, 0).

LRA's file is known to differ from the runs behind its paper's table; the setting reported
to reproduce its Transformer number (1 layer, width 128, 8 heads, MLP 128) is `:paper`.
Deviation: we mean-pool (LRA pools a CLS token). An accelerator job; `:small` (width 64,
2 layers, 3,000 steps) and `:smoke` are the CPU variants. Chance is the majority label
(0.1 on CIFAR-10).
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task.name = "tfds"
  c.task.seq_len = 1024
  c.task.tfds.name = "cifar10"
  c.task.tfds.train_split = "train[:90%]"
  c.task.tfds.validation_split = "train[90%:]"
  c.task.tfds.test_split = "test"
  c.task.tfds.kind = "classify"
  c.task.tfds.inputs = "image"
  c.task.tfds.label = "label"
  c.task.tfds.encoding = "grey"
  c.model.num_layers = 1
  c.model.d_model = 32
  c.model.num_heads = 1
  c.model.mlp_ratio = 2
  c.model.dropout = 0.3
  c.model.positions = "learned"
  c.model.pooling = "mean"
  c.model.norm = "layernorm"
  c.batch_size = 256
  c.total_steps = 35000
  c.eval_every = 1750
  c.checkpoint_every = 1750
  c.eval_examples = 5000  # all of train[90%:]
  c.optimizer.learning_rate = 5e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.end_lr_ratio = 0.0
  c.optimizer.warmup_steps = 175
  c.optimizer.weight_decay = 0.0
  c.optimizer.b2 = 0.98
  c.optimizer.grad_clip = 0.0
  if arg == "paper":
    c.model.d_model = 128
    c.model.num_heads = 8
    c.model.mlp_ratio = 1
  elif arg == "small":
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 2
    c.batch_size = 64
    c.total_steps = 3000
    c.eval_every = 500
    c.checkpoint_every = 500
    c.eval_examples = 1024
    c.optimizer.learning_rate = 1e-3
  elif arg == "smoke":
    base.shrink_to_smoke(c)
    c.optimizer.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/lra_image.py takes no argument, 'paper', 'small' or 'smoke', not {arg!r}")
  return c
