"""Block-sparse flash attention as Pallas kernels, driven by a per-(query block, key block) table.

The contract is `layers.attention.block_sparse.block_sparse_attention`'s (its pure-JAX engine
is the reference twin): for every query block of `block` rows, a table row lists the key
blocks it attends to; only those K/V tiles are loaded and computed. Inside a visited tile
the mask is built in the kernel from segment ids (0 = padding), stored positions (causal)
and an optional band (i - before <= j <= i + after, for sliding windows).

Three kernels, each a grid of independent programs over the native [B, T, N, H] layout,
one block size for queries and keys (the table's granularity):

- forward, grid (query block, head, batch): the query tile stays resident; the program
  reads its table row (a vector of `Mp` block indices, the valid ones first, then -1),
  and for m < count loads K/V tile row[m] and applies the online-softmax step in fp32
  base 2. Writes out and lse.
- dQ, grid (query block, head, batch): the same walk over the row, accumulating dS K.
- dK/dV, grid (key block, kv head, batch): the walk over the *transposed* table: for key
  block j, the (query head of its group, query block) pairs whose rows list j, as entries
  g * C + i. The program owns dK/dV of its tile, so no atomics.

Program tiles (`q_tile`, `kv_tile` in 1, 2, 4; default 1): a forward/dQ program may own r
consecutive query blocks (an r * block-row tile) and walk the union of their rows, each
entry carrying r bits that say which of the r blocks list it; the visited tile's rows whose
block does not list it are masked. The same for dK/dV programs over r key blocks and the
transposed table. Fewer, longer programs for tables with short rows, at the price of the
union's unlisted sub-tiles (computed, then masked). A streamed tile that none of the
program's blocks lists is never loaded; the program's own tile is loaded whole, and the rows
of its blocks that nothing lists get zero gradients whatever their values (NaN included).
Whether it pays on a GPU is for `scripts/bench_kernels.py` to say (not yet measured).

Cost: forward 4 * B * N * (kept block pairs) * block^2 * H FLOPs, backward 2.5x; memory
O(T * H) residuals plus the tables: [B or 1, N, C, M] int32, and the transposed table
[B or 1, K, C, M_T] where M_T is the largest number of listers of one key block (found
exactly for a concrete numpy table; G * C, its bound, for a table computed under jit such
as XAttention's).

Tables are passed as in `block_sparse_attention`: kv_blocks / kv_valid [B or 1, N or K or 1,
C, M]; the valid entries of a row must be distinct. Block sizes are powers of two >= 16
(Triton tiles). GPU: the Triton lowering; CPU: interpret mode (the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.common import (LOG2E, SQ, TILES, checked_tables, dot, dot_t, merge_rows, online_finish, online_init,
                            online_step, output_vjp, pad_axis, pltriton, pow2_at_least, resolve_interpret)


@dataclasses.dataclass(frozen=True)
class _Config:
  block: int
  causal: bool
  band: tuple[int, int] | None
  scale: float
  interpret: bool
  num_blocks: int  # C: query (and key) blocks
  table_batched: bool  # the table has a batch axis of B (else 1, shared)
  num_warps: int
  num_stages: int
  q_tile: int = 1  # table blocks per forward / dQ program (its query tile: q_tile * block rows)
  kv_tile: int = 1  # table blocks per dK/dV program (its key tile: kv_tile * block rows)


def _compiler_params(cfg: _Config):
  if cfg.interpret or pltriton is None:
    return None
  return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _tile_mask(row_pos, col_pos, row_seg, col_seg, cfg: _Config, rows_are_queries: bool, bits=None):
  """[rows, cols] visibility: same nonzero segment (rows arrive with 0 remapped to -1), causal, band;
  with `bits` (a multi-block program's entry, see `merge_rows`), only the rows of the blocks that list it."""
  mask = row_seg[:, None] == col_seg[None, :]
  if bits is not None:
    mask &= _sub_keep(bits, row_pos.shape[0] // cfg.block, cfg.block)[:, None]
  qp, kp = (row_pos[:, None], col_pos[None, :]) if rows_are_queries else (col_pos[None, :], row_pos[:, None])
  if cfg.causal:
    mask &= kp <= qp
  if cfg.band is not None:
    mask &= (kp >= qp - cfg.band[0]) & (kp <= qp + cfg.band[1])
  return mask


def _split(e, r: int):
  """An entry of a merged row (see `merge_rows`) -> (block or transposed entry, sub-block bits)."""
  if r == 1:
    return e, None
  return lax.div(e, 1 << r), lax.rem(e, 1 << r)


def _sub_keep(bits, r: int, bs: int):
  """[r * bs] bool: the tile's rows whose sub-block (row // bs) has its bit set in `bits`."""
  sub = lax.div(jnp.arange(r * bs, dtype=jnp.int32), jnp.int32(bs))
  return jnp.bitwise_and(bits, jnp.left_shift(jnp.int32(1), sub)) != 0


def _entry(row, m):
  """row[m] of a loaded table row (a masked sum: a vector load plus a reduction lowers everywhere)."""
  return jnp.sum(jnp.where(jnp.arange(row.shape[0], dtype=jnp.int32) == m, row, 0))


def _count(row):
  return jnp.sum((row >= 0).astype(jnp.int32))


def _no_pad(seg):
  return jnp.where(seg == 0, -1, seg)


# ----------------------------------------------------------------------------- forward and dQ


def _fwd_kernel(tbl_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, cfg: _Config):
  bs, r = cfg.block, cfg.q_tile
  i = pl.program_id(0)
  q = q_ref[...]
  q_pos = i * (r * bs) + jnp.arange(r * bs, dtype=jnp.int32)
  q_seg = _no_pad(qs_ref[...])
  row = tbl_ref[...]
  c = cfg.scale * LOG2E

  def step(m, carry):
    blk, bits = _split(_entry(row, m), r)
    start = pl.multiple_of(blk * bs, bs)
    k = k_ref[pl.ds(start, bs), :]
    s = dot_t(q, k) * c
    mask = _tile_mask(q_pos, start + jnp.arange(bs, dtype=jnp.int32), q_seg, ks_ref[pl.ds(start, bs)], cfg, True, bits)
    return online_step(carry, jnp.where(mask, s, -jnp.inf), lambda: v_ref[pl.ds(start, bs), :])

  online_finish(lax.fori_loop(0, _count(row), step, online_init(r * bs, q.shape[1])), o_ref, lse_ref)


def _dq_kernel(tbl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref, *, cfg: _Config):
  bs, r = cfg.block, cfg.q_tile
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse2, delta = lse_ref[...], delta_ref[...]
  q_pos = i * (r * bs) + jnp.arange(r * bs, dtype=jnp.int32)
  q_seg = _no_pad(qs_ref[...])
  row = tbl_ref[...]
  c = cfg.scale * LOG2E

  def step(m, dq):
    blk, bits = _split(_entry(row, m), r)
    start = pl.multiple_of(blk * bs, bs)
    k = k_ref[pl.ds(start, bs), :]
    v = v_ref[pl.ds(start, bs), :]
    s = dot_t(q, k) * c
    mask = _tile_mask(q_pos, start + jnp.arange(bs, dtype=jnp.int32), q_seg, ks_ref[pl.ds(start, bs)], cfg, True, bits)
    p = jnp.where(mask, jnp.exp2(s - lse2[:, None]), 0.0)
    ds = p * (dot_t(do, v) - delta[:, None])
    if r > 1:  # the tile's rows of a block with an empty row: their dO is never read
      ds = jnp.where(mask, ds, 0.0)
    return dq + dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, _count(row), step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(tbl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref, *,
                cfg: _Config):
  bs, nq, r = cfg.block, cfg.num_blocks, cfg.kv_tile
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_pos = j * (r * bs) + jnp.arange(r * bs, dtype=jnp.int32)
  k_seg = _no_pad(ks_ref[...])
  row = tbl_ref[...]
  c = cfg.scale * LOG2E

  def step(m, carry):
    dk, dv = carry
    e, bits = _split(_entry(row, m), r)
    g, i = lax.div(e, nq), lax.rem(e, nq)
    start = pl.multiple_of(i * bs, bs)
    q = q_ref[pl.ds(start, bs), g, :]
    do = do_ref[pl.ds(start, bs), g, :]
    lse2 = lse_ref[g, pl.ds(start, bs)]
    delta = delta_ref[g, pl.ds(start, bs)]
    st = dot_t(k, q) * c  # S^T [bk, bq]
    mask = _tile_mask(k_pos, start + jnp.arange(bs, dtype=jnp.int32), k_seg, qs_ref[pl.ds(start, bs)], cfg, False,
                      bits)
    pt = jnp.where(mask, jnp.exp2(st - lse2[None, :]), 0.0)
    dv = dv + dot(pt.astype(do.dtype), do)
    dst = pt * (dot_t(v, do) - delta[None, :])
    if r > 1:  # the tile's key rows of a block no row lists: their K/V are never read
      dst = jnp.where(mask, dst, 0.0)
    dk = dk + dot(dst.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, _count(row), step, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls


def _tsel(cfg: _Config):
  return (lambda bt: bt) if cfg.table_batched else (lambda bt: 0)


def _forward(rows, cols, q, k, v, seg, cfg: _Config):
  del cols  # the transposed table: the backward's
  b, tp, n, h = q.shape
  kvh = k.shape[2]
  g, mp = n // kvh, rows.shape[-1]
  bq = cfg.q_tile * cfg.block
  tb = _tsel(cfg)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(cfg.num_blocks // cfg.q_tile, n, b),
      in_specs=[
          pl.BlockSpec((SQ, SQ, SQ, mp), lambda i, hd, bt: (tb(bt), hd, i, 0)),
          pl.BlockSpec((SQ, bq, SQ, h), lambda i, hd, bt: (bt, i, hd, 0)),
          pl.BlockSpec((SQ, tp, SQ, h), lambda i, hd, bt: (bt, 0, lax.div(hd, g), 0)),
          pl.BlockSpec((SQ, tp, SQ, h), lambda i, hd, bt: (bt, 0, lax.div(hd, g), 0)),
          pl.BlockSpec((SQ, bq), lambda i, hd, bt: (bt, i)),
          pl.BlockSpec((SQ, tp), lambda i, hd, bt: (bt, 0)),
      ],
      out_specs=[
          pl.BlockSpec((SQ, bq, SQ, h), lambda i, hd, bt: (bt, i, hd, 0)),
          pl.BlockSpec((SQ, SQ, bq), lambda i, hd, bt: (bt, hd, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="block_sparse_fwd",
  )(rows, q, k, v, seg, seg)


def _backward(rows, cols, q, k, v, seg, out, lse, d_out, cfg: _Config):
  b, tp, n, h = q.shape
  kvh = k.shape[2]
  g = n // kvh
  bq, bk = cfg.q_tile * cfg.block, cfg.kv_tile * cfg.block
  tb = _tsel(cfg)
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
  lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, 0.0)  # rows that see nothing: every P is masked to 0

  q_spec = pl.BlockSpec((SQ, bq, SQ, h), lambda i, hd, bt: (bt, i, hd, 0))
  kv_spec = pl.BlockSpec((SQ, tp, SQ, h), lambda i, hd, bt: (bt, 0, lax.div(hd, g), 0))
  row_spec = pl.BlockSpec((SQ, SQ, bq), lambda i, hd, bt: (bt, hd, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(cfg.num_blocks // cfg.q_tile, n, b),
      in_specs=[pl.BlockSpec((SQ, SQ, SQ, rows.shape[-1]), lambda i, hd, bt: (tb(bt), hd, i, 0)),
                q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                pl.BlockSpec((SQ, bq), lambda i, hd, bt: (bt, i)),
                pl.BlockSpec((SQ, tp), lambda i, hd, bt: (bt, 0))],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="block_sparse_bwd_dq",
  )(rows, q, k, v, d_out, lse2, delta, seg, seg)

  qg_spec = pl.BlockSpec((SQ, tp, g, h), lambda j, kh, bt: (bt, 0, kh, 0))
  rowg_spec = pl.BlockSpec((SQ, g, tp), lambda j, kh, bt: (bt, kh, 0))
  kt_spec = pl.BlockSpec((SQ, bk, SQ, h), lambda j, kh, bt: (bt, j, kh, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(cfg.num_blocks // cfg.kv_tile, kvh, b),
      in_specs=[pl.BlockSpec((SQ, SQ, SQ, cols.shape[-1]), lambda j, kh, bt: (tb(bt), kh, j, 0)),
                qg_spec, kt_spec, kt_spec, qg_spec, rowg_spec, rowg_spec,
                pl.BlockSpec((SQ, tp), lambda j, kh, bt: (bt, 0)),
                pl.BlockSpec((SQ, bk), lambda j, kh, bt: (bt, j))],
      out_specs=[kt_spec, kt_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="block_sparse_bwd_dkv",
  )(cols, q, k, v, d_out, lse2, delta, seg, seg)
  return dq, dk, dv


_attention = output_vjp(_forward, _backward)


# ----------------------------------------------------------------------------- tables


# ----------------------------------------------------------------------------- public API


def block_sparse_attention_pallas(q_btnh, k_bskh, v_bskh, segment_ids, kv_blocks, kv_valid, *, block: int,
                                  causal: bool, band=None, interpret: bool | None = None,
                                  num_warps: int | None = None, num_stages: int = 2, q_tile: int = 1,
                                  kv_tile: int = 1):
  """`block_sparse_attention` through the Pallas kernels: same arguments, same result.

  q [B, T, N, H]; k, v [B, T, K, H] (N a multiple of K; grouped-query heads read their
  kv head's tiles, no copies); segment_ids [B, T] (0 = padding); kv_blocks / kv_valid
  [B or 1, N or K or 1, ceil(T / block), M]; block a power of two >= 16. Queries that see
  no key give zeros. Differentiable in q, k, v.

  q_tile / kv_tile (1, 2 or 4): table blocks per forward and dQ program / per dK/dV program.
  A program of r blocks walks the union of their r rows (`merge_rows`) with r * block-row
  tiles, masking each visited tile's rows by the blocks that list it: fewer, longer programs
  when rows are short (the FLOPs of the union's unlisted sub-tiles are spent, then masked).
  """
  if block < 16 or block & (block - 1):
    raise ValueError(f"block={block}: the Pallas block-sparse kernel needs a power of two >= 16")
  for name, r in (("q_tile", q_tile), ("kv_tile", kv_tile)):
    if r not in TILES:
      raise ValueError(f"{name}={r}: table blocks per program must be one of {TILES}")
  rows, cols = checked_tables(q_btnh, k_bskh, v_bskh, kv_blocks, kv_valid, block, multiple=max(q_tile, kv_tile))
  rows, cols = merge_rows(rows, q_tile), merge_rows(cols, kv_tile)
  b, t, n, h = q_btnh.shape
  nb = rows.shape[2] * q_tile
  tp = nb * block
  hp = pow2_at_least(h, 16)
  seg = pad_axis(jnp.asarray(segment_ids, jnp.int32), 1, tp)
  q = pad_axis(pad_axis(q_btnh, 3, hp), 1, tp)
  k = pad_axis(pad_axis(k_bskh, 3, hp), 1, tp)
  v = pad_axis(pad_axis(v_bskh, 3, hp), 1, tp)
  cfg = _Config(block=block, causal=bool(causal), band=None if band is None else (int(band[0]), int(band[1])),
                scale=1.0 / math.sqrt(h), interpret=resolve_interpret(interpret), num_blocks=nb,
                table_batched=rows.shape[0] > 1,
                num_warps=num_warps or (4 if max(q_tile, kv_tile) * block * hp <= 64 * 64 else 8),
                num_stages=num_stages, q_tile=q_tile, kv_tile=kv_tile)
  out = _attention(jnp.asarray(rows), jnp.asarray(cols), q, k, v, seg, cfg=cfg)
  return out[:, :t, :, :h]
