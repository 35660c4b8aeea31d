"""Legendre Memory Unit as the LMUFormer token mixer (docs/papers.md#lmu).

Memory (order q, window theta; fixed, not trained):

    A_ij = (2i+1)/theta * (-1 if i < j else (-1)^(i-j+1)),   B_i = (2i+1)(-1)^i / theta
    Abar = exp(A),  Bbar = A^{-1}(Abar - I) B              zero-order hold, dt = 1
    m_t  = Abar m_{t-1} + Bbar u_t  =  sum_k H_k u_{t-k},   H_k = Abar^k Bbar

The mixer is LMUFormer's `LMU` module (the part that replaces attention), d_model -> d_model:

    u_t = ReLU(x_t e + b_e)                a scalar per token
    h_t = ReLU(W_m m_t + W_x x_t + b_h)     hidden = d_model
    y_t = BatchNorm(W_p h_t + b_p)          the 1x1 Conv1d and BatchNorm1d (norm="none" drops the BN)

`lmu_memory` computes m in four interchangeable ways (`recurrent` is the obviously-
correct twin): `fft` (rFFT of length 2T, O(q T log T)), `direct` (the causal Toeplitz sum,
O(q T^2), for short rows), `chunked` (direct inside chunks of `chunk` tokens, the state
carried across chunks by lax.scan: O(q T (chunk + q))), `recurrent` (lax.scan over tokens,
O(q^2) per token; decoding). Abar, Bbar, H are computed in float64 numpy (matrix
exponential by scaling and squaring) and enter the graph as fp32 constants.

Segments: `reset_bt` zeroes the memory before a token. `direct`, `chunked` and `recurrent`
apply it exactly (the Toeplitz sum only takes lags within the token's segment). A single
FFT convolution cannot, so `fft` switches (lax.cond, at run time) to `chunked` when a batch
holds a reset after token 0, i.e. packed rows; rows of one example plus padding stay on the
FFT. Padding never leaks: u is zero on padding tokens, and a segment that follows another
resets. BatchNorm statistics (training) are taken over non-padding tokens only; in
training mode they are batch-wide, as in the paper, so strict causality holds at
evaluation and decoding, where the running statistics are used.

Causal: the memory is causal. spec.causal=False (classifiers) runs the same causal memory:
LMUFormer itself classifies with it. Decoding keeps m [B, q] in fp32.

Sequence parallelism (not wired here): a chunk of length L from a zero state gives
(m_last from `lmu_memory`, its transition `chunk_transition(reset, order, theta)`: Abar^L, or
0 when the chunk resets); compose (M1, m1) o (M2, m2) = (M2 M1, M2 m1 + m2); correct a
chunk for the incoming m_in by adding `propagate_state(m_in, reset, order, theta)` to its
memory before the (nonlinear) hidden layer, or rerun `lmu_memory(..., m0_bq=m_in)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import axes
from layers.core import Dense, param
from layers.mixer_base import MixContext, Mixer, MixerSpec

IMPLS = ("auto", "fft", "direct", "chunked", "recurrent")
NORMS = ("batchnorm", "none")
# State matmuls in full fp32: TF32 (the GPU default) compounds to ~1e-3 relative error through the recurrence.
HIGHEST = jax.lax.Precision.HIGHEST
BN_MOMENTUM = 0.1  # PyTorch BatchNorm1d defaults, as in LMUFormer
BN_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The fixed Legendre system (float64 numpy)
# ----------------------------------------------------------------------------------------------------------------


def legendre_state_space(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """The continuous (A [q, q], B [q]) of the Legendre delay system."""
  i = np.arange(order)[:, None]
  j = np.arange(order)[None, :]
  r = (2.0 * np.arange(order) + 1.0) / theta
  a = r[:, None] * np.where(i < j, -1.0, (-1.0) ** (i - j + 1))
  b = r * (-1.0) ** np.arange(order)
  return a, b


def expm(m: np.ndarray) -> np.ndarray:
  """Matrix exponential in float64: scale to norm <= 1/2, Taylor series, square back."""
  norm = np.linalg.norm(m, 1)
  squarings = max(0, int(math.ceil(math.log2(norm))) + 1) if norm > 0 else 0
  a = m / 2.0 ** squarings
  out = np.eye(len(m))
  term = np.eye(len(m))
  for k in range(1, 40):
    term = term @ a / k
    out = out + term
    if np.abs(term).max() < 1e-20:
      break
  for _ in range(squarings):
    out = out @ out
  return out


@functools.lru_cache(maxsize=16)
def discrete_system(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """Zero-order hold with dt = 1: expm([[A, B], [0, 0]]) = [[Abar, Bbar], [0, 1]] (no inverse of A needed)."""
  a, b = legendre_state_space(order, theta)
  block = np.zeros((order + 1, order + 1))
  block[:order, :order] = a
  block[:order, order] = b
  e = expm(block)
  return e[:order, :order], e[:order, order]


@functools.lru_cache(maxsize=16)
def _powers_of_two(order: int, theta: float, count: int) -> np.ndarray:
  """[count, q, q]: Abar^(2^j), j = 0..count-1."""
  abar, _ = discrete_system(order, theta)
  out, p = [], abar
  for _ in range(count):
    out.append(p)
    p = p @ p
  return np.stack(out) if out else np.zeros((0, order, order))


@functools.lru_cache(maxsize=16)
def impulse_response(order: int, theta: float, length: int) -> np.ndarray:
  """H [length, q], H_k = Abar^k Bbar, built by doubling: H[n:2n] = H[:n] (Abar^n)^T."""
  _, bbar = discrete_system(order, theta)
  h = bbar[None]
  for p in _powers_of_two(order, theta, max(0, math.ceil(math.log2(max(length, 1))))):
    if len(h) >= length:
      break
    h = np.concatenate([h, h @ p.T], axis=0)
  return h[:length]


def _num_doublings(length: int) -> int:
  return max(0, math.ceil(math.log2(max(length, 1))))


# ----------------------------------------------------------------------------------------------------------------
# The memory
# ----------------------------------------------------------------------------------------------------------------


def propagate_state(m0_bq, reset_bt, order: int, theta: float):
  """[B, T, q]: Abar^(t+1) m0 at token t, zero from the first reset on (the incoming state's share of m)."""
  bsz, t = reset_bt.shape
  pows = jnp.asarray(_powers_of_two(order, theta, _num_doublings(t) + 1), jnp.float32)
  v = jnp.matmul(m0_bq.astype(jnp.float32), pows[0].T, precision=HIGHEST)[:, None]  # token 0: Abar m0
  j = 0
  while v.shape[1] < t:
    # tokens n..2n-1 are Abar^n times tokens 0..n-1
    v = jnp.concatenate([v, jnp.matmul(v, pows[j].T, precision=HIGHEST)], axis=1)
    j += 1
  alive = jnp.cumsum(reset_bt.astype(jnp.int32), axis=1) == 0
  return jnp.where(alive[..., None], v[:, :t], 0.0)


def chunk_transition(reset_bt, order: int, theta: float):
  """[B, q, q]: what a chunk does to its incoming memory (Abar^L, or 0 if it resets)."""
  abar, _ = discrete_system(order, theta)
  power = jnp.asarray(np.linalg.matrix_power(abar, reset_bt.shape[1]), jnp.float32)
  return jnp.where(jnp.any(reset_bt, axis=1)[:, None, None], 0.0, power)


def _memory_recurrent(u_bt, reset_bt, m0_bq, order, theta):
  abar, bbar = (jnp.asarray(v, jnp.float32) for v in discrete_system(order, theta))

  def step(m, inp):
    u, r = inp
    m = jnp.where(r[:, None], 0.0, jnp.matmul(m, abar.T, precision=HIGHEST)) + u[:, None] * bbar
    return m, m

  _, ms = jax.lax.scan(step, m0_bq, (u_bt.T, reset_bt.T))
  return jnp.swapaxes(ms, 0, 1)


def _memory_direct(u_bt, reset_bt, m0_bq, order, theta):
  """m_t = sum_{k <= lags since the last reset} H_k u_{t-k}: a masked causal Toeplitz sum, [B, T, T] weights."""
  bsz, t = u_bt.shape
  h = jnp.asarray(impulse_response(order, theta, t), jnp.float32)
  idx = jnp.arange(t)
  start = jax.lax.cummax(jnp.where(reset_bt, idx, 0), axis=1)  # the latest reset at or before t
  lag = idx[:, None] - idx[None, :]  # [t, k] -> token t - k
  u_lagged = jnp.take(u_bt, jnp.clip(lag, 0, t - 1), axis=1)  # [B, T, T]: u_{t-k}
  visible = idx[None, None, :] <= (idx - start)[:, :, None]
  m = jnp.einsum("btk,kq->btq", jnp.where(visible, u_lagged, 0.0), h, precision=HIGHEST)
  return m if m0_bq is None else m + propagate_state(m0_bq, reset_bt, order, theta)


def _memory_fft_conv(u_bt, m0_bq, reset_bt, order, theta):
  t = u_bt.shape[1]
  n = 2 * t  # linear, not circular, convolution
  h_f = jnp.fft.rfft(jnp.asarray(impulse_response(order, theta, t), jnp.float32), n=n, axis=0)  # [n/2+1, q]
  u_f = jnp.fft.rfft(u_bt, n=n, axis=1)  # [B, n/2+1]
  m = jnp.fft.irfft(u_f[:, :, None] * h_f[None], n=n, axis=1)[:, :t]
  return m if m0_bq is None else m + propagate_state(m0_bq, reset_bt, order, theta)


def _memory_chunked(u_bt, reset_bt, m0_bq, order, theta, chunk):
  bsz, t = u_bt.shape
  cl = max(1, min(chunk, t))
  nc = -(-t // cl)
  pad = nc * cl - t
  if pad:
    u_bt = jnp.pad(u_bt, ((0, 0), (0, pad)))
    reset_bt = jnp.pad(reset_bt, ((0, 0), (0, pad)))
  split = lambda v: jnp.moveaxis(v.reshape(bsz, nc, cl), 1, 0)  # [nc, B, C]

  @jax.checkpoint
  def body(m_in, inp):
    u, r = inp
    m = _memory_direct(u, r, m_in, order, theta)  # local Toeplitz sum + the carried state's share
    return m[:, -1], m

  m0 = jnp.zeros((bsz, order), jnp.float32) if m0_bq is None else m0_bq
  _, ms = jax.lax.scan(body, m0, (split(u_bt), split(reset_bt)))
  return jnp.moveaxis(ms, 0, 1).reshape(bsz, nc * cl, order)[:, :t]


def lmu_memory(u_bt, *, order: int, theta: float, reset_bt=None, m0_bq=None, impl: str = "fft", chunk: int = 64):
  """m_t = Abar m_{t-1} + Bbar u_t (m_{-1} = m0, zeroed before tokens where reset_bt), fp32.

  Returns (m_btq, m_last_bq). impl: "fft" | "direct" | "chunked" | "recurrent" (see the module
  docstring; "auto" is resolved by the mixer).
  """
  if impl not in IMPLS[1:]:
    raise ValueError(f"lmu_memory impl={impl!r} is not one of {IMPLS[1:]}")
  u = jnp.asarray(u_bt, jnp.float32)
  bsz, t = u.shape
  reset = jnp.zeros((bsz, t), bool) if reset_bt is None else jnp.asarray(reset_bt, bool)
  m0 = None if m0_bq is None else jnp.asarray(m0_bq, jnp.float32)
  if impl == "recurrent":
    m0 = jnp.zeros((bsz, order), jnp.float32) if m0 is None else m0
    m = _memory_recurrent(u, reset, m0, order, theta)
  elif impl == "direct":
    m = _memory_direct(u, reset, m0, order, theta)
  elif impl == "chunked":
    m = _memory_chunked(u, reset, m0, order, theta, int(chunk))
  else:
    # One FFT convolution cannot restart the memory inside a row: packed rows take the chunked form.
    m = jax.lax.cond(jnp.any(reset[:, 1:]),
                     lambda u, r: _memory_chunked(u, r, m0, order, theta, int(chunk)),
                     lambda u, r: _memory_fft_conv(u, m0, r, order, theta), u, reset)
  return m, m[:, -1]


# ----------------------------------------------------------------------------------------------------------------
# The mixer
# ----------------------------------------------------------------------------------------------------------------


class MaskedBatchNorm(nnx.Module):
  """BatchNorm over (batch, length) that ignores padding tokens; running stats as nnx.BatchStat."""

  def __init__(self, features: int, *, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (features,), (axes.EMBED,))
    self.bias = param(rngs, jax.nn.initializers.zeros, (features,), (axes.EMBED,))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32), logical_axes=(axes.EMBED,))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32), logical_axes=(axes.EMBED,))

  def __call__(self, x_btd, mask_bt, training: bool):
    x = x_btd.astype(jnp.float32)
    if training:
      w = mask_bt.astype(jnp.float32)[..., None]
      n = jnp.sum(w)
      mean = jnp.sum(w * x, axis=(0, 1)) / jnp.maximum(n, 1.0)
      var = jnp.sum(w * jnp.square(x - mean), axis=(0, 1)) / jnp.maximum(n, 1.0)
      unbiased = jax.lax.stop_gradient(var * n / jnp.maximum(n - 1.0, 1.0))
      self.mean[...] = (1 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * jax.lax.stop_gradient(mean)
      self.var[...] = (1 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * unbiased
    else:
      mean, var = self.mean[...], self.var[...]
    y = (x - mean) * jax.lax.rsqrt(var + BN_EPS) * self.scale[...] + self.bias[...]
    return y.astype(x_btd.dtype)


class LMU(Mixer):
  """LMUFormer's LMU mixer (config group `model.lmu`).

  Options: memory_size (q; 0 = d_model, as LMUFormer), theta (128.0), impl ("auto" = "direct"
  up to direct_max_len tokens, else "fft"; or "fft", "direct", "chunked", "recurrent"),
  direct_max_len (128), chunk (64), norm ("batchnorm" | "none").
  """

  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    d = spec.d_model
    self.spec = spec
    self.order = int(spec.option("memory_size", 0)) or d
    self.theta = float(spec.option("theta", 128.0))
    self.impl = str(spec.option("impl", "auto"))
    self.direct_max_len = int(spec.option("direct_max_len", 128))
    self.chunk = int(spec.option("chunk", 64))
    self.norm_kind = str(spec.option("norm", "batchnorm"))
    if self.impl not in IMPLS:
      raise ValueError(f"model.lmu.impl={self.impl!r} is not one of {', '.join(IMPLS)}")
    if self.norm_kind not in NORMS:
      raise ValueError(f"model.lmu.norm={self.norm_kind!r} is not one of {', '.join(NORMS)}")
    if self.order < 1 or self.chunk < 1:
      raise ValueError(f"model.lmu.memory_size={self.order} and model.lmu.chunk={self.chunk} must be positive")
    if not self.theta > 0:
      raise ValueError(f"model.lmu.theta={self.theta} must be positive")
    e, q, mlp = (axes.EMBED,), self.order, (axes.MLP,)
    self.encoder = Dense((d,), (1,), in_axes=e, out_axes=(None,), rngs=rngs, use_bias=True)
    # W_h [m; x] split in two, each part scaled so the whole has fan-in q + d.
    self.hidden_m = Dense((q,), (d,), in_axes=(axes.STATE,), out_axes=mlp, rngs=rngs, use_bias=True,
                          init_scale=math.sqrt(q / (q + d)))
    self.hidden_x = Dense((d,), (d,), in_axes=e, out_axes=mlp, rngs=rngs, init_scale=math.sqrt(d / (q + d)))
    self.proj = Dense((d,), (d,), in_axes=mlp, out_axes=e, rngs=rngs, use_bias=True)
    self.norm = MaskedBatchNorm(d, rngs=rngs) if self.norm_kind == "batchnorm" else None

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    self.memory = nnx.Cache(jnp.zeros((batch, self.order), jnp.float32))
    self.last_segment_id = nnx.Cache(jnp.zeros((batch,), jnp.int32))

  def resolved_impl(self, length: int) -> str:
    if self.impl == "auto":
      return "direct" if length <= self.direct_max_len else "fft"
    return self.impl

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    if ctx.index is not None:
      raise ValueError("lmu needs tokens in storage order; a permuted layout (ctx.index, e.g. zigzag "
                       "load balancing) is not supported")
    seg = ctx.segment_ids.astype(jnp.int32)
    real = seg != 0
    u = jnp.where(real, jax.nn.relu(self.encoder(x_btd)[..., 0].astype(jnp.float32)), 0.0)
    t = x_btd.shape[1]
    if ctx.decode:
      if getattr(self, "memory", None) is None:
        raise ValueError("decode=True needs init_cache(batch, max_len, dtype) first")
      # The cached memory may be nonzero after padding too: every new nonzero segment restarts it.
      previous = jnp.concatenate([self.last_segment_id[...][:, None], seg[:, :-1]], axis=1)
      reset = (seg != previous) & real
      impl = "recurrent" if t == 1 else self.resolved_impl(t)
      m, m_last = lmu_memory(u, order=self.order, theta=self.theta, reset_bt=reset, m0_bq=self.memory[...],
                             impl=impl, chunk=self.chunk)
      self.memory[...] = m_last
      self.last_segment_id[...] = seg[:, -1]
    else:
      # Restart at a segment start only after an earlier real token (before it the memory is still 0),
      # so rows of one example after left padding keep the FFT path.
      previous = jnp.concatenate([jnp.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
      seen = jnp.cumsum(real.astype(jnp.int32), axis=1) - real.astype(jnp.int32) > 0
      reset = (seg != previous) & real & seen
      m, _ = lmu_memory(u, order=self.order, theta=self.theta, reset_bt=reset, impl=self.resolved_impl(t),
                        chunk=self.chunk)
    h = jax.nn.relu(self.hidden_m(m.astype(x_btd.dtype)) + self.hidden_x(x_btd))
    y = self.proj(h)
    if self.norm is not None:
      y = self.norm(y, real, ctx.training)
    return jnp.where(real[..., None], y, 0).astype(x_btd.dtype)
