"""The MetaFormer block: pre-norm -> token mixer -> residual -> pre-norm -> MLP -> residual."""

from __future__ import annotations

import jax
from flax import nnx

from layers import axes
from layers.core import MLP, Norm, dropout
from layers.mixers import MixContext, MixerSpec, make_mixer


class Block(nnx.Module):

  def __init__(self, mixer: str, spec: MixerSpec, *, norm: str, mlp: str, mlp_ratio: int, dropout_rate: float,
               rngs: nnx.Rngs):
    d = spec.d_model
    self.dropout_rate = dropout_rate
    self.norm_mixer = Norm(d, norm, rngs=rngs)
    self.mixer = make_mixer(mixer, spec, rngs=rngs)
    self.norm_mlp = Norm(d, norm, rngs=rngs)
    self.mlp = MLP(d, mlp_ratio * d, mlp, rngs=rngs, num_layers=spec.num_layers)

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    r_mix = r_mlp = None
    if ctx.dropout_rng is not None:
      r_mix, r_mlp = jax.random.split(ctx.dropout_rng)
    x_btd = x_btd + dropout(self.mixer(self.norm_mixer(x_btd), ctx), self.dropout_rate, r_mix)
    x_btd = x_btd + dropout(self.mlp(self.norm_mlp(x_btd)), self.dropout_rate, r_mlp)
    return axes.constrain(x_btd, axes.ACT_BTD)
