"""SLA: SLAB's simplified linear attention (Guo et al. 2024; docs/papers.md#sla).

Q, K, V = X W; a learnable positional embedding P (zero-initialised, one row per
position within the segment, stored [max_len, N, H] = [max_len, D] split like K) is
added to K; phi = ReLU (elementwise, so "over all channels before the head split" is
the same thing per head); per head the normalised linear attention

    O_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + 1e-6)

in fp32 through `layers.linear.core.linear_attention(normalize=True)` (no 1/sqrt(d));
then a depth-wise convolution of V, with weights shared across heads and a bias, is
added to every head's output before the output projection.

The convolution (config group `model.sla`):
* `grid` (h, w) with T = h w: the paper's 2-D depth-wise conv over the h x w image
  (kernel `conv_kernel` x `conv_kernel`, zero padding, weights [k, k, head_dim]).
  Bidirectional only.
* `grid` = (0, 0) (default): sequences are 1-D, a depth-wise conv1d over the length,
  weights [k, head_dim]: centred (taps -floor(k/2) .. k-1-floor(k/2)) when bidirectional,
  left-only (taps -(k-1) .. 0) when causal.
Either way a tap reads only tokens of the same nonzero segment id (never padding, never
a neighbouring packed example) and padding rows output zeros.

Causal SLA is this repository's extension (the paper is bidirectional): the causal
linear attention of the shared core plus the causal conv. Decoding (causal only) keeps
the core's linear state and the last k - 1 real rows of V with their segment ids and
positions (taps into that history follow positions, so a right-padded prompt decodes
like an unpadded one, as in the core).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers.core import param
from layers.linear.linear import KernelAttention
from layers.attention.swin import parse_grid
from layers.mixer_base import MixContext, MixerSpec, sequence_parallel


def conv_taps(k: int, causal: bool) -> tuple[int, int]:
  """(left, right) reach of a 1-D kernel of k taps: output t reads t - left .. t + right."""
  return (k - 1, 0) if causal else (k // 2, k - 1 - k // 2)


def depthwise_conv1d(v_btnh, segment_ids_bt, weight_kh, bias_h, *, causal: bool):
  """sum_j w[j] v[t + j - left], each tap only where its token has t's nonzero segment id (fp32).

  Heads share the [k, H] weights; padding rows output zeros.
  """
  k = weight_kh.shape[0]
  left, right = conv_taps(k, causal)
  t = v_btnh.shape[1]
  v = jnp.pad(v_btnh.astype(jnp.float32), [(0, 0), (left, right), (0, 0), (0, 0)])
  seg = segment_ids_bt.astype(jnp.int32)
  segp = jnp.pad(seg, [(0, 0), (left, right)])
  out = jnp.zeros(v_btnh.shape, jnp.float32)
  for j in range(k):
    same = (segp[:, j:j + t] == seg) & (seg != 0)
    out = out + jnp.where(same[:, :, None, None], v[:, j:j + t] * weight_kh[j], 0.0)
  return jnp.where((seg != 0)[:, :, None, None], out + bias_h, 0.0)


def sequence_conv1d(sp, v_btnh, segment_ids_bt, weight_kh, bias_h, *, causal: bool, logical: tuple):
  """`depthwise_conv1d` with the length sharded by the sequence-parallel strategy `sp` (a halo
  of the kernel's reach from each neighbour), or on one device when `sp` is None."""
  if sp is None:
    return depthwise_conv1d(v_btnh, segment_ids_bt, weight_kh, bias_h, causal=causal)
  left, right = conv_taps(weight_kh.shape[0], causal)
  conv = lambda v, seg, w, b: depthwise_conv1d(v, seg, w, b, causal=causal)
  return sp.halo(conv, v_btnh, segment_ids_bt, weight_kh, bias_h, left=left, right=right, logical=logical)


def conv_from_history(v_bsnh, seg_bs, pos_bs, segment_ids_bt, positions_bt, weight_kh) -> jax.Array:
  """The causal taps that reach earlier tokens kept from previous decode calls (fp32).

  History entry s adds w[k-1 - (p_t - p_s)] v_s to token t when both share a nonzero
  segment id and 0 < p_t - p_s <= k - 1: taps follow positions, so padding stored
  between a prompt and its continuation leaves no gap.
  """
  k = weight_kh.shape[0]
  seg, pos = segment_ids_bt.astype(jnp.int32), positions_bt.astype(jnp.int32)
  lag = pos[:, :, None] - pos_bs[:, None, :]  # [B, T, S]
  ok = (seg[:, :, None] == seg_bs[:, None, :]) & (seg != 0)[:, :, None] & (lag > 0) & (lag < k)
  taps = jnp.where(ok[..., None], weight_kh[jnp.clip(k - 1 - lag, 0, k - 1)], 0.0)  # [B, T, S, H]
  return jnp.einsum("btsh,bsnh->btnh", taps, v_bsnh.astype(jnp.float32))


def last_real_tokens(keep: int, *arrays_and_ids):
  """The last `keep` tokens with a nonzero id of each row, oldest first (empty slots: id 0).

  Arguments are ([B, L, ...] arrays ..., ids [B, L]); returns them gathered to [B, keep, ...].
  """
  *arrays, ids = arrays_and_ids
  real = ids != 0
  from_end = jnp.flip(jnp.cumsum(jnp.flip(real, axis=1), axis=1), axis=1)  # real tokens at or after i
  slot_of = jnp.where(real, keep - from_end, -1)  # newest real token -> slot keep - 1
  onehot = slot_of[:, :, None] == jnp.arange(keep)  # [B, L, keep]
  gather = lambda x: jnp.einsum("bls,bl...->bs...", onehot.astype(jnp.float32), x.astype(jnp.float32))
  out = [gather(x).astype(x.dtype) for x in arrays]
  return (*out, gather(ids).astype(ids.dtype))


def conv_decode_step(out_btnh, x_btnh, ctx, weight_kh, value_cache, segment_cache, position_cache):
  """Decode for a causal depth-wise conv: `out` (this call's own taps, `depthwise_conv1d`) plus
  the taps reaching the k - 1 real tokens kept from earlier calls; then the caches ([B, k-1,
  N, H] values with their segment ids and positions, nnx.Cache) keep the last k - 1 real
  tokens (padding skipped). Shared by `sla` (its conv on V) and `conv`."""
  seg, pos = ctx.segment_ids.astype(jnp.int32), ctx.positions.astype(jnp.int32)
  hist_x, hist_seg, hist_pos = value_cache[...], segment_cache[...], position_cache[...]
  out = out_btnh + conv_from_history(hist_x, hist_seg, hist_pos, seg, pos, weight_kh)
  value_cache[...], position_cache[...], segment_cache[...] = last_real_tokens(
      hist_x.shape[1], jnp.concatenate([hist_x, x_btnh.astype(hist_x.dtype)], axis=1),
      jnp.concatenate([hist_pos, pos], axis=1), jnp.concatenate([hist_seg, seg], axis=1))
  return out


def depthwise_conv2d(v_btnh, segment_ids_bt, weight_kkh, bias_h, *, grid: tuple[int, int]):
  """The 2-D version over a row-major h x w grid (zero padding, centred taps), fp32."""
  b, t, n, hd = v_btnh.shape
  gh, gw = grid
  if gh * gw != t:
    raise ValueError(f"model.sla.grid={grid} has {gh * gw} cells but the sequence has {t} tokens")
  k = weight_kkh.shape[0]
  left, right = conv_taps(k, causal=False)
  v = v_btnh.astype(jnp.float32).reshape(b, gh, gw, n, hd)
  seg = segment_ids_bt.astype(jnp.int32).reshape(b, gh, gw)
  v = jnp.pad(v, [(0, 0), (left, right), (left, right), (0, 0), (0, 0)])
  segp = jnp.pad(seg, [(0, 0), (left, right), (left, right)])
  out = jnp.zeros((b, gh, gw, n, hd), jnp.float32)
  for dy in range(k):
    for dx in range(k):
      same = (segp[:, dy:dy + gh, dx:dx + gw] == seg) & (seg != 0)
      out = out + jnp.where(same[..., None, None], v[:, dy:dy + gh, dx:dx + gw] * weight_kkh[dy, dx], 0.0)
  out = jnp.where((seg != 0)[..., None, None], out + bias_h, 0.0)
  return out.reshape(b, t, n, hd)


class SLA(KernelAttention):
  """Simplified linear attention (config group `model.sla`; see the module docstring).

  Options: `grid` ((0, 0) = 1-D, else (h, w) with T = h w; bidirectional only),
  `conv_kernel` (k, default 5), `chunk` (causal scan chunk, 64), `eps` (1e-6, added to
  the denominator).
  """

  ORDER_AWARE = True  # its learned position embedding (added to K) and the conv on V see order
  NORMALIZE = True

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.grid = parse_grid(spec.option("grid", (0, 0)), "model.sla.grid")
    self.conv_kernel = int(spec.option("conv_kernel", 5))
    if self.conv_kernel < 1:
      raise ValueError(f"model.sla.conv_kernel={self.conv_kernel} must be a positive number of taps")
    if self.grid is not None and spec.causal:
      raise ValueError(f"model.sla.grid={self.grid} (a 2-D conv) is bidirectional only; use grid=(0, 0) "
                       f"for a causal model")
    n, h, k = spec.num_heads, spec.head_dim, self.conv_kernel
    self.position = param(rngs, jax.nn.initializers.zeros, (spec.max_len, n, h), (None, axes.HEADS, axes.HEAD_DIM))
    # PyTorch's Conv default: uniform with bound 1 / sqrt(fan_in), fan_in = taps of one channel.
    conv_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    if self.grid is None:
      self.conv_weight = param(rngs, conv_init, (k, h), (None, axes.HEAD_DIM))
    else:
      self.conv_weight = param(rngs, conv_init, (k, k, h), (None, None, axes.HEAD_DIM))
    self.conv_bias = param(rngs, jax.nn.initializers.zeros, (h,), (axes.HEAD_DIM,))

  def features(self, q_btnh, k_btnh, ctx: MixContext):
    # Positions past the table reuse its last row.
    pos = jnp.take(self.position[...], ctx.positions.astype(jnp.int32), axis=0, mode="clip")
    return jax.nn.relu(q_btnh.astype(jnp.float32)), jax.nn.relu(k_btnh.astype(jnp.float32) + pos)

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    if self.grid is not None and self.grid[0] * self.grid[1] != x_btd.shape[1]:
      raise ValueError(f"model.sla.grid={self.grid} has {self.grid[0] * self.grid[1]} cells but the sequence has "
                       f"{x_btd.shape[1]} tokens")
    q, k, v = self.projections(x_btd)
    phi_q, phi_k = self.features(q, k, ctx)
    o = self.mix(phi_q, phi_k, v, ctx)
    o = o.astype(jnp.float32) + self.conv(v, ctx)
    return self.out(o.astype(x_btd.dtype))

  def conv(self, v_btnh, ctx: MixContext) -> jax.Array:
    w, bias = self.conv_weight[...], self.conv_bias[...]
    if self.grid is not None:
      return depthwise_conv2d(v_btnh, ctx.segment_ids, w, bias, grid=self.grid)
    sp = None if ctx.decode else sequence_parallel(self)
    out = sequence_conv1d(sp, v_btnh, ctx.segment_ids, w, bias, causal=self.spec.causal,
                          logical=(axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
    if not ctx.decode or self.conv_kernel == 1:
      return out
    return conv_decode_step(out, v_btnh, ctx, w, self.cached_conv_value, self.cached_conv_segment_ids,
                            self.cached_conv_positions)

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    super().init_cache(batch, max_len, dtype)  # raises for a bidirectional model
    keep = self.conv_kernel - 1
    n, h = self.spec.num_heads, self.spec.head_dim
    self.cached_conv_value = nnx.Cache(jnp.zeros((batch, keep, n, h), dtype))
    self.cached_conv_segment_ids = nnx.Cache(jnp.zeros((batch, keep), jnp.int32))
    self.cached_conv_positions = nnx.Cache(jnp.zeros((batch, keep), jnp.int32))
