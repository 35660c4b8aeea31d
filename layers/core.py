"""Building blocks shared by every mixer and head: dense maps, embeddings, norms, MLPs.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (names from
`layers.axes`), which `parallel.mesh` turns into shardings. Parameters are stored in
fp32; computation runs in the dtype the caller passes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes


def param(rngs: nnx.Rngs, init, shape: Sequence[int], logical_axes: Sequence[str | None], *,
          weight_decay: bool = True) -> nnx.Param:
  """A parameter with its logical axes. `weight_decay=False` exempts it from AdamW's decay
  whatever its rank (e.g. Mamba's A_log, Swin's relative position bias): the optimizer's
  default decays matrices only (trainer.optim.decay_mask)."""
  if len(shape) != len(logical_axes):
    raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
  meta = {} if weight_decay else {"weight_decay": False}
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), logical_axes=tuple(logical_axes), **meta)


def _metadata(variable) -> dict:
  return variable.get_metadata() if hasattr(variable, "get_metadata") else {}


def logical_axes_of(variable) -> tuple | None:
  return _metadata(variable).get("logical_axes")


def weight_decay_of(variable) -> bool:
  """False where the parameter was declared `weight_decay=False`."""
  return bool(_metadata(variable).get("weight_decay", True))


class Dense(nnx.Module):
  """y = x @ W (+ b) over the trailing `in_shape` dims, producing `out_shape` dims.

  A multi-dimensional kernel (e.g. [D, N, H] for a query projection) keeps head axes
  explicit so tensor parallelism can split them without reshapes.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, in_axes: Sequence[str | None],
               out_axes: Sequence[str | None], rngs: nnx.Rngs, use_bias: bool = False, init_scale: float = 1.0):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    fan_in = math.prod(self.in_shape)
    init = jax.nn.initializers.normal(init_scale / math.sqrt(fan_in))
    self.kernel = param(rngs, init, self.in_shape + self.out_shape, tuple(in_axes) + tuple(out_axes))
    self.bias = param(rngs, jax.nn.initializers.zeros, self.out_shape, out_axes) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    letters = "abcdefghijklmnopqrstuvw"
    batch = letters[: x.ndim - n_in]
    ins = letters[x.ndim - n_in: x.ndim]
    outs = "xyz"[: len(self.out_shape)]
    kernel = self.kernel[...].astype(x.dtype)
    y = jnp.einsum(f"{batch}{ins},{ins}{outs}->{batch}{outs}", x, kernel)
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding [V, D]; `attend` gives logits against the same table (tied head)."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs):
    self.embedding = param(rngs, jax.nn.initializers.normal(1.0), (vocab_size, d_model), (axes.VOCAB, axes.EMBED))

  def __call__(self, ids_bt: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.embedding[...], ids_bt, axis=0).astype(dtype)

  def attend(self, x_btd: jax.Array) -> jax.Array:
    # Rows have unit variance (good inputs for pre-norm blocks); 1/sqrt(D) keeps the
    # tied logits O(1) at initialisation.
    d = self.embedding.shape[-1]
    return jnp.einsum("btd,vd->btv", x_btd, self.embedding[...].astype(x_btd.dtype)) / jnp.sqrt(d).astype(x_btd.dtype)


class Norm(nnx.Module):
  """RMSNorm or LayerNorm, statistics in fp32."""

  def __init__(self, d_model: int, kind: str, *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.kind, self.eps = kind, eps
    self.scale = param(rngs, jax.nn.initializers.ones, (d_model,), (axes.EMBED,))
    self.bias = param(rngs, jax.nn.initializers.zeros, (d_model,), (axes.EMBED,)) if kind == "layernorm" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


class MLP(nnx.Module):
  """Position-wise MLP: column-parallel in ([D, F] split over F), row-parallel out."""

  def __init__(self, d_model: int, hidden: int, kind: str, *, rngs: nnx.Rngs, num_layers: int = 1):
    self.kind = kind
    self.up = Dense((d_model,), (hidden,), in_axes=(axes.EMBED,), out_axes=(axes.MLP,), rngs=rngs)
    self.gate = (Dense((d_model,), (hidden,), in_axes=(axes.EMBED,), out_axes=(axes.MLP,), rngs=rngs)
                 if kind == "swiglu" else None)
    # Residual-branch outputs scaled down with depth (GPT-2 style) for stable early training.
    self.down = Dense((hidden,), (d_model,), in_axes=(axes.MLP,), out_axes=(axes.EMBED,), rngs=rngs,
                      init_scale=1.0 / math.sqrt(2 * num_layers))

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    h = self.up(x_btd)
    h = jax.nn.silu(self.gate(x_btd)) * h if self.gate is not None else jax.nn.gelu(h)
    return self.down(h)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `rng` is None (evaluation) or rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
