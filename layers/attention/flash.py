"""Blockwise exact attention in pure JAX (FlashAttention's algorithm, no Pallas).

Queries are cut into blocks of `block_q` rows and keys/values into blocks of
`block_k`; each query block streams the key blocks with the online-softmax recurrence
(running max m, running sum l, rescaled accumulator o) and keeps only
`lse = m + log l` for the backward pass, which recomputes the probabilities block by
block. Nothing of size T x T is ever materialised, so memory is O(T).

Masks come from per-token segment ids (0 = padding) and absolute indices (causal:
key index <= query index), built inside each block. A (query block, key block) pair
whose mask is empty by the blocks' index and segment ranges is skipped with
`lax.cond`, which covers causal's upper triangle, padding blocks and packed segments
that do not meet, for any index layout (contiguous, zigzag, a visiting ring chunk).

Exported for reuse (ring attention, split-KV decode, the Pallas kernels' tests):
`flash_attention_lse` (output and lse of one query set against one key set) and
`merge_partials` (the associative combination of partial results on disjoint keys).

Cost: forward 4*B*N*Tq*Tk*H FLOPs (about half when causal), backward 2.5x that
(two recomputations of S and P: one pass for dQ, one for dK/dV).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels.reference import MASK_VALUE, NEG_INF

def _blocks(x, size, axis=1):
  """[B, T, ...] -> [T/size, B, size, ...] (T already a multiple of size)."""
  shape = x.shape
  x = x.reshape(shape[:axis] + (shape[axis] // size, size) + shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblocks(x, axis=1):
  """Inverse of `_blocks`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _map_into(fn, xs, acc):
  """`lax.map(lambda a: fn(x, a), (xs, acc))` written into `acc` itself: a loop carrying the
  accumulators and updating block i in place. A map would stack its results into a fresh,
  zero-initialised output buffer per accumulator - buffers that depend on nothing, which the
  scheduler is free to create early and hold across unrelated work."""
  index = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)

  def body(i, acc):
    new = fn(index(xs, i), index(acc, i))
    return jax.tree.map(lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), i, 0), acc, new)

  return jax.lax.fori_loop(0, jax.tree.leaves(xs)[0].shape[0], body, acc)


def pad_length(x, length, value=0):
  """Pads axis 1 (the length) of `x` up to `length` with `value` (segment id 0 = padding)."""
  extra = length - x.shape[1]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _maybe_visible(qseg, qidx, kseg, kidx, causal):
  """False only if no (query, key) pair of the two blocks can be visible."""
  q_lo, q_hi = jnp.min(jnp.where(qseg > 0, qseg, jnp.iinfo(jnp.int32).max)), jnp.max(qseg)
  k_lo, k_hi = jnp.min(jnp.where(kseg > 0, kseg, jnp.iinfo(jnp.int32).max)), jnp.max(kseg)
  ok = (q_hi > 0) & (k_hi > 0) & (q_lo <= k_hi) & (k_lo <= q_hi)
  if causal:
    ok &= jnp.min(kidx) <= jnp.max(qidx)
  return ok


def _block_mask(qseg, qidx, kseg, kidx, causal):
  """[B, bq, bk] visibility inside one block pair."""
  mask = (qseg[:, :, None] == kseg[:, None, :]) & (qseg[:, :, None] > 0)
  if causal:
    mask &= kidx[:, None, :] <= qidx[:, :, None]
  return mask


def _scores(q_blk, k_blk, scale):
  """q [B, bq, K, G, H], k [B, bk, K, H] -> s [B, K, G, bq, bk] in fp32."""
  return jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale


def _forward_state(b, kvh, g, h, bq):
  """Empty online-softmax state of one query block: (o [B, bq, K, G, H], m and l [B, K, G, bq]) fp32."""
  return (jnp.zeros((b, bq, kvh, g, h), jnp.float32), jnp.full((b, kvh, g, bq), MASK_VALUE, jnp.float32),
          jnp.zeros((b, kvh, g, bq), jnp.float32))


