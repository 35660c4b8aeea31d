"""Flash attention for Hopper GPUs as Mosaic GPU Pallas kernels (wgmma, TMA, warp
specialization): forward, dQ and dK/dV; GPU interpret mode on CPU.

Why a second set of kernels: the Triton-lowered ones of `kernels/flash_pallas.py` stay well
below cuDNN on Hopper (BENCHMARKS.md). Triton issues the K/V loads and the matrix products from the same warps. Here
every program (CTA) owns 128 rows (queries for the forward and dQ, keys for dK/dV) and runs
three warpgroups:

- two consumer warpgroups, 64 of the rows each, whose matrix products are wgmma with fp32
  accumulators in registers (the 64 x H output accumulators never leave registers), the
  softmax math in base 2 on those registers, and P / dS fed back to wgmma as register operands;
- one producer warpgroup that only issues TMA copies of the streamed tiles into a ring of
  `num_stages` shared-memory slots, each slot guarded by a "loaded" barrier (the copy's
  transaction count) and a "released" barrier (both consumers arrive once their wgmma has read
  the slot).

So the loads of the next tiles overlap the current tile's products and softmax, and the two
consumers interleave their softmax with each other's products.

Kernels (S = Q K^T * scale, rows of a tile 64, streamed tile n rows, H the head dim):
- forward: Q stationary, K/V streamed: S, online softmax, O += P V. 4*64*n*H FLOPs per
  consumer and tile, 2*n*H*2 bytes per tile from HBM/L2 (at n = H = 128: ~64 FLOPs per byte
  per program, and one head's K/V tiles are shared by all its query programs through L2).
- dQ: Q, dO stationary, K/V streamed: S, P = exp2(S - lse), dP = dO V^T, dS = P (dP - delta),
  dQ += dS K (3 products).
- dK/dV: K, V stationary, the query tiles of every query head of the group streamed with their
  dO, lse and delta, all transposed so each operand is a register array or a shared-memory tile:
  S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q (4 products). With the dQ kernel that is
  the two-kernel scheme's 7 products per tile pair.
- fused dK/dV/dQ (`Tiling(fused_dq=True)`): the dK/dV kernel also writes dS^T to shared memory
  and computes dQ_tile = dS K from it (a transposed wgmma operand), reduce-adding that into an
  fp32 dQ in global memory by TMA (`cp.reduce.async.bulk`, an atomic add per element in L2):
  5 products per tile pair, FlashAttention-2/3's one-kernel scheme. Each consumer adds into its
  own buffer ([2, B, T, N, H] fp32, zeroed first, summed and scaled after), so the two never
  contend for one address and the interpreter's emulation of the add has no race. Shared memory
  at H=128, 64-row query tiles, 2 slots: about 211 KiB (the fp32 dQ staging tiles are 64 KiB).
  The accumulator is a `jax.Ref` aliased in and out of the kernel, so it launches through
  `pl.kernel` (no vmap of this one kernel).

Contract: the padded arrays of `kernels.flash_pallas._prepare` (q [B, T, N, H], k/v [B, S, K, H],
segment ids [B, T] / [B, S], 0 = padding): `forward` -> out [B, T, N, H] in q's dtype and lse
[B, N, T] fp32 natural log, as `flash_pallas._forward`; `backward` -> dq, dk, dv from d_out and
the rows' (lse * log2(e), delta), as `flash_pallas._backward`. `Tiling(forward="mgpu")` and
`Tiling(backward="mgpu")` select them (independently: either side runs with the Triton other).
Supported: bf16/fp16, head dims 64 and 128, causal by storage order with the tiles past the
diagonal skipped by loop bounds (no load, no product), segment ids (the mask built per tile
from the stationary rows' ids and the streamed tile's, which travel with it), grouped-query
attention through the producer's head index. Explicit token positions (`q_index` /
`kv_index`), fp32 and other head dims are refused with one sentence; `flash_pallas` runs them.

Interpret mode runs everything but the matrix products as compiled: the warpgroups, the TMA
copies, the barriers' protocol (a phase nobody waits on is an error there), the loop bounds,
masks and softmax. Its interpreter has no `pl.run_state` (which starts an accumulator's wgmma
from a value in place) and no transposed wgmma operand, so `_mma` is the one place where the
two differ: interpreted, a product is a plain fp32 dot of the loaded tiles. The compiled
variant is checked by lowering it to Mosaic GPU on any host (tests/test_flash_mgpu.py), which
validates every register layout and shared-memory tiling; running it needs a Hopper GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import common

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

try:  # GPU interpret mode (runs the kernel's warpgroups, barriers and TMA copies on the CPU)
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as _InterpretGPUParams
except ImportError:  # pragma: no cover
  _InterpretGPUParams = None

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_M_INIT = -1e30  # finite start of the running max: a row that saw only masked scores keeps l = 0
ROWS = 64  # stationary rows per consumer warpgroup (one wgmma M)
CONSUMERS = 2
PROGRAM_ROWS = ROWS * CONSUMERS  # stationary rows per program (queries, or keys for dK/dV)
HEAD_DIMS = (64, 128)
DTYPES = ("bfloat16", "float16")
# Registers per thread: 2 x 240 + 24 = 504 of the 512 that 3 warpgroups share (64K per SM). The
# dK/dV consumer holds dK and dV (2 x 64 fp32 at H=128) and S^T, dP^T (2 x 32) at once.
CONSUMER_REGISTERS, PRODUCER_REGISTERS = 240, 24
# Options of the GPU interpreter (its InterpretGPUParams fields), e.g. {"detect_races": True}.
INTERPRET_OPTIONS: dict = {}
STREAMED = (64, 128)  # rows of a streamed tile
STAGES = tuple(range(2, 9))  # ring slots
SMEM_LIMIT = 232448  # bytes of shared memory one Hopper (H100/H200) program may allocate (227 KiB)


def available() -> bool:
  return plgpu is not None


def unsupported_reason(dtype, head_dim: int, has_index: bool, tiles=()) -> str | None:
  """One sentence naming the first input these kernels cannot run, or None. tiles: (name, value,
  allowed values) of the caller's tile settings."""
  if plgpu is None:
    return "this jax has no Mosaic GPU Pallas backend (jax.experimental.pallas.mosaic_gpu)"
  if jnp.dtype(dtype).name not in DTYPES:
    return f"dtype={jnp.dtype(dtype).name}: the Mosaic GPU kernels take bfloat16 or float16 (wgmma operands)"
  if head_dim not in HEAD_DIMS:
    return f"head_dim={head_dim}: the Mosaic GPU kernels take head dims {HEAD_DIMS}"
  for name, value, allowed in tiles:
    if value not in allowed:
      return f"{name}={value}: the Mosaic GPU kernels take {name} in {tuple(allowed)}"
  if has_index:
    return "explicit q_index/kv_index positions: the Mosaic GPU kernels mask by storage order only"
  return None


