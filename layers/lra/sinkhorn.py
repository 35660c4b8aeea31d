"""Sparse Sinkhorn attention (docs/papers.md#sinkhorn; Tay et al., 2020).

The row is cut into blocks of b tokens (padded internally to a multiple of b; a row
shorter than b is one block). A sorting network scores block-to-block moves from block
summaries, `R_i = W2 relu(W1 s_i + b1) + b2 in R^{nb}` (one row per kv head; the output
has ceil(max_len / b) columns, sliced to the row's nb, so the length is bounded by
max_len), with `s_i` the sum of block i's token embeddings (padding excluded).
Sinkhorn balancing in log space (`iters` rounds of row then column normalisation of
`(R + Gumbel noise) / temperature`; noise only with `gumbel` and a training dropout
rng) gives a soft permutation P. Each query block i attends, in one softmax, to its own
block's keys (token masks: segments, padding, causal) and to the sorted block
`sum_j P_ij K_j` (values likewise).

Padding inside sorted blocks: slot m of sorted block i mixes slot m of every block j.
We average only the real tokens, `K~_im = sum_j P_ij u_jm K_jm / sum_j P_ij u_jm`
(u = 1 for real tokens), and add `log(sum_j P_ij u_jm / sum_j P_ij)` (the share of the
row's mass on real tokens) to that slot's logit, masking it when the share is 0. For a
hard permutation this is exactly "the moved block, padding masked"; blocks made only of
padding take no part in the balancing. Packed rows: the own-block part honours segment
boundaries, but a sorted block is a soft mixture of whole blocks, so keys of another
example in the same row can be seen through it -- use unpacked rows with this mixer.

Causal (the paper's causal Sinkhorn balancing, made strictly causal): block i may only
be sorted from earlier blocks (P_ij = 0 unless j < i); the sorting network reads the
sum of all earlier blocks (an exclusive cumulative sum), never block i itself; and the
column normalisation of row i divides by the cumulative column mass of rows <= i only,
so no row's P depends on later blocks. Block 0 has no sorted block. Inside the own
block the usual causal token mask applies. A property of this balancing worth knowing:
column i-1's only entry in rows <= i is row i's, so every column round sets P[i, i-1] to 1
whatever the logits, and after the row normalisation the previous block dominates row i
(about 0.9 of it at iters=5 in a 5-block check). Causal Sinkhorn thus leans towards "own
block + previous block": on MQAR (blocks of 64 at L=256) it stops at 0.770, where that
pattern's reach is 0.774 (BENCHMARKS.md).

Cost: O(T * 2b * H) logits and mixing, O(nb^2 (K + iters) + T nb H) for sorting (the
mixture of blocks is a dense [nb, nb] x [nb, b*H] product), memory O(T * 2b + nb^2).

Reference twins: `reference_sinkhorn_permutation` (probability-space balancing with
explicit sums) and `reference_sinkhorn_attention` (a loop over query blocks building
each block's key list and softmax).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.reference import MASK_VALUE
from layers import axes
from layers.attention.block_sparse import check_storage_order
from layers.attention.exact import Attention, rope
from layers.attention.flash import pad_length
from layers.core import Dense
from layers.mixer_base import MixContext, MixerSpec

NEG = -1e30  # masked log-probabilities (exp() = 0); finite so empty rows stay NaN-free


def block_geometry(t: int, block: int) -> tuple[int, int, int]:
  """(b, padded length, nb): b = min(block, T), so a row shorter than a block is one block."""
  b = max(1, min(block, t))
  tp = -(-t // b) * b
  return b, tp, tp // b


def permutation_mask(block_valid_bi, causal: bool) -> jax.Array:
  """[B, 1, nb, nb] support of P: both blocks hold a real token (and j < i when causal)."""
  nb = block_valid_bi.shape[1]
  mask = block_valid_bi[:, None, :, None] & block_valid_bi[:, None, None, :]
  if causal:
    mask &= np.tril(np.ones((nb, nb), bool), -1)
  return mask


def _masked_lse(x, mask, axis):
  m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, x, NEG), axis=axis, keepdims=True))
  s = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x, m) - m), 0.0), axis=axis, keepdims=True)
  return m + jnp.log(jnp.where(s > 0, s, 1.0))


def sinkhorn_log(logits_bkij, mask, iters: int, causal: bool) -> jax.Array:
  """Log of the balanced matrix (NEG off the support). Row then column normalisation per
  round; causal columns are normalised by the cumulative mass of rows <= i."""
  x = jnp.where(mask, logits_bkij.astype(jnp.float32), NEG)
  for _ in range(iters):
    x = jnp.where(mask, x - _masked_lse(x, mask, -1), NEG)
    if causal:
      col = jax.lax.cumlogsumexp(x, axis=x.ndim - 2)  # masked entries are NEG: exp() = 0 in the running sum
      x = jnp.where(mask, x - col, NEG)
    else:
      x = jnp.where(mask, x - _masked_lse(x, mask, -2), NEG)
  return x


def reference_sinkhorn_permutation(logits_bkij, mask, iters: int, causal: bool) -> jax.Array:
  """P by alternating plain row and column divisions of exp(logits) on the support."""
  mask = jnp.broadcast_to(mask, logits_bkij.shape)
  x = jnp.where(mask, logits_bkij, -jnp.inf)
  peak = jnp.max(jnp.where(mask, logits_bkij, -1e30), axis=(-2, -1), keepdims=True)
  p = jnp.where(mask, jnp.exp(x - peak), 0.0)
  div = lambda a, s: jnp.where(s > 0, a / jnp.where(s > 0, s, 1.0), 0.0)
  for _ in range(iters):
    p = div(p, p.sum(-1, keepdims=True))
    p = div(p, jnp.cumsum(p, axis=-2) if causal else p.sum(-2, keepdims=True))
  return p


def sinkhorn_attention(q_btnh, k_btkh, v_btkh, segment_ids, p_bkij, *, block: int, causal: bool) -> jax.Array:
  """Each query block attends to its own block and to the P-sorted block; [B, T, N, H] out."""
  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  g = n // kv
  bs, tp, nb = block_geometry(t, block)
  seg = pad_length(jnp.asarray(segment_ids, jnp.int32), tp)
  q = pad_length(q_btnh.astype(jnp.float32), tp).reshape(b, nb, bs, kv, g, h) / math.sqrt(h)
  k = pad_length(k_btkh.astype(jnp.float32), tp).reshape(b, nb, bs, kv, h)
  v = pad_length(v_btkh.astype(jnp.float32), tp).reshape(b, nb, bs, kv, h)
  seg_b = seg.reshape(b, nb, bs)
  real = seg_b != 0  # [B, nb, b]

  # Own block: the exact token mask.
  local_mask = (seg_b[:, :, :, None] == seg_b[:, :, None, :]) & real[:, :, :, None]
  if causal:
    local_mask &= np.tril(np.ones((bs, bs), bool))
  local_mask = local_mask[:, None, None]  # [B, 1, 1, nb, b, b]
  local = jnp.einsum("bimkgh,binkh->bkgimn", q, k)

  # Sorted block: real tokens of the blocks, mixed by P; the slot's real share as a log weight.
  p = p_bkij.astype(jnp.float32)
  u = real.astype(jnp.float32)
  row_mass = jnp.sum(p, axis=-1)[..., None]  # [B, K, nb, 1]
  real_mass = jnp.einsum("bkij,bjm->bkim", p, u)  # [B, K, nb, b]
  safe = lambda a: jnp.where(a > 0, a, 1.0)
  # Divisors and the log are floored (1e-12, 1e-30) rather than only guarded at 0: a nearly hard P
  # gives slots whose real mass is tiny but positive, and x / y or log(y) would pass back
  # x / y^2 or 1 / y, which overflows fp32. Below the floors a slot's weight is < e^-69.
  mass_div = jnp.moveaxis(jnp.maximum(real_mass, 1e-12), 1, -1)[..., None]
  k_sorted = jnp.einsum("bkij,bjm,bjmkh->bimkh", p, u, k) / mass_div
  v_sorted = jnp.einsum("bkij,bjm,bjmkh->bimkh", p, u, v) / mass_div
  share = real_mass / safe(row_mass)
  sorted_mask = (real[:, None, None, :, :, None] & (share > 0)[:, :, None, :, None, :])  # [B, K, 1, nb, b, b]
  sorted_logits = (jnp.einsum("bimkgh,binkh->bkgimn", q, k_sorted)
                   + jnp.log(jnp.maximum(share, 1e-30))[:, :, None, :, None, :])

  logits = jnp.concatenate([local, sorted_logits], axis=-1)
  mask = jnp.concatenate(jnp.broadcast_arrays(local_mask, sorted_mask), axis=-1)
  probs = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
  probs = jnp.where(mask, probs, 0.0)
  out = (jnp.einsum("bkgimn,binkh->bimkgh", probs[..., :bs], v)
         + jnp.einsum("bkgimn,binkh->bimkgh", probs[..., bs:], v_sorted))
  return out.reshape(b, tp, n, h)[:, :t].astype(q_btnh.dtype)


def reference_sinkhorn_attention(q_btnh, k_btkh, v_btkh, segment_ids, p_bkij, *, block: int,
                                 causal: bool) -> jax.Array:
  """Loop over query blocks i: keys = block i's own tokens (token masks) followed by the b
  sorted slots, slot m = the P[i]-weighted mean of the real tokens at slot m of every block,
  its logit raised by log(real share of P[i]'s mass); one softmax per query."""
  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  bs, tp, nb = block_geometry(t, block)
  seg = np.zeros((b, tp), np.int64)
  seg[:, :t] = np.asarray(segment_ids)
  pad = lambda a: jnp.concatenate([a.astype(jnp.float32), jnp.zeros((b, tp - t) + a.shape[2:], jnp.float32)], 1)
  q, k, v = pad(q_btnh), pad(k_btkh), pad(v_btkh)
  kh = np.arange(n) // (n // kv)  # kv head of each query head
  k_slots, v_slots = k.reshape(b, nb, bs, kv, h), v.reshape(b, nb, bs, kv, h)  # [B, block j, slot m, K, H]
  real = seg.reshape(b, nb, bs) != 0
  outs = []
  for i in range(nb):
    rows = np.arange(i * bs, (i + 1) * bs)
    own = (seg[:, rows, None] == seg[:, None, rows]) & (seg[:, rows, None] != 0)  # [B, query, key]
    if causal:
      own &= rows[None, None, :] <= rows[None, :, None]
    wts = p_bkij[:, :, i, :, None] * real[:, None]  # [B, K, j, m]
    mass = wts.sum(2)  # [B, K, m]
    safe = jnp.where(mass > 0, mass, 1.0)
    k_mix = jnp.einsum("bkjm,bjmkh->bmkh", wts, k_slots) / jnp.moveaxis(safe, 1, 2)[..., None]
    v_mix = jnp.einsum("bkjm,bjmkh->bmkh", wts, v_slots) / jnp.moveaxis(safe, 1, 2)[..., None]
    row_mass = p_bkij[:, :, i].sum(-1)[..., None]  # [B, K, 1]
    share = mass / jnp.where(row_mass > 0, row_mass, 1.0)
    keys = jnp.concatenate([k[:, rows], k_mix], axis=1)[:, :, kh]  # [B, 2b, N, H]
    vals = jnp.concatenate([v[:, rows], v_mix], axis=1)[:, :, kh]
    bias = jnp.concatenate([jnp.zeros((b, n, bs)), jnp.log(jnp.where(share > 0, share, 1.0))[:, kh]], -1)
    ok = jnp.concatenate([jnp.broadcast_to(own[:, None], (b, n, bs, bs)),
                          (share > 0)[:, kh, None, :] & (seg[:, rows] != 0)[:, None, :, None]], -1)
    s = jnp.einsum("bqnh,bsnh->bnqs", q[:, rows], keys) / math.sqrt(h) + bias[:, :, None, :]
    any_key = ok.any(-1, keepdims=True)
    probs = jnp.where(any_key, jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1), 0.0)
    outs.append(jnp.einsum("bnqs,bsnh->bqnh", jnp.where(ok, probs, 0.0), vals))
  return jnp.concatenate(outs, axis=1)[:, :t].astype(q_btnh.dtype)


