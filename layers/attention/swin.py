"""Swin attention (Liu et al. 2021): window attention, shifted windows, relative position bias.

Tokens lie on an h x w grid (option `grid`, row-major) or on a line (`grid` = 0: a
1 x T grid). Attention stays inside non-overlapping M x M windows (M tokens in 1-D).
On every second Swin layer (`spec.alternation_index` odd: counted among the Swin layers of
a mixed schedule) the grid is cyclically shifted by
(-floor(M/2), -floor(M/2)) before windowing and shifted back afterwards; the windows
that wrap around the edge hold tokens from opposite ends of the grid, and a region
mask (3 x 3 regions: the paper's "efficient batch computation for shifted
configuration") keeps those apart. Every logit gets a learned bias B[head, dy, dx]
from a table of (2M-1)^2 entries per head ((2M-1) in 1-D), indexed by the relative
offset of the two tokens. Each axis no longer than M gets one window and no shift,
axis by axis (needed for the 1-D layout). The official implementation instead sets the
window to min(h, w) and the shift to 0 on both axes once min(h, w) <= M, so the two differ
on elongated grids (e.g. 4 x 16 with M = 8: 4 x 8 windows shifted along the long axis
here, 4 x 4 windows unshifted there).

Grid sides that are not multiples of M are padded (segment id 0, masked), so any
T works. Causal: defined for the 1-D layout only, as window attention with j <= i
inside each window (shifted or not, a window's tokens keep their order). On a 2-D grid
"earlier" has no meaning that windows respect, so causal use is an error.

The dense twin (`reference_swin`) never shifts anything: the shifted windows are, in
original coordinates, windows of M offset by M - floor(M/2) (the first and last are
cut short), so it builds the [T, T] mask from window ids floor((y + offset) / M), adds
the bias gathered by (y_i - y_j, x_i - x_j), and takes a masked softmax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.reference import MASK_VALUE, make_mask
from layers import axes
from layers.attention.exact import Attention
from layers.attention.patterns import WholeSequenceMixin, row_index
from layers.core import param
from layers.mixer_base import MixContext, MixerSpec


def parse_grid(value, key: str = "model.swin.grid") -> tuple[int, int] | None:
  """`grid` option: 0 / (0, 0) / "" = 1-D; (h, w) or "HxW" = a 2-D grid."""
  if value in (0, None, "") or (isinstance(value, (tuple, list)) and tuple(value) == (0, 0)):
    return None
  try:
    if isinstance(value, str):
      value = tuple(int(p) for p in value.lower().split("x"))
    h, w = (int(p) for p in value)
  except (TypeError, ValueError):
    h = w = 0
  if h < 1 or w < 1:
    raise ValueError(f"{key}={value!r} must be 0 or (0, 0) (1-D) or a grid (h, w) / 'HxW' of positive sides")
  return h, w


def table_size(window: int, two_d: bool) -> int:
  return (2 * window - 1) ** 2 if two_d else 2 * window - 1


def _plan(t: int, window: int, grid, shifted: bool):
  """((rows, window rows, shift rows), (cols, window cols, shift cols)) for a row of length t."""
  if grid is None:
    dims = (1, t)
  else:
    dims = tuple(grid)
    if dims[0] * dims[1] != t:
      raise ValueError(f"swin.grid={dims} has {dims[0] * dims[1]} cells but the sequence has {t} tokens")
  plan = []
  for dim in dims:
    win = min(window, dim)
    shift = window // 2 if shifted and dim > window else 0
    plan.append((dim, win, shift))
  return tuple(plan)


def _relative_index(dy, dx, window: int, two_d: bool):
  """Row of the bias table for offsets (dy, dx), |dy|, |dx| < window."""
  if two_d:
    return (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
  return dx + window - 1


def _regions(size: int, win: int, shift: int) -> np.ndarray:
  """Region label of each shifted coordinate along one axis: 0 unless inside the last
  window, where 1 = tokens from the grid's far end, 2 = tokens that wrapped around."""
  p = np.arange(size)
  if shift == 0:
    return np.zeros(size, np.int32)
  return np.where(p < size - win, 0, np.where(p < size - shift, 1, 2)).astype(np.int32)


