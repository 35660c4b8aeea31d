"""Linformer (docs/papers.md#linformer): keys and values projected along the length axis to k rows.

`K' = E K`, `V' = F V` with learned `E, F in R^{k x max_len}` (one pair per layer,
shared by all heads; `F = E` with `share_kv`), then `O = softmax(Q K'^T / sqrt(H)) V'`
over the k projected rows. Time O(T k H) per head, memory O(T k): nothing T x T.

Length: E and F have `max_len` columns; a row of T <= max_len tokens uses the first T
columns (the columns of its true positions when the row is stored permuted, ctx.index),
and a longer row is an error. Padding (segment id 0): the padded tokens' K and V are
zeroed before the projection, so they contribute nothing, and padded query rows output
zeros. Packed rows (several nonzero segment ids in one row) cannot be honoured by a
length projection, which mixes every position of the row into each of the k rows: all
nonzero segments of a row are treated as one sequence (segment ids act only as a
padding mask). Use unpacked rows with this mixer. Bidirectional only: a projection
along the length mixes future tokens into every row, so `causal=True` is refused.

Reference twin: `reference_linformer` (the formula with explicit E and F, in fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.reference import reference_attention
from layers.attention.exact import Attention
from layers.core import param
from layers.mixer_base import MixContext, MixerSpec


def reference_linformer(q_btnh, k_btkh, v_btkh, e_rl, f_rl, segment_ids) -> jax.Array:
  """softmax(Q (E K)^T / sqrt(H)) (F V) with padded tokens' K, V zeroed, in fp32 (storage order)."""
  t = q_btnh.shape[1]
  valid = (jnp.asarray(segment_ids) != 0)[:, :, None, None]
  k = jnp.where(valid, k_btkh.astype(jnp.float32), 0.0)
  v = jnp.where(valid, v_btkh.astype(jnp.float32), 0.0)
  k_proj = jnp.einsum("rt,btkh->brkh", e_rl[:, :t].astype(jnp.float32), k)
  v_proj = jnp.einsum("rt,btkh->brkh", f_rl[:, :t].astype(jnp.float32), v)
  mask = jnp.broadcast_to(valid[:, :, :, 0], (q_btnh.shape[0], t, e_rl.shape[0]))
  return reference_attention(q_btnh.astype(jnp.float32), k_proj, v_proj, mask).astype(q_btnh.dtype)


class Linformer(Attention):
  """Linformer attention (config group `model.linformer`).

  Options: `k` (projected length, default 64), `share_kv` (F = E, default False).
  Query/key/value projections, grouped-query heads and rotary positions as in
  `attention` (rope rotates Q and K before K is projected). Incremental decoding is
  not supported (bidirectional only).
  """

  # The projection needs every position of the row at once; only compiler-propagated
  # sharding ("auto"). (all_to_all / all_gather could carry it: E is shared by the heads.)
  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only
  PACKING_LEAK = "its length projection mixes every position of the row into each of its k rows"

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    if spec.causal:
      raise ValueError("linformer is bidirectional only (its length projection mixes future tokens into every "
                       "row); got causal=True, use a classification task or another mixer")
    super().__init__(spec, rngs=rngs)
    self.k = int(spec.option("k", 64))
    self.share_kv = bool(spec.option("share_kv", False))
    if self.k < 1:
      raise ValueError(f"model.linformer.k={self.k} must be a positive number of projected rows")
    if spec.max_len < 1:
      raise ValueError(f"linformer needs a positive max_len for its projections, got {spec.max_len}")
    init = jax.nn.initializers.normal(1.0 / spec.max_len ** 0.5)
    self.e_proj = param(rngs, init, (self.k, spec.max_len), (None, None))
    self.f_proj = None if self.share_kv else param(rngs, init, (self.k, spec.max_len), (None, None))

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    if ctx.decode:
      raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")
    return super().__call__(x_btd, ctx)

  def _columns(self, proj, ctx: MixContext, dtype):
    """[k, max_len] -> [B, k, T]: the columns of each stored token's true position."""
    b, t = ctx.segment_ids.shape
    w = proj[...].astype(dtype)
    if ctx.index is None:
      return jnp.broadcast_to(w[None, :, :t], (b, self.k, t))
    return jnp.moveaxis(jnp.take(w, jnp.asarray(ctx.index), axis=1), 1, 0)

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    b, t = ctx.segment_ids.shape
    if t > self.spec.max_len:
      raise ValueError(f"linformer projects lengths up to max_len={self.spec.max_len}, but got a sequence of "
                       f"T={t} tokens; raise the model's max_len or shorten the sequence")
    valid = jnp.asarray(ctx.segment_ids) != 0
    k = jnp.where(valid[:, :, None, None], k_btkh, jnp.zeros_like(k_btkh))
    v = jnp.where(valid[:, :, None, None], v_btkh, jnp.zeros_like(v_btkh))
    e = self._columns(self.e_proj, ctx, k.dtype)
    f = e if self.f_proj is None else self._columns(self.f_proj, ctx, v.dtype)
    k_proj = jnp.einsum("brt,btkh->brkh", e, k)
    v_proj = jnp.einsum("brt,btkh->brkh", f, v)
    mask = jnp.broadcast_to(valid[:, :, None], (b, t, self.k))  # padded queries see nothing -> zeros
    return reference_attention(q_btnh, k_proj, v_proj, mask)