def _smem_transforms(minor: int, dtype):
  """Tiling + swizzle of a [rows, minor] tile that wgmma reads (128-byte swizzle when it fits)."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, 8 * swizzle // bits)), plgpu.SwizzleTransform(swizzle))


def _layout(x, layout, interpret: bool):
  """Pins a register array's layout for the compiler (the interpreter has no layouts)."""
  return x if interpret else plgpu.layout_cast(x, layout)


def _load(ref, layout, interpret: bool):
  return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def _rows(x, n: int):
  """[64] per-row values -> [64, n] (a direct broadcast: the compiler cannot tile a [64, 1])."""
  return lax.broadcast_in_dim(x, (ROWS, n), (0,))


def _cols(x):
  """[n] per-column values -> [64, n]."""
  return lax.broadcast_in_dim(x, (ROWS, x.shape[0]), (1,))


def _mma(init, a, b_ref, interpret: bool, transpose_b: bool = False, transpose_a: bool = False):
  """init + a @ b (a^T, b^T with the transpose flags) in fp32 [rows of a, n] by one wgmma; a is a
  shared-memory ref or a register array, b a shared-memory ref; init None means zeros. Compiled,
  the accumulator starts from init in place (`pl.run_state`); the interpreter has neither
  run_state nor transposed wgmma operands, so there the same product is a plain dot of the
  loaded tiles."""
  if interpret:
    a_val = a if isinstance(a, jax.Array) else a[...]
    a_val = a_val.T if transpose_a else a_val
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    prod = lax.dot_general(a_val, b_ref[...], dims, preferred_element_type=jnp.float32)
    return prod if init is None else init + prod
  b = plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref
  a = plgpu.transpose_ref(a, (1, 0)) if transpose_a else a

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  if init is None:
    return pl.run_scoped(product, plgpu.ACC((a.shape[0], b.shape[-1]), jnp.float32))

  def in_place(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(in_place)(plgpu.ACC.init(init))


def _reduce_add(value, stage, gmem, interpret: bool):
  """gmem += value (fp32) through the shared-memory tile `stage`: one TMA reduce-add (an atomic
  add per element in L2), issued without waiting for it to land. The stage is only rewritten
  once the previous reduce-add from it has read it. The interpreter has no TMA reductions, so
  there the add is a read-modify-write (the previous store waited for, gmem read, the sum
  stored); it runs the grid's programs one after another, so no other program adds in between,
  and each consumer warpgroup adds into its own buffer."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=not interpret)
  stage[...] = value + gmem[...] if interpret else value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(stage, gmem, reduction_op=None if interpret else "add")


def _producer(total, stages: int, groups):
  """The producer warpgroup: for steps j = 0..total-1 into ring slot j % stages, each group
  (done barriers, issue(j, slot)) waits until both consumers released the slot's previous
  contents (from step j - stages), then issues its TMA copies. Finally it waits for the last
  releases too, so that every barrier phase is observed."""
  plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

  def load(j, _):
    slot = lax.rem(j, stages)
    for done, issue in groups:
      @pl.when(j >= stages)
      def _():
        plgpu.barrier_wait(done.at[slot])
      issue(j, slot)
    return ()

  lax.fori_loop(0, total, load, ())

  def drain(j, _):
    for done, _ in groups:
      plgpu.barrier_wait(done.at[lax.rem(j, stages)])
    return ()

  lax.fori_loop(jnp.maximum(total - stages, 0), total, drain, ())


def _tile_mask(row_seg, col_seg_ref, seg_bar, row0, col0, shape, causal_tile: bool, rows_are_queries: bool,
               interpret: bool):
  """Visibility of a [64, n] tile (None: all visible). row_seg: the stationary rows' segment ids
  with padding remapped to -1 (or None); col_seg_ref: the streamed tile's ids in shared memory,
  loaded once seg_bar says they arrived."""
  mask = None
  if row_seg is not None:
    plgpu.barrier_wait(seg_bar)
    cols = _load(col_seg_ref, plgpu.Layout.WGMMA.reduce(0), interpret)
    mask = _rows(row_seg, shape[1]) == _cols(cols)
  if causal_tile:
    iota = lambda d: _layout(lax.broadcasted_iota(jnp.int32, shape, d), plgpu.Layout.WGMMA, interpret)
    row, col = row0 + iota(0), col0 + iota(1)
    c = col <= row if rows_are_queries else row <= col
    mask = c if mask is None else mask & c
  return mask


def _stationary_rows(seg_ref, seg_smem, seg_bar, interpret: bool):
  """The stationary 64 rows' segment ids, padding remapped to -1 so it matches nothing."""
  plgpu.copy_gmem_to_smem(seg_ref, seg_smem, seg_bar)
  plgpu.barrier_wait(seg_bar)
  ids = _load(seg_smem, plgpu.Layout.WGMMA.reduce(1), interpret)
  return jnp.where(ids == 0, -1, ids)


def _store(value, smem, gmem):
  smem[...] = value.astype(smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem, gmem)


def _query_rows_kernel(*refs, kind: str, causal: bool, has_seg: bool, scale: float, block_k: int, num_stages: int,
                       nq: int, nk: int, group: int, interpret: bool):
  """The forward (kind "fwd") and the dQ kernel (kind "dq"): 128 query rows per program, two
  consumer warpgroups of 64 rows, key/value tiles streamed by the producer.

  fwd refs: q, k, v, qseg, kseg | out, lse | q_smem, k_smem, v_smem, lse_smem, qs_smem, ks_smem,
            q_bar, qs_bar, k_bar, v_bar, ks_bar, k_done, v_done
  dq refs:  q, k, v, qseg, kseg, do, stats | dq | q_smem, k_smem, v_smem, do_smem, stats_smem,
            qs_smem, ks_smem, q_bar, qs_bar, k_bar, v_bar, ks_bar, k_done, v_done, do_bar, stats_bar
  (stats [B, N, 2, T] = the rows' lse * log2(e) and delta = rowsum(dO * O) - dlse)."""
  if kind == "fwd":
    (q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, qs_smem, ks_smem,
     q_bar, qs_bar, k_bar, v_bar, ks_bar, k_done, v_done) = refs
  else:
    (q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, st_ref, dq_ref, q_smem, k_smem, v_smem, do_smem, st_smem,
     qs_smem, ks_smem, q_bar, qs_bar, k_bar, v_bar, ks_bar, k_done, v_done, do_bar, st_bar) = refs
  bk, stages = block_k, num_stages
  pid, head, batch = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
  qb = nq - 1 - pid if causal else pid  # causal: the longest programs first, to even the tail
  wg = lax.axis_index("wg")
  if causal:
    # Key tiles [0, n_full) are visible to all 128 rows; [n_full, hi) straddle the diagonal.
    n_full, hi = common.causal_q_bounds(qb, PROGRAM_ROWS, bk, nk)
  else:
    n_full = hi = nk

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
    r0 = qb * PROGRAM_ROWS + wg * ROWS
    rows = pl.ds(r0, ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[wg], q_bar.at[wg])
    if kind == "dq":
      plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[wg], do_bar.at[wg])
      plgpu.copy_gmem_to_smem(st_ref.at[batch, head, :, rows], st_smem.at[wg], st_bar.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    q_seg = _stationary_rows(qs_ref.at[batch, rows], qs_smem.at[wg], qs_bar.at[wg], interpret) if has_seg else None
    if kind == "dq":
      plgpu.barrier_wait(st_bar.at[wg])
      lse2 = _load(st_smem.at[wg, 0], row_layout, interpret)
      delta = _load(st_smem.at[wg, 1], row_layout, interpret)
      plgpu.barrier_wait(do_bar.at[wg])
    c = scale * LOG2E
    plgpu.barrier_wait(q_bar.at[wg])

    def scores(j, slot, masked: bool):
      plgpu.barrier_wait(k_bar.at[slot])
      s = _mma(None, q_smem.at[wg], k_smem.at[slot], interpret, transpose_b=True) * c
      mask = _tile_mask(q_seg, ks_smem.at[slot], ks_bar.at[slot], r0, j * bk, (ROWS, bk), masked, True, interpret)
      return s if mask is None else jnp.where(mask, s, -jnp.inf)

    def fwd_step(j, carry, masked: bool):
      o, m, l = carry
      slot = lax.rem(j, stages)
      s = scores(j, slot, masked)
      plgpu.barrier_arrive(k_done.at[slot])
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - _rows(m_new, bk))
      l = l * alpha + p.sum(axis=1)
      plgpu.barrier_wait(v_bar.at[slot])
      o = _mma(o * _rows(alpha, o.shape[1]), p.astype(q_ref.dtype), v_smem.at[slot], interpret)
      plgpu.barrier_arrive(v_done.at[slot])
      return o, m_new, l

    def dq_step(j, dq, masked: bool):
      slot = lax.rem(j, stages)
      p = jnp.exp2(scores(j, slot, masked) - _rows(lse2, bk))
      plgpu.barrier_wait(v_bar.at[slot])
      dp = _mma(None, do_smem.at[wg], v_smem.at[slot], interpret, transpose_b=True)
      plgpu.barrier_arrive(v_done.at[slot])
      ds = p * (dp - _rows(delta, bk))
      dq = _mma(dq, ds.astype(q_ref.dtype), k_smem.at[slot], interpret)
      plgpu.barrier_arrive(k_done.at[slot])
      return dq

    h = q_smem.shape[-1]
    acc = _layout(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA, interpret)
    if kind == "fwd":
      step = fwd_step
      carry = (acc, _layout(jnp.full((ROWS,), _M_INIT, jnp.float32), row_layout, interpret),
               _layout(jnp.zeros((ROWS,), jnp.float32), row_layout, interpret))
    else:
      step, carry = dq_step, acc
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    if causal:
      carry = lax.fori_loop(n_full, hi, functools.partial(step, masked=True), carry)
    # Q is no longer read: its slot stages the output tile.
    if kind == "fwd":
      o, m, l = carry
      empty = l == 0.0  # padding rows saw no key: out 0, lse -inf
      l_safe = jnp.where(empty, 1.0, l)
      _store(o * _rows(1.0 / l_safe, h), q_smem.at[wg], o_ref.at[batch, rows, head])
      _store(jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2), lse_smem.at[wg], lse_ref.at[batch, head, rows])
    else:
      _store(carry * scale, q_smem.at[wg], dq_ref.at[batch, rows, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _():
    kv_head = lax.div(head, group)
    tile = lambda j: pl.ds(j * bk, bk)

    def issue_k(j, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[batch, tile(j), kv_head], k_smem.at[slot], k_bar.at[slot])
      if has_seg:  # the slot's key segment ids travel with K (released by the same k_done)
        plgpu.copy_gmem_to_smem(ks_ref.at[batch, tile(j)], ks_smem.at[slot], ks_bar.at[slot])

    def issue_v(j, slot):
      plgpu.copy_gmem_to_smem(v_ref.at[batch, tile(j), kv_head], v_smem.at[slot], v_bar.at[slot])

    _producer(hi, stages, [(k_done, issue_k), (v_done, issue_v)])


def _dkv_kernel(*refs, causal: bool, has_seg: bool, scale: float, block_q: int, num_stages: int, nq: int, nk: int,
                group: int, fused_dq: bool, interpret: bool):
  """dK and dV: 128 key rows per program (two consumer warpgroups of 64), the query tiles of
  all `group` query heads of the kv head streamed by the producer with their dO, lse and delta.
  Everything is transposed (S^T = K Q^T, rows are keys) so each product's operands are a
  register array or a shared-memory tile: dV += P^T dO, dP^T = V dO^T, dK += dS^T Q.

  With `fused_dq` the same programs also produce dQ (the one-kernel backward, 5 products per
  tile pair instead of the two kernels' 7): each consumer writes its dS^T tile to shared memory,
  multiplies it transposed with its K rows (dQ_tile = dS K, [block_q, H] fp32) and reduce-adds
  that into its own fp32 dQ buffer in global memory (`_reduce_add`); the caller sums the two.

  refs: q, k, v, qseg, kseg, do, stats, [dq_acc [2, B, T, N, H] fp32 (fused_dq)] | dk, dv |
        k_smem, v_smem, q_smem, do_smem, st_smem, qs_smem, ks_smem, k_bar, v_bar, ks_bar, q_bar,
        do_bar, st_bar, qs_bar, done, [ds_smem, dq_stage (fused_dq)]"""
  n_in = 8 if fused_dq else 7
  q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, st_ref = refs[:7]
  dq_acc = refs[7] if fused_dq else None
  dk_ref, dv_ref = refs[n_in:n_in + 2]
  (k_smem, v_smem, q_smem, do_smem, st_smem, qs_smem, ks_smem, k_bar, v_bar, ks_bar, q_bar, do_bar, st_bar, qs_bar,
   done) = refs[n_in + 2:n_in + 17]
  ds_smem, dq_stage = refs[n_in + 17:] if fused_dq else (None, None)
  bq, stages = block_q, num_stages
  pid, kv_head, batch = lax.axis_index("k"), lax.axis_index("h"), lax.axis_index("b")
  kb = pid
  wg = lax.axis_index("wg")
  if causal:
    # Query tiles [lo, q_full) straddle the diagonal of these 128 keys; [q_full, nq) see them all.
    lo, q_full = common.causal_k_bounds(kb, bq, PROGRAM_ROWS, nq)
  else:
    lo = q_full = 0
  per_head = nq - lo

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
    r0 = kb * PROGRAM_ROWS + wg * ROWS
    rows = pl.ds(r0, ROWS)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[wg], k_bar.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[wg], v_bar.at[wg])
    k_seg = _stationary_rows(ks_ref.at[batch, rows], ks_smem.at[wg], ks_bar.at[wg], interpret) if has_seg else None
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    c = scale * LOG2E
    plgpu.barrier_wait(k_bar.at[wg])
    plgpu.barrier_wait(v_bar.at[wg])

    def step(i, carry, g, masked: bool):
      dk, dv = carry
      j = g * per_head + i - lo  # the producer's step counter
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(q_bar.at[slot])
      st = _mma(None, k_smem.at[wg], q_smem.at[slot], interpret, transpose_b=True) * c  # S^T [64 keys, bq]
      mask = _tile_mask(k_seg, qs_smem.at[slot], qs_bar.at[slot], r0, i * bq, (ROWS, bq), masked, False, interpret)
      if mask is not None:
        st = jnp.where(mask, st, -jnp.inf)
      plgpu.barrier_wait(st_bar.at[slot])
      lse2 = _load(st_smem.at[slot, 0], col_layout, interpret)
      delta = _load(st_smem.at[slot, 1], col_layout, interpret)
      pt = jnp.exp2(st - _cols(lse2))
      plgpu.barrier_wait(do_bar.at[slot])
      dv = _mma(dv, pt.astype(q_ref.dtype), do_smem.at[slot], interpret)
      dpt = _mma(None, v_smem.at[wg], do_smem.at[slot], interpret, transpose_b=True)
      ds = (pt * (dpt - _cols(delta))).astype(q_ref.dtype)  # dS^T [64 keys, bq]
      if fused_dq:  # (the wgmma below reads it from shared memory, transposed)
        ds_smem.at[wg][...] = ds
        plgpu.commit_smem()
      dk = _mma(dk, ds, q_smem.at[slot], interpret)
      plgpu.barrier_arrive(done.at[slot])  # the slot's tiles are all read (dQ needs dS and K only)
      if fused_dq:
        dq = _mma(None, ds_smem.at[wg], k_smem.at[wg], interpret, transpose_a=True)  # dS K [bq, H]
        head = kv_head * group + g
        _reduce_add(dq, dq_stage.at[wg], dq_acc.at[wg, batch, pl.ds(i * bq, bq), head], interpret)
      return dk, dv

    def head_loop(g, carry):
      if causal:
        carry = lax.fori_loop(lo, q_full, functools.partial(step, g=g, masked=True), carry)
      return lax.fori_loop(q_full, nq, functools.partial(step, g=g, masked=False), carry)

    h = k_smem.shape[-1]
    zeros = _layout(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA, interpret)
    dk, dv = lax.fori_loop(0, group, head_loop, (zeros, zeros))
    # K and V are no longer read: their slots stage the output tiles.
    _store(dk * scale, k_smem.at[wg], dk_ref.at[batch, rows, kv_head])
    _store(dv, v_smem.at[wg], dv_ref.at[batch, rows, kv_head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _():
    def issue(j, slot):
      head = kv_head * group + lax.div(j, per_head)
      tile = pl.ds((lo + lax.rem(j, per_head)) * bq, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[batch, tile, head], q_smem.at[slot], q_bar.at[slot])
      if has_seg:
        plgpu.copy_gmem_to_smem(qs_ref.at[batch, tile], qs_smem.at[slot], qs_bar.at[slot])
      plgpu.copy_gmem_to_smem(st_ref.at[batch, head, :, tile], st_smem.at[slot], st_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[batch, tile, head], do_smem.at[slot], do_bar.at[slot])

    _producer(group * per_head, stages, [(done, issue)])


def _check(q, k, q_rows: int, k_rows: int, tiles, out_dtype=None):
  """q_rows / k_rows: what T / S must be multiples of; tiles as for `unsupported_reason`."""
  t, h, s = q.shape[1], q.shape[3], k.shape[1]
  reason = unsupported_reason(q.dtype, h, False, tiles)
  if reason is None and (t % q_rows or s % k_rows):
    reason = f"lengths T={t}, S={s}: the Mosaic GPU kernels take them padded to {q_rows} and {k_rows} rows"
  if reason is None and out_dtype is not None and jnp.dtype(out_dtype) != q.dtype:
    reason = f"out_dtype={jnp.dtype(out_dtype).name}: the Mosaic GPU forward writes q's dtype"
  if reason is not None:
    raise ValueError(reason)


def _fits(scratch, what: str):
  """Refuses (one sentence) a kernel whose shared-memory scratch exceeds a Hopper SM's; checked in
  interpret mode too, so a tiling the GPU would reject is refused on every host."""
  need = sum(math.prod(r.shape) * jnp.dtype(r.dtype).itemsize for r in scratch if getattr(r, "dtype", None) is not None)
  need += 1024  # barriers and alignment
  if need > SMEM_LIMIT:
    raise ValueError(f"{what}: needs {need // 1024} KiB of shared memory, more than the "
                     f"{SMEM_LIMIT // 1024} KiB of a Hopper SM; use fewer num_stages or smaller tiles")


def _call(kernel, out_type, scratch, grid, grid_names, interpret: bool, what: str, mutable_args: bool = False):
  """The kernel launched on `grid` with 3 warpgroups ("wg": two consumers, the producer), once its
  scratch fits in shared memory (`what` names the kernel and its tiles if not). mutable_args:
  some arguments are `jax.Ref`s the kernel writes (aliased in and out); those go through
  `pl.kernel` with a Mosaic GPU mesh (`plgpu.kernel` wraps its kernels for vmap, which takes no
  refs)."""
  if interpret and _InterpretGPUParams is None:  # pragma: no cover
    raise NotImplementedError("this jax has no Mosaic GPU interpret mode; run the Mosaic GPU kernels on a GPU")
  _fits(scratch, what)
  params = dict(compiler_params=plgpu.CompilerParams(approx_math=True),
                interpret=_InterpretGPUParams(**INTERPRET_OPTIONS) if interpret else None)
  if not mutable_args:
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
                        num_threads=CONSUMERS + 1, thread_name="wg", **params)

  def body(*refs):  # scratch as plgpu.kernel allocates it: one allocation shared by the warpgroups
    pl.run_scoped(lambda *scratch_refs: kernel(*refs, *scratch_refs), *scratch, collective_axes="wg")
  mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=CONSUMERS + 1, thread_name="wg")
  return pl.kernel(body, out_type=out_type, mesh=mesh, name=getattr(kernel, "func", kernel).__name__, **params)


def forward(q, k, v, qseg, kseg, *, causal: bool, has_seg: bool, scale: float, block_k: int, num_stages: int,
            interpret: bool, out_dtype=None):
  """Padded q [B, T, N, H], k/v [B, S, K, H], segment ids [B, T] / [B, S] -> (out [B, T, N, H],
  lse [B, N, T] fp32 natural log). T and S multiples of 128 and of block_k."""
  _check(q, k, PROGRAM_ROWS, block_k, [("block_k", block_k, STREAMED), ("num_stages", num_stages, STAGES)], out_dtype)
  b, t, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  nq, nk = t // PROGRAM_ROWS, s // block_k
  tr = _smem_transforms(h, q.dtype)
  kernel = functools.partial(_query_rows_kernel, kind="fwd", causal=causal, has_seg=has_seg, scale=scale,
                             block_k=block_k, num_stages=num_stages, nq=nq, nk=nk, group=n // kvh,
                             interpret=interpret)
  ring = lambda: plgpu.SMEM((num_stages, block_k, h), q.dtype, transforms=tr)
  scratch = (
      plgpu.SMEM((CONSUMERS, ROWS, h), q.dtype, transforms=tr),  # Q, then the output tile
      ring(), ring(),  # K, V
      plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),  # lse
      plgpu.SMEM((CONSUMERS, ROWS), jnp.int32),  # query segment ids
      plgpu.SMEM((num_stages, block_k), jnp.int32),  # key segment ids, one tile per K/V slot
      plgpu.Barrier(num_barriers=CONSUMERS),  # Q loaded
      plgpu.Barrier(num_barriers=CONSUMERS),  # query segment ids loaded
      plgpu.Barrier(num_barriers=num_stages),  # K loaded
      plgpu.Barrier(num_barriers=num_stages),  # V loaded
      plgpu.Barrier(num_barriers=num_stages),  # key segment ids loaded
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=num_stages),  # K slot released
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=num_stages),  # V slot released
  )
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
  return _call(kernel, out_type, scratch, (nq, n, b), ("q", "h", "b"), interpret,
               f"Mosaic GPU forward with block_k={block_k}, num_stages={num_stages}, head_dim={h}")(q, k, v, qseg, kseg)


