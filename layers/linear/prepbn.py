"""PRepBN: progressive re-parameterised BatchNorm (SLAB, Guo et al. 2024; docs/papers.md#prepbn).

    RepBN(x) = BN(x) + eta x          (eta a learnable scalar, initialised to 1)
    training:  y = gamma LN(x) + (1 - gamma) RepBN(x)
    inference: y = RepBN(x) with running statistics = x * scale + shift (`fold()`)

BN normalises every channel with the mean and (biased) variance over batch x tokens,
counting only real tokens (segment id != 0), and has a learnable affine; LN is a
LayerNorm over channels with a learnable affine. Both use `eps`.

The schedule follows the official `LinearNorm`: during the first `warmup_steps`
training steps gamma = 1 (pure LN; the BN statistics are not updated either, since the
original never calls BN then); afterwards gamma = r0 (T_total - (step - warmup)) /
T_total, clipped to [0, 1], which reaches 0 after `total_steps` more steps and stays 0.

Running statistics (nnx.BatchStat) follow the Flax convention with momentum m:
running = m running + (1 - m) batch (m = 0.9 is PyTorch's momentum=0.1); like
PyTorch's BatchNorm1d, which SLAB uses, the running variance takes the unbiased batch
variance (n / (n - 1)). They change only in training calls, after warm-up, and only
when the batch has a real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers.core import param


def prepbn_gamma(step, *, total_steps: int, warmup_steps: int = 0, r0: float = 1.0) -> jax.Array:
  """The LN weight gamma at a training step (fp32 scalar)."""
  s = jnp.asarray(0 if step is None else step, jnp.float32)
  rem = jnp.maximum(0.0, total_steps - (s - warmup_steps))
  g = jnp.clip(r0 * rem / total_steps, 0.0, 1.0)
  return jnp.where(s < warmup_steps, 1.0, g)


class PRepBN(nnx.Module):
  """gamma LN + (1 - gamma) RepBN in training, RepBN (a per-channel affine) at inference."""

  def __init__(self, d_model: int, *, total_steps: int, warmup_steps: int = 0, r0: float = 1.0,
               momentum: float = 0.9, eps: float = 1e-5, rngs: nnx.Rngs):
    if total_steps < 1:
      raise ValueError(f"model.prepbn.total_steps={total_steps} must be a positive number of steps")
    if warmup_steps < 0:
      raise ValueError(f"model.prepbn.warmup_steps={warmup_steps} must be >= 0")
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"PRepBN momentum={momentum} must be in [0, 1)")
    self.total_steps, self.warmup_steps, self.r0 = int(total_steps), int(warmup_steps), float(r0)
    self.momentum, self.eps = float(momentum), float(eps)
    e = (axes.EMBED,)
    ones, zeros = jax.nn.initializers.ones, jax.nn.initializers.zeros
    self.ln_scale = param(rngs, ones, (d_model,), e)
    self.ln_bias = param(rngs, zeros, (d_model,), e)
    self.bn_scale = param(rngs, ones, (d_model,), e)
    self.bn_bias = param(rngs, zeros, (d_model,), e)
    self.eta = param(rngs, ones, (), ())
    self.running_mean = nnx.BatchStat(jnp.zeros((d_model,), jnp.float32), logical_axes=e)
    self.running_var = nnx.BatchStat(jnp.ones((d_model,), jnp.float32), logical_axes=e)

  def gamma(self, step) -> jax.Array:
    return prepbn_gamma(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, r0=self.r0)

  def fold(self) -> tuple[jax.Array, jax.Array]:
    """Per-channel (scale, shift) with inference RepBN(x) = x * scale + shift."""
    inv = self.bn_scale[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
    return inv + self.eta[...], self.bn_bias[...] - self.running_mean[...] * inv

  def layer_norm(self, x32: jax.Array) -> jax.Array:
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.ln_scale[...] + self.ln_bias[...]

  def __call__(self, x_btd: jax.Array, *, segment_ids: jax.Array, training: bool, step) -> jax.Array:
    x32 = x_btd.astype(jnp.float32)
    if not training:
      scale, shift = self.fold()
      return (x32 * scale + shift).astype(x_btd.dtype)
    real = (segment_ids != 0).astype(jnp.float32)[..., None]  # [B, T, 1]
    count = jnp.sum(real)
    n = jnp.maximum(count, 1.0)
    mean = jnp.sum(x32 * real, axis=(0, 1)) / n
    var = jnp.sum(jnp.square(x32 - mean) * real, axis=(0, 1)) / n
    bn = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.bn_scale[...] + self.bn_bias[...]
    rep = bn + self.eta[...] * x32
    g = self.gamma(step)
    y = g * self.layer_norm(x32) + (1.0 - g) * rep

    s = jnp.asarray(0 if step is None else step, jnp.int32)
    update = (s >= self.warmup_steps) & (count > 0)
    m = self.momentum
    unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
    batch_mean, batch_var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(unbiased)
    self.running_mean[...] = jnp.where(update, m * self.running_mean[...] + (1 - m) * batch_mean,
                                       self.running_mean[...])
    self.running_var[...] = jnp.where(update, m * self.running_var[...] + (1 - m) * batch_var,
                                      self.running_var[...])
    return y.astype(x_btd.dtype)
