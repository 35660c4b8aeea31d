"""Flash attention forward for Hopper GPUs as a Mosaic GPU Pallas kernel (wgmma, TMA, warp
specialization); GPU interpret mode on CPU.

Why a second forward: the Triton-lowered forward of `kernels/flash_pallas.py` reaches 0.61-0.73x
cuDNN at head dim 128 on an H200 (BENCHMARKS.md). Triton issues its K/V loads and matrix products
from the same warps, so the tensor cores idle while a tile's softmax runs. Here each program
(CTA) owns 128 query rows and runs three warpgroups:

- two consumer warpgroups, 64 query rows each: S = Q K^T by wgmma into fp32 registers, the
  online softmax in base 2 on those registers, then O += P V by wgmma with P (bf16/fp16) as a
  register operand; the 64 x H output accumulator never leaves registers;
- one producer warpgroup that only issues TMA copies of K and V tiles into a ring of
  `num_stages` shared-memory slots, each slot guarded by a "loaded" barrier (the TMA's
  transaction count) and a "consumed" barrier (both consumers arrive after their wgmma has
  read the slot).

So the loads of step j+1.. overlap the softmax and products of step j, and the two consumers
interleave their softmax with each other's matrix products.

Work per program and step (one [bk, H] K/V tile): 2 x 2*64*bk*H FLOPs per consumer on the
tensor cores, 64*bk exp2 per consumer; bytes: 2*bk*H*2 from HBM (L2) by TMA. At bk=128, H=128
that is 4.2 MFLOP per 64 KiB, ~64 FLOPs/byte per program, and the K/V tiles of one head are
shared by every query block of that head through L2.

Contract: the padded arrays of `kernels.flash_pallas._prepare` (q [B, T, N, H], k/v [B, S, K, H],
segment ids [B, T] / [B, S], 0 = padding) -> out [B, T, N, H] in q's dtype, lse [B, N, T] fp32
natural log, the same as `flash_pallas._forward`, whose backward kernels then run unchanged
(`Tiling(forward="mgpu")` selects this forward). Supported: bf16/fp16, head dims 64 and 128,
causal by storage order with the masked tiles past the diagonal skipped by loop bounds, segment
ids (mask built per tile from two vector loads), grouped-query attention through the producer's
head index. Explicit token positions (`q_index` / `kv_index`), fp32 inputs and other head dims
are refused with one sentence; `flash_pallas` handles them.

Interpret mode runs everything but the two matrix products as compiled: the warpgroups, the
TMA copies, the barriers' protocol, the loop bounds, masks and softmax. Its interpreter has no
`pl.run_state` (which starts the O accumulator's wgmma from O * alpha in place) and no
transposed wgmma operand (K^T), so `_mma` is the one place where the two differ: interpreted,
a product is a plain fp32 dot of the loaded tiles. The compiled variant is checked by lowering
it to Mosaic GPU on any host (tests/test_flash_mgpu.py), which validates its layouts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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
ROWS = 64  # query rows per consumer warpgroup (one wgmma M)
CONSUMERS = 2
BLOCK_Q = ROWS * CONSUMERS  # query rows per program
HEAD_DIMS = (64, 128)
DTYPES = ("bfloat16", "float16")


def available() -> bool:
  return plgpu is not None


def unsupported_reason(dtype, head_dim: int, block_q: int, block_k: int, num_stages: int,
                       has_index: bool) -> str | None:
  """One sentence naming the first input this forward cannot run, or None."""
  if plgpu is None:
    return "this jax has no Mosaic GPU Pallas backend (jax.experimental.pallas.mosaic_gpu)"
  if jnp.dtype(dtype).name not in DTYPES:
    return f"dtype={jnp.dtype(dtype).name}: the Mosaic GPU forward takes bfloat16 or float16 (wgmma operands)"
  if head_dim not in HEAD_DIMS:
    return f"head_dim={head_dim}: the Mosaic GPU forward takes head dims {HEAD_DIMS}"
  if block_q != BLOCK_Q:
    return f"block_q={block_q}: the Mosaic GPU forward's programs own {BLOCK_Q} query rows (2 warpgroups x {ROWS})"
  if block_k not in (64, 128):
    return f"block_k={block_k}: the Mosaic GPU forward streams K/V tiles of 64 or 128 rows"
  if num_stages < 2:
    return f"num_stages={num_stages}: the Mosaic GPU forward's K/V ring needs at least 2 slots"
  if has_index:
    return "explicit q_index/kv_index positions: the Mosaic GPU forward masks by storage order only"
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


def _mma(init, a, b_ref, interpret: bool, transpose_b: bool = False):
  """init + a @ b (or a @ b^T) in fp32 [64, n] by one wgmma; a is a shared-memory ref or a register
  array, b a shared-memory ref; init None means zeros. Compiled, the accumulator starts from
  init in place (`pl.run_state`); the interpreter has neither run_state nor transposed wgmma
  operands, so there the same product is a plain dot of the loaded tiles."""
  if interpret:
    a_val = a if isinstance(a, jax.Array) else a[...]
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    prod = lax.dot_general(a_val, b_ref[...], dims, preferred_element_type=jnp.float32)
    return prod if init is None else init + prod
  b = plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  if init is None:
    return pl.run_scoped(product, plgpu.ACC((ROWS, b.shape[-1]), jnp.float32))

  def in_place(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(in_place)(plgpu.ACC.init(init))


def _kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, qs_smem,
            ks_smem, q_bar, k_bar, v_bar, qs_bar, ks_bar, k_done, v_done, *, causal: bool, has_seg: bool, scale: float, block_k: int,
            num_stages: int, nq: int, nk: int, group: int, interpret: bool):
  bk, stages = block_k, num_stages
  pid, head, batch = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
  qb = nq - 1 - pid if causal else pid  # causal: the longest programs first, to even the tail
  wg = lax.axis_index("wg")
  if causal:
    # Key tiles [0, n_full) are visible to all 128 rows; [n_full, hi) straddle the diagonal.
    n_full = jnp.minimum(lax.div(qb * BLOCK_Q + 1, bk), nk)
    hi = jnp.minimum(lax.div((qb + 1) * BLOCK_Q + bk - 1, bk), nk)
  else:
    n_full = hi = nk

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    r0 = qb * BLOCK_Q + wg * ROWS
    rows = pl.ds(r0, ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[wg], q_bar.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    q_seg = None
    if has_seg:
      plgpu.copy_gmem_to_smem(qs_ref.at[batch, rows], qs_smem.at[wg], qs_bar.at[wg])
      plgpu.barrier_wait(qs_bar.at[wg])
      qs = _load(qs_smem.at[wg], row_layout, interpret)
      q_seg = jnp.where(qs == 0, -1, qs)  # padding matches no key
    c = scale * LOG2E
    plgpu.barrier_wait(q_bar.at[wg])

    def step(j, carry, masked: bool):
      o, m, l = carry
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_bar.at[slot])
      s = _mma(None, q_smem.at[wg], k_smem.at[slot], interpret, transpose_b=True) * c
      mask = None
      if has_seg:
        plgpu.barrier_wait(ks_bar.at[slot])
        ks = _load(ks_smem.at[slot], plgpu.Layout.WGMMA.reduce(0), interpret)
        mask = _rows(q_seg, bk) == _cols(ks)
      plgpu.barrier_arrive(k_done.at[slot])
      if masked:
        iota = lambda d: _layout(lax.broadcasted_iota(jnp.int32, (ROWS, bk), d), plgpu.Layout.WGMMA, interpret)
        row, col = r0 + iota(0), j * bk + iota(1)
        mask = col <= row if mask is None else mask & (col <= row)
      if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - _rows(m_new, bk))
      l = l * alpha + p.sum(axis=1)
      plgpu.barrier_wait(v_bar.at[slot])
      o = _mma(o * _rows(alpha, o.shape[1]), p.astype(q_ref.dtype), v_smem.at[slot], interpret)
      plgpu.barrier_arrive(v_done.at[slot])
      return o, m_new, l

    h = q_smem.shape[-1]
    carry = (_layout(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA, interpret),
             _layout(jnp.full((ROWS,), _M_INIT, jnp.float32), row_layout, interpret),
             _layout(jnp.zeros((ROWS,), jnp.float32), row_layout, interpret))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    if causal:
      carry = lax.fori_loop(n_full, hi, functools.partial(step, masked=True), carry)
    o, m, l = carry
    empty = l == 0.0  # padding rows saw no key: out 0, lse -inf
    l_safe = jnp.where(empty, 1.0, l)
    q_smem[wg] = (o * _rows(1.0 / l_safe, o.shape[1])).astype(q_smem.dtype)  # Q is no longer read: reuse its slot
    lse_smem[wg] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, group)

    def load(j, _):
      slot = lax.rem(j, stages)
      tile = pl.ds(j * bk, bk)

      @pl.when(j >= stages)
      def _():
        plgpu.barrier_wait(k_done.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[batch, tile, kv_head], k_smem.at[slot], k_bar.at[slot])
      if has_seg:  # the slot's key segment ids travel with K (released by the same k_done)
        plgpu.copy_gmem_to_smem(ks_ref.at[batch, tile], ks_smem.at[slot], ks_bar.at[slot])

      @pl.when(j >= stages)
      def _():
        plgpu.barrier_wait(v_done.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, tile, kv_head], v_smem.at[slot], v_bar.at[slot])
      return ()

    lax.fori_loop(0, hi, load, ())

    def drain(j, _):  # observe the last consumptions too, so every barrier phase is waited on
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_done.at[slot])
      plgpu.barrier_wait(v_done.at[slot])
      return ()

    lax.fori_loop(jnp.maximum(hi - stages, 0), hi, drain, ())


def forward(q, k, v, qseg, kseg, *, causal: bool, has_seg: bool, scale: float, block_k: int, num_stages: int,
            interpret: bool, out_dtype=None):
  """Padded q [B, T, N, H], k/v [B, S, K, H], segment ids [B, T] / [B, S] -> (out [B, T, N, H],
  lse [B, N, T] fp32 natural log). T a multiple of 128, S of block_k."""
  b, t, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  reason = unsupported_reason(q.dtype, h, BLOCK_Q, block_k, num_stages, has_index=False)
  if reason is None and (t % BLOCK_Q or s % block_k):
    reason = f"lengths T={t}, S={s}: the Mosaic GPU forward takes T padded to {BLOCK_Q} and S to block_k={block_k}"
  if reason is None and out_dtype is not None and jnp.dtype(out_dtype) != q.dtype:
    reason = f"out_dtype={jnp.dtype(out_dtype).name}: the Mosaic GPU forward writes q's dtype"
  if reason is not None:
    raise ValueError(reason)
  if interpret and _InterpretGPUParams is None:  # pragma: no cover
    raise NotImplementedError("this jax has no Mosaic GPU interpret mode; run the Mosaic GPU forward on a GPU")
  nq, nk = t // BLOCK_Q, s // block_k
  tr = _smem_transforms(h, q.dtype)
  kernel = functools.partial(_kernel, causal=causal, has_seg=has_seg, scale=scale, block_k=block_k,
                             num_stages=num_stages, nq=nq, nk=nk, group=n // kvh, interpret=interpret)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      scratch_types=(
          plgpu.SMEM((CONSUMERS, ROWS, h), q.dtype, transforms=tr),  # Q, then the output tile
          plgpu.SMEM((num_stages, block_k, h), k.dtype, transforms=tr),
          plgpu.SMEM((num_stages, block_k, h), v.dtype, transforms=tr),
          plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),  # lse
          plgpu.SMEM((CONSUMERS, ROWS), jnp.int32),  # query segment ids
          plgpu.SMEM((num_stages, block_k), jnp.int32),  # key segment ids, one tile per K/V slot
          plgpu.Barrier(num_barriers=CONSUMERS),  # Q loaded
          plgpu.Barrier(num_barriers=num_stages),  # K loaded
          plgpu.Barrier(num_barriers=num_stages),  # V loaded
          plgpu.Barrier(num_barriers=CONSUMERS),  # query segment ids loaded
          plgpu.Barrier(num_barriers=num_stages),  # key segment ids loaded
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=num_stages),  # K slot consumed
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=num_stages),  # V slot consumed
      ),
      grid=(nq, n, b),
      grid_names=("q", "h", "b"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_InterpretGPUParams() if interpret else None,
  )
  return call(q, k, v, qseg, kseg)
