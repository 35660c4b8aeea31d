"""Fused flash attention as Pallas kernels (Triton lowering on GPU; interpret mode on CPU).

Three kernels, each a grid of independent programs over the native [B, T, N, H] layout
(no transposes or copies of Q/K/V; grouped-query K/V are shared through index maps):

- forward, grid (query block, head, batch): one [bq, H] query tile stays resident while
  K/V tiles of [bk, H] stream by; online softmax in fp32 in base 2 (scores are scaled by
  log2(e)/sqrt(H) once, so each probability is one exp2); writes out and lse (natural log).
- dK/dV, grid (key block, kv head, batch): one K/V tile resident, the query tiles of all
  G = N/K query heads of its group stream by, recomputing P^T from the saved lse; the
  transposed formulation (S^T = K Q^T) keeps every matrix product's transposed operand
  a loaded tile, never a computed one.
- dQ, grid (query block, head, batch): like the forward, accumulating dS K. Or, with
  `Tiling(fused_dq=True)`, no dQ kernel: the dK/dV programs add dS K into an fp32 dQ by
  atomic adds, computing S and dP once per tile pair instead of twice.

Causal attention skips fully masked tiles by loop bounds computed from the block index
(not by masking them), and splits each loop into the tiles that straddle the diagonal
(mask built) and those entirely below it (no mask). Segment ids (0 = padding) are read
per tile and the mask built in the kernel. Lengths that are not multiples of the blocks
are padded outside the kernel with segment id 0; head dims that are not powers of two
are zero-padded (zeros change neither scores nor outputs).

The twin is `reference_flash_attention_lse` (the same contract computed densely by
`kernels.reference`); tests also compare with the pure-JAX blockwise
`layers.attention.flash.flash_attention_lse`. Cost: forward 4*B*N*Tq*Tk*H FLOPs (about half
when causal), backward 2.5x that.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import flash_mgpu
from kernels.common import (LOG2E, SQ, atomic_add, causal_k_bounds, causal_q_bounds, check_inputs, dot,
                            dot_t, fit, fused_attention, online_finish, online_init, online_step, pad_axis, pltriton,
                            pow2_at_least, resolve_interpret, visit_if_visible)
from kernels.reference import make_mask, reference_attention_lse


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes (powers of two, >= 16) and Triton launch parameters of the three kernels.

  The defaults are `default_tiling(128)`'s.
  """
  block_q: int = 128  # forward: query rows per program
  block_k: int = 64  # forward: key rows per streamed tile
  block_q_dkv: int = 32  # dK/dV: query rows per streamed tile
  block_k_dkv: int = 64  # dK/dV: key rows per program
  block_q_dq: int = 64  # dQ: query rows per program
  block_k_dq: int = 32  # dQ: key rows per streamed tile
  num_warps: int = 8  # forward
  num_stages: int = 3  # forward: software-pipelining depth of the K/V loop
  num_warps_bwd: int = 4
  num_stages_bwd: int = 3
  # Backward as ONE kernel: the dK/dV programs also add dS K into an fp32 dQ by atomic adds
  # (FlashAttention-2's scheme), so S and dP are computed once per tile pair, not twice (5 of
  # the backward's matrix products instead of 7). dQ then depends on the order of the adds in
  # its last bits. Off by default until a GPU run shows the atomics cost less than the saved
  # products (scripts/bench_kernels.py's tile sweep times both).
  fused_dq: bool = False
  # Forward kernel: "triton" (the kernel below) or "mgpu", the Hopper Mosaic GPU kernel of
  # kernels/flash_mgpu.py (wgmma, TMA, a producer warpgroup; 128 query rows per program, so
  # block_q must be 128; block_k and num_stages set its K/V tiles and ring depth; bf16/fp16,
  # head dims 64/128, no explicit positions). The backward kernels are the same for both.
  forward: str = "triton"
  # Backward kernels: "triton" (below) or "mgpu" (kernels/flash_mgpu.py: a dQ kernel of 128-row
  # query programs streaming block_k_dq-row K/V tiles, and a dK/dV kernel of 128-row key programs
  # streaming block_q_dkv-row query tiles; so block_q_dq = block_k_dkv = 128; num_stages_bwd
  # slots; with fused_dq, the dK/dV kernel alone, reduce-adding dS K into fp32 dQ buffers).
  backward: str = "triton"


