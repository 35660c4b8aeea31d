"""`conv`: a gated short convolution, the BaseConv of Zoology / Based (Arora et al. 2023).

    y = (x W + b) * (h * x + c)

`h * x` is a depth-wise convolution over the length with k taps per channel (weights
[k, D], bias c [D]): causal taps t-k+1 .. t, or centred when bidirectional; W [D, D], b [D]
a linear gate. No output projection (the block's residual follows). Each tap reads only
tokens of the token's own nonzero segment id; padding rows output zeros.

It is the cheapest mixer that moves information between neighbouring tokens, and the one
the Zoology MQAR protocol puts in layer 0 in front of the mixer under test (so layer 1
finds each value token already carrying its key: `model.mixer_schedule="conv,mixer"`; see
configs/mqar.py). Config group `model.conv`: `kernel` (k, default 3).

Decoding (causal) keeps the last k - 1 real input rows with their segment ids and
positions, exactly as SLA's conv on V does (`layers.linear.sla`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers.core import Dense, param
from layers.linear.sla import conv_decode_step, sequence_conv1d
from layers.mixer_base import HALO, MixContext, Mixer, MixerSpec, sequence_parallel


class ShortConv(Mixer):
  """Gated short convolution (config group `model.conv`; see the module docstring)."""

  # Reads only the kernel's reach: under sequence parallelism each device gets the k - 1
  # tokens before its chunk from its neighbour (parallel/halo.py).
  SEQUENCE_CAPABILITIES = frozenset({HALO})

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.kernel = int(spec.option("kernel", 3))
    if self.kernel < 1:
      raise ValueError(f"model.conv.kernel={self.kernel} must be a positive number of taps")
    self.gated = bool(spec.option("gate", True))
    d = spec.d_model
    self.gate = (Dense((d,), (d,), in_axes=(axes.EMBED,), out_axes=(None,), use_bias=True, rngs=rngs)
                 if self.gated else None)
    bound = 1.0 / math.sqrt(self.kernel)
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.conv_weight = param(rngs, init, (self.kernel, d), (None, None))
    self.conv_bias = param(rngs, jax.nn.initializers.zeros, (d,), (None,))

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    x4 = x_btd[:, :, None, :]  # one "head" of D channels: the shared depth-wise conv helpers
    w, bias = self.conv_weight[...], self.conv_bias[...]
    if ctx.index is not None:
      raise ValueError("conv reads neighbouring stored tokens; a permuted row layout (ctx.index, e.g. zigzag "
                       "load balancing) does not apply to it")
    sp = None if ctx.decode else sequence_parallel(self)
    conv = sequence_conv1d(sp, x4, ctx.segment_ids, w, bias, causal=self.spec.causal,
                           logical=(axes.BATCH, axes.LENGTH, None, axes.EMBED))
    if ctx.decode and self.kernel > 1:
      conv = conv_decode_step(conv, x4, ctx, w, self.cached_x, self.cached_segment_ids, self.cached_positions)
    y = conv[:, :, 0]
    if self.gate is not None:
      y = self.gate(x_btd).astype(jnp.float32) * y
    return y.astype(x_btd.dtype)

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    if not self.spec.causal:
      raise ValueError("incremental decoding needs a causal model; the conv mixer is bidirectional here")
    keep = self.kernel - 1
    self.cached_x = nnx.Cache(jnp.zeros((batch, keep, 1, self.spec.d_model), dtype))
    self.cached_segment_ids = nnx.Cache(jnp.zeros((batch, keep), jnp.int32))
    self.cached_positions = nnx.Cache(jnp.zeros((batch, keep), jnp.int32))
