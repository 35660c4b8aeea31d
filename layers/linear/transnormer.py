"""TransNormer (Qin et al. 2022, "The Devil in Linear Transformer"; docs/papers.md#transnormer).

Layer plan (config group `model.transnormer`): layers with `spec.layer_index <
diag_layers` (default -1 = num_layers // 2, the paper's first half) use DiagAttention,
the later ones NormAttention.

NormAttention: Q = phi(X W_q), K = phi(X W_k), V = X W_v; per head the raw
phi(Q) (phi(K)^T V) (no 1/sqrt(d), no denominator: `linear_attention(normalize=False)`
of layers/linear/core.py, so causal runs the chunked scan and decode carries its
state); heads concatenated and normalised by SimpleRMSNorm over the full hidden width,
SRMS(x) = x / (|x|_2 / sqrt(D) + 1e-8) with no gain; then the output projection.
`kernel`: "1+elu" (T2, and the usual reading of the paper) or "elu" — T1's config says
"elu", which the official helper maps to plain ELU (it can be negative).

DiagAttention: local attention inside non-overlapping chunks of w = `block` tokens,
logits (q / sqrt(d)) . k. Chunks are counted from each segment's start (chunk =
floor(position / w)), so for a row holding one sequence from position 0 they are the
paper's consecutive blocks of w stored tokens, and a packed example, or a right-padded
prompt continued by decoding, gets the chunks it would get alone. `diag` = "softmax"
(T2): masked softmax inside the chunk, no norm afterwards; "relu" (T1): ReLU(logits)
with masked entries set to 0, then SRMS over the hidden width. Causal masks later
tokens of the chunk; segment ids mask across segments and padding. With
`model.positions = "rope"` the rotary embedding is applied to q and k (the paper uses
its LRPE add-on instead; softmax attention with no position signal is permutation-blind
inside a chunk). Decoding keeps one chunk of keys and values ([B, w, N, H], slot =
position % w) with their segment ids and positions: prefill + one-token steps equal the
full forward.

Sequence parallelism (the same capabilities, summary and heads, for both kinds of layer):
"auto", "scan", "all_to_all".
NormAttention runs the shared scan / all-to-all paths of KernelAttention. DiagAttention
carries no state along the row: under "all_to_all" it runs on full-length heads; under
"scan" (and "auto") it is computed with compiler-propagated shardings: when every device
holds whole blocks (T / mesh.sequence a multiple of `block`) they exchange a halo of one
block of keys/values between neighbours and never gather the length
(tests/test_transnormer.py checks the compiled program); otherwise the compiler gathers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.reference import MASK_VALUE
from layers import axes
from layers.attention.exact import rope
from layers.core import Dense
from layers.linear.linear import KernelAttention
from layers.mixer_base import HEADS, SUMMARY, MixContext, Mixer, MixerSpec, sequence_parallel

KERNELS = {
    "1+elu": lambda x: jax.nn.elu(x) + 1.0,
    "elu": jax.nn.elu,  # T1 as coded: plain ELU
}
DIAG_KINDS = ("softmax", "relu")
SRMS_EPS = 1e-8


def simple_rms_norm(x_btnh: jax.Array, eps: float = SRMS_EPS) -> jax.Array:
  """SRMS over the concatenated heads (the last two axes), no gain, in fp32.

  Rows that are exactly zero (padding) stay zero with finite gradients: the square root
  is never taken at 0.
  """
  x = x_btnh.astype(jnp.float32)
  ms = jnp.mean(jnp.square(x), axis=(-2, -1), keepdims=True)
  positive = ms > 0
  rms = jnp.where(positive, jnp.sqrt(jnp.where(positive, ms, 1.0)), 0.0)
  return x / (rms + eps)


# -- NormAttention ------------------------------------------------------------------------------


class NormAttention(KernelAttention):
  """Unnormalised linear attention, SRMS over the hidden width (TransNormer's later layers)."""

  NORMALIZE = False

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.kernel = str(spec.option("kernel", "1+elu"))
    if self.kernel not in KERNELS:
      raise ValueError(f"model.transnormer.kernel={self.kernel!r} is not one of {', '.join(KERNELS)}")

  def features(self, q_btnh, k_btnh, ctx: MixContext):
    phi = KERNELS[self.kernel]
    return phi(q_btnh.astype(jnp.float32)), phi(k_btnh.astype(jnp.float32))

  def post(self, o_btnh, ctx: MixContext):
    return simple_rms_norm(o_btnh).astype(o_btnh.dtype)


# -- DiagAttention ------------------------------------------------------------------------------


def masked_scores_mix(q_bcinh, k_bcjnh, v_bcjnh, mask_bcij, kind: str) -> jax.Array:
  """Per chunk c: P = softmax or ReLU of (q / sqrt(H)) . k over the visible keys; returns P V (fp32).

  Query rows that see no key give zeros.
  """
  h = q_bcinh.shape[-1]
  logits = jnp.einsum("bcinh,bcjnh->bcnij", q_bcinh.astype(jnp.float32), k_bcjnh.astype(jnp.float32))
  logits = logits / math.sqrt(h)
  mask = mask_bcij[:, :, None]
  if kind == "softmax":
    p = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
  else:
    p = jax.nn.relu(logits)
  p = jnp.where(mask, p, 0.0)
  return jnp.einsum("bcnij,bcjnh->bcinh", p, v_bcjnh.astype(jnp.float32))


def _band(x_bcw, offsets, fill=0):
  """[B, C, w, ...] blocks -> [B, C, len(offsets) * w, ...]: block c followed by its neighbours c + d."""
  parts = []
  for d in offsets:
    if d == 0:
      parts.append(x_bcw)
    else:  # a shift by one block (pad + slice: a halo exchange when the blocks are split over devices)
      widths = [(0, 0), (1, 0) if d < 0 else (0, 1)] + [(0, 0)] * (x_bcw.ndim - 2)
      shifted = jnp.pad(x_bcw, widths, constant_values=fill)
      parts.append(shifted[:, :-1] if d < 0 else shifted[:, 1:])
  return jnp.concatenate(parts, axis=2)


def diag_attention(q_btnh, k_btnh, v_btnh, segment_ids_bt, positions_bt, *, block: int, causal: bool, kind: str,
                   extra=None) -> jax.Array:
  """Chunked local attention; [B, T, N, H] fp32 (before any SRMS).

  Token i sees j iff they share a nonzero segment id, floor(pos_i / w) == floor(pos_j / w)
  (chunks counted from each segment's start) and, if causal, j <= i in storage order.
  Segments are contiguous runs with consecutive positions, so a chunk spans less than w
  stored tokens: each block of w stored queries looks at its own block and the previous
  one (and the next one, bidirectional). O(T w) scores, [B, T/w, N, w, 2w or 3w].

  `extra` = (k [B, S, N, H], v, segment ids [B, S], positions [B, S]): keys stored before
  every query (the decode cache), visible under the same segment and chunk rules.
  """
  b, t, n, h = q_btnh.shape
  w = block
  pad = -t % w
  seg, pos = segment_ids_bt.astype(jnp.int32), positions_bt.astype(jnp.int32)
  if pad:
    grow = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q_btnh, k_btnh, v_btnh, seg, pos = (grow(x) for x in (q_btnh, k_btnh, v_btnh, seg, pos))
  nc = (t + pad) // w
  blocks = lambda x: x.reshape(b, nc, w, *x.shape[2:])  # [B, T', ...] -> [B, T'/w, w, ...]
  idx = jnp.broadcast_to(jnp.arange(t + pad, dtype=jnp.int32), (b, t + pad))
  offsets = (-1, 0) if causal else (-1, 0, 1)
  kb, vb, sb, pb, ib = (_band(blocks(x), offsets) for x in (k_btnh, v_btnh, seg, pos, idx))
  if extra is not None:
    ek, ev, es, ep = extra
    lead = lambda x, like: jnp.concatenate(
        [jnp.broadcast_to(x[:, None], (b, nc) + x.shape[1:]).astype(like.dtype), like], axis=2)
    kb, vb, sb, pb = lead(ek, kb), lead(ev, vb), lead(es, sb), lead(ep, pb)
    ib = lead(jnp.full(es.shape, -1, jnp.int32), ib)  # stored before every query
  sq, pq, iq = blocks(seg)[..., None], blocks(pos)[..., None], blocks(idx)[..., None]
  mask = (sq == sb[:, :, None]) & (sq != 0) & (pq // w == pb[:, :, None] // w)
  if causal:
    mask &= ib[:, :, None] <= iq
  out = masked_scores_mix(blocks(q_btnh), kb, vb, mask, kind)
  return out.reshape(b, nc * w, n, h)[:, :t]


def reference_diag_attention(q_btnh, k_btnh, v_btnh, segment_ids_bt, positions_bt, *, block: int, causal: bool,
                             kind: str) -> jax.Array:
  """The dense twin: explicit [T, T] mask (same nonzero segment, same chunk floor(pos / w),
  j <= i if causal), softmax or ReLU of the scaled logits, then P V (fp32)."""
  t = q_btnh.shape[1]
  seg, pos = segment_ids_bt, positions_bt
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  mask &= pos[:, :, None] // block == pos[:, None, :] // block
  if causal:
    mask &= (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]
  logits = jnp.einsum("binh,bjnh->bnij", q_btnh.astype(jnp.float32), k_btnh.astype(jnp.float32))
  logits = logits / math.sqrt(q_btnh.shape[-1])
  m = mask[:, None]
  if kind == "softmax":
    p = jnp.where(m, jax.nn.softmax(jnp.where(m, logits, -jnp.inf), axis=-1), 0.0)
    p = jnp.nan_to_num(p)  # rows with no visible key
  else:
    p = jnp.where(m, jax.nn.relu(logits), 0.0)
  return jnp.einsum("bnij,bjnh->binh", p, v_btnh.astype(jnp.float32))


class DiagAttention(Mixer):
  """Chunked local attention of TransNormer's early layers (see the module docstring)."""

  # As the kernelised attention of its other layers: both kinds run under one strategy ("scan"
  # leaves the diagonal blocks to the compiler, local when devices hold whole blocks).
  SEQUENCE_CAPABILITIES = frozenset({SUMMARY, HEADS})

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    if spec.num_kv_heads != spec.num_heads:
      raise ValueError(f"DiagAttention needs model.num_kv_heads == model.num_heads "
                       f"(got {spec.num_kv_heads} and {spec.num_heads})")
    if spec.positions == "rope" and spec.head_dim % 2:
      raise ValueError(f"rotary positions need an even head dim, got {spec.head_dim}")
    self.spec = spec
    self.block = int(spec.option("block", 64))
    self.kind = str(spec.option("diag", "softmax"))
    if self.block < 1:
      raise ValueError(f"model.transnormer.block={self.block} must be a positive number of tokens")
    if self.kind not in DIAG_KINDS:
      raise ValueError(f"model.transnormer.diag={self.kind!r} is not one of {', '.join(DIAG_KINDS)}")
    d, n, h = spec.d_model, spec.num_heads, spec.head_dim
    e = (axes.EMBED,)
    self.query = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.key = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.value = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.out = Dense((n, h), (d,), in_axes=(axes.HEADS, axes.HEAD_DIM), out_axes=e, rngs=rngs,
                     init_scale=1.0 / math.sqrt(2 * spec.num_layers))

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    q, k, v = self.query(x_btd), self.key(x_btd), self.value(x_btd)
    if self.spec.positions == "rope":
      q, k = rope(q, ctx.positions), rope(k, ctx.positions)
    o = self._attend_cached(q, k, v, ctx) if ctx.decode else self._attend(q, k, v, ctx)
    if self.kind == "relu":
      o = simple_rms_norm(o)
    return self.out(o.astype(x_btd.dtype))

  def _attend(self, q, k, v, ctx: MixContext) -> jax.Array:
    if ctx.index is not None:
      raise ValueError("DiagAttention finds a chunk's tokens among neighbouring stored tokens; a permuted row "
                       "layout (parallel.load_balance) does not apply to it")
    fn = lambda q, k, v, seg, pos: diag_attention(q, k, v, seg, pos, block=self.block, causal=self.spec.causal,
                                                  kind=self.kind)
    sp = sequence_parallel(self)
    if sp is not None and sp.needs == HEADS:
      # The strategy gathers [b, T] ids and "index" rows for the local function: here the
      # positions ride in the index slot (rows stay in storage order, checked above).
      local = lambda q, k, v, qseg, kseg, qpos, kpos: fn(q, k, v, qseg, qpos).astype(q.dtype)
      return sp.heads(local, q, k, v, ctx.segment_ids, ctx.positions)
    # "auto" / "scan": compiler-propagated shardings (a one-block halo when devices hold whole blocks).
    return fn(q, k, v, ctx.segment_ids, ctx.positions)

  # -- decoding -------------------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    del max_len  # only the current chunk is kept
    if not self.spec.causal:
      raise ValueError("DiagAttention decodes only causally (model is bidirectional)")
    n, h, w = self.spec.num_heads, self.spec.head_dim, self.block
    # Slot s holds the latest real token with position % w == s (and its segment id and
    # position, which tell whether it is in the querying token's chunk).
    self.cached_key = nnx.Cache(jnp.zeros((batch, w, n, h), dtype))
    self.cached_value = nnx.Cache(jnp.zeros((batch, w, n, h), dtype))
    self.cached_segment_ids = nnx.Cache(jnp.zeros((batch, w), jnp.int32))
    self.cached_positions = nnx.Cache(jnp.zeros((batch, w), jnp.int32))

  def _attend_cached(self, q, k, v, ctx: MixContext) -> jax.Array:
    if getattr(self, "cached_key", None) is None:
      raise ValueError("decode=True needs init_cache(batch, max_len, dtype) first")
    b, t = ctx.segment_ids.shape
    w = self.block
    seg, pos = ctx.segment_ids.astype(jnp.int32), ctx.positions.astype(jnp.int32)
    old = (self.cached_key[...], self.cached_value[...], self.cached_segment_ids[...], self.cached_positions[...])
    # Each slot takes the last real token of this call that maps to it, else keeps its entry.
    writes = (pos[:, :, None] % w == jnp.arange(w)) & (seg != 0)[:, :, None]  # [B, T, w]
    last = jnp.max(jnp.where(writes, jnp.arange(t)[None, :, None], -1), axis=1)  # [B, w]
    pick = lambda x: jnp.take_along_axis(x, jnp.maximum(last, 0).reshape((b, w) + (1,) * (x.ndim - 2)), axis=1)
    new = tuple(jnp.where((last >= 0).reshape((b, w) + (1,) * (c.ndim - 2)), pick(x).astype(c.dtype), c)
                for c, x in zip(old, (k, v, seg, pos)))
    if t == 1:  # one token: it is in the cache now; attend over the w slots
      ck, cv, cseg, cpos = new
      mask = (cseg == seg) & (seg != 0) & (cpos // w == pos // w) & (cpos <= pos)  # [B, w]
      o = masked_scores_mix(q[:, None], ck[:, None], cv[:, None], mask[:, None, None], self.kind)[:, 0]
    else:  # the call's own tokens as in the full forward, plus the entries cached before it
      o = diag_attention(q, k, v, seg, pos, block=w, causal=True, kind=self.kind, extra=old)
    self.cached_key[...], self.cached_value[...], self.cached_segment_ids[...], self.cached_positions[...] = new
    return o


# -- the registry entry -------------------------------------------------------------------------


class TransNormer(Mixer):
  """`transnormer`: DiagAttention in layers < diag_layers, NormAttention after (docs/papers.md#transnormer).

  Options (`model.transnormer.*`): diag_layers (-1 = num_layers // 2), kernel ("1+elu" |
  "elu"), diag ("softmax" | "relu"), block (w, 64), chunk (NormAttention's causal scan
  chunk, 64). Both kinds hold the same projections (query/key/value/out) under `attention`.
  """

  LAYER_INDEXED = True  # early layers are DiagAttention, later ones NormAttention

  # As the kernelised attention of its other layers: both kinds run under one strategy ("scan"
  # leaves the diagonal blocks to the compiler, local when devices hold whole blocks).
  SEQUENCE_CAPABILITIES = frozenset({SUMMARY, HEADS})

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    diag_layers = int(spec.option("diag_layers", -1))
    if diag_layers < -1:
      raise ValueError(f"model.transnormer.diag_layers={diag_layers} must be -1 (num_layers // 2) or >= 0")
    self.diag_layers = spec.num_layers // 2 if diag_layers == -1 else diag_layers
    self.is_diag = spec.layer_index < self.diag_layers
    layer = DiagAttention if self.is_diag else NormAttention
    self.attention = layer(spec, rngs=rngs)

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    return self.attention(x_btd, ctx)

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    self.attention.init_cache(batch, max_len, dtype)
