"""What the attention kernels share: tile math, the custom-VJP contracts, argument checks and
block tables. Every backend file (Triton, Mosaic GPU, TPU, block-sparse, decode) imports this
module, `kernels.reference` and `jax` only; nothing here imports a backend or `layers/`.

- Triton tiles: `dot` / `dot_t` (fp32 accumulation; `dot_t` reads its second operand
  transposed), the base-2 online-softmax step (`online_init`, `online_step`,
  `online_finish`), causal loop bounds of a query or key block (`causal_q_bounds`,
  `causal_k_bounds`), and run-time skipping of empty tiles (`visit_if_visible`).
- TPU (Mosaic) tiles: the natural-log online softmax in VMEM scratch (`tpu_fwd_init`,
  `tpu_fwd_tile`, `tpu_fwd_finish`) and `tpu_when_visible`.
- Custom-VJP contracts: `fused_attention` (differentiable in out and lse, for kernels whose
  partial results are merged) and `output_vjp` (differentiable in out only).
- `check_inputs`, padding (`pad_axis`, `pow2_at_least`, `fit`) and `resolve_interpret`
  (interpret mode on CPU, compiled on GPU).
- Block tables of the block-sparse kernels: `compact_table`, `transpose_table`,
  `merge_rows`, `checked_tables`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton compiler parameters (num_warps, num_stages); absent from some jax builds.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None

# Atomic read-modify-write on a ref: `pallas.triton.atomic_add` in newer jax, `pl.atomic_add` before.
atomic_add = getattr(pltriton, "atomic_add", None) or getattr(pl, "atomic_add", None)
# `pl.squeezed` (newer) and `None` (older) both mean "this block dimension is 1 and dropped".
SQ = getattr(pl, "squeezed", None)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite start for the running max: exp2(-inf - M_INIT) is 0 and exp2(M_INIT - M_INIT) is
# 1, so a row that has seen only masked (-inf) scores keeps l = 0 and o = 0, without NaNs.
M_INIT = -1e30


# ----------------------------------------------------------------------------- Triton tiles


def dot(a, b):
  """a [m, k] @ b [k, n] -> fp32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_t(a, b):
  """a [m, k] @ b[n, k]^T -> fp32 (b is a loaded tile; Triton reads it transposed for free)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def causal_q_bounds(i, bq: int, bk: int, nk: int):
  """Key blocks of query block i: [0, n_full) entirely visible, [n_full, hi) straddling the diagonal."""
  n_full = jnp.minimum(lax.div(i * bq + 1, bk), nk)
  hi = jnp.minimum(lax.div((i + 1) * bq + bk - 1, bk), nk)
  return n_full, hi


def causal_k_bounds(j, bq: int, bk: int, nq: int):
  """Query blocks seen by key block j: [lo, q_full) straddling the diagonal, [q_full, nq) below it."""
  lo = jnp.minimum(lax.div(j * bk, bq), nq)
  q_full = jnp.minimum(lax.div((j + 1) * bk - 1 + bq - 1, bq), nq)
  return lo, q_full


def any_visible(mask):
  """True when any entry of a [rows, cols] mask is set (a max: reductions of bools do not lower to Triton)."""
  return jnp.max(mask.astype(jnp.int32)) > 0


def visit_if_visible(step, mask_of, carry):
  """step(mask, carry) when the tile's mask has a visible entry, else carry unchanged."""
  mask = mask_of()
  return lax.cond(any_visible(mask), lambda c: step(mask, c), lambda c: c, carry)


def online_step(carry, s, load_v):
  """One online-softmax step in base 2: carry (o [rows, H] fp32, m, l [rows]); s the tile's
  scores [rows, cols], already scaled by log2(e)/sqrt(H) and masked to -inf; load_v() loads
  the V tile (after the exponentials, as a pipelined kernel wants)."""
  o, m, l = carry
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l = l * alpha + jnp.sum(p, axis=1)
  v = load_v()
  return o * alpha[:, None] + dot(p.astype(v.dtype), v), m_new, l


def online_init(rows: int, h: int):
  return jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), M_INIT, jnp.float32), jnp.zeros((rows,), jnp.float32)


