"""Fixed sparse attention patterns: Sparse Transformer (Child et al. 2019) and Longformer.

Both are unions of simple key sets, each computed without a T x T mask and merged
with FlashAttention's operator (`kernels.reference.merge_partials`), which combines softmax
partials over *disjoint* key sets exactly:

* a band (query i sees key j iff lo <= i - j <= hi): `band_attention_lse`, cut into
  blocks of size >= the band's reach so each query block meets only its neighbours;
* a residue class (i - j = 0 mod l): the sequence folded to [T/l, l] and attended
  along columns (`flash_attention_lse` on the folded rows);
* a block diagonal (same block of l): the sequence folded to [T/l rows of l];
* a static column set (e.g. the last c positions of every block, or Longformer's
  global tokens): gathered keys.

Patterns are defined on row indices (storage order), like causality in
`kernels.reference.make_mask`; segment ids (0 = padding) keep packed sequences apart on top.
Band and residue patterns depend only on i - j, so they are the same wherever a
segment starts; the fixed pattern's blocks and Longformer's global positions are
aligned to the row (the tasks pad, they do not pack, so row index = sequence position).

Every fast path has a dense twin (`reference_*`) that builds the explicit [B, T, T]
mask and calls `kernels.reference.reference_attention`.

Causal models of both decode (`decode.PatternCacheMixin`): each new query attends over a
dense cache with its row of the same rules (`sparse_transformer_rules`, `longformer_window`),
built for a row of the cache's max_len tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.reference import MASK_VALUE, NEG_INF, make_mask, merge_partials, reference_attention
from layers import axes
from layers.attention.decode import PatternCacheMixin, causal_visibility, map_query_chunks, masked_attention_lse
from layers.attention.exact import Attention, rope
from layers.attention.flash import flash_attention_lse, pad_length
from layers.core import Dense
from layers.mixer_base import MixContext, MixerSpec


# ----------------------------------------------------------------------------------------------
# Shared pieces: padding, folding, a banded attention with lse.


def _fold(x, period: int):
  """[B, R*period, ...] -> [B*period, R, ...]: row c of the result holds indices c, c+period, ..."""
  b, t = x.shape[:2]
  x = x.reshape((b, t // period, period) + x.shape[2:])
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape((b * period, t // period) + x.shape[3:])


def _unfold(x, batch: int):
  """Inverse of `_fold`."""
  bp, r = x.shape[:2]
  period = bp // batch
  x = x.reshape((batch, period, r) + x.shape[2:])
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape((batch, r * period) + x.shape[3:])


def row_index(b: int, t: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def band_attention_lse(q_btnh, k_btkh, v_btkh, q_segment_ids, kv_segment_ids, *, lo: int, hi: int,
                       keep_offset: Callable[[np.ndarray], np.ndarray] | None = None):
  """Query i sees key j iff lo <= i - j <= hi, same nonzero segment, and keep_offset(i - j).

  Returns (out [B, T, N, H], lse [B, T, N]); rows with no visible key give 0 and -inf
  (so `merge_partials` ignores them). The sequence is cut into blocks of
  c = max(|lo|, |hi|) rows; a query block then needs at most the key blocks just
  before and after it, so scores are [T, (neighbours + 1) * c]: O(T * band).
  `keep_offset` is a static numpy predicate on the offset i - j (used to carve out
  offsets another partial already covers).
  """
  b, t, n, h = q_btnh.shape
  kvh = k_btkh.shape[2]
  g = n // kvh
  lo, hi = max(lo, -(t - 1)), min(hi, t - 1)
  c = max(abs(lo), abs(hi), 1)
  nb = -(-t // c)
  tp = nb * c
  before, after = -(-max(hi, 0) // c), -(-max(-lo, 0) // c)  # key blocks needed on each side
  offsets = range(-before, after + 1)

  def key_windows(x):  # [B, T, ...] -> [B, nb, len(offsets) * c, ...]
    widths = [(0, 0)] * x.ndim
    widths[1] = (before * c, after * c + tp - t)
    xb = jnp.pad(x, widths).reshape((b, before + nb + after, c) + x.shape[2:])
    return jnp.concatenate([xb[:, before + o: before + o + nb] for o in offsets], axis=2)

  kw, vw, ksw = key_windows(k_btkh), key_windows(v_btkh), key_windows(kv_segment_ids.astype(jnp.int32))
  qb = pad_length(q_btnh, tp).reshape(b, nb, c, kvh, g, h)
  qs = pad_length(q_segment_ids.astype(jnp.int32), tp).reshape(b, nb, c)
  # i - j inside a (query block, key window) pair does not depend on the block: static.
  diff = np.arange(c)[:, None] - np.concatenate([o * c + np.arange(c) for o in offsets])[None, :]
  static = (diff >= lo) & (diff <= hi)
  if keep_offset is not None:
    static &= keep_offset(diff)
  static = jnp.asarray(static)

  # One query block against its key window, rematerialised in the backward pass (as flash
  # recomputes P): autodiff would otherwise keep several [T, band] score arrays alive.
  @jax.checkpoint
  def block(args):
    qb, kw, vw, qs, ksw = args  # [B, c, K, G, H], [B, W, K, H], [B, W, K, H], [B, c], [B, W]
    mask = (static & (qs[:, :, None] == ksw[:, None, :]) & (qs[:, :, None] > 0))[:, None, None]  # [B, 1, 1, c, W]
    s = jnp.einsum("bqkgh,bskh->bkgqs", qb, kw, preferred_element_type=jnp.float32) / math.sqrt(h)
    s = jnp.where(mask, s, MASK_VALUE)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o = jnp.einsum("bkgqs,bskh->bqkgh", p / l_safe[..., None], vw.astype(jnp.float32))
    return o, jnp.where(empty, NEG_INF, m + jnp.log(l_safe))  # lse [B, K, G, c]

  # Blocks in vectorised chunks of about 1024 query rows: transients stay O(chunk * band)
  # rather than O(T * band), while each step is still one large batched matmul.
  first = lambda x: jnp.moveaxis(x, 1, 0)
  o, lse = jax.lax.map(block, tuple(first(x) for x in (qb, kw, vw, qs, ksw)), batch_size=max(1, 1024 // c))
  o, lse = jnp.moveaxis(o, 0, 1), jnp.moveaxis(lse, 0, 1)  # [B, nb, c, K, G, H], [B, nb, K, G, c]
  out = o.reshape(b, tp, n, h)[:, :t].astype(q_btnh.dtype)
  lse = jnp.moveaxis(lse, -1, 2).reshape(b, tp, n)[:, :t]
  return out, lse


def _split_heads(q, k, v, n1: int):
  """Query heads [0, n1) and [n1, N) with the K/V heads each group reads (copied only if a
  grouped-query group straddles the split)."""
  n, kvh = q.shape[2], k.shape[2]
  g = n // kvh
  if n1 % g:
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    g = 1
  return (q[:, :, :n1], k[:, :, :n1 // g], v[:, :, :n1 // g]), (q[:, :, n1:], k[:, :, n1 // g:], v[:, :, n1 // g:])


def _check_positive(name: str, value: int) -> int:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")
  return int(value)


# ----------------------------------------------------------------------------------------------
# Sparse Transformer (Child et al. 2019, "Generating Long Sequences with Sparse Transformers").
#
# Causal (the paper):   strided A1 = {i-l <= j <= i},        A2 = {j <= i : (i-j) mod l = 0}
#                       fixed   A1 = {j <= i : j//l = i//l},  A2 = {j <= i : j mod l >= l-c}
# Bidirectional analogue (our choice, same key counts): strided A1 = {|i-j| <= l//2},
# A2 = {(i-j) mod l = 0}; fixed A1 = same block, A2 = {j mod l >= l-c}.
# Heads ("factorized attention heads", paper section 4.3): "split" = the paper's
# multi-head form (first ceil(N/2) heads on A1, the rest on A2); "merged" = every head
# attends to A1 u A2; "alternate" = layers alternate between A1 (even) and A2 (odd).

PATTERNS = ("strided", "fixed")
HEAD_MODES = ("split", "merged", "alternate")


def _strided_band(causal: bool, l: int) -> tuple[int, int]:
  return (0, l) if causal else (-(l // 2), l // 2)


def _strided_local(q, k, v, seg, l, causal, exclude_columns=False):
  lo, hi = _strided_band(causal, l)
  keep = (lambda d: d % l != 0) if exclude_columns else None  # those offsets belong to A2
  return band_attention_lse(q, k, v, seg, seg, lo=lo, hi=hi, keep_offset=keep)


def _strided_columns(q, k, v, seg, l, causal):
  """(i - j) mod l = 0: attention along the columns of the [T/l, l] view."""
  b, t = seg.shape
  tp = -(-t // l) * l
  idx = row_index(b, tp)
  segp = pad_length(seg.astype(jnp.int32), tp)
  fq, fk, fv = (_fold(pad_length(x, tp), l) for x in (q, k, v))
  fs, fi = _fold(segp, l), _fold(idx, l)
  out, lse = flash_attention_lse(fq, fk, fv, fs, fs, fi, fi, causal=causal)
  return _unfold(out, b)[:, :t], _unfold(lse, b)[:, :t]


def _fixed_block(q, k, v, seg, l, c, causal, exclude_summary=False):
  """Same block of l: the [T/l, l] rows attended one by one."""
  b, t = seg.shape
  tp = -(-t // l) * l
  nb = tp // l
  segp = pad_length(seg.astype(jnp.int32), tp)
  kv_seg = jnp.where(jnp.arange(tp) % l >= l - c, 0, segp) if exclude_summary else segp  # those keys are in A2
  rows = lambda x: pad_length(x, tp).reshape((b * nb, l) + x.shape[2:])
  idx = row_index(b * nb, l)
  out, lse = flash_attention_lse(rows(q), rows(k), rows(v), segp.reshape(b * nb, l), kv_seg.reshape(b * nb, l),
                                 idx, idx, causal=causal)
  return out.reshape(b, tp, *out.shape[2:])[:, :t], lse.reshape(b, tp, -1)[:, :t]


def _fixed_summary(q, k, v, seg, l, c, causal):
  """j mod l >= l - c: the "summary" columns of every block, gathered (T*c/l keys)."""
  b, t = seg.shape
  cols = np.array([j for j in range(t) if j % l >= l - c], np.int32)
  idx = row_index(b, t)
  if cols.size == 0:
    return jnp.zeros(q.shape, q.dtype), jnp.full(q.shape[:3], NEG_INF, jnp.float32)
  return flash_attention_lse(q, k[:, cols], v[:, cols], seg, seg[:, cols], idx, idx[:, cols], causal=causal)


def _sub_pattern(which: int, q, k, v, seg, pattern, l, c, causal, exclusive=False):
  """A1 (which=1) or A2 (which=2) as (out, lse). exclusive: A1 minus A2 (for the merged union)."""
  if pattern == "strided":
    if which == 1:
      return _strided_local(q, k, v, seg, l, causal, exclusive)
    return _strided_columns(q, k, v, seg, l, causal)
  if which == 1:
    return _fixed_block(q, k, v, seg, l, c, causal, exclusive)
  return _fixed_summary(q, k, v, seg, l, c, causal)


def check_sparse_transformer(pattern: str, head_mode: str, num_heads: int) -> None:
  if pattern not in PATTERNS:
    raise ValueError(f"sparse_transformer.pattern={pattern!r} is not one of {PATTERNS}")
  if head_mode not in HEAD_MODES:
    raise ValueError(f"sparse_transformer.head_mode={head_mode!r} is not one of {HEAD_MODES}")
  if head_mode == "split" and num_heads < 2:
    raise ValueError(f"sparse_transformer.head_mode='split' needs num_heads >= 2 (got {num_heads}); "
                     f"use head_mode='merged' or 'alternate'")


def sparse_transformer_attention(q_btnh, k_btkh, v_btkh, segment_ids, *, pattern: str, stride: int, c: int,
                                 causal: bool, head_mode: str = "split", layer_index: int = 0) -> jax.Array:
  """Sparse Transformer attention without a T x T mask. `c` is clipped to the stride."""
  check_sparse_transformer(pattern, head_mode, q_btnh.shape[2])
  l = _check_positive("sparse_transformer.stride", stride)
  c = min(_check_positive("sparse_transformer.c", c), l)
  args = (segment_ids, pattern, l, c, causal)
  if head_mode == "alternate":
    return _sub_pattern(1 + layer_index % 2, q_btnh, k_btkh, v_btkh, *args)[0]
  if head_mode == "merged":
    o1, lse1 = _sub_pattern(1, q_btnh, k_btkh, v_btkh, *args, exclusive=True)
    o2, lse2 = _sub_pattern(2, q_btnh, k_btkh, v_btkh, *args)
    return merge_partials(o1.astype(jnp.float32), lse1, o2.astype(jnp.float32), lse2)[0].astype(q_btnh.dtype)
  n = q_btnh.shape[2]
  g1, g2 = _split_heads(q_btnh, k_btkh, v_btkh, n - n // 2)
  return jnp.concatenate([_sub_pattern(1, *g1, *args)[0], _sub_pattern(2, *g2, *args)[0]], axis=2)


def sparse_transformer_rules(i, j, *, pattern: str, stride: int, c: int, causal: bool):
  """A1 and A2 as predicates on query / key row indices i, j (numpy or jax integer arrays
  that broadcast against each other; a result may have only j's shape, so callers broadcast
  it). Causality and segments are applied by the caller."""
  l, c = stride, min(c, stride)
  if pattern == "strided":
    lo, hi = _strided_band(causal, l)
    return (i - j >= lo) & (i - j <= hi), (i - j) % l == 0
  return (i // l) == (j // l), j % l >= l - c


def sparse_transformer_masks(segment_ids, *, pattern: str, stride: int, c: int, causal: bool):
  """Dense boolean [B, T, T] masks of A1 and A2 (the reference's definition)."""
  b, t = segment_ids.shape
  idx = row_index(b, t)
  base = make_mask(segment_ids, segment_ids, idx, idx, causal)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  a1, a2 = sparse_transformer_rules(i, j, pattern=pattern, stride=stride, c=c, causal=causal)
  return base & jnp.asarray(a1), base & jnp.asarray(a2)


def sparse_transformer_head_masks(a1, a2, *, num_heads: int, head_mode: str, layer_index: int = 0):
  """Which of A1 / A2 each query head uses, as masks [..., N or 1, T, S] from [..., T, S] ones
  (split: the first ceil(N/2) heads A1, the rest A2; merged: A1 u A2; alternate: by layer)."""
  if head_mode == "alternate":
    return (a1 if layer_index % 2 == 0 else a2)[..., None, :, :]
  if head_mode == "merged":
    return (a1 | a2)[..., None, :, :]
  first = jnp.arange(num_heads) < num_heads - num_heads // 2
  return jnp.where(first[:, None, None], a1[..., None, :, :], a2[..., None, :, :])


def reference_sparse_transformer(q_btnh, k_btkh, v_btkh, segment_ids, *, pattern: str, stride: int, c: int,
                                 causal: bool, head_mode: str = "split", layer_index: int = 0) -> jax.Array:
  """Dense twin of `sparse_transformer_attention`: explicit masks + `reference_attention`."""
  m1, m2 = sparse_transformer_masks(segment_ids, pattern=pattern, stride=stride, c=c, causal=causal)
  if head_mode == "alternate":
    return reference_attention(q_btnh, k_btkh, v_btkh, m1 if layer_index % 2 == 0 else m2)
  if head_mode == "merged":
    return reference_attention(q_btnh, k_btkh, v_btkh, m1 | m2)
  n = q_btnh.shape[2]
  g1, g2 = _split_heads(q_btnh, k_btkh, v_btkh, n - n // 2)
  return jnp.concatenate([reference_attention(*g1, m1), reference_attention(*g2, m2)], axis=2)


class WholeSequenceMixin:
  """For mixers whose pattern is laid out on the stored row: only compiler-propagated
  sequence sharding ("auto": Attention's ring / all-to-all paths attend to full key sets,
  not to these patterns), tokens in storage order (a permuted layout, ctx.index, would
  scramble the pattern), and no decode cache unless the mixer also takes
  `decode.PatternCacheMixin` (which sets SUPPORTS_DECODE)."""

  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only
  SUPPORTS_DECODE = False

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding (decode=True)")

  def _check_context(self, ctx: MixContext) -> None:
    if ctx.decode and not self.SUPPORTS_DECODE:
      raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding (decode=True)")
    if getattr(ctx, "index", None) is not None:
      raise NotImplementedError(f"{type(self).__name__} needs tokens in storage order; a permuted layout "
                                f"(ctx.index, e.g. zigzag sequence parallelism) is not supported")


def auto_period(option: int, t: int) -> int:
  """0 = ceil(sqrt(T)), the paper's choice that makes the cost O(T sqrt T)."""
  return int(option) if option else max(1, math.isqrt(max(t - 1, 0)) + 1)


class SparseTransformer(PatternCacheMixin, WholeSequenceMixin, Attention):
  """Sparse Transformer factorised attention (config `model.sparse_transformer.*`):
  `pattern` "strided" (default) | "fixed", `stride` l (default 0 = ceil(sqrt(T))), `c`
  (fixed: summary columns per block, default 8, clipped to l), `head_mode` "split"
  (default) | "merged" | "alternate".

  Causal models decode (`init_cache(batch, max_len, dtype)`, then calls with ctx.decode):
  a dense KV cache of max_len slots, and each new query attends over it with its row of
  the pattern built for a row of max_len tokens (the stride l = 0 resolves to
  ceil(sqrt(max_len))), so prefill + token-by-token decoding equals the full causal
  forward over max_len tokens at the same positions. Padding is not stored (see
  `decode.PatternCacheMixin`): a right-padded prompt decodes as its unpadded sequence.
  Cost O(max_len) per decoded token (the dense path), whatever the pattern's sparsity.
  """

  LAYER_INDEXED = True  # alternate layers use the other half of the factorised pattern

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.pattern = spec.option("pattern", "strided")
    self.stride = int(spec.option("stride", 0))
    self.c = int(spec.option("c", 8))
    self.head_mode = spec.option("head_mode", "split")
    check_sparse_transformer(self.pattern, self.head_mode, spec.num_heads)
    if self.stride < 0 or self.c < 1:
      raise ValueError(f"sparse_transformer.stride={self.stride} must be >= 0 (0 = auto) and c={self.c} >= 1")

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    self._check_context(ctx)
    return super().__call__(x_btd, ctx)

  def decode_name(self) -> str:
    return "sparse_transformer"

  def decode_pattern(self, position_bt, size: int):
    a1, a2 = sparse_transformer_rules(position_bt[:, :, None], jnp.arange(size)[None, None, :], pattern=self.pattern,
                                      stride=auto_period(self.stride, size), c=self.c, causal=True)
    a1, a2 = (jnp.broadcast_to(a, position_bt.shape + (size,)) for a in (a1, a2))
    return sparse_transformer_head_masks(a1, a2, num_heads=self.spec.num_heads, head_mode=self.head_mode,
                                         layer_index=self.spec.alternation_index)

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    return sparse_transformer_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, pattern=self.pattern,
                                        stride=auto_period(self.stride, q_btnh.shape[1]), c=self.c,
                                        causal=self.spec.causal, head_mode=self.head_mode,
                                        layer_index=self.spec.alternation_index)


# ----------------------------------------------------------------------------------------------
# Longformer (Beltagy et al. 2020): sliding window + global tokens.
#
# Every query attends to its window (bidirectional |i-j| <= w//2, causal 0 <= i-j < w;
# with dilation d the window's offsets are multiples of d: (i-j)/d in that range) and to
# every global token; global tokens instead attend to all tokens, through their own
# projections (Q_g, K_g, V_g; the paper's section 3.1, as in the authors' code:
# Q_g from the global tokens, K_g and V_g from every token). Non-global queries read
# global keys through the ordinary K/V. Cost O(T * (w + g)) per head.


def global_index(global_positions, t: int) -> np.ndarray:
  """The static global row indices that exist in a row of length t (sorted, unique)."""
  return np.array(sorted({int(p) for p in global_positions if 0 <= int(p) < t}), np.int32)


def longformer_attention(q_btnh, k_btkh, v_btkh, qg_btnh, kg_btkh, vg_btkh, segment_ids, *, window: int,
                         global_positions=(), causal: bool, dilation: int = 1) -> jax.Array:
  """Longformer attention without a T x T mask: window partial (global keys removed so the
  key sets are disjoint) merged with the global-key partial; global rows replaced by
  their own full attention."""
  w = _check_positive("longformer.window", window)
  d = _check_positive("longformer.dilation", dilation)
  b, t = segment_ids.shape
  seg = segment_ids.astype(jnp.int32)
  gidx = global_index(global_positions, t)
  is_global = np.zeros(t, bool)
  is_global[gidx] = True
  kv_seg = jnp.where(jnp.asarray(is_global)[None], 0, seg)  # global keys come from the global partial
  lo, hi = (0, w - 1) if causal else (-(w // 2), w // 2)
  if d == 1:
    out, lse = band_attention_lse(q_btnh, k_btkh, v_btkh, seg, kv_seg, lo=lo, hi=hi)
  else:  # dilated window = plain window inside each residue class mod d
    tp = -(-t // d) * d
    fold = lambda x: _fold(pad_length(x, tp), d)
    out, lse = band_attention_lse(fold(q_btnh), fold(k_btkh), fold(v_btkh), fold(seg), fold(kv_seg), lo=lo, hi=hi)
    out, lse = _unfold(out, b)[:, :t], _unfold(lse, b)[:, :t]
  if gidx.size == 0:
    return out
  idx = row_index(b, t)
  o_g, lse_g = flash_attention_lse(q_btnh, k_btkh[:, gidx], v_btkh[:, gidx], seg, seg[:, gidx], idx, idx[:, gidx],
                                   causal=causal)
  out = merge_partials(out.astype(jnp.float32), lse, o_g.astype(jnp.float32), lse_g)[0].astype(q_btnh.dtype)
  rows_g, _ = flash_attention_lse(qg_btnh[:, gidx], kg_btkh, vg_btkh, seg[:, gidx], seg, idx[:, gidx], idx,
                                  causal=causal)
  return out.at[:, gidx].set(rows_g.astype(out.dtype))


def longformer_window(i, j, *, window: int, causal: bool, dilation: int = 1):
  """Is key row j in query row i's (dilated) window? i, j: broadcasting numpy or jax integer arrays."""
  off = i - j
  steps = off // dilation
  lo, hi = (0, window - 1) if causal else (-(window // 2), window // 2)
  return (off % dilation == 0) & (steps >= lo) & (steps <= hi)


def global_indicator(global_positions, t: int) -> np.ndarray:
  """Bool [t]: which rows of a length-t row are global."""
  is_global = np.zeros(t, bool)
  is_global[global_index(global_positions, t)] = True
  return is_global


def longformer_mask(segment_ids, *, window: int, global_positions=(), causal: bool, dilation: int = 1):
  """Dense [B, T, T] mask of the ordinary rows (window u global keys) and the global-row indicator [T]."""
  b, t = segment_ids.shape
  idx = row_index(b, t)
  base = make_mask(segment_ids, segment_ids, idx, idx, causal)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  in_window = longformer_window(i, j, window=window, causal=causal, dilation=dilation)
  is_global = global_indicator(global_positions, t)
  return base & jnp.asarray(in_window | is_global[None, :]), base, is_global


def reference_longformer(q_btnh, k_btkh, v_btkh, qg_btnh, kg_btkh, vg_btkh, segment_ids, *, window: int,
                         global_positions=(), causal: bool, dilation: int = 1) -> jax.Array:
  """Dense twin of `longformer_attention`."""
  local, full, is_global = longformer_mask(segment_ids, window=window, global_positions=global_positions,
                                           causal=causal, dilation=dilation)
  out = reference_attention(q_btnh, k_btkh, v_btkh, local)
  out_g = reference_attention(qg_btnh, kg_btkh, vg_btkh, full)
  return jnp.where(jnp.asarray(is_global)[None, :, None, None], out_g, out)


class Longformer(PatternCacheMixin, WholeSequenceMixin, Attention):
  """Longformer attention (config `model.longformer.*`): `window` w (default 256),
  `dilation` d (default 1) and `global_positions` (row indices, default (0,): the CLS /
  first token; () for none), whose rows use their own Q/K/V projections.

  Causal models decode (`init_cache(batch, max_len, dtype)`, then calls with ctx.decode):
  dense caches of max_len slots for K/V and for the global projections K_g/V_g. A new
  query at an ordinary position attends with Q over K/V restricted to its window and the
  global positions (< max_len); a query at a global position attends with Q_g over K_g/V_g
  of every earlier token, the same roles as the forward. This equals the full causal
  forward over max_len tokens at the same positions; padding is not stored (see
  `decode.PatternCacheMixin`). Cost O(max_len) per decoded token (two dense passes over
  the cache).
  """

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.window = _check_positive("longformer.window", spec.option("window", 256))
    self.dilation = _check_positive("longformer.dilation", spec.option("dilation", 1))
    positions = spec.option("global_positions", (0,))
    positions = (positions,) if isinstance(positions, (int, np.integer)) else tuple(positions)
    if any(int(p) < 0 for p in positions):
      raise ValueError(f"longformer.global_positions={positions} must be row indices >= 0")
    self.global_positions = tuple(int(p) for p in positions)
    d, n, kv, h = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
    e = (axes.EMBED,)
    self.query_global = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.key_global = Dense((d,), (kv, h), in_axes=e, out_axes=(axes.KV_HEADS, axes.HEAD_DIM), rngs=rngs)
    self.value_global = Dense((d,), (kv, h), in_axes=e, out_axes=(axes.KV_HEADS, axes.HEAD_DIM), rngs=rngs)

  def decode_name(self) -> str:
    return "longformer"

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    super().init_cache(batch, max_len, dtype)
    if global_indicator(self.global_positions, max_len).any():  # K_g / V_g only serve global queries
      kv, h = self.spec.num_kv_heads, self.spec.head_dim
      self.cached_global_key = nnx.Cache(jnp.zeros((batch, max_len, kv, h), dtype))
      self.cached_global_value = nnx.Cache(jnp.zeros((batch, max_len, kv, h), dtype))

  def attend_cached_global(self, q, k, v, qg, kg, vg, ctx: MixContext) -> jax.Array:
    """Decoding: ordinary queries (Q over K/V: window u global keys), global queries (Q_g over
    K_g/V_g: every earlier token), as in `longformer_attention`."""
    size = self.cached_segment_ids.shape[1] if getattr(self, "cached_segment_ids", None) is not None else 0
    is_global_np = global_indicator(self.global_positions, size)
    has_global = bool(is_global_np.any())
    extra = dict(cached_global_key=kg, cached_global_value=vg) if has_global else {}
    position, seg = self.append_to_cache(ctx, cached_key=k, cached_value=v, **extra)
    kv_seg = self.cached_segment_ids[...]
    is_global = jnp.asarray(is_global_np)
    keys, values = self.cached_key[...], self.cached_value[...]
    keys_g, values_g = (self.cached_global_key[...], self.cached_global_value[...]) if has_global else (None, None)

    def run(q, qg, pos, seg):
      visible = causal_visibility(pos, seg, kv_seg)
      window = longformer_window(pos[:, :, None], jnp.arange(size)[None, None, :], window=self.window, causal=True,
                                 dilation=self.dilation)
      out = masked_attention_lse(q, keys, values, (visible & (window | is_global[None, None, :]))[:, None])[0]
      if not has_global:
        return out
      out_g = masked_attention_lse(qg, keys_g, values_g, visible[:, None])[0]
      return jnp.where(is_global[jnp.clip(pos, 0, size - 1)][:, :, None, None], out_g, out)

    return map_query_chunks(run, (q, qg, position, seg), self.DECODE_CHUNK).astype(q.dtype)

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    self._check_context(ctx)
    q, k, v = self.query(x_btd), self.key(x_btd), self.value(x_btd)
    qg, kg, vg = self.query_global(x_btd), self.key_global(x_btd), self.value_global(x_btd)
    if self.spec.positions == "rope":
      q, k, qg, kg = (rope(a, ctx.positions) for a in (q, k, qg, kg))
    if ctx.decode:
      return self.out(self.attend_cached_global(q, k, v, qg, kg, vg, ctx))
    y = longformer_attention(q, k, v, qg, kg, vg, ctx.segment_ids, window=self.window,
                             global_positions=self.global_positions, causal=self.spec.causal,
                             dilation=self.dilation)
    return self.out(y)
