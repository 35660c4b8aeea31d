"""The framework's overhead: `trainer.train`'s compiled train step against a minimal hand-written one.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/bench_overhead.py [--rounds 5]

Both train the same model (built by `layers.models.build_model` from the same spec and
seed) on the same batches in the same process:

- seqmix: `Experiment.compiled_train_step()`, i.e. flat named parameters, the configured
  optimizer (clipping, AdamW with a decay mask, the schedule), the step's metrics (loss,
  accuracy, gradient norm, real-token count, learning rate), the state donated;
- hand-written: `nnx.split` once, then a jitted function of (params, opt_state, batch)
  that merges the module, takes the weighted cross-entropy's gradient and applies
  `optax.chain(clip_by_global_norm, adamw)` with the same settings, params donated.

The steps are timed alternately (one of each per round, `--steps` steps each, blocking on
the result), so drift of the machine affects both alike; the table gives each one's
median step time and their ratio (target: at most 1.05).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from layers.models import build_model  # noqa: E402
from trainer import optim  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.experiment import Experiment  # noqa: E402


def hand_written_step(spec, cfg):
  graphdef, params = nnx.split(build_model(spec, cfg.seed), nnx.Param)
  o = cfg.optimizer
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                   optax.adamw(optim.schedule(o, cfg.total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                               weight_decay=o.weight_decay,
                               mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))

  def loss_fn(p, batch):
    logits = nnx.merge(graphdef, p)(batch, training=True)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  def step(p, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="steps per round and side")
  p.add_argument("--overrides", default="task.seq_len=512,batch_size=8,model.d_model=256,model.num_layers=4",
                 help="comma-separated config overrides of configs/default.py")
  args = p.parse_args()
  over = ["mesh.data=1", "eval_examples=1", "optimizer.weight_decay=0.1", *args.overrides.split(",")]
  cfg = load_config("configs/default.py", over)
  with tempfile.TemporaryDirectory() as wd:
    exp = Experiment(cfg, os.path.join(wd, "none"), read_only=True)
    ours = exp.compiled_train_step()
    state = exp.fresh_state()
    batches = [exp.train_batch(s) for s in range(args.steps)]
    hand, params, opt_state = hand_written_step(exp.spec, cfg)
    state, m = ours(state, batches[0])  # warm-up (compilation) of both
    params, opt_state, loss = hand(params, opt_state, batches[0])
    jax.block_until_ready((m, loss))
    first = (float(m["loss"]), float(loss))  # the same model, init and batch: the same loss
    times = {"seqmix": [], "hand-written": []}
    for _ in range(args.rounds):
      t0 = time.perf_counter()
      for b in batches:
        state, m = ours(state, b)
      jax.block_until_ready(m)
      times["seqmix"].append((time.perf_counter() - t0) / len(batches))
      t0 = time.perf_counter()
      for b in batches:
        params, opt_state, loss = hand(params, opt_state, b)
      jax.block_until_ready(loss)
      times["hand-written"].append((time.perf_counter() - t0) / len(batches))
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"{', '.join(over)}; {jax.devices()[0].platform}, {len(jax.devices())} device(s); "
        f"{args.rounds} rounds x {args.steps} steps each\n")
  print(f"first step's loss: seqmix {first[0]:.6f}, hand-written {first[1]:.6f}\n")
  print("| train step | median step (ms) | vs hand-written |")
  print("|---|---|---|")
  for k in ("seqmix", "hand-written"):
    print(f"| {k} | {med[k] * 1e3:.1f} | {med[k] / med['hand-written']:.3f} |")


if __name__ == "__main__":
  main()
