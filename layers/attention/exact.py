"""Exact softmax attention, computed by the configured backend (`layers.attention.ops`).

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
from layers.attention import ops
from layers.core import Dense
from layers.mixer_base import ATTENTION, HEADS, INDEX, MixContext, Mixer, MixerSpec, sequence_parallel


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

  SEQUENCE_CAPABILITIES = frozenset({ATTENTION, HEADS, INDEX})

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
    sp = sequence_parallel(self)
    if sp is not None:
      return sp.attention(self.local_attention, q_btnh, k_btkh, v_btkh, ctx.segment_ids, ctx.token_index(),
                          causal=self.spec.causal, impl=self.spec.attention_impl, options=ops.Options.of(self.spec))
    return ops.attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, ctx.segment_ids, ctx.index, ctx.index,
                         causal=self.spec.causal, impl=self.spec.attention_impl, options=ops.Options.of(self.spec))

  def local_attention(self, q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index):
    """Single-device attention of queries against keys (possibly a different set of tokens)."""
    return ops.attention(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_index, kv_index,
                         causal=self.spec.causal, impl=self.spec.attention_impl, options=ops.Options.of(self.spec))

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
    return ops.decode_attention(q_btnh, keys, values, start + t, ctx.segment_ids, kv_segments,
                                causal=self.spec.causal, impl=self.spec.attention_impl,
                                options=ops.Options.of(self.spec))


class FlashAttention(Attention):
  """`attention` computed blockwise (layers/attention/flash.py): O(T) memory."""

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(dataclasses.replace(spec, attention_impl="flash"), rngs=rngs)
