"""Split-KV decode attention for TPU as a Pallas (Mosaic) kernel; the TPU interpreter on CPU.

`kernels/decode_pallas.py`'s contract (a few new tokens against a long KV cache with
per-sequence lengths; inference only) in Mosaic's terms. The cache is read in place as
[B, S, K*H] (a free reshape of [B, S, K, H]): a tile is (block_k, H) of one kv head, so head
dims must be multiples of 128 (the lane width). The G = N/K query heads of a kv head and the
Tq new tokens form the G*Tq rows of one query tile, so K/V are read once per kv head.

Grid (batch, kv head, split, block of the split): the splits are independent ("parallel":
TPU cores share them) and each walks its contiguous range of cache blocks sequentially with
the online-softmax state in VMEM scratch, writing a partial (out, lse) that the associative
merge (`kernels.reference.merge_partials`) combines outside. The lengths travel as a
scalar-prefetch operand: blocks past a sequence's length repeat the last needed block index
(so they are never fetched) and compute nothing.

Tested in the TPU interpreter against the pure-JAX reference (`reference_decode_attention`)
and lowered to Mosaic on any host; it has not run on a TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import tpu_fwd_finish, tpu_fwd_init, tpu_fwd_tile
from kernels.reference import merge_partials

SQ = None


def _decode_kernel(*refs, bk: int, per_split: int, scale: float, segs: bool):
  if segs:
    len_ref, q_ref, pos_ref, qs_ref, k_ref, v_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  else:
    len_ref, q_ref, pos_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  bt, sp, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  blk = sp * per_split + j

  @pl.when(j == 0)
  def _init():
    tpu_fwd_init(m_sc, l_sc, acc_sc)

  @pl.when(blk * bk < len_ref[bt])  # a block holding a valid cache entry
  def _step():
    pos = pos_ref[...]  # [R, 1]; -1 on padding rows
    k_pos = blk * bk + lax.broadcasted_iota(jnp.int32, (pos.shape[0], bk), 1)
    visible = k_pos <= pos
    if segs:  # only the query's own segment: [R, 1] against the block's [1, bk]
      visible &= qs_ref[...] == ks_ref[...]
    tpu_fwd_tile(q_ref, k_ref, v_ref, m_sc, l_sc, acc_sc, visible, scale)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    tpu_fwd_finish(o_ref, lse_ref, m_sc, l_sc, acc_sc)


def decode_attention_tpu(q_btnh, k_cache_bskh, v_cache_bskh, lengths_b, *, q_segment_ids=None, kv_segment_ids=None,
                         block_k: int = 512, num_splits: int = 2, interpret: bool | None = None):
  """Attention of Tq new tokens against a KV cache: out [B, Tq, N, H] in q's dtype.

  q [B, Tq, N, H]; caches [B, S, K, H] with entries [0, lengths[b]) valid and the new tokens'
  K/V already written at [lengths[b] - Tq, lengths[b]); causal among the new tokens. Optional
  segment ids, q [B, Tq] and cache [B, S] (both or neither; 0 = padding): a query sees only
  entries of its own nonzero segment. Rows that see no key (lengths[b] = 0, padding queries)
  give zeros. H a multiple of 128; S a multiple of `block_k` (a
  multiple of 8). `num_splits` independent ranges of the cache (2: one per TensorCore of a
  megacore chip). `interpret=None` compiles with Mosaic on TPU and runs the TPU interpreter
  elsewhere.
  """
  b, tq, n, h = q_btnh.shape
  _, s, kvh, _ = k_cache_bskh.shape
  if n % kvh:
    raise ValueError(f"num_heads={n} is not a multiple of num_kv_heads={kvh}")
  if h % 128:
    raise ValueError(f"head dim {h}: the TPU decode kernel reads (block_k, H) cache tiles and needs H to be a "
                     f"multiple of 128")
  if block_k < 8 or block_k % 8 or s % block_k:
    raise ValueError(f"block_k={block_k} must be a multiple of 8 dividing the cache length {s}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  g = n // kvh
  rows = -(-g * tq // 8) * 8
  # [B, Tq, K, G, H] -> rows ordered (g, t): [B, K, G*Tq, H], zero rows up to a multiple of 8.
  q = jnp.transpose(q_btnh.reshape(b, tq, kvh, g, h), (0, 2, 3, 1, 4)).reshape(b, kvh, g * tq, h)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g * tq), (0, 0)))
  lengths = lengths_b.astype(jnp.int32)
  t_pos = lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]  # [B, Tq]
  segs = q_segment_ids is not None
  if segs:  # a padding query sees nothing
    t_pos = jnp.where(jnp.asarray(q_segment_ids) != 0, t_pos, -1)
  per_row = lambda x: jnp.pad(jnp.tile(x, (1, g)), ((0, 0), (0, rows - g * tq)), constant_values=-1)[..., None]
  pos = per_row(t_pos)  # [B, rows, 1], as the query rows are ordered
  blocks = s // block_k
  per_split = -(-blocks // max(1, min(num_splits, blocks)))
  splits = -(-blocks // per_split)

  def kv_block(bt, kh, sp, j, len_ref):  # the last block holding a valid entry, for the steps past it
    last = jnp.maximum(lax.div(len_ref[bt] + block_k - 1, block_k) - 1, 0)
    return bt, jnp.minimum(sp * per_split + j, last), kh

  kv_spec = pl.BlockSpec((SQ, block_k, h), kv_block)
  row_spec = pl.BlockSpec((SQ, rows, 1), lambda bt, kh, sp, j, ln: (bt, 0, 0))
  # Cache segment ids as [B, S/bk, 1, bk]: a (1, bk) tile spans its array's last two dims.
  kseg_spec = pl.BlockSpec((SQ, SQ, 1, block_k), lambda *a: (*kv_block(*a)[:2], 0, 0))
  grid = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, kvh, splits, per_split),
      in_specs=[pl.BlockSpec((SQ, SQ, rows, h), lambda bt, kh, sp, j, ln: (bt, kh, 0, 0)), row_spec]
      + ([row_spec] if segs else []) + [kv_spec, kv_spec] + ([kseg_spec] if segs else []),
      out_specs=[pl.BlockSpec((SQ, SQ, SQ, rows, h), lambda bt, kh, sp, j, ln: (bt, kh, sp, 0, 0)),
                 pl.BlockSpec((SQ, SQ, SQ, rows, 1), lambda bt, kh, sp, j, ln: (bt, kh, sp, 0, 0))],
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, h), jnp.float32)])
  o, lse = pl.pallas_call(
      functools.partial(_decode_kernel, bk=block_k, per_split=per_split, scale=1.0 / math.sqrt(h), segs=segs),
      grid_spec=grid,
      out_shape=[jax.ShapeDtypeStruct((b, kvh, splits, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kvh, splits, rows, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="decode_tpu",
  )(lengths, q, pos, *([per_row(jnp.asarray(q_segment_ids, jnp.int32))] if segs else []),
    k_cache_bskh.reshape(b, s, kvh * h), v_cache_bskh.reshape(b, s, kvh * h),
    *([jnp.asarray(kv_segment_ids, jnp.int32).reshape(b, blocks, 1, block_k)] if segs else []))
  lse = lse[..., 0]
  out, _ = functools.reduce(lambda acc, i: merge_partials(*acc, o[:, :, i], lse[:, :, i]), range(1, splits),
                            (o[:, :, 0], lse[:, :, 0]))
  out = out[:, :, :g * tq].reshape(b, kvh, g, tq, h)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, tq, n, h).astype(q_btnh.dtype)