def _attend(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk, state=None, finish=False):
  """Folds the key blocks of k/v into the running state (unnormalised o, running max m, sum l);
  `state=None` starts each query block from empty (never materialising a whole empty state),
  `finish=True` returns each block normalised, (o, lse), as soon as it is done."""
  b, _, kvh, g, h = q.shape
  scale = 1.0 / math.sqrt(h)
  kb, vb, ksb, kib = _blocks(k, bk), _blocks(v, bk), _blocks(kseg, bk), _blocks(kidx, bk)
  nk = kb.shape[0]

  def per_q_block(args, carry=()):
    q_blk, qs, qi = args

    def body(j, carry):
      def visit(carry):
        o, m, l = carry
        s = _scores(q_blk, kb[j], scale)
        mask = _block_mask(qs, qi, ksb[j], kib[j], causal)[:, None, None]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = corr * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgqs,bskh->bqkgh", p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
        o = jnp.moveaxis(corr, -1, 1)[..., None] * o + pv
        return o, m_new, l

      return jax.lax.cond(_maybe_visible(qs, qi, ksb[j], kib[j], causal), visit, lambda c: c, carry)

    out = jax.lax.fori_loop(0, nk, body, tuple(carry) or _forward_state(b, kvh, g, h, bq))
    return _finish(out) if finish else out

  xs = (_blocks(q, bq), _blocks(qseg, bq), _blocks(qidx, bq))
  if state is None:
    return jax.lax.map(per_q_block, xs)
  return _map_into(per_q_block, xs, tuple(state))


def _finish(state):
  """Normalised (o [..., B, bq, K, G, H], lse [..., B, K, G, bq]); empty rows: 0 and -inf."""
  o, m, l = state
  empty = l == 0.0
  o = o / jnp.moveaxis(jnp.where(empty, 1.0, l), -1, -3)[..., None]
  return o, jnp.where(empty, NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))


def _forward(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk):
  """q [B, Tq, K, G, H] (padded), k/v [B, Tk, K, H] -> out [B, Tq, K, G, H], lse [B, K, G, Tq]."""
  o, lse = _attend(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk, finish=True)
  return _unblocks(o), _unblocks(lse, axis=3)


def _backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out, causal, bq, bk, d_lse=None, acc=None):
  """(dq, dk, dv) in fp32; with `acc` = blocked (dq, dk, dv) accumulators (see
  `chunk_grad_accumulators`), adds into them in place and returns them blocked."""
  b, tq, kvh, g, h = q.shape
  scale = 1.0 / math.sqrt(h)
  # delta_i = rowsum(dO * O): the softmax Jacobian's correction term, [B, K, G, Tq].
  delta = jnp.moveaxis(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 1, -1)
  if d_lse is not None:  # d(lse)/dS = P, so an lse cotangent enters dS = P * (dP - delta + d_lse)
    delta = delta - d_lse.astype(jnp.float32)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def probs(q_blk, k_blk, qs, qi, ks, ki, lse_blk):
    s = _scores(q_blk, k_blk, scale)
    mask = _block_mask(qs, qi, ks, ki, causal)[:, None, None]
    return jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)

  qb, qsb, qib = _blocks(q, bq), _blocks(qseg, bq), _blocks(qidx, bq)
  dob, lseb, deltab = _blocks(d_out, bq), _blocks(lse_safe, bq, axis=3), _blocks(delta, bq, axis=3)
  kb, vb, ksb, kib = _blocks(k, bk), _blocks(v, bk), _blocks(kseg, bk), _blocks(kidx, bk)
  nq, nk = qb.shape[0], kb.shape[0]

  def dq_block(args, dq0):  # pass 1: dQ, query block by query block
    q_blk, qs, qi, do_blk, lse_blk, dl_blk = args

    def body(j, dq):
      def visit(dq):
        p = probs(q_blk, kb[j], qs, qi, ksb[j], kib[j], lse_blk)
        dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, vb[j], preferred_element_type=jnp.float32)
        ds = p * (dp - dl_blk[..., None])
        return dq + jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(k.dtype), kb[j],
                               preferred_element_type=jnp.float32) * scale
      return jax.lax.cond(_maybe_visible(qs, qi, ksb[j], kib[j], causal), visit, lambda x: x, dq)

    return jax.lax.fori_loop(0, nk, body, dq0)

  def dkv_block(args, acc):  # pass 2: dK and dV, key block by key block
    k_blk, v_blk, ks, ki = args

    def body(i, carry):
      def visit(carry):
        dk, dv = carry
        p = probs(qb[i], k_blk, qsb[i], qib[i], ks, ki, lseb[i])
        dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dob.dtype), dob[i], preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgh,bskh->bkgqs", dob[i], v_blk, preferred_element_type=jnp.float32)
        ds = p * (dp - deltab[i][..., None])
        dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(q.dtype), qb[i], preferred_element_type=jnp.float32) * scale
        return dk, dv
      return jax.lax.cond(_maybe_visible(qsb[i], qib[i], ks, ki, causal), visit, lambda c: c, carry)

    return jax.lax.fori_loop(0, nq, body, acc)

  dq_xs, dkv_xs = (qb, qsb, qib, dob, lseb, deltab), (kb, vb, ksb, kib)
  if acc is not None:
    return (_map_into(dq_block, dq_xs, acc[0]), *_map_into(dkv_block, dkv_xs, (acc[1], acc[2])))
  dq = jax.lax.map(lambda x: dq_block(x, jnp.zeros(qb.shape[1:], jnp.float32)), dq_xs)
  dk, dv = jax.lax.map(lambda x: dkv_block(x, (jnp.zeros(kb.shape[1:], jnp.float32),) * 2), dkv_xs)
  return _unblocks(dq), _unblocks(dk), _unblocks(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk):
  return _forward(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk)  # out in fp32: callers cast