def swin_attention(q_btnh, k_btkh, v_btkh, segment_ids, bias_np, *, window: int, grid=None, shifted: bool,
                   causal: bool) -> jax.Array:
  """Window attention with cyclic shift + region mask and relative position bias.

  bias_np: [N, (2M-1)^2] (2-D) or [N, 2M-1] (1-D). Cost O(T M^2) (2-D) / O(T M) (1-D).
  """
  if causal and grid is not None:
    raise ValueError("swin: causal attention is only defined for the 1-D layout (swin.grid=0)")
  b, t, n, h = q_btnh.shape
  kvh = k_btkh.shape[2]
  g = n // kvh
  two_d = grid is not None
  (hy, my, sy), (hx, mx, sx) = _plan(t, window, grid, shifted)
  hp, wp = -(-hy // my) * my, -(-hx // mx) * mx
  nwy, nwx, nw = hp // my, wp // mx, my * mx

  def to_windows(x):  # [B, T, ...] -> [B, nwy, nwx, my*mx, ...], shifted
    x = x.reshape((b, hy, hx) + x.shape[2:])
    widths = [(0, 0)] * x.ndim
    widths[1], widths[2] = (0, hp - hy), (0, wp - hx)
    x = jnp.roll(jnp.pad(x, widths), (-sy, -sx), axis=(1, 2))
    x = x.reshape((b, nwy, my, nwx, mx) + x.shape[3:])
    x = jnp.swapaxes(x, 2, 3)
    return x.reshape((b, nwy, nwx, nw) + x.shape[5:])

  def from_windows(x):  # inverse of to_windows
    x = x.reshape((b, nwy, nwx, my, mx) + x.shape[4:])
    x = jnp.swapaxes(x, 2, 3).reshape((b, hp, wp) + x.shape[5:])
    x = jnp.roll(x, (sy, sx), axis=(1, 2))[:, :hy, :hx]
    return x.reshape((b, t) + x.shape[3:])

  qw = to_windows(q_btnh).reshape(b, nwy, nwx, nw, kvh, g, h)
  kw, vw = to_windows(k_btkh), to_windows(v_btkh)
  segw = to_windows(segment_ids.astype(jnp.int32))  # [B, nwy, nwx, W]
  # Static per-window structure: region labels (shifted layers), causal order, bias rows.
  label = (_regions(hp, my, sy)[:, None] * 3 + _regions(wp, mx, sx)[None, :]).reshape(nwy, my, nwx, mx)
  label = label.transpose(0, 2, 1, 3).reshape(nwy, nwx, nw)
  static = label[:, :, :, None] == label[:, :, None, :]  # [nwy, nwx, W, W]
  ly, lx = np.arange(nw) // mx, np.arange(nw) % mx
  if causal:
    static = static & (np.arange(nw)[:, None] >= np.arange(nw)[None, :])
  rel = _relative_index(ly[:, None] - ly[None, :], lx[:, None] - lx[None, :], window, two_d)
  bias = jnp.asarray(bias_np, jnp.float32)[:, rel].reshape(kvh, g, nw, nw)
  mask = jnp.asarray(static)[None] & (segw[..., :, None] == segw[..., None, :]) & (segw[..., :, None] > 0)
  mask = mask[:, :, :, None, None]  # [B, nwy, nwx, 1, 1, W, W]
  s = jnp.einsum("byxqkgh,byxskh->byxkgqs", qw, kw, preferred_element_type=jnp.float32) / math.sqrt(h) + bias
  s = jnp.where(mask, s, MASK_VALUE)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  p = jnp.where(mask, p, 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  o = jnp.einsum("byxkgqs,byxskh->byxqkgh", p, vw.astype(jnp.float32)).reshape(b, nwy, nwx, nw, n, h)
  return from_windows(o).astype(q_btnh.dtype)


def swin_mask_and_bias(segment_ids, bias_np, *, window: int, grid=None, shifted: bool, causal: bool):
  """Dense [B, T, T] mask and [N, T, T] bias of the same attention, in original coordinates."""
  b, t = segment_ids.shape
  two_d = grid is not None
  (hy, my, sy), (hx, mx, sx) = _plan(t, window, grid, shifted)
  i = np.arange(t)
  y, x = i // hx, i % hx
  # A shift of s makes the windows start at s, i.e. window id floor((y + M - s) / M).
  wy, wx = (y + (-sy) % my) // my, (x + (-sx) % mx) // mx
  same_window = (wy[:, None] == wy[None, :]) & (wx[:, None] == wx[None, :])
  idx = row_index(b, t)
  mask = make_mask(segment_ids, segment_ids, idx, idx, causal) & jnp.asarray(same_window)
  rel = _relative_index(y[:, None] - y[None, :], x[:, None] - x[None, :], window, two_d)
  rel = np.clip(rel, 0, table_size(window, two_d) - 1)  # pairs out of range are masked anyway
  return mask, jnp.asarray(bias_np, jnp.float32)[:, rel]


def reference_swin(q_btnh, k_btkh, v_btkh, segment_ids, bias_np, *, window: int, grid=None, shifted: bool,
                   causal: bool) -> jax.Array:
  """Dense twin of `swin_attention`: softmax(q k^T / sqrt(H) + bias, masked) v in fp32."""
  if causal and grid is not None:
    raise ValueError("swin: causal attention is only defined for the 1-D layout (swin.grid=0)")
  mask, bias = swin_mask_and_bias(segment_ids, bias_np, window=window, grid=grid, shifted=shifted, causal=causal)
  g = q_btnh.shape[2] // k_btkh.shape[2]
  q = q_btnh.astype(jnp.float32)
  k, v = (jnp.repeat(a.astype(jnp.float32), g, axis=2) for a in (k_btkh, v_btkh))
  s = jnp.einsum("binh,bjnh->bnij", q, k) / math.sqrt(q.shape[-1]) + bias[None]
  m = mask[:, None]
  p = jnp.where(m, jax.nn.softmax(jnp.where(m, s, MASK_VALUE), axis=-1), 0.0)
  return jnp.einsum("bnij,bjnh->binh", p, v).astype(q_btnh.dtype)


class Swin(WholeSequenceMixin, Attention):
  """Swin window attention (config `model.swin.*`): `window` M (default 8), `grid`
  ((0, 0) or 0 = 1-D, default; (h, w) or "HxW" = 2-D, T must equal h*w); odd layers use
  shifted windows; a learned relative position bias per head. Rotary positions are
  applied as in every attention mixer when model.positions = "rope"."""

  LAYER_INDEXED = True  # every second layer shifts its windows

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.window = int(spec.option("window", 8))
    if self.window < 1:
      raise ValueError(f"swin.window={self.window} must be >= 1")
    self.grid = parse_grid(spec.option("grid", 0))
    if spec.causal and self.grid is not None:
      raise ValueError(f"swin: causal attention is only defined for the 1-D layout (swin.grid=0), got "
                       f"grid={self.grid}; use a bidirectional task or grid=0")
    self.shifted = spec.alternation_index % 2 == 1
    size = table_size(self.window, self.grid is not None)
    # Not weight-decayed, as in Swin's reference training (a bias, stored as a table).
    self.relative_bias = param(rngs, jax.nn.initializers.truncated_normal(0.02), (spec.num_heads, size),
                               (axes.HEADS, None), weight_decay=False)

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    self._check_context(ctx)
    return super().__call__(x_btd, ctx)

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    return swin_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, self.relative_bias[...], window=self.window,
                          grid=self.grid, shifted=self.shifted, causal=self.spec.causal)
