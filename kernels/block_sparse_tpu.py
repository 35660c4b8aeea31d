"""Block-sparse flash attention for TPU as Pallas (Mosaic) kernels; the TPU interpreter on CPU.

`kernels/block_sparse_pallas.py`'s contract (the GPU kernels; the pure-JAX twin is
`layers.attention.block_sparse.block_sparse_attention`) in `kernels/flash_tpu.py`'s layout:
heads before length, the walk over a table row a grid dimension marked "arbitrary" with the
online-softmax state in VMEM scratch. The tables travel as scalar-prefetch operands (SMEM), so
the BlockSpec index maps read them: step m of query block i fetches K/V tile rows[i][m], and
only listed tiles are ever copied into VMEM.

- forward, grid (batch, head, query block, m < M): out and lse on the last step.
- dQ, the same grid, accumulating dS K.
- dK/dV, grid (batch, kv head, key block, m < M_T) over the transposed table, whose entries
  g * C + i name (query head of the group, query block) pairs.

A row's steps past its count repeat its last listed block index (a repeated index is not
re-fetched) and compute nothing. M (and M_T) is the table's exact width for a concrete
numpy table. One block size for queries and keys, a multiple of 8 (sublanes); 128 suits the
TPU's MXU. Tested in the TPU interpreter against the engine and the dense reference, and
lowered to Mosaic on any host; it has not run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import (checked_tables, dot, dot_t, output_vjp, tpu_fwd_finish, tpu_fwd_init, tpu_fwd_tile,
                            tpu_when_visible)

SQ = None  # a squeezed block dimension


@dataclasses.dataclass(frozen=True)
class _Config:
  block: int
  causal: bool
  band: tuple[int, int] | None
  scale: float
  interpret: bool
  num_blocks: int  # C
  heads: int  # N
  kv_heads: int  # K
  width: int  # M: entries per table row
  width_t: int  # M_T: entries per transposed row
  table_batched: bool


def _params(cfg: _Config, semantics):
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
              interpret=pltpu.InterpretParams() if cfg.interpret else False)


def _mask(cfg: _Config, qi, kj, q_seg, k_seg):
  """[bs, bs] visibility of query block qi against key block kj (segments [bs, 1] / [1, bs])."""
  bs = cfg.block
  mask = (q_seg == k_seg) & (q_seg != 0)
  if cfg.causal or cfg.band is not None:
    rows = qi * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
    cols = kj * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
    if cfg.causal:
      mask &= cols <= rows
    if cfg.band is not None:
      mask &= (cols >= rows - cfg.band[0]) & (cols <= rows + cfg.band[1])
  return mask


def _slot(cfg: _Config, bt, hd, i, m, count_ref, width, heads):
  """Flat index of entry m (clamped to the row's last listed one) of table row (bt, hd, i)."""
  tb = bt if cfg.table_batched else 0
  row = (tb * heads + hd) * cfg.num_blocks + i
  last = jnp.maximum(count_ref[row] - 1, 0)
  return row * width + jnp.minimum(m, last), row


def _entry(cfg, bt, hd, i, m, tbl_ref, count_ref, width, heads):
  slot, _ = _slot(cfg, bt, hd, i, m, count_ref, width, heads)
  return jnp.maximum(tbl_ref[slot], 0)  # an empty row fetches block 0 and computes nothing


# ----------------------------------------------------------------------------- kernels


def _walk(cfg: _Config, tbl_ref, cnt_ref, qs_ref, ks_ref, tile, *, transposed: bool):
  """Step m of a table row: when m is below the row's count and the tile's mask has a visible
  entry, tile(mask). Rows: (batch, head, query block i) listing key blocks; transposed rows:
  (batch, kv head, key block j) listing entries g * C + i."""
  bt, hd, r, m = (pl.program_id(a) for a in range(4))
  width, heads = (cfg.width_t, cfg.kv_heads) if transposed else (cfg.width, cfg.heads)
  slot, row = _slot(cfg, bt, hd, r, m, cnt_ref, width, heads)

  @pl.when(m < cnt_ref[row])
  def _step():
    e = tbl_ref[slot]  # a listed entry (m is below the count), so >= 0
    qi, kj = (lax.rem(e, cfg.num_blocks), r) if transposed else (r, e)
    mask = _mask(cfg, qi, kj, qs_ref[...], ks_ref[...])  # [bq, bk]

    @tpu_when_visible(mask)
    def _visible():
      tile(mask)


def _fwd_kernel(tbl_ref, cnt_ref, tblt_ref, cntt_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc,
                l_sc, acc_sc, *, cfg: _Config):
  del tblt_ref, cntt_ref
  m = pl.program_id(3)
  pl.when(m == 0)(lambda: tpu_fwd_init(m_sc, l_sc, acc_sc))
  _walk(cfg, tbl_ref, cnt_ref, qs_ref, ks_ref, lambda mask: tpu_fwd_tile(q_ref, k_ref, v_ref, m_sc, l_sc, acc_sc, mask,
                                                                       cfg.scale), transposed=False)
  pl.when(m == pl.num_programs(3) - 1)(lambda: tpu_fwd_finish(o_ref, lse_ref, m_sc, l_sc, acc_sc))


def _dq_kernel(tbl_ref, cnt_ref, tblt_ref, cntt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref,
               dq_ref, dq_sc, *, cfg: _Config):
  del tblt_ref, cntt_ref
  m = pl.program_id(3)

  @pl.when(m == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def tile(mask):
    k = k_ref[...]
    p = jnp.where(mask, jnp.exp(dot_t(q_ref[...], k) * cfg.scale - lse_ref[...]), 0.0)
    ds = p * (dot_t(do_ref[...], v_ref[...]) - delta_ref[...])
    dq_sc[...] += dot(ds.astype(k.dtype), k)

  _walk(cfg, tbl_ref, cnt_ref, qs_ref, ks_ref, tile, transposed=False)

  @pl.when(m == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(tbl_ref, cnt_ref, tblt_ref, cntt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref,
                ks_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: _Config):
  del tbl_ref, cnt_ref
  m = pl.program_id(3)

  @pl.when(m == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def tile(mask):
    q, do = q_ref[...], do_ref[...]
    p = jnp.where(mask, jnp.exp(dot_t(q, k_ref[...]) * cfg.scale - lse_ref[...]), 0.0)
    contract_rows = lambda a, b_: lax.dot_general(a, b_, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dv_sc[...] += contract_rows(p.astype(do.dtype), do)
    ds = p * (dot_t(do, v_ref[...]) - delta_ref[...])
    dk_sc[...] += contract_rows(ds.astype(q.dtype), q)

  _walk(cfg, tblt_ref, cntt_ref, qs_ref, ks_ref, tile, transposed=True)

  @pl.when(m == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls


def _row_specs(cfg: _Config, h: int):
  """BlockSpecs of a (batch, head, query block, m) grid whose step m reads K/V block rows[i][m]."""
  bs, g = cfg.block, cfg.heads // cfg.kv_heads
  kj = lambda bt, hd, i, m, t, c, tt, ct: _entry(cfg, bt, hd, i, m, t, c, cfg.width, cfg.heads)
  q = pl.BlockSpec((SQ, SQ, bs, h), lambda bt, hd, i, m, *tables: (bt, hd, i, 0))
  kv = pl.BlockSpec((SQ, SQ, bs, h), lambda bt, hd, i, m, *tables: (bt, lax.div(hd, g), kj(bt, hd, i, m, *tables),
                                                                      0))
  stat = pl.BlockSpec((SQ, SQ, bs, 1), lambda bt, hd, i, m, *tables: (bt, hd, i, 0))
  qseg = pl.BlockSpec((SQ, bs, 1), lambda bt, hd, i, m, *tables: (bt, i, 0))
  kseg = pl.BlockSpec((SQ, SQ, 1, bs), lambda bt, hd, i, m, *tables: (bt, kj(bt, hd, i, m, *tables), 0, 0))
  return q, kv, stat, qseg, kseg


def _forward(tables, q, k, v, qseg, kseg, cfg: _Config):
  """q [B, N, Tp, H], k/v [B, K, Tp, H], qseg [B, Tp, 1], kseg [B, C, 1, bs] (a whole-array (1, bs) tile, as
  Mosaic wants for any block size) -> out, lse [B, N, Tp, 1]."""
  b, n, tp, h = q.shape
  bs = cfg.block
  q_spec, kv_spec, stat_spec, qseg_spec, kseg_spec = _row_specs(cfg, h)
  grid = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(b, n, cfg.num_blocks, cfg.width),
      in_specs=[q_spec, kv_spec, kv_spec, qseg_spec, kseg_spec], out_specs=[q_spec, stat_spec],
      scratch_shapes=[pltpu.VMEM((bs, 1), jnp.float32), pltpu.VMEM((bs, 1), jnp.float32),
                      pltpu.VMEM((bs, h), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg), grid_spec=grid,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)],
      name="block_sparse_tpu_fwd", **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
  )(*tables, q, k, v, qseg, kseg)


def _backward(tables, q, k, v, qseg, kseg, out, lse, d_out, cfg: _Config):
  b, n, tp, h = q.shape
  bs, g, nq = cfg.block, cfg.heads // cfg.kv_heads, cfg.num_blocks
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing: every P is masked to 0
  q_spec, kv_spec, stat_spec, qseg_spec, kseg_spec = _row_specs(cfg, h)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, n, nq, cfg.width),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, qseg_spec, kseg_spec],
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bs, h), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="block_sparse_tpu_bwd_dq", **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
  )(*tables, q, k, v, d_out, lse, delta, qseg, kseg)

  # dK/dV: step m of key block j reads the (query head, query block) pair e = colsT[j][m].
  e = lambda bt, kh, j, m, t, c, tt, ct: _entry(cfg, bt, kh, j, m, tt, ct, cfg.width_t, cfg.kv_heads)
  qh = lambda bt, kh, j, m, *tables: kh * g + lax.div(e(bt, kh, j, m, *tables), nq)
  qb = lambda bt, kh, j, m, *tables: lax.rem(e(bt, kh, j, m, *tables), nq)
  qt_spec = pl.BlockSpec((SQ, SQ, bs, h), lambda bt, kh, j, m, *t: (bt, qh(bt, kh, j, m, *t), qb(bt, kh, j, m, *t),
                                                                      0))
  st_spec = pl.BlockSpec((SQ, SQ, bs, 1), lambda bt, kh, j, m, *t: (bt, qh(bt, kh, j, m, *t),
                                                                      qb(bt, kh, j, m, *t), 0))
  kt_spec = pl.BlockSpec((SQ, SQ, bs, h), lambda bt, kh, j, m, *t: (bt, kh, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, cfg.kv_heads, nq, cfg.width_t),
          in_specs=[qt_spec, kt_spec, kt_spec, qt_spec, st_spec, st_spec,
                    pl.BlockSpec((SQ, bs, 1), lambda bt, kh, j, m, *t: (bt, qb(bt, kh, j, m, *t), 0)),
                    pl.BlockSpec((SQ, SQ, 1, bs), lambda bt, kh, j, m, *t: (bt, j, 0, 0))],
          out_specs=[kt_spec, kt_spec],
          scratch_shapes=[pltpu.VMEM((bs, h), jnp.float32), pltpu.VMEM((bs, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="block_sparse_tpu_bwd_dkv", **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
  )(*tables, q, k, v, d_out, lse, delta, qseg, kseg)
  return dq, dk, dv


_attention = output_vjp(_forward, _backward)


# ----------------------------------------------------------------------------- public API


def _trim(table, bound: int):
  """(flat entries, per-row counts, width): a concrete table cut to its widest row, a traced one
  to `bound` (the most entries a row can hold; the shared helpers pad rows to Triton vectors)."""
  xp = np if isinstance(table, np.ndarray) else jnp
  counts = xp.sum(table >= 0, axis=-1).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1) if xp is np else min(bound, table.shape[-1])
  return table[..., :width].reshape(-1).astype(np.int32), counts.reshape(-1), width


def block_sparse_attention_tpu(q_btnh, k_bskh, v_bskh, segment_ids, kv_blocks, kv_valid, *, block: int, causal: bool,
                               band=None, interpret: bool | None = None):
  """`block_sparse_attention` through the TPU kernels: same arguments, same result.

  q [B, T, N, H]; k, v [B, T, K, H]; segment_ids [B, T] (0 = padding); kv_blocks / kv_valid
  [B or 1, N or K or 1, ceil(T / block), M]; block a multiple of 8. Queries that see no key
  give zeros. Differentiable in q, k, v. `interpret=None` compiles with Mosaic on TPU and
  runs the TPU interpreter elsewhere.
  """
  if block < 8 or block % 8:
    raise ValueError(f"block={block}: TPU tiles must be positive multiples of 8")
  rows, cols = checked_tables(q_btnh, k_bskh, v_bskh, kv_blocks, kv_valid, block)
  b, t, n, h = q_btnh.shape
  kvh = k_bskh.shape[2]
  nb = rows.shape[2]
  tp = nb * block
  (tbl, cnt, width), (tblt, cntt, width_t) = _trim(rows, kv_blocks.shape[-1]), _trim(cols, (n // kvh) * nb)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  cfg = _Config(block=block, causal=bool(causal), band=None if band is None else (int(band[0]), int(band[1])),
                scale=1.0 / math.sqrt(h), interpret=bool(interpret), num_blocks=nb, heads=n, kv_heads=kvh,
                width=int(width), width_t=int(width_t), table_batched=rows.shape[0] > 1)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
  heads_first = lambda x: jnp.swapaxes(pad(x), 1, 2)  # [B, T, N, H] -> [B, N, Tp, H]
  seg = pad(jnp.asarray(segment_ids, jnp.int32))
  tables = tuple(jnp.asarray(x) for x in (tbl, cnt, tblt, cntt))
  out = _attention(tables, heads_first(q_btnh), heads_first(k_bskh), heads_first(v_bskh), seg[:, :, None],
                   seg.reshape(b, nb, 1, block), cfg=cfg)
  return jnp.swapaxes(out, 1, 2)[:, :t]