class Sinkhorn(Attention):
  """Sparse Sinkhorn attention (config group `model.sinkhorn`).

  Options: `block` (b, default 64), `iters` (Sinkhorn rounds, default 5), `temperature`
  (default 0.75), `gumbel` (Gumbel noise on the sorting logits in training, default
  False for determinism), `hidden` (sorting-network width, default d_model).
  Projections, grouped-query heads (one P per kv head) and rotary positions as in
  `attention`. Incremental decoding is not supported.
  """

  # Blocks are contiguous runs of stored tokens; only compiler-propagated sharding.
  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only
  PACKING_LEAK = "its sorted block is a soft mixture of whole blocks, which can hold another example's keys"

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.block = int(spec.option("block", 64))
    self.iters = int(spec.option("iters", 5))
    self.temperature = float(spec.option("temperature", 0.75))
    self.gumbel = bool(spec.option("gumbel", False))
    self.hidden = int(spec.option("hidden", 0) or spec.d_model)
    if self.block < 1 or self.iters < 0 or self.hidden < 1 or not self.temperature > 0:
      raise ValueError(f"model.sinkhorn needs block >= 1, iters >= 0, hidden >= 1 and temperature > 0; got block="
                       f"{self.block}, iters={self.iters}, hidden={self.hidden}, temperature={self.temperature}")
    if spec.max_len < 1:
      raise ValueError(f"sinkhorn needs a positive max_len (its sorting network scores max_len / block blocks), "
                       f"got {spec.max_len}")
    self.max_blocks = -(-spec.max_len // self.block)
    self.sort_in = Dense((spec.d_model,), (self.hidden,), in_axes=(axes.EMBED,), out_axes=(axes.MLP,), rngs=rngs,
                         use_bias=True)
    self.sort_out = Dense((self.hidden,), (spec.num_kv_heads, self.max_blocks), in_axes=(axes.MLP,),
                          out_axes=(axes.KV_HEADS, None), rngs=rngs, use_bias=True)

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")

  def sort_logits(self, x_btd, segment_ids) -> jax.Array:
    """R [B, K, nb, nb] from the block summaries (causal: the sum of all earlier blocks)."""
    t = x_btd.shape[1]
    bs, tp, nb = block_geometry(t, self.block)
    real = jnp.asarray(segment_ids) != 0
    x = pad_length(jnp.where(real[..., None], x_btd, jnp.zeros_like(x_btd)), tp)
    sums = jnp.sum(x.astype(jnp.float32).reshape(x.shape[0], nb, bs, -1), axis=2)  # [B, nb, D]
    if self.spec.causal:
      sums = jnp.cumsum(sums, axis=1) - sums  # exclusive: blocks before i only
    r = self.sort_out(jax.nn.relu(self.sort_in(sums.astype(x_btd.dtype))))[..., :nb]  # [B, nb, K, nb]
    return jnp.moveaxis(r, 2, 1).astype(jnp.float32)

  def permutation(self, x_btd, ctx: MixContext) -> jax.Array:
    """Soft permutation P [B, K, nb, nb] (zero off its support)."""
    t = x_btd.shape[1]
    bs, tp, nb = block_geometry(t, self.block)
    r = self.sort_logits(x_btd, ctx.segment_ids)
    if self.gumbel and ctx.training and ctx.dropout_rng is not None:
      u = jax.random.uniform(jax.random.fold_in(ctx.dropout_rng, 0x51CC), r.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
      r = r - jnp.log(-jnp.log(u))
    block_valid = jnp.any(pad_length(jnp.asarray(ctx.segment_ids) != 0, tp).reshape(-1, nb, bs), axis=-1)
    mask = permutation_mask(block_valid, self.spec.causal)
    return jnp.where(mask, jnp.exp(sinkhorn_log(r / self.temperature, mask, self.iters, self.spec.causal)), 0.0)

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    if ctx.decode:
      raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")
    check_storage_order(ctx, "sinkhorn")
    t = x_btd.shape[1]
    if t > self.spec.max_len:
      raise ValueError(f"sinkhorn scores at most max_len={self.spec.max_len} tokens ({self.max_blocks} blocks), "
                       f"but got a sequence of T={t} tokens; raise the model's max_len or shorten the sequence")
    q, k, v = self.query(x_btd), self.key(x_btd), self.value(x_btd)
    if self.spec.positions == "rope":
      q, k = rope(q, ctx.positions), rope(k, ctx.positions)
    p = self.permutation(x_btd, ctx)
    return self.out(sinkhorn_attention(q, k, v, ctx.segment_ids, p, block=self.block, causal=self.spec.causal))