def backward(q, k, v, qseg, kseg, d_out, stats, *, causal: bool, has_seg: bool, scale: float, block_q: int,
             block_k: int, num_stages: int, interpret: bool, fused_dq: bool = False):
  """(dq, dk, dv) of the padded inputs from d_out [B, T, N, H] and stats [B, N, 2, T] fp32 (lse *
  log2(e), 0 on rows that see no key; delta = rowsum(dO * O) - dlse). Two kernels: dQ with
  128-row query programs streaming block_k-row K/V tiles, and dK/dV with 128-row key programs
  streaming block_q-row query tiles of every query head of the group. fused_dq: one kernel, the
  dK/dV one, which also reduce-adds dS K into two fp32 dQ buffers [2, B, T, N, H] (one per
  consumer warpgroup, zeroed first, summed and cast after); block_k is then unused."""
  _check(q, k, PROGRAM_ROWS, PROGRAM_ROWS, [("block_q", block_q, STREAMED), ("block_k", block_k, STREAMED),
                                  ("num_stages", num_stages, STAGES)])  # 128-row programs on both sides
  b, t, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  group = n // kvh
  tr = _smem_transforms(h, q.dtype)
  ring = lambda rows: plgpu.SMEM((num_stages, rows, h), q.dtype, transforms=tr)
  rows_tile = lambda: plgpu.SMEM((CONSUMERS, ROWS, h), q.dtype, transforms=tr)
  slot_bars = lambda: plgpu.Barrier(num_barriers=num_stages)
  wg_bars = lambda: plgpu.Barrier(num_barriers=CONSUMERS)
  released = lambda: plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=num_stages)

  if not fused_dq:
    nq, nk = t // PROGRAM_ROWS, s // block_k
    dq_kernel = functools.partial(_query_rows_kernel, kind="dq", causal=causal, has_seg=has_seg, scale=scale,
                                  block_k=block_k, num_stages=num_stages, nq=nq, nk=nk, group=group,
                                  interpret=interpret)
    dq_scratch = (rows_tile(), ring(block_k), ring(block_k), rows_tile(),  # Q (then dQ), K, V, dO
                  plgpu.SMEM((CONSUMERS, 2, ROWS), jnp.float32),  # lse2, delta
                  plgpu.SMEM((CONSUMERS, ROWS), jnp.int32), plgpu.SMEM((num_stages, block_k), jnp.int32),
                  wg_bars(), wg_bars(), slot_bars(), slot_bars(), slot_bars(), released(), released(),
                  wg_bars(), wg_bars())
    dq = _call(dq_kernel, jax.ShapeDtypeStruct(q.shape, q.dtype), dq_scratch, (nq, n, b), ("q", "h", "b"),
               interpret, f"Mosaic GPU dQ kernel with block_k={block_k}, num_stages={num_stages}, head_dim={h}")(
                   q, k, v, qseg, kseg, d_out, stats)

  nq, nk = t // block_q, s // PROGRAM_ROWS
  dkv_kernel = functools.partial(_dkv_kernel, causal=causal, has_seg=has_seg, scale=scale, block_q=block_q,
                                 num_stages=num_stages, nq=nq, nk=nk, group=group, fused_dq=fused_dq,
                                 interpret=interpret)
  dkv_scratch = (rows_tile(), rows_tile(), ring(block_q), ring(block_q),  # K (then dK), V (then dV), Q, dO
                 plgpu.SMEM((num_stages, 2, block_q), jnp.float32),  # lse2, delta of each query tile
                 plgpu.SMEM((num_stages, block_q), jnp.int32), plgpu.SMEM((CONSUMERS, ROWS), jnp.int32),
                 wg_bars(), wg_bars(), wg_bars(), slot_bars(), slot_bars(), slot_bars(), slot_bars(), released())
  dkv_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  args = (q, k, v, qseg, kseg, d_out, stats)
  what = (f"Mosaic GPU {'fused dK/dV/dQ' if fused_dq else 'dK/dV'} kernel with block_q={block_q}, "
          f"num_stages={num_stages}, head_dim={h}")
  if not fused_dq:
    dk, dv = _call(dkv_kernel, dkv_type, dkv_scratch, (nk, kvh, b), ("k", "h", "b"), interpret, what)(*args)
    return dq, dk, dv
  dkv_scratch += (plgpu.SMEM((CONSUMERS, ROWS, block_q), q.dtype, transforms=_smem_transforms(block_q, q.dtype)),
                  plgpu.SMEM((CONSUMERS, block_q, h), jnp.float32, transforms=_smem_transforms(h, jnp.float32)))

  @jax.jit  # (a ref placed in global memory exists only inside a jit)
  def fused(*args):
    dq_acc = jax.new_ref(jnp.zeros((CONSUMERS,) + q.shape, jnp.float32), memory_space=plgpu.GMEM)
    dk, dv = _call(dkv_kernel, dkv_type, dkv_scratch, (nk, kvh, b), ("k", "h", "b"), interpret, what,
                   mutable_args=True)(*args, dq_acc)
    acc = dq_acc[...]
    return ((acc[0] + acc[1]) * scale).astype(q.dtype), dk, dv
  return fused(*args)
