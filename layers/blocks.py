"""The MetaFormer block: pre-norm -> token mixer -> residual -> pre-norm -> MLP -> residual.

`mlp="none"` drops the second half: pre-norm -> mixer -> residual, the block of the
reference Mamba model (its `Block` around `Mamba`, stacked with no MLP in between)."""

from __future__ import annotations

import jax
from flax import nnx

from layers import axes
from layers.core import MLP, Norm, dropout
from layers.linear.prepbn import PRepBN
from layers.mixers import MixContext, MixerSpec, make_mixer


class Block(nnx.Module):

  def __init__(self, mixer: str, spec: MixerSpec, *, norm: str, mlp: str, mlp_ratio: int, dropout_rate: float,
               rngs: nnx.Rngs, norm_options: tuple = ()):
    d = spec.d_model
    self.dropout_rate = dropout_rate
    # "prepbn": SLAB's progressive LayerNorm -> re-parameterised BatchNorm, in both norms.
    make_norm = ((lambda: PRepBN(d, rngs=rngs, **dict(norm_options))) if norm == "prepbn"
                 else (lambda: Norm(d, norm, rngs=rngs)))
    self.norm_mixer = make_norm()
    self.mixer = make_mixer(mixer, spec, rngs=rngs)
    self.norm_mlp = make_norm() if mlp != "none" else None
    self.mlp = MLP(d, mlp_ratio * d, mlp, rngs=rngs, num_layers=spec.num_layers) if mlp != "none" else None

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    r_mix = r_mlp = None
    if ctx.dropout_rng is not None:
      r_mix, r_mlp = jax.random.split(ctx.dropout_rng)
    h_btd = self._norm(self.norm_mixer, x_btd, ctx)
    if ctx.prepare:
      self.mixer.prepare(h_btd, ctx)
    x_btd = x_btd + dropout(self.mixer(h_btd, ctx), self.dropout_rate, r_mix)
    if self.mlp is not None:
      x_btd = x_btd + dropout(self.mlp(self._norm(self.norm_mlp, x_btd, ctx)), self.dropout_rate, r_mlp)
    return axes.constrain(x_btd, axes.ACT_BTD)

  @staticmethod
  def _norm(norm, x_btd, ctx: MixContext) -> jax.Array:
    if isinstance(norm, PRepBN):  # batch statistics over real tokens; blend scheduled by the step
      return norm(x_btd, segment_ids=ctx.segment_ids, training=ctx.training, step=ctx.step)
    return norm(x_btd)
