"""Combiner (Ren et al. 2021, "Combiner: Full Attention Transformer with Sparse Computation Cost").

This is **Combiner-Fixed** (docs/papers.md#combiner; the official code's `sqrt_fixed_full`, whose
LM config uses `local_summary='identity-max'`). The row is cut into spans of s tokens.
Query i attends

* directly to the keys of its own span (j <= i when causal), logits q_i.k_j/sqrt(H);
* indirectly to every other span r through one summary: key kbar_r = pool(k_j in r),
  value vbar_r = sum_j q(j|r) v_j with q(j|r) = softmax_j(qbar_r.k_j/sqrt(H)) over the
  span and qbar_r = pool(q_j in r); logit q_i.kbar_r/sqrt(H). Causal: only spans
  r < span(i). Bidirectional: every span, the query's own included (as the official
  code does), alongside the direct logits.

All logits share one softmax, so p(j|i) = p(r|i) q(j|r) is non-zero for every j of
the support ("full attention"), at cost O(T (s + T/s)) = O(T sqrt T) with s ~ sqrt T.

Segments. A span can hold the end of one packed sequence and the start of the next,
so each span keeps two summaries: one over the tokens of its *last* segment (what
later spans of that segment read) and one over its *first* segment (what earlier
spans read, bidirectional only); when both are the same segment the second is
dropped so nothing is counted twice. A summary is visible only to queries of its
segment, so packed sequences never mix and every query still reaches its whole
segment. Padding (segment 0) is never pooled.

Fast path: direct part = `flash_attention_lse` on the [T/s, s] rows; summary values =
`flash_attention_lse` of the pooled queries against their span; summary part =
`flash_attention_lse` of all queries against the 2T/s summaries (causality through
summary index (r+1)s <= i <=> r < span(i)); the two partials merged with
`merge_partials`, which is exactly the single softmax over the concatenated logits.
The dense twin (`combiner_probabilities`, `reference_combiner`) builds p(j|i) as an
explicit [B, N, T, T] matrix from the same definitions with [T, T] and [slots, T] masks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.reference import MASK_VALUE, make_mask, merge_partials
from layers.attention.decode import PatternCacheMixin, causal_visibility, map_query_chunks, masked_attention_lse
from layers.attention.exact import Attention
from layers.attention.flash import flash_attention_lse, pad_length
from layers.attention.patterns import WholeSequenceMixin, auto_period, row_index
from layers.mixer_base import MixContext, MixerSpec

SUMMARIES = tuple(f"{a}-{p}" for a in ("identity", "relu") for p in ("max", "mean", "sum"))


def check_summary(summary: str) -> None:
  if summary not in SUMMARIES:
    raise ValueError(f"combiner.summary={summary!r} is not one of {SUMMARIES} (activation-pooling)")


def pool(x, member, summary: str, axis: int):
  """Activation-then-pooling of x over `axis`, members only (member broadcasts against x).
  A summary with no member gives 0 (it is invisible anyway)."""
  act, how = summary.split("-")
  if act == "relu":
    x = jax.nn.relu(x)
  any_member = jnp.any(member, axis=axis)
  if how == "max":
    low = jnp.finfo(x.dtype).min
    return jnp.where(any_member, jnp.max(jnp.where(member, x, low), axis=axis), 0).astype(x.dtype)
  total = jnp.sum(jnp.where(member, x, 0), axis=axis)
  if how == "sum":
    return total
  count = jnp.sum(member, axis=axis).astype(x.dtype)
  return total / jnp.maximum(count, 1)


def _span_slots(seg_brs):
  """Per span: (last segment, first segment) of its non-padding tokens, 0 if none. [B, R, 2]."""
  s = seg_brs.shape[-1]
  valid = seg_brs > 0
  any_valid = jnp.any(valid, axis=-1)
  first = jnp.argmax(valid, axis=-1)
  last = s - 1 - jnp.argmax(valid[..., ::-1], axis=-1)
  take = lambda pos: jnp.take_along_axis(seg_brs, pos[..., None], axis=-1)[..., 0]
  return jnp.where(any_valid[..., None], jnp.stack([take(last), take(first)], axis=-1), 0)


def combiner_attention(q_btnh, k_btkh, v_btkh, segment_ids, *, span: int, causal: bool,
                       summary: str = "identity-max") -> jax.Array:
  """Combiner-Fixed attention, sub-quadratic (see the module docstring)."""
  check_summary(summary)
  if span < 1:
    raise ValueError(f"combiner.span={span} must be >= 1")
  b, t, n, h = q_btnh.shape
  s = span
  tp = -(-t // s) * s
  r = tp // s
  seg = pad_length(segment_ids.astype(jnp.int32), tp)
  q, k, v = (pad_length(x, tp) for x in (q_btnh, k_btkh, v_btkh))
  rows = lambda x: x.reshape((b * r, s) + x.shape[2:])

  # Direct part: the own span, [B*R, s] rows.
  local_idx = row_index(b * r, s)
  o_d, lse_d = flash_attention_lse(rows(q), rows(k), rows(v), rows(seg), rows(seg), local_idx, local_idx,
                                   causal=causal)
  o_d, lse_d = o_d.reshape(b, tp, n, h), lse_d.reshape(b, tp, n)

  kbar_n, vbar, visible_seg, sum_idx = span_summaries(q, k, v, seg, span=s, summary=summary)
  o_s, lse_s = flash_attention_lse(q, kbar_n, vbar, seg, visible_seg, row_index(b, tp), sum_idx, causal=causal)
  out, _ = merge_partials(o_d.astype(jnp.float32), lse_d, o_s.astype(jnp.float32), lse_s)
  return out[:, :t].astype(q_btnh.dtype)


def span_summaries(q_btnh, k_btkh, v_btkh, segment_ids, *, span: int, summary: str):
  """The 2R summary slots of a row of R = T / span whole spans (T a multiple of the span):
  (kbar [B, 2R, N, H], vbar [B, 2R, N, H] (per query head), the segment each slot is
  visible to [B, 2R] (0 = none), and its index [B, 2R] for causality: summary r counts as
  (r+1)*s, so "index <= i" means r < span(i))."""
  b, tp, n, h = q_btnh.shape
  kvh = k_btkh.shape[2]
  s = span
  r = tp // s
  seg = segment_ids.astype(jnp.int32)
  rows = lambda x: x.reshape((b * r, s) + x.shape[2:])
  # Two slots per span (last segment, first segment).
  slot_seg = _span_slots(seg.reshape(b, r, s))  # [B, R, 2]
  member = seg.reshape(b, r, 1, s) == slot_seg[..., None]  # [B, R, 2, s]; slot 0 never matches a real token
  member = member & (slot_seg[..., None] > 0)
  m = member[..., None, None]  # [B, R, 2, s, 1, 1]
  qbar = pool(q_btnh.reshape(b, r, 1, s, n, h), m, summary, axis=3)  # [B, R, 2, N, H]
  kbar = pool(k_btkh.reshape(b, r, 1, s, kvh, h), m, summary, axis=3)  # [B, R, 2, K, H]
  # vbar = attention of each pooled query over its span's members (segment ids do the
  # member selection: the slot's segment against the span's tokens).
  vbar, _ = flash_attention_lse(qbar.reshape(b * r, 2, n, h), rows(k_btkh), rows(v_btkh), slot_seg.reshape(b * r, 2),
                                rows(seg), row_index(b * r, 2), row_index(b * r, s), causal=False)
  visible_seg = slot_seg.at[..., 1].set(jnp.where(slot_seg[..., 1] == slot_seg[..., 0], 0, slot_seg[..., 1]))
  kbar_n = jnp.repeat(kbar, n // kvh, axis=3).reshape(b, 2 * r, n, h)  # vbar is per query head
  sum_idx = jnp.broadcast_to(jnp.repeat((jnp.arange(r, dtype=jnp.int32) + 1) * s, 2), (b, 2 * r))
  return kbar_n, vbar.reshape(b, 2 * r, n, h), visible_seg.reshape(b, 2 * r), sum_idx


def combiner_probabilities(q_btnh, k_btkh, segment_ids, *, span: int, causal: bool,
                           summary: str = "identity-max") -> jax.Array:
  """The implied attention matrix p(j|i) as a dense [B, N, T, T] fp32 array.

  Built without reshaping into spans: span membership, slots and visibility are all
  [T]-indexed masks, the summaries are masked reductions over the whole row.
  """
  b, t, n, h = q_btnh.shape
  g = n // k_btkh.shape[2]
  q = q_btnh.astype(jnp.float32)
  k = jnp.repeat(k_btkh.astype(jnp.float32), g, axis=2)
  seg = segment_ids.astype(jnp.int32)
  r = -(-t // span)
  pos = np.arange(t)
  span_of = pos // span
  in_span = jnp.asarray(span_of[None, :] == np.arange(r)[:, None])  # [R, T]
  valid = seg > 0
  cand = in_span[None] & valid[:, None, :]  # [B, R, T]
  first = jnp.min(jnp.where(cand, pos, t), axis=-1)
  last = jnp.max(jnp.where(cand, pos, -1), axis=-1)
  seg_at = lambda p: jnp.where((p >= 0) & (p < t), jnp.take_along_axis(seg, jnp.clip(p, 0, t - 1), axis=1), 0)
  last_seg, first_seg = seg_at(last), seg_at(first)  # [B, R]
  slot_seg = jnp.stack([last_seg, first_seg], axis=-1).reshape(b, 2 * r)
  visible_seg = jnp.stack([last_seg, jnp.where(first_seg == last_seg, 0, first_seg)], axis=-1).reshape(b, 2 * r)
  slot_span = np.repeat(np.arange(r), 2)  # [2R]
  member = jnp.asarray(slot_span[:, None] == span_of[None, :])[None] & (seg[:, None, :] == slot_seg[:, :, None])
  member = member & (slot_seg[:, :, None] > 0)  # [B, 2R, T]
  qbar = pool(q[:, None], member[..., None, None], summary, axis=2)  # [B, 2R, N, H]
  kbar = pool(k[:, None], member[..., None, None], summary, axis=2)
  scale = 1.0 / math.sqrt(h)
  # q(j | slot): softmax of the pooled query over the slot's members.
  inner = jnp.einsum("bonh,btnh->bnot", qbar, k) * scale
  inner_mask = member[:, None]
  inner = jax.nn.softmax(jnp.where(inner_mask, inner, MASK_VALUE), axis=-1)
  inner = jnp.where(inner_mask, inner, 0.0)
  # Direct logits on the own span; summary logits on visible slots.
  idx = row_index(b, t)
  direct_mask = make_mask(seg, seg, idx, idx, causal) & jnp.asarray(span_of[:, None] == span_of[None, :])
  sum_mask = (visible_seg[:, None, :] == seg[:, :, None]) & (seg[:, :, None] > 0)  # [B, T, 2R]
  if causal:
    sum_mask &= jnp.asarray(slot_span[None, :] < span_of[:, None])
  direct = jnp.einsum("binh,bjnh->bnij", q, k) * scale
  summ = jnp.einsum("binh,bonh->bnio", q, kbar) * scale
  mask = jnp.concatenate([direct_mask, sum_mask], axis=-1)[:, None]
  joint = jax.nn.softmax(jnp.where(mask, jnp.concatenate([direct, summ], axis=-1), MASK_VALUE), axis=-1)
  joint = jnp.where(mask, joint, 0.0)
  p_direct, p_sum = joint[..., :t], joint[..., t:]
  return p_direct + jnp.einsum("bnio,bnoj->bnij", p_sum, inner)


def reference_combiner(q_btnh, k_btkh, v_btkh, segment_ids, *, span: int, causal: bool,
                       summary: str = "identity-max") -> jax.Array:
  """Dense twin of `combiner_attention`: output = P V with P from `combiner_probabilities`."""
  g = q_btnh.shape[2] // k_btkh.shape[2]
  p = combiner_probabilities(q_btnh, k_btkh, segment_ids, span=span, causal=causal, summary=summary)
  v = jnp.repeat(v_btkh.astype(jnp.float32), g, axis=2)
  return jnp.einsum("bnij,bjnh->binh", p, v).astype(q_btnh.dtype)


class Combiner(PatternCacheMixin, WholeSequenceMixin, Attention):
  """Combiner-Fixed (config `model.combiner.*`): span s (0 = ceil(sqrt(T))) and summary
  (activation-pooling of the span's queries and keys, default identity-max).

  Causal models decode (`init_cache(batch, max_len, dtype)`, then calls with ctx.decode),
  exactly: dense caches of max_len slots for K, V and the (rotated) queries, which the
  span summaries pool. A new query at position p attends directly to the cached keys of
  its own span (<= p) and, through the same single softmax, to the summaries of the
  spans before its own, recomputed from the cache with `span_summaries` (those spans are
  complete once p arrives; the span s = 0 resolves to ceil(sqrt(max_len))). This equals
  the full causal forward over max_len tokens at the same positions; padding is not
  stored (see `decode.PatternCacheMixin`). Cost O(max_len) per decoded token (recomputing
  the summaries is O(max_len * H) per head, plus the dense pass over the cache).
  """

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.span = int(spec.option("span", 0))
    self.summary = spec.option("summary", "identity-max")
    check_summary(self.summary)
    if self.span < 0:
      raise ValueError(f"combiner.span={self.span} must be >= 0 (0 = ceil(sqrt(T)))")

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    self._check_context(ctx)
    return super().__call__(x_btd, ctx)

  def decode_name(self) -> str:
    return "combiner"

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    super().init_cache(batch, max_len, dtype)
    self.cached_query = nnx.Cache(jnp.zeros((batch, max_len, self.spec.num_heads, self.spec.head_dim), dtype))

  def attend_cached(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    position, seg = self.append_to_cache(ctx, cached_key=k_btkh, cached_value=v_btkh, cached_query=q_btnh)
    keys, values, kv_seg = self.cached_key[...], self.cached_value[...], self.cached_segment_ids[...]
    size = kv_seg.shape[1]
    s = auto_period(self.span, size)
    tp = -(-size // s) * s
    kbar, vbar, visible_seg, sum_idx = span_summaries(
        *(pad_length(x, tp) for x in (self.cached_query[...], keys, values, kv_seg)), span=s, summary=self.summary)
    own_span = jnp.arange(size) // s

    def run(q, pos, seg):
      direct = causal_visibility(pos, seg, kv_seg) & (own_span[None, None, :] == (pos // s)[:, :, None])
      o_d, lse_d = masked_attention_lse(q, keys, values, direct[:, None])
      summaries = ((visible_seg[:, None, :] == seg[:, :, None]) & (seg[:, :, None] != 0)
                   & (sum_idx[:, None, :] <= pos[:, :, None]))
      o_s, lse_s = masked_attention_lse(q, kbar, vbar, summaries[:, None])
      return merge_partials(o_d, lse_d, o_s, lse_s)[0]

    return map_query_chunks(run, (q_btnh, position, seg), self.DECODE_CHUNK).astype(q_btnh.dtype)

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    return combiner_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, span=auto_period(self.span, q_btnh.shape[1]),
                              causal=self.spec.causal, summary=self.summary)