def online_finish(carry, o_ref, lse_ref):
  """Writes out = o / l and lse (natural log); rows that saw no key get 0 and -inf."""
  o, m, l = carry
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (o * (1.0 / l_safe)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


# ----------------------------------------------------------------------------- TPU tiles


def tpu_when_visible(mask):
  """Decorator: run the tile's body only if its mask has a visible entry (a max: Mosaic reduces ints)."""
  return pl.when(jnp.max(mask.astype(jnp.int32)) > 0)


def tpu_fwd_init(m_sc, l_sc, acc_sc):
  m_sc[...] = jnp.full(m_sc.shape, M_INIT, jnp.float32)
  l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
  acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def tpu_fwd_finish(o_ref, lse_ref, m_sc, l_sc, acc_sc):
  """out = acc / l and lse = m + log l; rows that saw no key: out 0, lse -inf."""
  l = l_sc[...]
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l_safe))


def tpu_fwd_tile(q_ref, k_ref, v_ref, m_sc, l_sc, acc_sc, mask, scale: float):
  """One online-softmax step of the resident query tile against one K/V tile."""
  s = jnp.where(mask, dot_t(q_ref[...], k_ref[...]) * scale, -jnp.inf)  # [bq, bk]
  m = m_sc[...]
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new)
  l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
  acc_sc[...] = acc_sc[...] * alpha + dot(p.astype(v_ref.dtype), v_ref[...])
  m_sc[...] = m_new


# ----------------------------------------------------------------------------- custom VJPs


def fused_attention(forward, backward):
  """The differentiable (out, lse) = f(q, k, v, qseg, kseg, qidx, kidx, cfg) of a kernel family:
  forward(...) -> (out, lse); backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out, d_lse,
  cfg) -> (dq, dk, dv), the lse cotangent entering as dS = P (dP - delta + dlse)."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
  def attention(q, k, v, qseg, kseg, qidx, kidx, cfg):
    return tuple(forward(q, k, v, qseg, kseg, qidx, kidx, cfg))

  def attention_fwd(q, k, v, qseg, kseg, qidx, kidx, cfg):
    out, lse = forward(q, k, v, qseg, kseg, qidx, kidx, cfg)
    return (out, lse), (q, k, v, qseg, kseg, qidx, kidx, out, lse)

  def attention_bwd(cfg, res, grads):
    q, k, v, qseg, kseg, qidx, kidx, out, lse = res
    d_out, d_lse = grads
    dq, dk, dv = backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out.astype(q.dtype),
                          d_lse.astype(jnp.float32), cfg)
    float0 = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return dq, dk, dv, float0(qseg), float0(kseg), float0(qidx), float0(kidx)

  attention.defvjp(attention_fwd, attention_bwd)
  return attention


def output_vjp(forward, backward):
  """out = f(*arrays, cfg=...) of a kernel family differentiable in its output only (the
  block-sparse kernels): forward(*arrays, cfg) -> (out, lse), the lse saved for the backward;
  backward(*arrays, out, lse, d_out, cfg) -> the gradients of the floating-point arrays (q, k,
  v) in order. Integer arrays (block tables, segment ids) get float0 zeros."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
  def attention(arrays, cfg):
    return forward(*arrays, cfg)[0]

  def attention_fwd(arrays, cfg):
    out, lse = forward(*arrays, cfg)
    return out, (arrays, out, lse)

  def attention_bwd(cfg, res, d_out):
    arrays, out, lse = res
    grads = iter(backward(*arrays, out, lse, d_out, cfg))
    zero_or_grad = lambda a: next(grads) if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape,
                                                                                                 jax.dtypes.float0)
    return (jax.tree.map(zero_or_grad, arrays),)  # in leaf order, as backward returns them

  attention.defvjp(attention_fwd, attention_bwd)
  return lambda *arrays, cfg: attention(arrays, cfg)


# ----------------------------------------------------------------------------- arguments


def resolve_interpret(interpret: bool | None) -> bool:
  if interpret is not None:
    return bool(interpret)
  backend = jax.default_backend()
  if backend == "cpu":
    return True
  if backend == "gpu":
    return False
  raise NotImplementedError(f"this Pallas kernel has a GPU (Triton) path only, none for backend {backend!r} (the "
                            f"TPU flash kernels are kernels/flash_tpu.py); pass interpret=True or use "
                            f"layers.attention.flash")


def pow2_at_least(x: int, lo: int) -> int:
  return max(lo, 1 << max(0, (x - 1).bit_length()))


