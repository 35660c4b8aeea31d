"""The optimizer from `config.optimizer`: AdamW, warmup + cosine/rsqrt/constant, clipping."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  peak, warm = opt_cfg.learning_rate, max(int(opt_cfg.warmup_steps), 0)
  warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
  rest = max(total_steps - warm, 1)
  if opt_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=opt_cfg.end_lr_ratio)
  elif opt_cfg.schedule == "rsqrt":
    after = lambda s: peak * jnp.sqrt(max(warm, 1) / (s + max(warm, 1)))
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warmup, after], [warm]) if warm else after


def decay_mask(params: dict, no_decay=frozenset()) -> dict:
  """Weight decay on matrices only: norms' scales, biases and the parameters named in
  `no_decay` (declared weight_decay=False, e.g. Mamba's A_log) are left alone."""
  return {k: len(v.shape) >= 2 and not k.endswith("bias") and k not in no_decay for k, v in params.items()}


def make_optimizer(opt_cfg, total_steps: int, params: dict, skip_nonfinite: bool,
                   no_decay=frozenset()) -> optax.GradientTransformation:
  parts = []
  if opt_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  parts.append(optax.adamw(schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=decay_mask(params, no_decay)))
  tx = optax.chain(*parts)
  if skip_nonfinite:
    # A step whose gradients are not finite leaves params and moments unchanged.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
  return tx
