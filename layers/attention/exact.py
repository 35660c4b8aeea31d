"""Exact softmax attention: the reference every other attention path is tested against.

Multi-head or grouped-query (`num_kv_heads` < `num_heads`, K/V shared by groups of
query heads without copying), causal or bidirectional, padding and packed segments
through segment ids, rotary positions, and a KV cache for incremental decoding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers.attention.decode import cached_attention
from layers.attention.flash import MASK_VALUE, flash_attention_lse
from layers.core import Dense
from layers.mixer_base import MixContext, Mixer, MixerSpec, sequence_parallel



def make_mask(q_segment_ids_bq, kv_segment_ids_bk, q_index_bq, kv_index_bk, causal: bool) -> jax.Array:
  """Boolean [B, Tq, Tk]: query i sees key j iff same nonzero segment (and j <= i if causal).

  Indices are absolute positions in the row (or in the KV cache), not per-segment
  positions, so causality is by storage order.
  """
  mask = (q_segment_ids_bq[:, :, None] == kv_segment_ids_bk[:, None, :]) & (q_segment_ids_bq[:, :, None] != 0)
  if causal:
    mask &= kv_index_bk[:, None, :] <= q_index_bq[:, :, None]
  return mask


def reference_attention(q_btnh, k_bskh, v_bskh, mask_bts) -> jax.Array:
  """Dense softmax(q k^T / sqrt(H)) v in fp32, materialising the [B, N, T, S] scores.

  Grouped-query: query head n uses kv head n // (N / K). Query rows that see no key
  produce zeros.
  """
  b, t, n, h = q_btnh.shape
  kv = k_bskh.shape[2]
  q = q_btnh.astype(jnp.float32).reshape(b, t, kv, n // kv, h) / math.sqrt(h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh.astype(jnp.float32))
  scores = jnp.where(mask_bts[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask_bts[:, None, None], probs, 0.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh.astype(jnp.float32))
  return out.reshape(b, t, n, h).astype(q_btnh.dtype)


def one_example_per_row(segment_ids_bt) -> jax.Array:
  """Scalar bool: every row is one example (a single nonzero id from position 0) followed only
  by padding, i.e. fully described by its length. Padding-only rows count as such."""
  seg = jnp.asarray(segment_ids_bt, jnp.int32)
  lengths = jnp.sum(seg > 0, axis=1)
  first = jnp.arange(seg.shape[1])[None, :] < lengths[:, None]
  return jnp.all(seg == jnp.where(first, seg[:, :1], 0))


def cudnn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, *, causal: bool, block: int = 128,
                    implementation: str = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention`'s fused cuDNN kernel (forward and backward) for rows that
  hold one example followed by padding, passed as per-row lengths; a batch with packed rows
  (or padding before a real token) takes the pure-JAX blockwise path instead, chosen at run
  time (`lax.cond`), so the result is exact for every input. Padding queries give zeros.
  cuDNN takes 16-bit inputs only (bfloat16 / float16); `implementation="xla"` runs the same
  call through XLA, which is how the CPU tests check the wiring.
  """
  if implementation == "cudnn" and q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention_impl='cudnn' takes bfloat16 or float16 activations, got {q_btnh.dtype} "
                     f"(set model.dtype=bfloat16)")
  seg = jnp.asarray(segment_ids_bt, jnp.int32)
  lengths = jnp.maximum(jnp.sum(seg > 0, axis=1), 1).astype(jnp.int32)  # an all-padding row: zeroed below

  def fused(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation=implementation)

  def blockwise(q, k, v):
    idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    return flash_attention_lse(q, k, v, seg, seg, idx, idx, causal=causal, block_q=block, block_k=block)[0]

  out = jax.lax.cond(one_example_per_row(seg), fused, blockwise, q_btnh, k_btkh, v_btkh)
  return jnp.where((seg > 0)[:, :, None, None], out, 0).astype(q_btnh.dtype)


