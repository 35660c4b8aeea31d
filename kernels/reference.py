"""The obviously-correct attention math every kernel and layer is checked against, and the
online-softmax pieces they share. Pure `jax.numpy`: the bottom of the import floors (no
Pallas, nothing from `layers/`), so kernels and layers alike may import it.

- `make_mask`: which key each query sees (same nonzero segment id; key index <= query index
  when causal, by absolute position, so permuted storage orders mask correctly).
- `reference_attention` / `reference_attention_lse`: dense softmax(q k^T / sqrt(H)) v in fp32,
  materialising every score: the twin of each fast path.
- `merge_partials`: the associative combination of two normalised partial results over
  disjoint key sets, (o1, lse1) + (o2, lse2), which split-KV decoding, ring attention and the
  sparse patterns all use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
# Finite rather than -inf so rows with no visible key give zeros, not NaNs.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_mask(q_segment_ids_bq, kv_segment_ids_bk, q_index_bq, kv_index_bk, causal: bool) -> jax.Array:
  """Boolean [B, Tq, Tk]: query i sees key j iff same nonzero segment (and j <= i if causal).

  Indices are absolute positions in the row (or in the KV cache), not per-segment
  positions, so causality is by storage order.
  """
  mask = (q_segment_ids_bq[:, :, None] == kv_segment_ids_bk[:, None, :]) & (q_segment_ids_bq[:, :, None] != 0)
  if causal:
    mask &= kv_index_bk[:, None, :] <= q_index_bq[:, :, None]
  return mask


def reference_attention_lse(q_btnh, k_bskh, v_bskh, mask_bts):
  """Dense attention in fp32: (out [B, T, N, H] in q's dtype, lse [B, T, N] fp32, natural log).

  Grouped-query: query head n uses kv head n // (N / K). Query rows that see no key give
  out = 0 and lse = -inf.
  """
  b, t, n, h = q_btnh.shape
  kv = k_bskh.shape[2]
  q = q_btnh.astype(jnp.float32).reshape(b, t, kv, n // kv, h) / math.sqrt(h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh.astype(jnp.float32))
  visible = mask_bts[:, None, None]
  scores = jnp.where(visible, scores, MASK_VALUE)
  probs = jnp.where(visible, jax.nn.softmax(scores, axis=-1), 0.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh.astype(jnp.float32))
  seen = jnp.any(visible, axis=-1)  # [B, K, G, T]
  # Masked scores hold a finite MASK_VALUE, so this logsumexp (and its gradient) is finite
  # everywhere; rows that see nothing are set to -inf after it.
  lse = jnp.where(seen, jax.nn.logsumexp(scores, axis=-1), NEG_INF)
  lse = jnp.moveaxis(lse.reshape(b, n, t), 1, 2)
  return out.reshape(b, t, n, h).astype(q_btnh.dtype), lse


def reference_attention(q_btnh, k_bskh, v_bskh, mask_bts) -> jax.Array:
  """Dense softmax(q k^T / sqrt(H)) v in fp32, materialising the [B, N, T, S] scores; see
  `reference_attention_lse`."""
  return reference_attention_lse(q_btnh, k_bskh, v_bskh, mask_bts)[0]


def merge_partials(o1, lse1, o2, lse2):
  """Combines normalised partial outputs over disjoint key sets.

  o: arrays broadcastable with lse[..., None]; lse = -inf marks an empty partial (no
  visible key), which contributes nothing. Written with "safe" branches throughout so
  gradients stay finite for empty partials (where lse is -inf).
  """
  fin1, fin2 = jnp.isfinite(lse1), jnp.isfinite(lse2)
  m = jnp.maximum(jnp.where(fin1, lse1, -1e30), jnp.where(fin2, lse2, -1e30))
  e1 = jnp.where(fin1, jnp.exp(jnp.where(fin1, lse1, 0.0) - m), 0.0)
  e2 = jnp.where(fin2, jnp.exp(jnp.where(fin2, lse2, 0.0) - m), 0.0)
  total = e1 + e2
  nonempty = total > 0
  denom = jnp.where(nonempty, total, 1.0)
  lse = jnp.where(nonempty, m + jnp.log(denom), NEG_INF)
  return (e1 / denom)[..., None] * o1 + (e2 / denom)[..., None] * o2, lse
