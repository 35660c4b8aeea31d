"""Fused flash attention for TPU as Pallas (Mosaic) kernels; the TPU interpreter on CPU.

The same contract as `kernels/flash_pallas.py` (the GPU/Triton kernels), laid out the way
Mosaic wants it: heads before length ([B, N, T, H], transposed outside the kernels) so a
tile is (rows, H) in VMEM, and the key loop a grid dimension marked "arbitrary" (TPU grids
run sequentially on a core, so the online-softmax state lives in VMEM scratch across those
steps instead of in a loop carry):

- forward, grid (batch, head, query block, key block): m, l and the fp32 accumulator in
  scratch; out and lse written on the last key block.
- dK/dV, grid (batch, kv head, key block, query head of the group, query block): dK and
  dV accumulate in scratch over the G query heads and all query blocks, recomputing P^T
  from the saved lse (grouped-query attention without copies of K/V).
- dQ, grid (batch, head, query block, key block), accumulating dS K.

Causal tiles past the diagonal are skipped (`pl.when`), and their block index is clamped
to the last needed one so the pipeline does not even fetch them (a repeated block index
is not re-copied). With explicit token positions (`q_index`, `kv_index`: ring chunks,
zigzag rows) the causal mask uses them and a tile is computed only when its mask has a
visible entry. Segment ids (0 = padding) are read per tile and the mask is built in the
kernel; lengths that are not multiples of the blocks are padded with segment id 0.
`flash_chunk_grads_tpu` is ring attention's backward step (one key chunk's gradients from
the final lse).

Tested in the TPU interpreter (`pltpu.InterpretParams`) on CPU against the pure-JAX
blockwise flash and the dense reference, and lowered to Mosaic (`tpu_custom_call`) on any
host; it has not run on a TPU yet. Block sizes: multiples of 8 (sublanes), 128 by default.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import (check_inputs, dot, dot_t, fused_attention, tpu_fwd_finish, tpu_fwd_init, tpu_fwd_tile,
                            tpu_when_visible)


@dataclasses.dataclass(frozen=True)
class _Config:
  causal: bool
  block_q: int
  block_k: int
  scale: float
  interpret: bool
  # Causal by explicit token positions (ring chunks, zigzag rows) instead of storage order:
  # every tile is fetched, and computed only when its mask has a visible entry.
  has_index: bool = False
  out_dtype: str | None = None  # forward output dtype (None: q's); ring attention merges fp32 partials


def _params(cfg: _Config, semantics):
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
              interpret=pltpu.InterpretParams() if cfg.interpret else False)


def _mask(cfg: _Config, i, j, q_seg, k_seg, q_idx, k_idx):
  """[bq, bk] visibility of query block i against key block j: same nonzero segment, causal
  (by the position tiles q_idx [bq, 1] / k_idx [1, bk] when the call has them)."""
  bq, bk = cfg.block_q, cfg.block_k
  mask = (q_seg == k_seg) & (q_seg != 0)  # [bq, 1] vs [1, bk]
  if cfg.causal and cfg.has_index:
    mask &= k_idx <= q_idx
  elif cfg.causal:
    rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask &= cols <= rows
  return mask


def _needed(cfg: _Config, i, j):
  """Whether key block j can be visible from query block i (causal: it starts at or before the block's last row)."""
  if not cfg.causal or cfg.has_index:
    return True
  return j * cfg.block_k <= (i + 1) * cfg.block_q - 1


# Integer division by lax.div (truncating; every operand here is >= 0): jnp's floor division
# brings in `sign`, whose Mosaic lowering asks which TPU generation it runs on.


def _last_k(cfg: _Config, i, nk: int):
  """The last key block query block i needs (the clamp that stops the pipeline fetching the rest)."""
  if not cfg.causal or cfg.has_index:
    return nk - 1
  return jnp.minimum(lax.div((i + 1) * cfg.block_q - 1, cfg.block_k), nk - 1)


def _first_q(cfg: _Config, j):
  """The first query block that can see key block j."""
  if not cfg.causal or cfg.has_index:
    return 0
  return lax.div(j * cfg.block_k, cfg.block_q)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, qi_ref, ki_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                cfg: _Config):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    tpu_fwd_init(m_sc, l_sc, acc_sc)

  @pl.when(_needed(cfg, i, j))
  def _step():
    mask = _mask(cfg, i, j, qs_ref[...], ks_ref[...], qi_ref[...], ki_ref[...])

    @tpu_when_visible(mask)
    def _visible():
      tpu_fwd_tile(q_ref, k_ref, v_ref, m_sc, l_sc, acc_sc, mask, cfg.scale)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    tpu_fwd_finish(o_ref, lse_ref, m_sc, l_sc, acc_sc)