def default_tiling(head_dim: int) -> Tiling:
  """Per-head-dim GPU defaults.

  The backward kernels keep two fp32 accumulators of [rows, H] (dK and dV) or one (dQ)
  resident, so their streamed side is 32 rows. For H=128 the forward keeps the 128-row query
  tiles at 8 warps, and the backward uses 64-row programs at 4 warps, the faster of each in the
  GPU tile sweep (BENCHMARKS.md); the two are separate launches, so each keeps its own best.
  The bench's sweep (scripts/bench_kernels.py) re-times these and the fused-dQ variant on every
  GPU run.
  """
  if head_dim <= 64:
    return Tiling(128, 64, 32, 128, 128, 32, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=3)
  if head_dim <= 128:
    return Tiling()
  return Tiling(64, 32, 32, 64, 64, 32, num_warps=4, num_stages=2, num_warps_bwd=8, num_stages_bwd=1)


def mgpu_tiling(head_dim: int, backward: str = "mgpu") -> Tiling:
  """The Hopper Mosaic GPU kernels (kernels/flash_mgpu.py). Forward: 128-row programs, 128-row K/V
  tiles, a ring of 2 (H=128: 160 KiB of shared memory) or 3 (H=64: 112 KiB) slots. Backward:
  128-row programs streaming 64-row tiles through 2 slots (H=128: about 130 KiB per kernel), or
  with backward="triton" the Triton backward of `default_tiling`. Not yet timed on a GPU, so not
  the default anywhere."""
  tiling = dataclasses.replace(default_tiling(head_dim), block_q=128, block_k=128,
                               num_stages=2 if head_dim > 64 else 3, forward="mgpu")
  if backward == "mgpu":
    tiling = dataclasses.replace(tiling, block_q_dq=128, block_k_dq=64, block_q_dkv=64, block_k_dkv=128,
                                 num_stages_bwd=2, backward="mgpu")
  return tiling


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: a custom_vjp nondiff argument)."""
  causal: bool
  has_seg: bool
  tiling: Tiling
  scale: float  # 1/sqrt(H) of the unpadded head dim
  interpret: bool
  # Causal by explicit token positions (q_index / kv_index arrays) instead of storage order:
  # every tile is visited, and skipped at run time when its mask is empty.
  has_index: bool = False
  out_dtype: str | None = None  # forward output dtype (None: q's); ring attention merges fp32 partials


def _row_col_mask(row_pos, col_pos, row_seg, col_seg, causal: bool, rows_are_queries: bool):
  """Visibility of a [rows, cols] tile, or None when every entry is visible.

  Segment ids arrive with padding already remapped on one side (0 -> -1), so plain
  equality means "same nonzero segment".
  """
  mask = None
  if row_seg is not None:
    mask = row_seg[:, None] == col_seg[None, :]
  if causal:
    c = (col_pos[None, :] <= row_pos[:, None]) if rows_are_queries else (row_pos[:, None] <= col_pos[None, :])
    mask = c if mask is None else mask & c
  return mask


def _q_block(pid, nq: int, causal: bool):
  # Causal programs of higher query blocks do more work: launching them first evens the tail.
  return nq - 1 - pid if causal else pid


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, qi_ref, ki_ref, o_ref, lse_ref, *, cfg: _Config, nq: int,
                nk: int):
  t = cfg.tiling
  bq, bk = t.block_q, t.block_k
  i = _q_block(pl.program_id(0), nq, cfg.causal)
  q = q_ref[...]
  q_pos = qi_ref[...] if cfg.has_index else i * bq + jnp.arange(bq, dtype=jnp.int32)
  q_seg = None
  if cfg.has_seg:
    qs = qs_ref[...]
    q_seg = jnp.where(qs == 0, -1, qs)
  c = cfg.scale * LOG2E

  def tile_mask(start, causal_tile: bool):
    k_pos = ki_ref[pl.ds(start, bk)] if cfg.has_index else start + jnp.arange(bk, dtype=jnp.int32)
    k_seg = ks_ref[pl.ds(start, bk)] if cfg.has_seg else None
    return _row_col_mask(q_pos, k_pos, q_seg, k_seg, causal_tile, True)

  def step(j, carry, causal_tile: bool, mask=None):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    s = dot_t(q, k) * c
    if mask is None:
      mask = tile_mask(start, causal_tile)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    return online_step(carry, s, lambda: v_ref[pl.ds(start, bk), :])

  carry = online_init(bq, q.shape[1])
  if cfg.has_index:
    visit = lambda j, carry: visit_if_visible(lambda mask, c: step(j, c, True, mask),
                                               lambda: tile_mask(pl.multiple_of(j * bk, bk), True), carry)
    carry = lax.fori_loop(0, nk, visit, carry)
  elif cfg.causal:
    n_full, hi = causal_q_bounds(i, bq, bk, nk)
    carry = lax.fori_loop(0, n_full, functools.partial(step, causal_tile=False), carry)
    carry = lax.fori_loop(n_full, hi, functools.partial(step, causal_tile=True), carry)
  else:
    carry = lax.fori_loop(0, nk, functools.partial(step, causal_tile=False), carry)
  online_finish(carry, o_ref, lse_ref)  # no visible key (padding rows): out 0, lse -inf


def _compiler_params(cfg: _Config, backward: bool):
  if cfg.interpret or pltriton is None:
    return None
  t = cfg.tiling
  if backward:
    return pltriton.CompilerParams(num_warps=t.num_warps_bwd, num_stages=t.num_stages_bwd)
  return pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def _forward(q, k, v, qseg, kseg, qidx, kidx, cfg: _Config):
  """q [B, T, N, H], k/v [B, S, K, H] (padded) -> out [B, T, N, H], lse [B, N, T] (natural log)."""
  if cfg.tiling.forward == "mgpu":
    return flash_mgpu.forward(q, k, v, qseg, kseg, causal=cfg.causal, has_seg=cfg.has_seg, scale=cfg.scale,
                              block_k=cfg.tiling.block_k, num_stages=cfg.tiling.num_stages,
                              interpret=cfg.interpret, out_dtype=cfg.out_dtype)
  b, tq, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  g = n // kvh
  bq, bk = cfg.tiling.block_q, cfg.tiling.block_k
  nq, nk = tq // bq, s // bk
  qb = functools.partial(_q_block, nq=nq, causal=cfg.causal)
  kernel = functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk)
  return pl.pallas_call(
      kernel,
      grid=(nq, n, b),
      in_specs=[
          pl.BlockSpec((SQ, bq, SQ, h), lambda i, hd, bt: (bt, qb(i), hd, 0)),
          pl.BlockSpec((SQ, s, SQ, h), lambda i, hd, bt: (bt, 0, lax.div(hd, g), 0)),
          pl.BlockSpec((SQ, s, SQ, h), lambda i, hd, bt: (bt, 0, lax.div(hd, g), 0)),
          pl.BlockSpec((SQ, bq), lambda i, hd, bt: (bt, qb(i))),
          pl.BlockSpec((SQ, s), lambda i, hd, bt: (bt, 0)),
          pl.BlockSpec((SQ, bq), lambda i, hd, bt: (bt, qb(i))),
          pl.BlockSpec((SQ, s), lambda i, hd, bt: (bt, 0)),
      ],
      out_specs=[
          pl.BlockSpec((SQ, bq, SQ, h), lambda i, hd, bt: (bt, qb(i), hd, 0)),
          pl.BlockSpec((SQ, SQ, bq), lambda i, hd, bt: (bt, hd, qb(i))),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, cfg.out_dtype or q.dtype),
                 jax.ShapeDtypeStruct((b, n, tq), jnp.float32)],
      compiler_params=_compiler_params(cfg, backward=False),
      interpret=cfg.interpret,
      name="flash_fwd",
  )(q, k, v, qseg, kseg, qidx, kidx)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, qi_ref, ki_ref, dq_ref, *,
               cfg: _Config, nq: int, nk: int):
  t = cfg.tiling
  bq, bk = t.block_q_dq, t.block_k_dq
  i = _q_block(pl.program_id(0), nq, cfg.causal)
  q, do = q_ref[...], do_ref[...]
  lse2, delta = lse_ref[...], delta_ref[...]
  q_pos = qi_ref[...] if cfg.has_index else i * bq + jnp.arange(bq, dtype=jnp.int32)
  q_seg = None
  if cfg.has_seg:
    qs = qs_ref[...]
    q_seg = jnp.where(qs == 0, -1, qs)
  c = cfg.scale * LOG2E

  def tile_mask(start, causal_tile: bool):
    k_pos = ki_ref[pl.ds(start, bk)] if cfg.has_index else start + jnp.arange(bk, dtype=jnp.int32)
    k_seg = ks_ref[pl.ds(start, bk)] if cfg.has_seg else None
    return _row_col_mask(q_pos, k_pos, q_seg, k_seg, causal_tile, True)

  def step(j, dq, causal_tile: bool, mask=None):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = dot_t(q, k) * c
    if mask is None:
      mask = tile_mask(start, causal_tile)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp2(s - lse2[:, None])
    dp = dot_t(do, v)
    ds = p * (dp - delta[:, None])
    return dq + dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  if cfg.has_index:
    visit = lambda j, dq: visit_if_visible(lambda mask, c: step(j, c, True, mask),
                                            lambda: tile_mask(pl.multiple_of(j * bk, bk), True), dq)
    dq = lax.fori_loop(0, nk, visit, dq)
  elif cfg.causal:
    n_full, hi = causal_q_bounds(i, bq, bk, nk)
    dq = lax.fori_loop(0, n_full, functools.partial(step, causal_tile=False), dq)
    dq = lax.fori_loop(n_full, hi, functools.partial(step, causal_tile=True), dq)
  else:
    dq = lax.fori_loop(0, nk, functools.partial(step, causal_tile=False), dq)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, qi_ref, ki_ref, *refs,
                cfg: _Config, nq: int, group: int):
  """refs: (dk, dv) outputs, or with `fused_dq` (dq_in, dk, dv, dq): dq_in is the zero fp32 buffer
  aliased to the dq output, which every program of the same query rows adds into."""
  t = cfg.tiling
  dk_ref, dv_ref = refs[-3:-1] if t.fused_dq else refs
  dq_ref = refs[-1] if t.fused_dq else None
  bq, bk = t.block_q_dkv, t.block_k_dkv
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_pos = ki_ref[...] if cfg.has_index else j * bk + jnp.arange(bk, dtype=jnp.int32)
  k_seg = None
  if cfg.has_seg:
    ks = ks_ref[...]
    k_seg = jnp.where(ks == 0, -1, ks)
  c = cfg.scale * LOG2E

  def tile_mask(start, causal_tile: bool):
    q_pos = qi_ref[pl.ds(start, bq)] if cfg.has_index else start + jnp.arange(bq, dtype=jnp.int32)
    q_seg = qs_ref[pl.ds(start, bq)] if cfg.has_seg else None
    return _row_col_mask(k_pos, q_pos, k_seg, q_seg, causal_tile, False)

  def step(i, carry, g, causal_tile: bool, mask=None):
    dk, dv = carry
    start = pl.multiple_of(i * bq, bq)
    q = q_ref[pl.ds(start, bq), g, :]
    do = do_ref[pl.ds(start, bq), g, :]
    lse2 = lse_ref[g, pl.ds(start, bq)]
    delta = delta_ref[g, pl.ds(start, bq)]
    st = dot_t(k, q) * c  # S^T [bk, bq]
    if mask is None:
      mask = tile_mask(start, causal_tile)
    if mask is not None:
      st = jnp.where(mask, st, -jnp.inf)
    pt = jnp.exp2(st - lse2[None, :])
    dv = dv + dot(pt.astype(do.dtype), do)
    dpt = dot_t(v, do)
    dst = (pt * (dpt - delta[None, :])).astype(q.dtype)
    dk = dk + dot(dst, q)
    if dq_ref is not None:  # dQ_i += dS K (unscaled; the caller applies 1/sqrt(H) once)
      dq_tile = lax.dot_general(dst, k, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      atomic_add(dq_ref, (pl.ds(start, bq), jnp.asarray(g, jnp.int32), slice(None)), dq_tile)
    return dk, dv

  def per_head(g, carry):
    if cfg.has_index:
      visit = lambda i, c: visit_if_visible(lambda mask, cc: step(i, cc, g, True, mask),
                                             lambda: tile_mask(pl.multiple_of(i * bq, bq), True), c)
      return lax.fori_loop(0, nq, visit, carry)
    if cfg.causal:
      lo, q_full = causal_k_bounds(j, bq, bk, nq)
      carry = lax.fori_loop(lo, q_full, functools.partial(step, g=g, causal_tile=True), carry)
      return lax.fori_loop(q_full, nq, functools.partial(step, g=g, causal_tile=False), carry)
    return lax.fori_loop(0, nq, functools.partial(step, g=g, causal_tile=False), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  carry = per_head(0, (zeros, zeros)) if group == 1 else lax.fori_loop(0, group, per_head, (zeros, zeros))
  dk, dv = carry
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out, d_lse, cfg: _Config):
  b, tq, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  g = n // kvh
  t = cfg.tiling
  # delta_i = rowsum(dO * O) - dlse_i: the softmax Jacobian's correction term (an lse cotangent
  # enters as dS = P * (dP - delta + dlse)), [B, N, T]. One cheap XLA fusion, O(T) memory.
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32)) - d_lse
  lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, 0.0)  # empty rows: all P are masked to 0 anyway
  if t.backward == "mgpu":
    return flash_mgpu.backward(q, k, v, qseg, kseg, d_out, jnp.stack([lse2, delta], axis=2), causal=cfg.causal,
                               has_seg=cfg.has_seg, scale=cfg.scale, block_q=t.block_q_dkv, block_k=t.block_k_dq,
                               num_stages=t.num_stages_bwd, interpret=cfg.interpret, fused_dq=t.fused_dq)

  dq = None if t.fused_dq else _dq_call(q, k, v, d_out, lse2, delta, qseg, kseg, qidx, kidx, cfg)
  bq, bk = t.block_q_dkv, t.block_k_dkv
  nq, nk = tq // bq, s // bk
  # One program per (key block, kv head): it owns dK/dV of that tile, so the G query heads of
  # its group are summed in registers (no atomics, no [B, S, N, H] intermediate). With
  # fused_dq the same programs also add their dS K into the shared fp32 dQ (atomics there).
  qg_spec = pl.BlockSpec((SQ, tq, g, h), lambda j, kh, bt: (bt, 0, kh, 0))
  rowg_spec = pl.BlockSpec((SQ, g, tq), lambda j, kh, bt: (bt, kh, 0))
  kt_spec = pl.BlockSpec((SQ, bk, SQ, h), lambda j, kh, bt: (bt, j, kh, 0))
  in_specs = [qg_spec, kt_spec, kt_spec, qg_spec, rowg_spec, rowg_spec,
              pl.BlockSpec((SQ, tq), lambda j, kh, bt: (bt, 0)),
              pl.BlockSpec((SQ, bk), lambda j, kh, bt: (bt, j)),
              pl.BlockSpec((SQ, tq), lambda j, kh, bt: (bt, 0)),
              pl.BlockSpec((SQ, bk), lambda j, kh, bt: (bt, j))]
  args = [q, k, v, d_out, lse2, delta, qseg, kseg, qidx, kidx]
  out_specs = [kt_spec, kt_spec]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  aliases = {}
  if t.fused_dq:
    if atomic_add is None:  # pragma: no cover
      raise NotImplementedError("Tiling(fused_dq=True) needs Pallas atomic_add, which this jax lacks")
    aliases = {len(args): 2}
    args.append(jnp.zeros(q.shape, jnp.float32))
    in_specs.append(qg_spec)
    out_specs.append(qg_spec)
    out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, nq=nq, group=g),
      grid=(nk, kvh, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=_compiler_params(cfg, backward=True),
      interpret=cfg.interpret,
      name="flash_bwd_dkv_dq" if t.fused_dq else "flash_bwd_dkv",
  )(*args)
  dk, dv = outs[:2]
  if t.fused_dq:
    dq = (outs[2] * cfg.scale).astype(q.dtype)
  return dq, dk, dv


def _dq_call(q, k, v, d_out, lse2, delta, qseg, kseg, qidx, kidx, cfg: _Config):
  b, tq, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  g = n // kvh
  t = cfg.tiling
  nq, nk = tq // t.block_q_dq, s // t.block_k_dq
  qb = functools.partial(_q_block, nq=nq, causal=cfg.causal)
  bq, bk = t.block_q_dq, t.block_k_dq
  q_spec = pl.BlockSpec((SQ, bq, SQ, h), lambda i, hd, bt: (bt, qb(i), hd, 0))
  kv_spec = pl.BlockSpec((SQ, s, SQ, h), lambda i, hd, bt: (bt, 0, lax.div(hd, g), 0))
  row_spec = pl.BlockSpec((SQ, SQ, bq), lambda i, hd, bt: (bt, hd, qb(i)))
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk),
      grid=(nq, n, b),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                pl.BlockSpec((SQ, bq), lambda i, hd, bt: (bt, qb(i))),
                pl.BlockSpec((SQ, s), lambda i, hd, bt: (bt, 0)),
                pl.BlockSpec((SQ, bq), lambda i, hd, bt: (bt, qb(i))),
                pl.BlockSpec((SQ, s), lambda i, hd, bt: (bt, 0))],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(cfg, backward=True),
      interpret=cfg.interpret,
      name="flash_bwd_dq",
  )(q, k, v, d_out, lse2, delta, qseg, kseg, qidx, kidx)


_attention = fused_attention(_forward, _backward)


# ----------------------------------------------------------------------------- public API


def _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, *, causal, block_q, block_k,
             tiling, interpret, out_dtype=None):
  """Checks, tiles and pads the inputs: (q, k, v, qseg, kseg, qidx, kidx) padded, and the static config."""
  check_inputs(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index)
  b, t, n, h = q_btnh.shape
  s = k_bskh.shape[1]
  interp = resolve_interpret(interpret)
  hp = pow2_at_least(h, 16)
  if tiling is None:
    base = default_tiling(hp)
    if block_q is not None or block_k is not None:
      bq = block_q or base.block_q
      bk = block_k or base.block_k
      base = dataclasses.replace(base, block_q=bq, block_k=bk, block_q_dkv=bq, block_k_dkv=bk, block_q_dq=bq,
                                 block_k_dq=bk)
    tiling = base
  for name in ("forward", "backward"):
    if getattr(tiling, name) not in ("triton", "mgpu"):
      raise ValueError(f"Tiling.{name}={getattr(tiling, name)!r}: expected 'triton' or 'mgpu'")
  mgpu_f, mgpu_b = tiling.forward == "mgpu", tiling.backward == "mgpu"
  # The Mosaic GPU programs own 128 rows whatever the length (padded up to it).
  keep = lambda block, fixed, length: block if fixed else fit(block, length)
  tiling = dataclasses.replace(
      tiling, block_q=keep(tiling.block_q, mgpu_f, t), block_k=fit(tiling.block_k, s),
      block_q_dkv=fit(tiling.block_q_dkv, t), block_k_dkv=keep(tiling.block_k_dkv, mgpu_b, s),
      block_q_dq=keep(tiling.block_q_dq, mgpu_b, t), block_k_dq=fit(tiling.block_k_dq, s))
  for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
    size = getattr(tiling, name)
    if size < 16 or size & (size - 1):
      raise ValueError(f"{name}={size}: Pallas/Triton tiles must be powers of two >= 16")
  # Powers of two: the largest block is a multiple of the others.
  tp = -(-t // max(tiling.block_q, tiling.block_q_dkv, tiling.block_q_dq)) * max(
      tiling.block_q, tiling.block_q_dkv, tiling.block_q_dq)
  sp = -(-s // max(tiling.block_k, tiling.block_k_dkv, tiling.block_k_dq)) * max(
      tiling.block_k, tiling.block_k_dkv, tiling.block_k_dq)
  has_seg = q_segment_ids is not None or tp != t or sp != s
  if q_segment_ids is None:
    q_segment_ids = jnp.ones((b, t), jnp.int32)
    kv_segment_ids = jnp.ones((b, s), jnp.int32)
  has_index = bool(causal) and q_index is not None  # positions matter only for the causal mask
  owned, streamed, stages = (flash_mgpu.PROGRAM_ROWS,), flash_mgpu.STREAMED, flash_mgpu.STAGES
  checks = []
  if mgpu_f:
    checks.append(("forward", [("block_q", tiling.block_q, owned), ("block_k", tiling.block_k, streamed),
                               ("num_stages", tiling.num_stages, stages)]))
  if mgpu_b:
    checks.append(("backward", [("block_q_dq", tiling.block_q_dq, owned), ("block_k_dq", tiling.block_k_dq, streamed),
                                ("block_k_dkv", tiling.block_k_dkv, owned),
                                ("block_q_dkv", tiling.block_q_dkv, streamed),
                                ("num_stages_bwd", tiling.num_stages_bwd, stages)]))
  for which, tiles in checks:
    reason = flash_mgpu.unsupported_reason(q_btnh.dtype, hp, has_index, tiles)
    if reason is not None:
      raise ValueError(f"Tiling({which}='mgpu'): {reason}")
  if q_index is None:
    q_index, kv_index = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
  pad_tok = lambda x, size: pad_axis(jnp.asarray(x).astype(jnp.int32), 1, size)
  arrays = (pad_axis(pad_axis(q_btnh, 3, hp), 1, tp), pad_axis(pad_axis(k_bskh, 3, hp), 1, sp),
            pad_axis(pad_axis(v_bskh, 3, hp), 1, sp), pad_tok(q_segment_ids, tp), pad_tok(kv_segment_ids, sp),
            pad_tok(q_index, tp), pad_tok(kv_index, sp))
  cfg = _Config(causal=bool(causal), has_seg=has_seg, tiling=tiling, scale=1.0 / math.sqrt(h), interpret=interp,
                has_index=has_index, out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name)
  return arrays, cfg


def flash_attention_pallas_lse(q_btnh, k_bskh, v_bskh, q_segment_ids=None, kv_segment_ids=None, *, causal: bool,
                               q_index=None, kv_index=None, block_q: int | None = None, block_k: int | None = None,
                               tiling: Tiling | None = None, interpret: bool | None = None, out_dtype=None):
  """Fused attention: (out [B, T, N, H] in q's dtype, lse [B, T, N] fp32 natural log).

  Same contract as `layers.attention.flash.flash_attention_lse`: causal means key index <=
  query index, where the indices are `q_index` [B, T] / `kv_index` [B, S] (true token
  positions: zigzag layouts, ring chunks) or, when None, storage order 0..T-1 and 0..S-1;
  segment ids [B, T] / [B, S] (0 = padding, both or neither); rows that see no key give
  out = 0, lse = -inf. Differentiable in q, k, v through both outputs (the lse cotangent is
  what a merge of partial results sends back). `out_dtype` overrides the output dtype
  (fp32 partials for a later merge).

  With storage order, causal tiles past the diagonal are skipped by loop bounds; with
  explicit indices every tile's mask is built and the tile skipped at run time when it is
  empty (its K/V are then never multiplied).

  Tiles: `tiling` sets all six block sizes and launch parameters; otherwise `block_q` and
  `block_k` (powers of two >= 16) set the query/key tiles of all three kernels, and when
  they are None too the per-head-dim GPU defaults apply. `interpret=None` interprets on
  CPU and compiles with Triton on GPU.
  """
  t, h = q_btnh.shape[1], q_btnh.shape[3]
  arrays, cfg = _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, causal=causal,
                         block_q=block_q, block_k=block_k, tiling=tiling, interpret=interpret, out_dtype=out_dtype)
  out, lse = _attention(*arrays, cfg)
  return out[:, :t, :, :h], jnp.swapaxes(lse, 1, 2)[:, :t]


def flash_chunk_grads_pallas(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, out_btnh,
                             lse_btn, d_out_btnh, *, causal: bool, block_q: int | None = None,
                             block_k: int | None = None, tiling: Tiling | None = None,
                             interpret: bool | None = None):
  """(dq, dk, dv) contributions of ONE key chunk given the final (merged) out and lse: the
  backward kernels run with P = exp(S - lse_final), which splits the softmax gradient exactly
  over disjoint key chunks. `layers.attention.flash.flash_chunk_grads`'s contract (ring
  attention's backward); dq in fp32 for accumulation across chunks, dk/dv in k's dtype."""
  t, h = q_btnh.shape[1], q_btnh.shape[3]
  s = k_bskh.shape[1]
  arrays, cfg = _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, causal=causal,
                         block_q=block_q, block_k=block_k, tiling=tiling, interpret=interpret)
  q, k, v, qseg, kseg, qidx, kidx = arrays
  tp, hp = q.shape[1], q.shape[3]
  out = pad_axis(pad_axis(out_btnh.astype(q.dtype), 3, hp), 1, tp)
  d_out = pad_axis(pad_axis(d_out_btnh.astype(q.dtype), 3, hp), 1, tp)
  lse = pad_axis(jnp.swapaxes(lse_btn.astype(jnp.float32), 1, 2), 2, tp, value=-jnp.inf)  # [B, N, Tp]
  dq, dk, dv = _backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out, jnp.zeros(lse.shape, jnp.float32), cfg)
  return dq[:, :t, :, :h].astype(jnp.float32), dk[:, :s, :, :h], dv[:, :s, :, :h]


def reference_flash_attention_lse(q_btnh, k_bskh, v_bskh, q_segment_ids=None, kv_segment_ids=None, *,
                                  causal: bool, q_index=None, kv_index=None):
  """The twin: `flash_attention_pallas_lse`'s contract computed densely (`kernels.reference`)."""
  b, t = q_btnh.shape[:2]
  s = k_bskh.shape[1]
  if q_segment_ids is None:
    q_segment_ids, kv_segment_ids = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
  if q_index is None:
    q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  mask = make_mask(q_segment_ids, kv_segment_ids, q_index, kv_index, causal)
  return reference_attention_lse(q_btnh, k_bskh, v_bskh, mask)


def flash_attention_pallas(q_btnh, k_bskh, v_bskh, q_segment_ids=None, kv_segment_ids=None, *, causal: bool,
                           q_index=None, kv_index=None, block_q: int | None = None, block_k: int | None = None,
                           tiling: Tiling | None = None, interpret: bool | None = None):
  """Fused attention output [B, T, N, H]; see `flash_attention_pallas_lse`."""
  return flash_attention_pallas_lse(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, causal=causal,
                                    q_index=q_index, kv_index=kv_index, block_q=block_q, block_k=block_k,
                                    tiling=tiling, interpret=interpret)[0]
