"""Split-KV decode attention (Flash-Decoding / LeanAttention) as a Pallas kernel.

A few new query tokens attend to a long KV cache. One query row per program would leave
the GPU idle (B * N programs for a whole cache), so the cache is cut into `num_splits`
contiguous ranges and each program - (split, kv head, batch) - streams only its range,
returning a partial output and its log-sum-exp. The partials are combined outside the
kernel with the associative online-softmax merge (`kernels.reference.merge_partials`).

Grouped-query heads are packed into the rows of one tile: the G = N/K query heads that
share a kv head and the Tq new tokens form G*Tq rows (padded to 16, the smallest Triton
matrix tile), so K/V are read once per kv head, not once per query head.

Per-sequence cache lengths: the new tokens are the last Tq entries of each sequence's
valid cache prefix, so query t of sequence b sits at position lengths[b] - Tq + t and sees
keys at positions <= its own (which also hides everything past the length). Key blocks
past a sequence's length are never loaded: the loop bound comes from the positions.
With segment ids (a model's batched cache: padded prompts, packed prompts, one write
position for every row) a query also needs its own nonzero segment; the ids of each key
block are loaded beside it (4 bytes a slot against 2*K*H*2 for bf16 K/V).

Inference only (no VJP). Twin: `reference_decode_attention` (dense attention with the same
mask, `kernels.reference`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.common import LN2, LOG2E, M_INIT, SQ, dot, dot_t, pltriton, resolve_interpret
from kernels.reference import make_mask, merge_partials, reference_attention_lse


def _decode_kernel(*refs, bk: int, blocks_per_split: int, scale: float, segs: bool):
  if segs:
    q_ref, pos_ref, qs_ref, k_ref, v_ref, ks_ref, o_ref, lse_ref = refs
  else:
    (q_ref, pos_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
  sp = pl.program_id(0)
  q = q_ref[...]  # [R, H]
  pos = pos_ref[...]  # [R] query positions; -1 on padding rows (they see nothing)
  q_seg = None if qs_ref is None else qs_ref[...]  # [R] segment ids of the query rows
  c = scale * LOG2E
  # Blocks holding any visible key: cdiv(max position + 1, bk) (0 when every row is padding).
  n_valid = lax.div(jnp.max(pos) + bk, bk)
  lo = sp * blocks_per_split
  hi = jnp.minimum(lo + blocks_per_split, n_valid)

  def step(j, carry):
    o, m, l = carry
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    s = dot_t(q, k) * c
    k_pos = start + jnp.arange(bk, dtype=jnp.int32)
    visible = k_pos[None, :] <= pos[:, None]
    if q_seg is not None:  # packed or padded caches: only the query's own segment
      visible &= ks_ref[pl.ds(start, bk)][None, :] == q_seg[:, None]
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    v = v_ref[pl.ds(start, bk), :]
    o = o * alpha[:, None] + dot(p.astype(v.dtype), v)
    return o, m_new, l

  rows = q.shape[0]
  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), M_INIT, jnp.float32), jnp.zeros((rows,), jnp.float32))
  o, m, l = lax.fori_loop(lo, hi, step, carry)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = o * (1.0 / l_safe)[:, None]
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


def _default_splits(batch: int, kv_heads: int, blocks: int) -> int:
  """About four programs per multiprocessor, never more splits than key blocks."""
  try:
    cores = int(getattr(jax.devices()[0], "core_count", 0)) or 132
  except Exception:  # noqa: BLE001 - no device information: assume an H100's 132 SMs
    cores = 132
  return max(1, min(blocks, -(-4 * cores // (batch * kv_heads))))


def decode_attention_pallas(q_btnh, k_cache_bskh, v_cache_bskh, lengths_b, *, q_segment_ids=None,
                            kv_segment_ids=None, block_k: int = 64, num_splits: int | None = None,
                            num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None):
  """Attention of Tq new tokens against a KV cache: out [B, Tq, N, H] in q's dtype.

  q [B, Tq, N, H]; caches [B, S, K, H] with entries [0, lengths[b]) valid and the new
  tokens' K/V already written at [lengths[b] - Tq, lengths[b]); causal among the new
  tokens. Optional segment ids, q [B, Tq] and cache [B, S] (both or neither; 0 = padding):
  a query then sees only cached entries of its own nonzero segment (padded prompts in a
  batch sharing one write position, packed prompts). Rows that see no key (lengths[b] = 0,
  padding queries) give zeros. S must be a multiple of `block_k` (a power of two >= 16):
  caches are allocated once, so no per-call padding of gigabytes is done here.
  """
  b, tq, n, h = q_btnh.shape
  _, s, kvh, _ = k_cache_bskh.shape
  if n % kvh:
    raise ValueError(f"num_heads={n} is not a multiple of num_kv_heads={kvh}")
  if block_k < 16 or block_k & (block_k - 1) or s % block_k:
    raise ValueError(f"block_k={block_k} must be a power of two >= 16 dividing the cache length {s}")
  if h < 16 or h & (h - 1):
    raise ValueError(f"head dim {h}: the decode kernel needs a power of two >= 16")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  interp = resolve_interpret(interpret)
  g = n // kvh
  rows = max(16, 1 << (g * tq - 1).bit_length())
  # [B, Tq, K, G, H] -> rows ordered (g, t): [B, K, G*Tq, H], zero rows to a power of two.
  q = jnp.transpose(q_btnh.reshape(b, tq, kvh, g, h), (0, 2, 3, 1, 4)).reshape(b, kvh, g * tq, h)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g * tq), (0, 0)))
  t_pos = lengths_b.astype(jnp.int32)[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]  # [B, Tq]
  if q_segment_ids is not None:  # a padding query sees nothing
    t_pos = jnp.where(jnp.asarray(q_segment_ids) != 0, t_pos, -1)
  pos = jnp.pad(jnp.tile(t_pos, (1, g)), ((0, 0), (0, rows - g * tq)), constant_values=-1)  # [B, rows]
  blocks = s // block_k
  splits = num_splits or _default_splits(b, kvh, blocks)
  per_split = -(-blocks // min(splits, blocks))
  splits = -(-blocks // per_split)
  params = None if interp or pltriton is None else pltriton.CompilerParams(num_warps=num_warps,
                                                                              num_stages=num_stages)
  row_spec = pl.BlockSpec((SQ, rows), lambda sp, kh, bt: (bt, 0))
  cache_spec = pl.BlockSpec((SQ, s, SQ, h), lambda sp, kh, bt: (bt, 0, kh, 0))
  segs = q_segment_ids is not None
  if segs:  # ids per query row, as the rows are ordered; padding rows -1 (they see nothing anyway)
    q_seg = jnp.pad(jnp.tile(jnp.asarray(q_segment_ids, jnp.int32), (1, g)), ((0, 0), (0, rows - g * tq)),
                    constant_values=-1)
    kv_seg = jnp.asarray(kv_segment_ids, jnp.int32)
  o, lse = pl.pallas_call(
      functools.partial(_decode_kernel, bk=block_k, blocks_per_split=per_split, scale=1.0 / math.sqrt(h),
                        segs=segs),
      grid=(splits, kvh, b),
      in_specs=[pl.BlockSpec((SQ, SQ, rows, h), lambda sp, kh, bt: (bt, kh, 0, 0)), row_spec]
      + ([row_spec] if segs else []) + [cache_spec, cache_spec]
      + ([pl.BlockSpec((SQ, s), lambda sp, kh, bt: (bt, 0))] if segs else []),
      out_specs=[
          pl.BlockSpec((SQ, SQ, SQ, rows, h), lambda sp, kh, bt: (bt, kh, sp, 0, 0)),
          pl.BlockSpec((SQ, SQ, SQ, rows), lambda sp, kh, bt: (bt, kh, sp, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, kvh, splits, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kvh, splits, rows), jnp.float32)],
      compiler_params=params,
      interpret=interp,
      name="flash_decode",
  )(*((q, pos, q_seg, k_cache_bskh, v_cache_bskh, kv_seg) if segs else (q, pos, k_cache_bskh, v_cache_bskh)))
  out, _ = functools.reduce(lambda acc, i: merge_partials(*acc, o[:, :, i], lse[:, :, i]), range(1, splits),
                            (o[:, :, 0], lse[:, :, 0]))
  out = out[:, :, :g * tq].reshape(b, kvh, g, tq, h)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, tq, n, h).astype(q_btnh.dtype)


def reference_decode_attention(q_btnh, k_cache_bskh, v_cache_bskh, lengths_b):
  """The same function computed densely (`kernels.reference`; independent of the kernel)."""
  b, tq = q_btnh.shape[:2]
  s = k_cache_bskh.shape[1]
  lengths = lengths_b.astype(jnp.int32)
  q_index = lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]
  kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  kv_seg = (kv_index < lengths[:, None]).astype(jnp.int32)
  q_seg = jnp.ones((b, tq), jnp.int32)
  out, _ = reference_attention_lse(q_btnh, k_cache_bskh, v_cache_bskh,
                                   make_mask(q_seg, kv_seg, q_index, kv_index, causal=True))
  return out