def _forward(q, k, v, qseg, kseg, qidx, kidx, cfg: _Config):
  """q [B, N, T, H], k/v [B, K, S, H], qseg/qidx [B, T, 1], kseg/kidx [B, 1, S] -> out [B, N, T, H],
  lse [B, N, T, 1]."""
  b, n, t, h = q.shape
  kvh, s = k.shape[1], k.shape[2]
  g, bq, bk = n // kvh, cfg.block_q, cfg.block_k
  nq, nk = t // bq, s // bk
  kj = lambda i, j: jnp.minimum(j, _last_k(cfg, i, nk))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(b, n, nq, nk),
      in_specs=[
          pl.BlockSpec((None, None, bq, h), lambda bt, hd, i, j: (bt, hd, i, 0)),
          pl.BlockSpec((None, None, bk, h), lambda bt, hd, i, j: (bt, lax.div(hd, g), kj(i, j), 0)),
          pl.BlockSpec((None, None, bk, h), lambda bt, hd, i, j: (bt, lax.div(hd, g), kj(i, j), 0)),
          pl.BlockSpec((None, bq, 1), lambda bt, hd, i, j: (bt, i, 0)),
          pl.BlockSpec((None, 1, bk), lambda bt, hd, i, j: (bt, 0, kj(i, j))),
          pl.BlockSpec((None, bq, 1), lambda bt, hd, i, j: (bt, i, 0)),
          pl.BlockSpec((None, 1, bk), lambda bt, hd, i, j: (bt, 0, kj(i, j))),
      ],
      out_specs=[
          pl.BlockSpec((None, None, bq, h), lambda bt, hd, i, j: (bt, hd, i, 0)),
          pl.BlockSpec((None, None, bq, 1), lambda bt, hd, i, j: (bt, hd, i, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, cfg.out_dtype or q.dtype),
                 jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, h), jnp.float32)],
      name="flash_tpu_fwd",
      **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
  )(q, k, v, qseg, kseg, qidx, kidx)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, qi_ref, ki_ref, dq_ref, dq_sc, *,
               cfg: _Config):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(_needed(cfg, i, j))
  def _step():
    mask = _mask(cfg, i, j, qs_ref[...], ks_ref[...], qi_ref[...], ki_ref[...])

    @tpu_when_visible(mask)
    def _visible():
      k = k_ref[...]
      s = dot_t(q_ref[...], k) * cfg.scale
      p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
      ds = p * (dot_t(do_ref[...], v_ref[...]) - delta_ref[...])
      dq_sc[...] += dot(ds.astype(k.dtype), k)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, qi_ref, ki_ref, dk_ref, dv_ref, dk_sc,
                dv_sc, *, cfg: _Config):
  j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  first = (gi == 0) & (i == 0)
  last = (gi == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

  @pl.when(first)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_needed(cfg, i, j))
  def _step():
    mask = _mask(cfg, i, j, qs_ref[...], ks_ref[...], qi_ref[...], ki_ref[...])

    @tpu_when_visible(mask)
    def _visible():
      q, do = q_ref[...], do_ref[...]
      s = dot_t(q, k_ref[...]) * cfg.scale  # [bq, bk]
      p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
      # dV += P^T dO and dK += dS^T Q: contractions over the query rows.
      contract_rows = lambda a, b_: lax.dot_general(a, b_, (((0,), (0,)), ((), ())),
                                                    preferred_element_type=jnp.float32)
      dv_sc[...] += contract_rows(p.astype(do.dtype), do)
      ds = p * (dot_t(do, v_ref[...]) - delta_ref[...])
      dk_sc[...] += contract_rows(ds.astype(q.dtype), q)

  @pl.when(last)
  def _finish():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out, d_lse, cfg: _Config):
  b, n, t, h = q.shape
  kvh, s = k.shape[1], k.shape[2]
  g, bq, bk = n // kvh, cfg.block_q, cfg.block_k
  nq, nk = t // bq, s // bk
  # delta = rowsum(dO * O) - dlse, [B, N, T, 1]; lse of empty rows -> 0 (all their P are masked).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True) - d_lse
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

  kj = lambda i, j: jnp.minimum(j, _last_k(cfg, i, nk))
  row = lambda bt, hd, i, j: (bt, hd, i, 0)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(b, n, nq, nk),
      in_specs=[
          pl.BlockSpec((None, None, bq, h), row),
          pl.BlockSpec((None, None, bk, h), lambda bt, hd, i, j: (bt, lax.div(hd, g), kj(i, j), 0)),
          pl.BlockSpec((None, None, bk, h), lambda bt, hd, i, j: (bt, lax.div(hd, g), kj(i, j), 0)),
          pl.BlockSpec((None, None, bq, h), row),
          pl.BlockSpec((None, None, bq, 1), row),
          pl.BlockSpec((None, None, bq, 1), row),
          pl.BlockSpec((None, bq, 1), lambda bt, hd, i, j: (bt, i, 0)),
          pl.BlockSpec((None, 1, bk), lambda bt, hd, i, j: (bt, 0, kj(i, j))),
          pl.BlockSpec((None, bq, 1), lambda bt, hd, i, j: (bt, i, 0)),
          pl.BlockSpec((None, 1, bk), lambda bt, hd, i, j: (bt, 0, kj(i, j))),
      ],
      out_specs=pl.BlockSpec((None, None, bq, h), row),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
      name="flash_tpu_bwd_dq",
      **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
  )(q, k, v, d_out, lse, delta, qseg, kseg, qidx, kidx)

  # Query blocks before the first one that sees key block j are clamped to it (not fetched).
  qi = lambda j, i: jnp.minimum(jnp.maximum(i, _first_q(cfg, j)), nq - 1)  # (a key block no query sees: nq - 1)
  qrow = lambda bt, kh, j, gi, i: (bt, kh * g + gi, qi(j, i), 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(b, kvh, nk, g, nq),
      in_specs=[
          pl.BlockSpec((None, None, bq, h), qrow),
          pl.BlockSpec((None, None, bk, h), lambda bt, kh, j, gi, i: (bt, kh, j, 0)),
          pl.BlockSpec((None, None, bk, h), lambda bt, kh, j, gi, i: (bt, kh, j, 0)),
          pl.BlockSpec((None, None, bq, h), qrow),
          pl.BlockSpec((None, None, bq, 1), qrow),
          pl.BlockSpec((None, None, bq, 1), qrow),
          pl.BlockSpec((None, bq, 1), lambda bt, kh, j, gi, i: (bt, qi(j, i), 0)),
          pl.BlockSpec((None, 1, bk), lambda bt, kh, j, gi, i: (bt, 0, j)),
          pl.BlockSpec((None, bq, 1), lambda bt, kh, j, gi, i: (bt, qi(j, i), 0)),
          pl.BlockSpec((None, 1, bk), lambda bt, kh, j, gi, i: (bt, 0, j)),
      ],
      out_specs=[pl.BlockSpec((None, None, bk, h), lambda bt, kh, j, gi, i: (bt, kh, j, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
      name="flash_tpu_bwd_dkv",
      **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
  )(q, k, v, d_out, lse, delta, qseg, kseg, qidx, kidx)
  return dq, dk, dv


_attention = fused_attention(_forward, _backward)


# ----------------------------------------------------------------------------- public API


def _fit(block: int, length: int) -> int:
  """A block no longer than the length rounded up to a multiple of 8 (sublanes)."""
  return min(block, -(-length // 8) * 8)


def _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, *, causal, block_q,
             block_k, interpret, out_dtype=None):
  """Checks, pads and lays out the inputs heads-first: (q, k, v, qseg, kseg, qidx, kidx) and the config."""
  check_inputs(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index)
  b, t, n, h = q_btnh.shape
  s = k_bskh.shape[1]
  for name, size in (("block_q", block_q), ("block_k", block_k)):
    if size < 8 or size % 8:
      raise ValueError(f"{name}={size}: TPU tiles must be positive multiples of 8")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  bq, bk = _fit(block_q, t), _fit(block_k, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  if q_segment_ids is None:
    q_segment_ids, kv_segment_ids = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
  has_index = bool(causal) and q_index is not None
  if q_index is None:
    q_index, kv_index = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
  pad = lambda x, size: jnp.pad(x, [(0, 0), (0, size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  rows = lambda x: pad(jnp.asarray(x, jnp.int32), tp)[:, :, None]  # [B, Tp, 1]
  cols = lambda x: pad(jnp.asarray(x, jnp.int32), sp)[:, None, :]  # [B, 1, Sp]
  heads_first = lambda x, size: jnp.swapaxes(pad(x, size), 1, 2)  # [B, T, N, H] -> [B, N, Tp, H]
  cfg = _Config(causal=bool(causal), block_q=bq, block_k=bk, scale=1.0 / math.sqrt(h), interpret=bool(interpret),
                has_index=has_index, out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name)
  arrays = (heads_first(q_btnh, tp), heads_first(k_bskh, sp), heads_first(v_bskh, sp), rows(q_segment_ids),
            cols(kv_segment_ids), rows(q_index), cols(kv_index))
  return arrays, cfg


def flash_attention_tpu_lse(q_btnh, k_bskh, v_bskh, q_segment_ids=None, kv_segment_ids=None, *, causal: bool,
                            q_index=None, kv_index=None, block_q: int = 128, block_k: int = 128,
                            interpret: bool | None = None, out_dtype=None):
  """Fused attention on TPU: (out [B, T, N, H] in q's dtype, lse [B, T, N] fp32).

  `kernels.flash_pallas.flash_attention_pallas_lse`'s contract: causal means key index <=
  query index, the indices being `q_index` [B, T] / `kv_index` [B, S] (true positions:
  ring chunks, zigzag rows; then every tile is fetched and computed only if its mask has a
  visible entry) or, when None, storage order (tiles past the diagonal neither computed nor
  fetched); segment ids [B, T] / [B, S] (0 = padding, both or neither); rows that see no key
  give out = 0, lse = -inf; differentiable in q, k, v through both outputs; `out_dtype`
  overrides the output dtype. Blocks: multiples of 8, trimmed to short lengths.
  `interpret=None` compiles with Mosaic on TPU and runs the TPU interpreter elsewhere.
  """
  t = q_btnh.shape[1]
  arrays, cfg = _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, causal=causal,
                         block_q=block_q, block_k=block_k, interpret=interpret, out_dtype=out_dtype)
  out, lse = _attention(*arrays, cfg)
  return jnp.swapaxes(out, 1, 2)[:, :t], jnp.swapaxes(lse[..., 0], 1, 2)[:, :t]


def flash_chunk_grads_tpu(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, out_btnh,
                          lse_btn, d_out_btnh, *, causal: bool, block_q: int = 128, block_k: int = 128,
                          interpret: bool | None = None):
  """(dq fp32, dk, dv) contributions of ONE key chunk given the final (merged) out and lse: ring
  attention's backward step, `layers.attention.flash.flash_chunk_grads`'s contract."""
  t, s = q_btnh.shape[1], k_bskh.shape[1]
  arrays, cfg = _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, causal=causal,
                         block_q=block_q, block_k=block_k, interpret=interpret)
  q = arrays[0]
  tp = q.shape[2]
  heads_first = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, tp - t), (0, 0)])
  lse = jnp.pad(jnp.swapaxes(lse_btn.astype(jnp.float32), 1, 2), [(0, 0), (0, 0), (0, tp - t)],
                constant_values=-jnp.inf)[..., None]
  out, d_out = heads_first(out_btnh.astype(q.dtype)), heads_first(d_out_btnh.astype(q.dtype))
  dq, dk, dv = _backward(*arrays, out, lse, d_out, jnp.zeros(lse.shape, jnp.float32), cfg)
  back = lambda x, n: jnp.swapaxes(x, 1, 2)[:, :n]
  return back(dq, t).astype(jnp.float32), back(dk, s), back(dv, s)


def flash_attention_tpu(q_btnh, k_bskh, v_bskh, q_segment_ids=None, kv_segment_ids=None, *, causal: bool,
                        q_index=None, kv_index=None, block_q: int = 128, block_k: int = 128,
                        interpret: bool | None = None):
  """Fused attention output [B, T, N, H]; see `flash_attention_tpu_lse`."""
  return flash_attention_tpu_lse(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, causal=causal,
                                 q_index=q_index, kv_index=kv_index, block_q=block_q, block_k=block_k,
                                 interpret=interpret)[0]