def _flash_fwd(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk):
  out, lse = _forward(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk)
  return (out, lse), (q, k, v, qseg, kseg, qidx, kidx, out, lse)


def _flash_bwd(causal, bq, bk, res, grads):
  q, k, v, qseg, kseg, qidx, kidx, out, lse = res
  d_out, d_lse = grads
  dq, dk, dv = _backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out, causal, bq, bk, d_lse=d_lse)
  none = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), none(qseg), none(kseg), none(qidx),
          none(kidx))


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_lse(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, *,
                        causal: bool, block_q: int = 128, block_k: int = 128, out_dtype=None,
                        per_row: bool = False):
  """Attention of one query set against one key set: (out [B, T, N, H], lse [B, T, N]).

  `out` has q's dtype unless `out_dtype` says otherwise (partial results that will be
  merged, as in ring attention, should stay fp32). A block pair is skipped when no pair
  in it can be visible in any row of the batch; `per_row=True` runs the rows one after
  another so each row skips its own padding and, in packed rows, the blocks between
  different examples (the same result; fewer FLOPs when rows differ, no batch parallelism).

  Rows that see no key give out = 0 and lse = -inf (so `merge_partials` ignores them).
  Lengths need not be multiples of the blocks (padded internally with segment id 0).
  """
  b, t, n, h = q_btnh.shape
  if per_row and b > 1:
    def one_row(args):
      o, l = flash_attention_lse(*(a[None] for a in args), causal=causal, block_q=block_q, block_k=block_k,
                                 out_dtype=out_dtype)
      return o[0], l[0]
    return jax.lax.map(one_row, (q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index))
  (q, k, v, qseg, kseg, qidx, kidx), (bq, bk, tp) = _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids,
                                                             kv_segment_ids, q_index, kv_index, block_q, block_k)
  out, lse = _flash(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk)
  out = out.reshape(b, tp, n, h)[:, :t].astype(out_dtype or q_btnh.dtype)
  lse = jnp.moveaxis(lse, -1, 1).reshape(b, tp, n)[:, :t]
  return out, lse


def flash_attention(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, *, causal: bool, block_q: int = 128,
                    block_k: int = 128):
  """Blockwise exact attention over one sequence (indices 0..T-1 on both sides)."""
  b, t = q_segment_ids.shape
  s = kv_segment_ids.shape[1]
  qidx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  kidx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  return flash_attention_lse(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, qidx, kidx, causal=causal,
                             block_q=block_q, block_k=block_k)[0]


def flash_accumulate(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, state, *,
                     causal: bool, block_q: int = 128, block_k: int = 128):
  """Folds one key chunk into a running attention state (None: the first chunk): what a merge
  of the chunks' partial (out, lse) results gives, without materialising any partial. Ring
  attention's forward keeps one state per query chunk while the key chunks visit
  (`flash_finish` at the end). Not differentiable (the ring's backward is its own custom VJP)."""
  (q, k, v, qseg, kseg, qidx, kidx), (bq, bk, _) = _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids,
                                                            q_index, kv_index, block_q, block_k)
  return _attend(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk, state)