def fit(block: int, length: int) -> int:
  """A block no larger than the (power-of-two-rounded) length, so tiny inputs are not padded to 128."""
  return min(block, pow2_at_least(length, 16))


def pad_axis(x, axis: int, size: int, value=0):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def check_inputs(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index) -> None:
  """The attention kernels' shared argument contract, with one-sentence errors."""
  b, t, n, h = q_btnh.shape
  bs, s, kvh, hk = k_bskh.shape
  if k_bskh.shape != v_bskh.shape or bs != b or hk != h:
    raise ValueError(f"q {q_btnh.shape}, k {k_bskh.shape}, v {v_bskh.shape}: expected q [B, T, N, H] and k, v "
                     f"[B, S, K, H] with the same B and H")
  if n % kvh:
    raise ValueError(f"num_heads={n} is not a multiple of num_kv_heads={kvh}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if (q_index is None) != (kv_index is None):
    raise ValueError("pass both q_index and kv_index, or neither")


# ----------------------------------------------------------------------------- block tables


def compact_table(kv_blocks, kv_valid, num_heads: int, num_kv_heads: int, num_blocks: int):
  """The engine's table layout -> rows [B or 1, N, C, Mp] int32: each row's valid blocks first, then -1.

  Mp is M rounded up to a power of two >= 16 (a Triton vector). numpy in, numpy out (the
  table is then a compile-time constant); jax in, jax out.
  """
  concrete = isinstance(kv_blocks, np.ndarray) and isinstance(kv_valid, np.ndarray)
  xp = np if concrete else jnp
  blocks, valid = xp.asarray(kv_blocks).astype(np.int32), xp.asarray(kv_valid).astype(bool)
  if blocks.ndim != 4 or blocks.shape != valid.shape:
    raise ValueError(f"kv_blocks {blocks.shape} and kv_valid {valid.shape} must both be [B or 1, heads, "
                     f"{num_blocks} query blocks, M]")
  tb, tn, tc, m = blocks.shape
  if tn not in (1, num_kv_heads, num_heads) or tc != num_blocks:
    raise ValueError(f"block table of shape {blocks.shape} does not fit {num_heads} query heads / {num_kv_heads} kv "
                     f"heads and {num_blocks} blocks")
  if tn != num_heads:  # one table per kv head (query head n reads n // G's) or one for all heads
    pick = np.arange(num_heads) // (num_heads // num_kv_heads) if tn == num_kv_heads else np.zeros(num_heads, int)
    blocks, valid = blocks[:, pick], valid[:, pick]
  valid = valid & (blocks >= 0) & (blocks < num_blocks)
  entries = xp.where(valid, blocks, -1)
  if concrete:
    order = np.argsort(~valid, axis=-1, kind="stable")
  else:
    order = jnp.argsort(~valid, axis=-1, stable=True)
  rows = xp.take_along_axis(entries, order, axis=-1)
  mp = pow2_at_least(m, 16)
  pad = [(0, 0)] * 3 + [(0, mp - m)]
  return xp.pad(rows, pad, constant_values=-1)


def transpose_table(rows, num_kv_heads: int):
  """rows [B or 1, N, C, Mp] -> cols [B or 1, K, C, M_T]: for key block j of kv head kh, the
  entries g * C + i of the (query head kh * G + g, query block i) rows that list j, then -1."""
  concrete = isinstance(rows, np.ndarray)
  xp = np if concrete else jnp
  tb, n, c, _ = rows.shape
  g = n // num_kv_heads
  hit = xp.any(rows[..., None] == xp.arange(c, dtype=np.int32), axis=-2)  # [tb, N, C_i, C_j]
  hit = hit.reshape(tb, num_kv_heads, g, c, c).transpose(0, 1, 4, 2, 3).reshape(tb, num_kv_heads, c, g * c)
  lanes = xp.arange(g * c, dtype=np.int32)
  entries = xp.where(hit, lanes, -1)
  if concrete:
    order = np.argsort(~hit, axis=-1, kind="stable")
    width = pow2_at_least(max(int(hit.sum(-1).max(initial=0)), 1), 16)
  else:
    order = jnp.argsort(~hit, axis=-1, stable=True)
    width = pow2_at_least(g * c, 16)
  cols = xp.take_along_axis(entries, order, axis=-1)
  if width <= cols.shape[-1]:
    return cols[..., :width]
  return xp.pad(cols, [(0, 0)] * 3 + [(0, width - cols.shape[-1])], constant_values=-1)


TABLE_BIG = 1 << 26  # above every entry (a transposed entry is below G * C); times 2^4 it still fits int32
TILES = (1, 2, 4)  # table blocks per program


def merge_rows(rows, r: int):
  """rows [B or 1, H, C, M] (C a multiple of r; each row's distinct entries first, then -1) ->
  [B or 1, H, C / r, W]: merged row i lists once each entry e of rows i*r .. i*r + r - 1, as
  e * 2^r + bits, where bit s says that row i*r + s lists e; then -1. One program walks a merged
  row for a tile of r table blocks and masks each visited tile's rows by their bit. W is the
  longest merged row rounded up to a power of two >= 16 (r * M for a table traced under jit).
  numpy in, numpy out; jax in, jax out."""
  if r == 1:
    return rows
  concrete = isinstance(rows, np.ndarray)
  xp = np if concrete else jnp
  argsort = (lambda a: np.argsort(a, axis=-1, kind="stable")) if concrete else (
      lambda a: jnp.argsort(a, axis=-1, stable=True))
  tb, h, c, m = rows.shape
  x = xp.asarray(rows).astype(np.int32).reshape(tb, h, c // r, r * m)
  vals = xp.where(x >= 0, x, TABLE_BIG)
  order = argsort(vals)
  sv = xp.take_along_axis(vals, order, axis=-1)
  sub_bit = xp.broadcast_to(xp.asarray(1 << np.repeat(np.arange(r, dtype=np.int32), m)), x.shape)
  sb = xp.where(sv < TABLE_BIG, xp.take_along_axis(sub_bit, order, axis=-1), 0)
  first = (sv < TABLE_BIG) & xp.concatenate([xp.ones_like(sv[..., :1], bool), sv[..., 1:] != sv[..., :-1]], axis=-1)
  bits = sb  # a run of equal entries is at most r long (a row's entries are distinct): OR its bits
  for d in range(1, r):
    pad = [(0, 0)] * 3 + [(0, d)]
    bits = bits | xp.where(xp.pad(sv[..., d:], pad, constant_values=-1) == sv, xp.pad(sb[..., d:], pad), 0)
  enc = xp.take_along_axis(xp.where(first, sv * (1 << r) + bits, -1), argsort(~first), axis=-1)
  longest = int(first.sum(-1).max(initial=0)) if concrete else r * m
  width = pow2_at_least(max(longest, 1), 16)
  if width <= enc.shape[-1]:
    return enc[..., :width]
  return xp.pad(enc, [(0, 0)] * 3 + [(0, width - enc.shape[-1])], constant_values=-1)


def checked_tables(q_btnh, k_bskh, v_bskh, kv_blocks, kv_valid, block: int, multiple: int = 1):
  """The shape checks every block-sparse kernel shares, then (rows, cols): the compacted table
  and its transpose (see `compact_table`, `transpose_table`), the block count padded with
  empty rows to a multiple of `multiple`."""
  b, t, n, h = q_btnh.shape
  kvh = k_bskh.shape[2]
  if k_bskh.shape != v_bskh.shape or k_bskh.shape[:2] != (b, t) or k_bskh.shape[3] != h:
    raise ValueError(f"q {q_btnh.shape}, k {k_bskh.shape}, v {v_bskh.shape}: block-sparse attention is "
                     f"self-attention, expected k and v [B, T, K, H] matching q [B, T, N, H]")
  if n % kvh:
    raise ValueError(f"num_heads={n} is not a multiple of num_kv_heads={kvh}")
  rows = compact_table(kv_blocks, kv_valid, n, kvh, -(-t // block))
  if rows.shape[0] not in (1, b):
    raise ValueError(f"block table batch {rows.shape[0]} does not fit batch {b}")
  extra = -rows.shape[2] % multiple
  if extra:
    rows = (np if isinstance(rows, np.ndarray) else jnp).pad(rows, [(0, 0), (0, 0), (0, extra), (0, 0)],
                                                            constant_values=-1)
  if n * rows.shape[2] >= TABLE_BIG:
    raise ValueError(f"{n} heads x {rows.shape[2]} blocks is too many table entries for int32 tables")
  return rows, transpose_table(rows, kvh)
