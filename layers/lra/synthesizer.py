"""Synthesizer (docs/papers.md#synthesizer): attention weights synthesised without query-key dot products.

Dense (`kind="dense"`): every token predicts its own row of logits over positions,
`B_i = W2 relu(W1 x_i + b1) + b2 in R^{N x max_len}` (one row per head), and
`O = softmax(B) V`. Random (`kind="random"`): a learned `R in R^{N x max_len x max_len}`
gives the logits, the same for every input; with `fixed=True` R is drawn at
initialisation and never trained (kept as a non-parameter variable, so the optimizer
never sees it; it travels in checkpoints as extra state).

Positions: the logit of query i for key j is `B_i[p_j]` (dense) or `R[p_i, p_j]`
(random) with p the position of the token within its own segment (ctx.positions), so a
packed example gets exactly the logits it would get alone in a row. Masks: keys of
other segments and padding are excluded, and causal models see keys j <= i (by
ctx.token_index(), so permuted storage layouts work). A row longer than max_len is an
error (there are no logits for those positions).

Cost: O(T * max_len * F) for the dense logits plus O(T^2) softmax, O(T^2 H) mixing per
head; memory O(T^2) per head, like exact attention.

This is already the dense computation; tests/test_lra_mixers.py checks it against the
formula written with explicit index grids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.reference import MASK_VALUE, make_mask
from layers import axes
from layers.core import Dense, param
from layers.mixer_base import MixContext, Mixer, MixerSpec

KINDS = ("dense", "random")


class FixedRandom(nnx.Variable):
  """A random buffer drawn at initialisation and never trained (not an nnx.Param)."""


def masked_softmax_mix(logits_bnts, v_btnh, mask_bts) -> jax.Array:
  """softmax over keys of the masked fp32 logits, times V; rows that see no key give zeros."""
  logits = jnp.where(mask_bts[:, None], logits_bnts.astype(jnp.float32), MASK_VALUE)
  probs = jnp.where(mask_bts[:, None], jax.nn.softmax(logits, axis=-1), 0.0)
  return jnp.einsum("bnts,bsnh->btnh", probs, v_btnh.astype(jnp.float32)).astype(v_btnh.dtype)


class Synthesizer(Mixer):
  """Dense or Random Synthesizer (config group `model.synthesizer`).

  Options: `kind` ("dense" | "random", default "dense"); `hidden` (width F of W1 in the
  dense kind, default d_model); `fixed` (random kind: R is not trained, default False).
  Values use `num_heads` heads (num_kv_heads does not apply: there are no keys); rotary
  positions do not apply either (the logits are indexed by position directly).
  Incremental decoding is not supported (init_cache raises).
  """

  # Logits come from the tokens' own features (or a table), not from heads that could be
  # split across devices with an all-to-all; only compiler-propagated sharding.
  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.kind = str(spec.option("kind", "dense"))
    self.hidden = int(spec.option("hidden", 0) or spec.d_model)
    self.fixed = bool(spec.option("fixed", False))
    if self.kind not in KINDS:
      raise ValueError(f"model.synthesizer.kind={self.kind!r} is not one of {', '.join(KINDS)}")
    if self.hidden < 1:
      raise ValueError(f"model.synthesizer.hidden={self.hidden} must be positive")
    if spec.max_len < 1:
      raise ValueError(f"synthesizer needs a positive max_len (its logits are per position), got {spec.max_len}")
    d, n, h, length = spec.d_model, spec.num_heads, spec.head_dim, spec.max_len
    e = (axes.EMBED,)
    self.value = Dense((d,), (n, h), in_axes=e, out_axes=(axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.out = Dense((n, h), (d,), in_axes=(axes.HEADS, axes.HEAD_DIM), out_axes=e, rngs=rngs,
                     init_scale=1.0 / math.sqrt(2 * spec.num_layers))
    if self.kind == "dense":
      self.w1 = Dense((d,), (self.hidden,), in_axes=e, out_axes=(axes.MLP,), rngs=rngs, use_bias=True)
      self.w2 = Dense((self.hidden,), (n, length), in_axes=(axes.MLP,), out_axes=(axes.HEADS, None), rngs=rngs,
                      use_bias=True)
      self.table = None
    else:
      self.w1 = self.w2 = None
      # Unit-variance logits: a fixed table must be far from uniform to mix anything.
      table = param(rngs, jax.nn.initializers.normal(1.0), (n, length, length), (axes.HEADS, None, None))
      self.table = FixedRandom(table[...], logical_axes=(axes.HEADS, None, None)) if self.fixed else table

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")

  def logits(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
    """[B, N, T, T] fp32: row i, column j = the logit of query i for the key at position p_j."""
    pos = jnp.clip(jnp.asarray(positions_bt, jnp.int32), 0, self.spec.max_len - 1)
    b, t = pos.shape
    if self.kind == "dense":
      rows = jnp.moveaxis(self.w2(jax.nn.relu(self.w1(x_btd))), 2, 1).astype(jnp.float32)  # [B, N, T, L]
      cols = jnp.broadcast_to(pos[:, None, None, :], rows.shape[:3] + (t,))
      return jnp.take_along_axis(rows, cols, axis=-1)
    table = self.table[...]
    if self.fixed:
      table = jax.lax.stop_gradient(table)
    return jax.vmap(lambda p: table[:, p[:, None], p[None, :]])(pos).astype(jnp.float32)

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    if ctx.decode:
      raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")
    b, t = ctx.segment_ids.shape
    if t > self.spec.max_len:
      raise ValueError(f"synthesizer has logits for max_len={self.spec.max_len} positions, but got a sequence of "
                       f"T={t} tokens; raise the model's max_len or shorten the sequence")
    index = ctx.token_index()
    mask = make_mask(ctx.segment_ids, ctx.segment_ids, index, index, self.spec.causal)
    out = masked_softmax_mix(self.logits(x_btd, ctx.positions), self.value(x_btd), mask)
    return self.out(out)