def flash_finish(state, t: int, num_heads: int):
  """State -> (out [B, T, N, H] fp32, lse [B, T, N]), as `flash_attention_lse` returns them."""
  o, lse = _finish(state)
  o, lse = _unblocks(o), _unblocks(lse, axis=3)
  b, tp, kvh, g, h = o.shape
  return o.reshape(b, tp, num_heads, h)[:, :t], jnp.moveaxis(lse, -1, 1).reshape(b, tp, num_heads)[:, :t]


def _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, block_q, block_k):
  """Pads to whole blocks (segment id 0) and groups query heads by kv head."""
  b, t, n, h = q_btnh.shape
  s, kvh = k_bskh.shape[1], k_bskh.shape[2]
  if n % kvh:
    raise ValueError(f"num_heads={n} is not a multiple of num_kv_heads={kvh}")
  bq, bk = min(block_q, t), min(block_k, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  q = pad_length(q_btnh, tp).reshape(b, tp, kvh, n // kvh, h)
  k, v = pad_length(k_bskh, sp), pad_length(v_bskh, sp)
  qseg, kseg = pad_length(q_segment_ids.astype(jnp.int32), tp), pad_length(kv_segment_ids.astype(jnp.int32), sp)
  qidx, kidx = pad_length(q_index.astype(jnp.int32), tp), pad_length(kv_index.astype(jnp.int32), sp)
  return (q, k, v, qseg, kseg, qidx, kidx), (bq, bk, tp)


def flash_chunk_grads(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index, out_btnh, lse_btn,
                      d_out_btnh, *, causal: bool, block_q: int = 128, block_k: int = 128, acc=None):
  """Gradient contributions (dq, dk, dv) of ONE key chunk, given the final (merged) out and lse.

  With P = exp(S - lse_final) the softmax gradient splits exactly over disjoint key
  chunks, so ring attention's backward sums these over the chunks that visit a device
  (dq) and carries dk/dv around the ring back to the chunk's owner.

  Returns fp32 [B, T, N, H], [B, S, K, H] x2; or, given `acc` (blocked fp32 accumulators
  from `chunk_grad_accumulators`), the accumulators with this chunk's contributions added
  in place, still blocked: the ring keeps them in that layout, so no step materialises a
  separate contribution or a layout copy (`unblock_chunk_grads` at the end).
  """
  (q, k, v, qseg, kseg, qidx, kidx), (bq, bk, tp) = _prepare(q_btnh, k_bskh, v_bskh, q_segment_ids,
                                                             kv_segment_ids, q_index, kv_index, block_q, block_k)
  b, t, n, h = q_btnh.shape
  kvh = k_bskh.shape[2]
  out = pad_length(out_btnh, tp).reshape(q.shape)
  d_out = pad_length(d_out_btnh, tp).reshape(q.shape)
  lse = jnp.moveaxis(pad_length(lse_btn, tp, value=-jnp.inf).reshape(b, tp, kvh, n // kvh), 1, -1)
  if acc is not None:
    return _backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out, causal, bq, bk, acc=acc)
  dq, dk, dv = _backward(q, k, v, qseg, kseg, qidx, kidx, out, lse, d_out, causal, bq, bk)
  s = k_bskh.shape[1]
  return dq.reshape(b, tp, n, h)[:, :t], dk[:, :s], dv[:, :s]


def chunk_grad_accumulators(q_shape, k_shape, *, block_q: int = 128, block_k: int = 128):
  """Zero blocked fp32 (dq, dk, dv) accumulators for `flash_chunk_grads(..., acc=)`:
  [T/bq, B, bq, K, G, H] and [S/bk, B, bk, K, H] x2 (lengths rounded up to whole blocks)."""
  b, t, n, h = q_shape
  s, kvh = k_shape[1], k_shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  nq, nk = -(-t // bq), -(-s // bk)
  return (jnp.zeros((nq, b, bq, kvh, n // kvh, h), jnp.float32), jnp.zeros((nk, b, bk, kvh, h), jnp.float32),
          jnp.zeros((nk, b, bk, kvh, h), jnp.float32))


def unblock_chunk_grads(acc, t: int, s: int):
  """Blocked accumulators -> (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, H]) in fp32."""
  dq, dk, dv = (_unblocks(x) for x in acc)
  b, tp, kvh, g, h = dq.shape
  return dq.reshape(b, tp, kvh * g, h)[:, :t], dk[:, :s], dv[:, :s]
