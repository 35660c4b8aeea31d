"""Split-KV decode attention (Flash-Decoding; the equal-split case of Lean Attention).

Decoding asks a few new query tokens per sequence to attend over a long KV cache. One
query row per (batch, head) leaves a blockwise kernel with almost no parallel work
along the query axis, so the cache is cut into chunks of `chunk` slots instead, every
chunk's partial result (normalised output o and log-sum-exp lse) is computed
independently of the others, and the partials are reduced with the online-softmax
merge (PAPERS.md A2/D15):

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

Measured (one H200, jax 0.11.2, bf16, B=4, N=32, K=8, H=128, one new token, full caches of
8k-128k): 0.18-1.9 ms, 0.7-1.15 TB/s of K/V read, level with XLA's dense path and ~9.5x
faster than one `flash_attention_lse` call streaming the same cache block by block (one
query row leaves that loop's parallel width at B*N). What the split buys over the dense
path is memory on long prefills through the cache ([B, N, block_q, S] scores at a time,
not [B, N, T, S]); for bandwidth-bound decoding the Pallas kernel (kernels/decode_pallas.py)
is the fast path and this is its portable twin.
"""

from __future__ import annotations

import jax.numpy as jnp

from layers.attention.flash import flash_attention_lse, merge_partials

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
  """Dense masked attention over the whole cache (exact.reference_attention) with the same masks."""
  # Imported here so that exact.py can import this module at its top without a cycle.
  from layers.attention.exact import make_mask, reference_attention
  b, t = q_btnh.shape[:2]
  lengths = jnp.broadcast_to(jnp.asarray(cache_lengths_b, jnp.int32), (b,))
  q_seg, kv_seg, q_index, kv_index = decode_masks(lengths, t, k_cache_bskh.shape[1], q_segment_ids, kv_segment_ids)
  return reference_attention(q_btnh, k_cache_bskh, v_cache_bskh, make_mask(q_seg, kv_seg, q_index, kv_index, causal))
