"""Split-KV decode attention (Flash-Decoding; the equal-split case of Lean Attention).

Decoding asks a few new query tokens per sequence to attend over a long KV cache. One
query row per (batch, head) leaves a blockwise kernel with almost no parallel work
along the query axis, so the cache is cut into chunks of `chunk` slots instead, every
chunk's partial result (normalised output o and log-sum-exp lse) is computed
independently of the others, and the partials are reduced with the online-softmax
merge (docs/papers.md#decode):

    lse = logaddexp(lse1, lse2),   o = e^(lse1 - lse) o1 + e^(lse2 - lse) o2.

That operator is associative and commutative, so the partials are reduced as a
balanced tree (log2(#chunks) merges) and any grouping gives the same result up to
rounding. Lean Attention differs only in scheduling (stream-K: each GPU block takes an
equal run of (head, chunk) tiles, possibly crossing head boundaries); in pure JAX the
chunks are folded into the batch axis and XLA does the scheduling, which is the
FlashDecoding layout.

Sequences are ragged: row b's cache holds `cache_lengths_b[b]` valid slots `[0, len)`;
slots past it (and, when given, slots whose segment id is 0) are masked out, so a row
of length 0 returns zeros. The T queries of row b are the last T tokens of its cache
(slots len - T .. len - 1); with `causal=True` query i sees slots <= len - T + i.

Grouped-query attention works on the cache as stored, [B, S, K, H] with K kv heads:
query heads are grouped onto their kv head inside the einsums, never by repeating K/V.
The per-chunk partials are `flash_attention_lse` (layers/attention/flash.py) on the
chunks folded into the batch axis ([B, S, K, H] -> [B * S/C, C, K, H] is a reshape, not
a copy), and the reduction is its `merge_partials`, so gradients come from flash's
custom VJP and the merge's autodiff.

Cost: the same 4*B*N*T*S*H FLOPs as dense attention, plus O(#chunks * B*N*T*H) for the
merge. Memory beyond the cache: the queries repeated once per chunk (#chunks * B*T*N*H;
small while T is a few tokens) and the chunks' fp32 scores, B*N*T*S in all, which for
decoding is a small fraction of the cache (N/(K*H) of it at T = 1); a long prefill's
queries are tiled by `block_q` inside each chunk.

On a GPU it is level with XLA's dense path and far faster than one `flash_attention_lse` call
streaming the same cache block by block (one query row leaves that loop's parallel width at
B*N; timings in BENCHMARKS.md). What the split buys over the dense path is memory on long prefills through the cache ([B, N, block_q, S] scores at a time,
not [B, N, T, S]); for bandwidth-bound decoding the Pallas kernel (kernels/decode_pallas.py)
is the fast path and this is its portable twin.

The second half of this module decodes the causal sparse-pattern mixers exactly
(`PatternCacheMixin`: a dense, compacted cache and the pattern's mask row per new query;
see the notes above `compact_slots`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.reference import MASK_VALUE, NEG_INF, make_mask, merge_partials, reference_attention
from layers.attention.flash import flash_attention_lse, pad_length

DEFAULT_CHUNK = 256  # cache slots per split when neither `chunk` nor `num_splits` is given


def _chunk_size(cache_len: int, chunk: int | None, num_splits: int | None) -> int:
  if chunk is not None and num_splits is not None:
    raise ValueError("give chunk or num_splits, not both")
  if num_splits is not None:
    if num_splits < 1:
      raise ValueError(f"num_splits={num_splits} must be >= 1")
    return max(1, -(-cache_len // num_splits))
  chunk = DEFAULT_CHUNK if chunk is None else chunk
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1")
  return min(chunk, max(cache_len, 1))


def decode_masks(cache_lengths_b, t: int, s: int, q_segment_ids=None, kv_segment_ids=None):
  """(q_segment_ids [B, T], kv_segment_ids [B, S], q_index [B, T], kv_index [B, S]).

  Encodes the ragged cache as segment ids: a slot at or past its row's length gets
  segment 0 (invisible), and queries sit at the last T slots of their row.
  """
  lengths = jnp.asarray(cache_lengths_b, jnp.int32)
  b = lengths.shape[0]
  kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  q_index = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
  q_seg = jnp.ones((b, t), jnp.int32) if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
  kv_seg = jnp.ones((b, s), jnp.int32) if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
  kv_seg = jnp.where(kv_index < lengths[:, None], kv_seg, 0)
  return q_seg, kv_seg, q_index, kv_index


def tree_merge(o_pbtnh, lse_pbtn):
  """Reduces P partials (stacked on axis 0) pairwise, as a balanced tree: ([B,T,N,H], [B,T,N])."""
  o, lse = o_pbtnh, lse_pbtn
  while o.shape[0] > 1:
    p = o.shape[0]
    even = p - p % 2
    mo, ml = merge_partials(o[0:even:2], lse[0:even:2], o[1:even:2], lse[1:even:2])
    if p % 2:  # the odd one out waits for the next level
      mo, ml = jnp.concatenate([mo, o[-1:].astype(mo.dtype)]), jnp.concatenate([ml, lse[-1:]])
    o, lse = mo, ml
  return o[0], lse[0]


def _fold_partials(q_btnh, k_bskh, v_bskh, q_seg, kv_seg, q_index, kv_index, chunk, causal, block_q):
  """Partials of every whole chunk of k/v (length a multiple of `chunk`): ([P,B,T,N,H], [P,B,T,N])."""
  b, t, n, h = q_btnh.shape
  p = k_bskh.shape[1] // chunk
  # Chunk j of row b becomes batch row b * P + j; only the (small) queries are repeated.
  fold = lambda x: x.reshape((b * p, chunk) + x.shape[2:])
  rep = lambda x: jnp.repeat(x, p, axis=0)
  o, lse = flash_attention_lse(rep(q_btnh), fold(k_bskh), fold(v_bskh), rep(q_seg), fold(kv_seg), rep(q_index),
                               fold(kv_index), causal=causal, block_q=block_q, block_k=chunk)
  return jnp.moveaxis(o.reshape(b, p, t, n, h), 1, 0), jnp.moveaxis(lse.reshape(b, p, t, n), 1, 0)


def split_kv_decode_attention(q_btnh, k_cache_bskh, v_cache_bskh, cache_lengths_b, *, chunk: int | None = None,
                              num_splits: int | None = None, q_segment_ids=None, kv_segment_ids=None,
                              causal: bool = True, block_q: int = 128, return_lse: bool = False):
  """Exact attention of T new queries per row over a ragged KV cache, split into chunks.

  q [B, T, N, H]; caches [B, S, K, H] (N a multiple of K); cache_lengths [B] int (or a
  scalar for every row), each <= S. Give `chunk` (slots per split) or `num_splits`;
  S need not be a multiple of the chunk (the remainder is one more, shorter partial).
  Optional segment ids (0 = padding) hide further slots, e.g. padded prompts in a
  batch that shares one write position. Returns out [B, T, N, H] (and lse [B, T, N],
  -inf where a query sees nothing, if `return_lse`).
  """
  b, t, n, h = q_btnh.shape
  s, kvh = k_cache_bskh.shape[1], k_cache_bskh.shape[2]
  if n % kvh:
    raise ValueError(f"num_heads={n} is not a multiple of num_kv_heads={kvh}")
  c = _chunk_size(s, chunk, num_splits)
  lengths = jnp.broadcast_to(jnp.asarray(cache_lengths_b, jnp.int32), (b,))
  q_seg, kv_seg, q_index, kv_index = decode_masks(lengths, t, s, q_segment_ids, kv_segment_ids)
  main = s // c * c
  os_, lses = [], []
  if main:
    whole = (lambda x: x) if main == s else (lambda x: x[:, :main])
    o, lse = _fold_partials(q_btnh, whole(k_cache_bskh), whole(v_cache_bskh), q_seg, whole(kv_seg), q_index,
                            whole(kv_index), c, causal, block_q)
    os_.append(o)
    lses.append(lse)
  if main < s:  # the remainder: one partial over the last s - main slots
    o, lse = flash_attention_lse(q_btnh, k_cache_bskh[:, main:], v_cache_bskh[:, main:], q_seg, kv_seg[:, main:],
                                 q_index, kv_index[:, main:], causal=causal, block_q=block_q, block_k=s - main)
    os_.append(o[None])
    lses.append(lse[None])
  o, lse = tree_merge(jnp.concatenate(os_) if len(os_) > 1 else os_[0],
                      jnp.concatenate(lses) if len(lses) > 1 else lses[0])
  out = o.astype(q_btnh.dtype)
  return (out, lse) if return_lse else out


def reference_decode_attention(q_btnh, k_cache_bskh, v_cache_bskh, cache_lengths_b, *, q_segment_ids=None,
                               kv_segment_ids=None, causal: bool = True):
  """Dense masked attention over the whole cache (`kernels.reference`) with the same masks."""
  b, t = q_btnh.shape[:2]
  lengths = jnp.broadcast_to(jnp.asarray(cache_lengths_b, jnp.int32), (b,))
  q_seg, kv_seg, q_index, kv_index = decode_masks(lengths, t, k_cache_bskh.shape[1], q_segment_ids, kv_segment_ids)
  return reference_attention(q_btnh, k_cache_bskh, v_cache_bskh, make_mask(q_seg, kv_seg, q_index, kv_index, causal))


# -- exact decoding of sparse patterns over a dense, compacted cache -----------------------------
#
# The causal sparse mixers (sparse_transformer, longformer, block_sparse, bigbird, combiner) lay
# their patterns out on stored positions, and some of them on the row's total length too. A
# decode cache of `max_len` slots reproduces their full causal forward over a row of `max_len`
# tokens: the pattern is built for `max_len`, and the query at position p attends over the cache
# with the pattern's mask row for p (plus segment and causality). Causal outputs at positions
# < T depend only on tokens < T, so "prefill, then one token at a time" equals that forward.
#
# The cache is *compacted*: a row's real tokens (segment id != 0) take its slots 0, 1, 2, ... in
# order and padding is never stored, so slot = the token's position in the row with its padding
# removed. A right-padded (ragged) prompt therefore decodes exactly as its unpadded sequence
# would be computed by a full forward, as exact attention's segment masking does; packed prompts
# (several segments in a row) keep their stored layout. Cost per new token: O(max_len) for the
# mask row and the attention (the dense reference path over the whole cache), independent of
# how sparse the pattern is.


def compact_slots(lengths_b, segment_ids_bt, size: int):
  """(position [B, T], write slot [B, T]) of the new tokens in a compacted cache of `size` slots.

  Row b's real tokens go to slots lengths[b], lengths[b] + 1, ... in order; a padding token's
  write slot is `size` (out of range: a scatter with mode="drop" skips it) and its position is
  that of the last real token before it (it sees nothing anyway, having segment id 0).
  """
  real = jnp.asarray(segment_ids_bt) != 0
  position = jnp.asarray(lengths_b, jnp.int32)[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
  return position, jnp.where(real, position, size)


def scatter_rows(cache_bs, new_bt, slots_bt):
  """cache[b, slots[b, t]] = new[b, t]; out-of-range slots (padding, or past the end) are dropped."""
  rows = jnp.arange(cache_bs.shape[0])[:, None]
  return cache_bs.at[rows, slots_bt].set(new_bt.astype(cache_bs.dtype), mode="drop")


def causal_visibility(position_bt, segment_ids_bt, kv_segment_ids_bs):
  """[B, T, S]: query at `position` sees compacted slot j iff j <= position, same nonzero segment
  (empty slots hold segment 0, so they are hidden too)."""
  seg = jnp.asarray(segment_ids_bt, jnp.int32)[:, :, None]
  j = jnp.arange(kv_segment_ids_bs.shape[1], dtype=jnp.int32)[None, None, :]
  return (seg == kv_segment_ids_bs[:, None, :]) & (seg != 0) & (j <= position_bt[:, :, None])


def block_mask_rows(block_mask_bncc, position_bt, block: int, size: int):
  """Token mask rows [B, heads, T, size] of a block-level pattern [B or 1, heads, C, C] for
  queries at `position`: key slot j is in iff block (position // block, j // block) is."""
  bm = jnp.asarray(block_mask_bncc, bool)
  nb = bm.shape[-1]
  qblock = jnp.clip(jnp.asarray(position_bt) // block, 0, nb - 1)
  rows_of = lambda m_ncc, qb_t: m_ncc[:, qb_t]  # [heads, T, C]
  rows = jax.vmap(rows_of, in_axes=(0 if bm.shape[0] > 1 else None, 0))(bm if bm.shape[0] > 1 else bm[0], qblock)
  return rows[..., np.arange(size) // block]


def masked_attention_lse(q_btnh, k_bskh, v_bskh, mask_bnts):
  """Dense softmax attention with a per-head mask, grouped-query without copying K/V.

  mask [B or 1, N or 1, T, S]. Returns (out [B, T, N, H] fp32, lse [B, T, N]); a query that
  sees no key gives 0 and -inf (so `merge_partials` ignores it).
  """
  b, t, n, h = q_btnh.shape
  s, kvh = k_bskh.shape[1], k_bskh.shape[2]
  g = n // kvh
  mask = jnp.asarray(mask_bnts, bool)
  heads = mask.shape[1]
  mask = jnp.broadcast_to(mask, (b, heads, t, s))
  mask = mask.reshape(b, kvh, g, t, s) if heads == n else mask[:, :, None]  # [B, K, G, T, S] or [B, 1, 1, T, S]
  q = q_btnh.astype(jnp.float32).reshape(b, t, kvh, g, h) / math.sqrt(h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh.astype(jnp.float32))
  scores = jnp.where(mask, scores, MASK_VALUE)
  mx = jnp.max(scores, axis=-1)
  p = jnp.where(mask, jnp.exp(scores - mx[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  out = jnp.einsum("bkgts,bskh->btkgh", p / l_safe[..., None], v_bskh.astype(jnp.float32)).reshape(b, t, n, h)
  lse = jnp.where(empty, NEG_INF, mx + jnp.log(l_safe))  # [B, K, G, T]
  return out, jnp.moveaxis(lse.reshape(b, n, t), 1, 2)


def map_query_chunks(fn, arrays_bt, chunk: int):
  """fn(*arrays) computed on runs of at most `chunk` queries (axis 1) and concatenated, so a long
  prefill holds [B, N, chunk, S] scores at a time rather than [B, N, T, S]. Padded queries carry
  zeros (segment id 0), which fn must treat as padding."""
  t = arrays_bt[0].shape[1]
  if t <= chunk:
    return fn(*arrays_bt)
  c = -(-t // chunk)
  runs = [jnp.swapaxes(pad_length(a, c * chunk).reshape((a.shape[0], c, chunk) + a.shape[2:]), 0, 1)
          for a in arrays_bt]
  out = jax.lax.map(lambda xs: fn(*xs), tuple(runs))
  return jax.tree.map(lambda o: jnp.swapaxes(o, 0, 1).reshape((o.shape[1], c * chunk) + o.shape[3:])[:, :t], out)


class PatternCacheMixin:
  """Exact decoding for a causal sparse-pattern attention mixer (an `exact.Attention` subclass)
  over a dense compacted KV cache of `max_len` slots (see the notes above `compact_slots`).

  A subclass defines `decode_pattern(position_bt, size)`: its pattern's mask rows for queries at
  those positions, bool broadcastable to [B, N, T, size], built for a row of `size` = max_len
  tokens by the same rules as its forward pass. Subclasses needing more per-token state (e.g.
  Longformer's global K/V) extend `init_cache` and call `append_to_cache` with their arrays.
  """

  SUPPORTS_DECODE = True
  DECODE_CHUNK = 256  # prefill queries attended at a time

  def decode_name(self) -> str:
    return type(self).__name__

  def check_causal_decode(self) -> None:
    if not self.spec.causal:
      raise ValueError(f"{self.decode_name()} decodes only causally (this model is bidirectional: its pattern at a "
                       f"position reaches later tokens)")

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    self.check_causal_decode()
    kv, h = self.spec.num_kv_heads, self.spec.head_dim
    self.cached_key = nnx.Cache(jnp.zeros((batch, max_len, kv, h), dtype))
    self.cached_value = nnx.Cache(jnp.zeros((batch, max_len, kv, h), dtype))
    self.cached_segment_ids = nnx.Cache(jnp.zeros((batch, max_len), jnp.int32))
    self.cache_length = nnx.Cache(jnp.zeros((batch,), jnp.int32))  # real tokens stored per row

  def append_to_cache(self, ctx, **new_bt):
    """Stores this call's real tokens (`cached_<name>` = array pairs, plus the segment ids) and
    returns (position [B, T], segment ids [B, T]) of the new tokens."""
    self.check_causal_decode()
    if getattr(self, "cache_length", None) is None:
      raise ValueError("decode=True needs init_cache(batch, max_len, dtype) first")
    seg = jnp.asarray(ctx.segment_ids, jnp.int32)
    size = self.cached_segment_ids.shape[1]
    position, slots = compact_slots(self.cache_length[...], seg, size)
    for name, x in new_bt.items():
      var = getattr(self, name)
      var[...] = scatter_rows(var[...], x, slots)
    self.cached_segment_ids[...] = scatter_rows(self.cached_segment_ids[...], seg, slots)
    self.cache_length[...] = self.cache_length[...] + jnp.sum(seg != 0, axis=1, dtype=jnp.int32)
    return position, seg

  def attend_cached(self, q_btnh, k_btkh, v_btkh, ctx) -> jax.Array:
    position, seg = self.append_to_cache(ctx, cached_key=k_btkh, cached_value=v_btkh)
    keys, values, kv_seg = self.cached_key[...], self.cached_value[...], self.cached_segment_ids[...]
    size = kv_seg.shape[1]

    def run(q, pos, seg):
      mask = causal_visibility(pos, seg, kv_seg)[:, None] & self.decode_pattern(pos, size)
      return masked_attention_lse(q, keys, values, mask)[0]

    return map_query_chunks(run, (q_btnh, position, seg), self.DECODE_CHUNK).astype(q_btnh.dtype)

  def decode_pattern(self, position_bt, size: int):
    raise NotImplementedError
