"""Kernelised (linear) attention mixers: the shared module and the Linear Transformer.

`KernelAttention` owns what every member of the family shares: Q/K/V/output
projections, the call into `layers.linear.core.linear_attention` (chunked causal scan or
bidirectional sums, packed segments, decode state, sequence-parallel scan). A member
supplies its feature map (`features`) and, where it differs, whether to normalise and
what to do with the per-head output (`post`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers.core import Dense
from layers.linear.core import LinearState, linear_attention
from layers.mixer_base import HEADS, SUMMARY, MixContext, Mixer, MixerSpec, sequence_parallel


class KernelAttention(Mixer):
  """out = phi(Q) (phi(K)^T V) [/ phi(Q) sum phi(K)] per head, then the output projection."""

  # Chunk states are associative summaries (the parallel scan), and heads are independent
  # given whole rows (all-to-all).
  SEQUENCE_CAPABILITIES = frozenset({SUMMARY, HEADS})
  NORMALIZE = True
  ORDER_AWARE = False  # no rotary embedding: bidirectional, only learned positions give order

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    if spec.num_kv_heads != spec.num_heads:
      raise ValueError(f"{type(self).__name__} needs model.num_kv_heads == model.num_heads "
                       f"(got {spec.num_kv_heads} and {spec.num_heads})")
    d, n, h = spec.d_model, spec.num_heads, spec.head_dim
    self.spec = spec
    e = (axes.EMBED,)
    self.query = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.key = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.value = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.out = Dense((n, h), (d,), in_axes=(axes.HEADS, axes.HEAD_DIM), out_axes=e, rngs=rngs,
                     init_scale=1.0 / math.sqrt(2 * spec.num_layers))
    self.chunk = int(spec.option("chunk", 64))
    self.eps = float(spec.option("eps", 1e-6))

  # -- what a family member overrides ------------------------------------------------------

  def features(self, q_btnh, k_btnh, ctx: MixContext):
    """(phi(q), phi(k)), each [B, T, N, F]."""
    raise NotImplementedError

  def post(self, o_btnh, ctx: MixContext):
    """The per-head output before the output projection (e.g. a normalisation)."""
    return o_btnh

  def feature_count(self) -> int:
    return self.spec.head_dim

  # -- shared -----------------------------------------------------------------------------

  def projections(self, x_btd):
    return self.query(x_btd), self.key(x_btd), self.value(x_btd)

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    q, k, v = self.projections(x_btd)
    phi_q, phi_k = self.features(q, k, ctx)
    o = self.mix(phi_q, phi_k, v, ctx)
    return self.out(self.post(o, ctx))

  def mix(self, phi_q, phi_k, v, ctx: MixContext) -> jax.Array:
    kw = dict(causal=self.spec.causal, normalize=self.NORMALIZE, eps=self.eps, chunk=self.chunk)
    if ctx.decode:
      return self._mix_cached(phi_q, phi_k, v, ctx, kw)
    if ctx.index is not None:
      raise ValueError(f"{type(self).__name__} masks causally by storage order; a permuted row layout "
                       f"(parallel.load_balance with ring attention) does not apply to it")
    sp = sequence_parallel(self)
    if sp is not None and sp.needs == SUMMARY:
      return sp.linear_attention(phi_q, phi_k, v, ctx.segment_ids, **kw)
    if sp is not None:
      local = lambda q, k, v, qseg, kseg, qi, ki: linear_attention(q, k, v, qseg, **kw)[0]
      return sp.heads(local, phi_q, phi_k, v, ctx.segment_ids, ctx.token_index())
    return linear_attention(phi_q, phi_k, v, ctx.segment_ids, **kw)[0]

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    del max_len, dtype  # the state is O(1) in the length
    if not self.spec.causal:
      raise ValueError(f"{type(self).__name__} decodes only causally (model is bidirectional)")
    width = self.spec.head_dim + (1 if self.NORMALIZE else 0)
    zeros = LinearState.zeros(batch, self.spec.num_heads, self.feature_count(), width)
    self.cached_kv = nnx.Cache(zeros.kv)
    self.cached_segment = nnx.Cache(zeros.segment)

  def _mix_cached(self, phi_q, phi_k, v, ctx, kw):
    if getattr(self, "cached_kv", None) is None:
      raise ValueError("decode=True needs init_cache(batch, max_len, dtype) first")
    state = LinearState(self.cached_kv[...], self.cached_segment[...])
    o, new = linear_attention(phi_q, phi_k, v, ctx.segment_ids, state=state, **kw)
    self.cached_kv[...], self.cached_segment[...] = new.kv, new.segment
    return o


def elu_plus_one(x):
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


class LinearTransformer(KernelAttention):
  """Katharopoulos et al.: phi(x) = elu(x) + 1, normalised (docs/papers.md#linear)."""

  def features(self, q_btnh, k_btnh, ctx):
    return elu_plus_one(q_btnh), elu_plus_one(k_btnh)