def rope(x_btnh: jax.Array, positions_bt: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary embedding (rotate-half form) at the given per-token positions."""
  h = x_btnh.shape[-1]
  freq = base ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)
  angle = positions_bt.astype(jnp.float32)[:, :, None, None] * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


class Attention(Mixer):
  """Multi-head / grouped-query exact softmax attention."""

  SEQUENCE_STRATEGIES = ("auto", "ring", "all_to_all", "all_gather")

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    d, n, kv, h = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
    if spec.positions == "rope" and h % 2:
      raise ValueError(f"rotary positions need an even head dim, got {h}")
    self.spec = spec
    e = (axes.EMBED,)
    self.query = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.key = Dense((d,), (kv, h), in_axes=e, out_axes=(axes.KV_HEADS, axes.HEAD_DIM), rngs=rngs)
    self.value = Dense((d,), (kv, h), in_axes=e, out_axes=(axes.KV_HEADS, axes.HEAD_DIM), rngs=rngs)
    self.out = Dense((n, h), (d,), in_axes=(axes.HEADS, axes.HEAD_DIM), out_axes=e, rngs=rngs,
                     init_scale=1.0 / math.sqrt(2 * spec.num_layers))
    # Decode-state attributes (nnx.Cache) appear only after init_cache().

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    kv, h = self.spec.num_kv_heads, self.spec.head_dim
    self.cached_key = nnx.Cache(jnp.zeros((batch, max_len, kv, h), dtype))
    self.cached_value = nnx.Cache(jnp.zeros((batch, max_len, kv, h), dtype))
    self.cached_segment_ids = nnx.Cache(jnp.zeros((batch, max_len), jnp.int32))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    q, k, v = self.query(x_btd), self.key(x_btd), self.value(x_btd)
    if self.spec.positions == "rope":
      q, k = rope(q, ctx.positions), rope(k, ctx.positions)
    if not ctx.decode:
      return self.out(self.attend(q, k, v, ctx))
    return self.out(self.attend_cached(q, k, v, ctx))

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    """Full-sequence attention (training, evaluation); sequence-parallel when a strategy is active."""
    index = ctx.token_index()
    sp = sequence_parallel()
    if sp is not None:
      return sp.attention(self.local_attention, q_btnh, k_btkh, v_btkh, ctx.segment_ids, index,
                          causal=self.spec.causal, block_q=self.spec.option("block_q", 128),
                          block_k=self.spec.option("block_k", 128), impl=self.impl())
    if self.impl() == "cudnn" and ctx.index is None:  # lengths describe storage-order rows only
      return cudnn_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, causal=self.spec.causal,
                             block=self.spec.option("block_q", 128))
    if self.spec.attention_impl == "mgpu" and ctx.index is None:  # the Hopper kernels mask by storage order
      from kernels.flash_pallas import flash_attention_pallas, mgpu_tiling
      return flash_attention_pallas(q_btnh, k_btkh, v_btkh, ctx.segment_ids, ctx.segment_ids,
                                    causal=self.spec.causal, tiling=mgpu_tiling(q_btnh.shape[-1]))
    if self.impl() == "pallas":  # storage order (no ctx.index): the kernel's diagonal loop bounds
      from kernels.flash_pallas import flash_attention_pallas
      return flash_attention_pallas(q_btnh, k_btkh, v_btkh, ctx.segment_ids, ctx.segment_ids,
                                    causal=self.spec.causal, q_index=ctx.index, kv_index=ctx.index)
    return self.local_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, ctx.segment_ids, index, index)

  def impl(self) -> str:
    """`auto` -> the Pallas kernels on GPU (Triton) and TPU (Mosaic), the pure-JAX blockwise path elsewhere.
    `cudnn`: exact attention's full-sequence path on cuDNN; everything else (other mixers, decoding,
    sequence-parallel pieces, permuted rows) treats it as `flash`. `mgpu`: exact attention's
    full-sequence path on the Hopper Mosaic GPU kernels (kernels/flash_mgpu.py); everything else
    treats it as `pallas`."""
    impl = self.spec.attention_impl
    if impl == "auto":
      impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "flash"
    return "pallas" if impl == "mgpu" else impl

  def local_attention(self, q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index):
    """Single-device attention of queries against keys (possibly a different set of tokens)."""
    if self.impl() == "pallas":
      from kernels.flash_pallas import flash_attention_pallas
      return flash_attention_pallas(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, causal=self.spec.causal,
                                    q_index=q_index, kv_index=kv_index)
    if self.impl() in ("flash", "cudnn"):
      return flash_attention_lse(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index,
                                 causal=self.spec.causal, block_q=self.spec.option("block_q", 128),
                                 block_k=self.spec.option("block_k", 128),
                                 per_row=bool(self.spec.option("per_row", False)))[0]
    mask = make_mask(q_segment_ids, kv_segment_ids, q_index, kv_index, self.spec.causal)
    return reference_attention(q_btnh, k_bskh, v_bskh, mask)

  def attend_cached(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    """Appends this call's K/V to the cache and attends over everything cached so far."""
    if getattr(self, "cache_index", None) is None:
      raise ValueError("decode=True needs init_cache(batch, max_len, dtype) first")
    b, t = ctx.segment_ids.shape
    start = self.cache_index[...]
    self.cached_key[...] = jax.lax.dynamic_update_slice(self.cached_key[...], k_btkh.astype(self.cached_key.dtype),
                                                        (0, start, 0, 0))
    self.cached_value[...] = jax.lax.dynamic_update_slice(self.cached_value[...],
                                                          v_btkh.astype(self.cached_value.dtype), (0, start, 0, 0))
    self.cached_segment_ids[...] = jax.lax.dynamic_update_slice(self.cached_segment_ids[...],
                                                                ctx.segment_ids.astype(jnp.int32), (0, start))
    self.cache_index[...] = start + t
    keys, values, kv_segments = self.cached_key[...], self.cached_value[...], self.cached_segment_ids[...]
    # Slots past the write position hold segment id 0, which the mask already hides.
    return cached_attention(q_btnh, keys, values, start + t, ctx.segment_ids, kv_segments, causal=self.spec.causal,
                            impl=self.impl(), chunk=self.spec.option("decode_chunk", 256))


class FlashAttention(Attention):
  """`attention` computed blockwise (layers/attention/flash.py): O(T) memory."""

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(dataclasses.replace(spec, attention_impl="flash"), rngs=rngs)
