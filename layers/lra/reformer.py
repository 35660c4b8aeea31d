"""Reformer LSH attention (docs/papers.md#reformer; Kitaev et al., 2020).

Shared query-key projection: queries are `qk`, keys are `qk / |qk|` (L2-normalised),
logits `q . k_hat / sqrt(H)`. Each hash round r buckets every token by angular LSH,
`h(x) = argmax([x R_r ; -x R_r])` with a random `R_r in R^{H x n_buckets/2}` per round
and head, fixed per layer by (`seed`, layer index) and recomputed from them (no state).
Tokens are sorted by (segment, bucket, true position) -- padding last, and each packed
example's tokens together, which is the paper's (bucket, position) order applied per
example -- and the sorted sequence is cut into chunks of c tokens. A token attends to
itself only when nothing else is visible: its self logit is a finite -1e5, as in the
paper. Keys of other segments and padding are always masked.

Bidirectional (the paper): a query attends to the keys of its own chunk and of the
previous chunk (wrapping around: chunk 0 looks at the last chunk), and with
`same_bucket` only to those hashed into its bucket.

Causal: the paper's causal version (chunk windows plus a position mask) is causal in its
values but not in its pattern -- future tokens hashed into lower buckets shift the
chunk boundaries, so *which* past keys a query sees depends on the future. We use the
strictly causal form of the same window: query i sees the keys j of its own bucket with
0 <= rank(i) - rank(j) <= c in the sorted order, i.e. the c most recent earlier tokens
of its bucket (all inside its chunk and the previous one). Within one segment and
bucket the sorted order is the position order, so that rank difference counts only
tokens at positions <= i, and perturbing future tokens leaves every output unchanged.

Hash rounds are combined with weights from their log-sum-exps, `o = sum_r softmax_r(lse_r)
o_r`. With `dedup` (the paper's fix for keys found in several rounds) every logit is
lowered by log N_ij, N_ij = the number of rounds in which key j is in query i's chunk
window, which makes the result exactly softmax attention over the union of the rounds'
windows (each key counted once). Without it a key found in k rounds counts k times.

Cost per round: O(T log T) sort, O(T * 2c * H) logits and mixing, memory O(T * 2c)
(with `dedup`, O(n_hashes * T * 2c) for the counts); total x n_hashes.

Reference twin: `reference_lsh_attention` builds every round's [T, T] visibility from
the same buckets with numpy (sort, ranks, chunks, windows) and runs dense masked softmax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.reference import MASK_VALUE
from layers import axes
from layers.attention.exact import rope
from layers.core import Dense
from layers.mixer_base import MixContext, Mixer, MixerSpec

SELF_VALUE = -1e5  # the paper's self-attention logit: loses to any real key, wins over masked ones


def lsh_rotations(seed: int, layer_index: int, n_hashes: int, num_heads: int, head_dim: int,
                  n_buckets: int) -> np.ndarray:
  """[n_hashes, N, H, n_buckets // 2] Gaussian rotations, fixed by (seed, layer index)."""
  rng = np.random.default_rng((seed, layer_index, 0x5EF0))
  return rng.standard_normal((n_hashes, num_heads, head_dim, max(n_buckets // 2, 1))).astype(np.float32)


def lsh_buckets(qk_btnh: jax.Array, rotations_rnhc, n_buckets: int) -> jax.Array:
  """[R, B, N, T] int32 buckets argmax([x R; -x R]) (all 0 with one bucket)."""
  b, t, n, _ = qk_btnh.shape
  r = rotations_rnhc.shape[0]
  if n_buckets == 1:
    return jnp.zeros((r, b, n, t), jnp.int32)
  proj = jnp.einsum("btnh,rnhc->rbntc", qk_btnh.astype(jnp.float32), jnp.asarray(rotations_rnhc, jnp.float32))
  return jnp.argmax(jnp.concatenate([proj, -proj], axis=-1), axis=-1).astype(jnp.int32)


def _pad_last(x, length, value):
  extra = length - x.shape[-1]
  if extra == 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=value)


def _chunk_geometry(t: int, chunk: int) -> tuple[int, int, int]:
  """(c, padded length, number of chunks): c = min(chunk, T), so a row shorter than a chunk is one chunk."""
  c = max(1, min(chunk, t))
  tp = -(-t // c) * c
  return c, tp, tp // c


def _gather_tokens(x_rbnt, perm_rbnt):
  """x[..., perm] along the token axis (axis 3), trailing feature axes kept."""
  idx = perm_rbnt.reshape(perm_rbnt.shape + (1,) * (x_rbnt.ndim - 4))
  return jnp.take_along_axis(x_rbnt, jnp.broadcast_to(idx, perm_rbnt.shape + x_rbnt.shape[4:]), axis=3)


def lsh_attention(qk_btnh, v_btnh, segment_ids, index, buckets_rbnt, *, chunk: int, causal: bool,
                  dedup: bool = True, same_bucket: bool = False) -> jax.Array:
  """Multi-round chunked LSH attention; [B, T, N, H] out (padded query rows give zeros)."""
  b, t, n, h = qk_btnh.shape
  r = buckets_rbnt.shape[0]
  c, tp, nc = _chunk_geometry(t, chunk)
  seg = _pad_last(jnp.asarray(segment_ids, jnp.int32), tp, 0)
  idx = jnp.concatenate([jnp.asarray(index, jnp.int32), jnp.broadcast_to(t + jnp.arange(tp - t, dtype=jnp.int32),
                                                                          (b, tp - t))], axis=1)
  buckets = _pad_last(buckets_rbnt.astype(jnp.int32), tp, 0)
  shape = (r, b, n, tp)
  seg_key = jnp.broadcast_to(jnp.where(seg == 0, jnp.iinfo(jnp.int32).max, seg)[None, :, None], shape)
  idx_r = jnp.broadcast_to(idx[None, :, None], shape)
  seg_r = jnp.broadcast_to(seg[None, :, None], shape)
  # Primary key last: segment (padding last), then bucket, then true position.
  perm = jnp.lexsort((idx_r, buckets, seg_key), axis=-1).astype(jnp.int32)
  rank = jnp.argsort(perm, axis=-1).astype(jnp.int32)

  qk = jnp.moveaxis(_pad_last(jnp.moveaxis(qk_btnh.astype(jnp.float32), 1, -1), tp, 0.0), -1, 2)  # [B, N, Tp, H]
  v = jnp.moveaxis(_pad_last(jnp.moveaxis(v_btnh.astype(jnp.float32), 1, -1), tp, 0.0), -1, 2)
  # The epsilon inside the root keeps the gradient finite for a real token whose qk is 0
  # (sqrt's derivative is infinite at 0, and a clamp after it passes 0 * inf = NaN back).
  norm = jnp.sqrt(jnp.sum(jnp.square(qk), axis=-1, keepdims=True) + 1e-12)
  k_hat = qk / norm / math.sqrt(h)
  full = lambda x: jnp.broadcast_to(x[None], (r,) + x.shape)
  sq, sk, sv = (_gather_tokens(full(x), perm) for x in (qk, k_hat, v))  # [R, B, N, Tp, H]
  sseg, sidx, sbkt = (_gather_tokens(x, perm) for x in (seg_r, idx_r, buckets))  # [R, B, N, Tp]

  chunked = lambda x: x.reshape((r, b, n, nc, c) + x.shape[4:])
  sq, sk, sv, sseg, sidx, sbkt, stok = map(chunked, (sq, sk, sv, sseg, sidx, sbkt, perm))

  def window(x):  # [R, B, N, nc, c, ...] -> [R, B, N, nc, W, ...]: own chunk, then the previous one
    return x if nc == 1 else jnp.concatenate([x, jnp.roll(x, 1, axis=3)], axis=4)

  srank = chunked(jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), shape))
  wk, wv, wseg, widx, wbkt, wtok, wrank = map(window, (sk, sv, sseg, sidx, sbkt, stok, srank))
  logits = jnp.einsum("rbnqch,rbnqwh->rbnqcw", sq, wk)
  col = lambda x: x[..., None, :]
  row = lambda x: x[..., :, None]
  mask = (row(sseg) == col(wseg)) & row(sseg != 0)
  if causal:  # the c most recent earlier tokens of the query's own bucket (the wrapped chunk drops out)
    gap = row(srank) - col(wrank)
    mask &= (gap >= 0) & (gap <= c) & (row(sbkt) == col(wbkt)) & (col(widx) <= row(sidx))
  elif same_bucket:
    mask &= row(sbkt) == col(wbkt)
  logits = jnp.where(row(stok) == col(wtok), SELF_VALUE, logits)
  if dedup and r > 1:
    logits = logits - jnp.log(_round_counts(rank, buckets, stok, wtok, c, nc, same_bucket, causal))
  logits = jnp.where(mask, logits, MASK_VALUE)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [R, B, N, nc, c]
  probs = jnp.exp(logits - lse[..., None])
  o = jnp.einsum("rbnqcw,rbnqwh->rbnqch", probs, wv).reshape(r, b, n, tp, h)
  # Back to token order, then the rounds weighted by their share of the total mass.
  o = _gather_tokens(o, rank)
  lse = _gather_tokens(lse.reshape(r, b, n, tp), rank)
  out = jnp.sum(jax.nn.softmax(lse, axis=0)[..., None] * o, axis=0)  # [B, N, Tp, H]
  out = jnp.moveaxis(out, 1, 2)[:, :t]
  valid = jnp.asarray(segment_ids)[:, :, None, None] != 0
  return jnp.where(valid, out, 0.0).astype(v_btnh.dtype)


def _round_counts(rank, buckets, stok, wtok, c, nc, same_bucket, causal):
  """N_ij [R, B, N, nc, c, W]: in how many rounds r' key wtok is in query stok's window
  (the segment and position masks are the same in every round and are applied outside)."""
  r, b, n, tp = rank.shape
  chunk_of = rank // c  # [R', B, N, Tp]

  def at(table, tok):  # table [R', B, N, Tp], tok [R, B, N, nc, x] -> [R', R, B, N, nc, x]
    flat = tok.reshape(1, r, b, n, -1)
    vals = jnp.take_along_axis(jnp.broadcast_to(table[:, None], (r, r, b, n, tp)),
                               jnp.broadcast_to(flat, (r, r, b, n, flat.shape[-1])), axis=-1)
    return vals.reshape((r,) + tok.shape)

  same = at(buckets, stok)[..., :, None] == at(buckets, wtok)[..., None, :]
  if causal:
    gap = at(rank, stok)[..., :, None] - at(rank, wtok)[..., None, :]
    return jnp.maximum(jnp.sum(same & (gap >= 0) & (gap <= c), axis=0), 1).astype(jnp.float32)
  cq, ck = at(chunk_of, stok)[..., :, None], at(chunk_of, wtok)[..., None, :]
  member = ck == cq
  if nc > 1:
    member |= ck == (cq - 1) % nc
  if same_bucket:
    member &= same
  return jnp.maximum(jnp.sum(member, axis=0), 1).astype(jnp.float32)


def reference_lsh_attention(qk_btnh, v_btnh, segment_ids, index, buckets_rbnt, *, chunk: int, causal: bool,
                            dedup: bool = True, same_bucket: bool = False) -> jax.Array:
  """Dense twin of `lsh_attention`: each round's key sets built with numpy from the sort.

  Round r: tokens (padded to a multiple of c with padding tokens) sorted by (segment with
  padding last, bucket, position); rank(i) = place in that order, chunk(i) = rank(i) // c.
  Query i sees key j only in the same nonzero segment, and bidirectional: chunk(j) is
  chunk(i) or chunk(i) - 1 mod n_chunks (only chunk(i) with one chunk) [and the same
  bucket]; causal: the same bucket and 0 <= rank(i) - rank(j) <= c. Self logit -1e5.
  dedup: one softmax over the union of the rounds' sets; else per-round softmaxes mixed
  by softmax over rounds of their log-sum-exps. Buckets, segment ids, index: concrete.
  """
  b, t, n, h = qk_btnh.shape
  bk = np.asarray(buckets_rbnt)
  r = bk.shape[0]
  c, tp, nc = _chunk_geometry(t, chunk)
  seg = np.zeros((b, tp), np.int64)
  seg[:, :t] = np.asarray(segment_ids)
  pos = np.concatenate([np.asarray(index), np.broadcast_to(np.arange(t, tp), (b, tp - t))], axis=1)
  sees = np.zeros((r, b, n, t, t), bool)
  for ri in range(r):
    for bi in range(b):
      same_seg = (seg[bi, :t, None] == seg[bi, None, :t]) & (seg[bi, :t, None] != 0)
      for ni in range(n):
        bkt = np.zeros(tp, np.int64)
        bkt[:t] = bk[ri, bi, ni]
        order = np.lexsort((pos[bi], bkt, np.where(seg[bi] == 0, np.iinfo(np.int64).max, seg[bi])))
        rank = np.empty(tp, np.int64)
        rank[order] = np.arange(tp)
        rank, bkt = rank[:t], bkt[:t]
        same_bkt = bkt[:, None] == bkt[None, :]
        if causal:
          gap = rank[:, None] - rank[None, :]
          near = same_bkt & (gap >= 0) & (gap <= c)
        else:
          ci, cj = rank[:, None] // c, rank[None, :] // c
          near = (cj == ci) | ((nc > 1) & (cj == (ci - 1) % nc))
          if same_bucket:
            near &= same_bkt
        sees[ri, bi, ni] = near & same_seg
  qk = qk_btnh.astype(jnp.float32)
  k_hat = qk / jnp.maximum(jnp.linalg.norm(qk, axis=-1, keepdims=True), 1e-6)
  s = jnp.einsum("binh,bjnh->bnij", qk, k_hat) / math.sqrt(h)
  s = jnp.where(np.eye(t, dtype=bool), SELF_VALUE, s)
  v = v_btnh.astype(jnp.float32)

  def attend(mask):  # [B, N, T, T] -> out [B, T, N, H], lse [B, N, T]
    logits = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(jnp.where(mask.any(-1, keepdims=True), logits, 0.0), axis=-1)
    probs = jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0)
    return jnp.einsum("bnij,bjnh->binh", probs, v), lse

  if dedup:
    out, _ = attend(sees.any(0))
  else:
    outs, lses = zip(*(attend(sees[ri]) for ri in range(r)))
    weights = jax.nn.softmax(jnp.stack(lses), axis=0)  # [R, B, N, T]
    out = sum(jnp.moveaxis(weights[ri], 1, 2)[..., None] * outs[ri] for ri in range(r))
  valid = np.asarray(segment_ids)[:, :, None, None] != 0
  return jnp.where(valid, out, 0.0).astype(v_btnh.dtype)


class Reformer(Mixer):
  """LSH attention with a shared query-key projection (config group `model.reformer`).

  Options: `n_buckets` (buckets per round; 1 or even, default 8), `chunk` (c, default
  64), `n_hashes` (rounds, default 2), `seed` (with the layer index fixes the random
  rotations, default 0), `dedup` (count each key once across rounds, default True),
  `same_bucket` (bidirectional: also require equal buckets inside the chunk window,
  default False; causal always requires it).
  Heads: `num_heads` for the shared QK and for V (num_kv_heads does not apply).
  Rotary positions rotate the shared QK before hashing. No incremental decoding.
  """

  LAYER_INDEXED = True  # the hash rotations are drawn per layer

  # Sorting and chunking need each head's whole row; only compiler-propagated sharding.
  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.n_buckets = int(spec.option("n_buckets", 8))
    self.chunk = int(spec.option("chunk", 64))
    self.n_hashes = int(spec.option("n_hashes", 2))
    self.seed = int(spec.option("seed", 0))
    self.dedup = bool(spec.option("dedup", True))
    self.same_bucket = bool(spec.option("same_bucket", False))
    if self.n_buckets < 1 or (self.n_buckets > 1 and self.n_buckets % 2):
      raise ValueError(f"model.reformer.n_buckets={self.n_buckets} must be 1 or even (h(x) = argmax([xR; -xR]))")
    if self.chunk < 1 or self.n_hashes < 1:
      raise ValueError(f"model.reformer.chunk={self.chunk} and model.reformer.n_hashes={self.n_hashes} must be "
                       f"positive")
    d, n, h = spec.d_model, spec.num_heads, spec.head_dim
    if spec.positions == "rope" and h % 2:
      raise ValueError(f"rotary positions need an even head dim, got {h}")
    e = (axes.EMBED,)
    self.qk = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.value = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.out = Dense((n, h), (d,), in_axes=(axes.HEADS, axes.HEAD_DIM), out_axes=e, rngs=rngs,
                     init_scale=1.0 / math.sqrt(2 * spec.num_layers))

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")

  def rotations(self) -> np.ndarray:
    return lsh_rotations(self.seed, self.spec.layer_index, self.n_hashes, self.spec.num_heads, self.spec.head_dim,
                         self.n_buckets)

  def project(self, x_btd, ctx: MixContext):
    """(shared qk, v) [B, T, N, H], rope applied to qk."""
    qk, v = self.qk(x_btd), self.value(x_btd)
    if self.spec.positions == "rope":
      qk = rope(qk, ctx.positions)
    return qk, v

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    if ctx.decode:
      raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")
    qk, v = self.project(x_btd, ctx)
    buckets = lsh_buckets(qk, self.rotations(), self.n_buckets)
    out = lsh_attention(qk, v, ctx.segment_ids, ctx.token_index(), buckets, chunk=self.chunk,
                        causal=self.spec.causal, dedup=self.dedup, same_bucket=self.same_bucket)
    return self.out(out)
