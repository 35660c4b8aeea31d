"""Performer (FAVOR+): softmax attention through positive orthogonal random features (docs/papers.md#performer).

The softmax kernel exp(q.k / sqrt(d)) is estimated without bias by

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),   x = q / d^{1/4} (and k / d^{1/4}),

with W [m, d] whose rows are orthogonal within blocks of d (Gaussian blocks
orthogonalised by QR) and rescaled to the norms of independent Gaussian d-vectors
(chi_d), so each row is marginally N(0, I_d) as the estimator needs. Attention is then
the shared normalised linear attention (layers/linear/core.py) on phi(q), phi(k):
O(T m d) for the features plus O(T C m + T m d) for the scan.

W is one matrix per layer, shared by every head (as in the original Performer), and
never a trained parameter: it is recomputed inside each call from (`feature_seed`,
layer index, ctx.step // `redraw_every`) with `jax.random.fold_in`, so it is a pure
function of the training step (redrawn every `redraw_every` steps; 0 = never) and
identical after a resume. Decode states built at one step are only valid while the
features stay the same, i.e. generate at one fixed ctx.step (None means step 0: pass
the checkpoint's step when generating from a model trained with redraws).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear.linear import KernelAttention
from layers.mixer_base import MixContext, MixerSpec

# Causal keys get no data-dependent stabiliser (see `Performer.features`); their exponent
# w.x - |x|^2/2 = |w|^2/2 - |x - w|^2/2 is bounded by |w|^2/2 ~ chi^2_d / 2 (< 60 for
# head_dim <= 64 in practice). The cap only guards pathological keys of very large heads
# against fp32 overflow of the summed state (exp(60) * tokens stays finite).
KEY_EXPONENT_CAP = 60.0


def orthogonal_random_features(key: jax.Array, features: int, dim: int) -> jax.Array:
  """W [features, dim]: rows orthogonal within each block of `dim`, norms chi_dim distributed."""
  blocks = -(-features // dim)
  # One draw split in two (the blocks to orthogonalise, the vectors whose norms rescale
  # the rows): each random op costs about a second of XLA compile time on CPU.
  z = jax.random.normal(key, ((blocks * dim + features) * dim,), jnp.float32)
  g = z[:blocks * dim * dim].reshape(blocks, dim, dim)
  norms = jnp.linalg.norm(z[blocks * dim * dim:].reshape(features, dim), axis=-1)
  q, r = jnp.linalg.qr(g)  # q [blocks, dim, dim]: orthonormal columns
  # Fixing the signs of R's diagonal makes q Haar-distributed (QR alone is biased by its sign convention).
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(q, -1, -2).reshape(blocks * dim, dim)[:features]
  return rows * norms[:, None]


def feature_key(seed: int, layer_index: int, step, redraw_every: int) -> jax.Array:
  """The PRNG key of the features in force at `step` (traced int32 or None = 0)."""
  step = jnp.zeros((), jnp.int32) if step is None else jnp.asarray(step, jnp.int32)
  window = step // redraw_every if redraw_every > 0 else jnp.zeros((), jnp.int32)
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), layer_index), window)


def favor_exponents(x_btnh: jax.Array, w_fh: jax.Array) -> jax.Array:
  """w_f . x' - |x'|^2 / 2 with x' = x / d^{1/4}, in fp32; [B, T, N, F]."""
  d = x_btnh.shape[-1]
  x = x_btnh.astype(jnp.float32) * d ** -0.25
  # Full fp32 products: an error in the exponent is a relative error in the feature, and
  # accelerators' default matmul precision for fp32 (TF32 on NVIDIA) rounds to ~1e-3.
  proj = jnp.einsum("btnh,fh->btnf", x, w_fh, precision=jax.lax.Precision.HIGHEST)
  return proj - 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)


def favor_features(q_btnh, k_btnh, w_fh, valid_bt, *, causal: bool):
  """(phi(q), phi(k)) [B, T, N, m] with the numerical stabilisers, fp32."""
  valid = valid_bt[:, :, None, None]
  scale = 1.0 / math.sqrt(w_fh.shape[0])
  # Padding tokens get exponent 0 (the core zeroes them anyway): keeps exp finite there,
  # so the masked branch cannot turn gradients into inf * 0 = NaN.
  eq = jnp.where(valid, favor_exponents(q_btnh, w_fh), 0.0)
  ek = jnp.where(valid, favor_exponents(k_btnh, w_fh), 0.0)
  # Queries: a per-(token, head) constant cancels between numerator and denominator.
  eq = eq - jax.lax.stop_gradient(jnp.max(eq, axis=-1, keepdims=True))
  if causal:
    # Keys, causal: any shift must be one constant for every key a query sees, fixed
    # before the future is known and unchanged across decode calls; a max over the row
    # would read future tokens (and change as decoding appends keys). So no shift, only
    # the overflow cap described at KEY_EXPONENT_CAP.
    ek = jnp.minimum(ek, KEY_EXPONENT_CAP)
  else:
    # Keys, bidirectional: the max over the row's valid tokens and features, per batch row
    # and head (constant over every segment of the row, so it cancels per segment); under
    # a sequence-sharded layout XLA reduces it across devices. No gradient: it cancels.
    stab = jnp.max(jnp.where(valid, ek, -jnp.inf), axis=(1, 3), keepdims=True)
    ek = ek - jax.lax.stop_gradient(jnp.where(jnp.isfinite(stab), stab, 0.0))
  return jnp.exp(eq) * scale, jnp.exp(ek) * scale


class Performer(KernelAttention):
  """FAVOR+ linear attention (config group `model.performer`).

  Options: `features` (m, default 256), `redraw_every` (steps per feature draw, default
  1000; 0 = draw once), `feature_seed` (default 0), `chunk`, `eps` (as `linear`).
  Causal and bidirectional, packed segments, decode (causal), sequence-parallel "scan".
  """

  LAYER_INDEXED = True  # the random features are drawn per layer

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.num_features = int(spec.option("features", 256))
    self.redraw_every = int(spec.option("redraw_every", 1000))
    self.feature_seed = int(spec.option("feature_seed", 0))
    if self.num_features < 1:
      raise ValueError(f"model.performer.features={self.num_features} must be a positive number of random features")
    if self.redraw_every < 0:
      raise ValueError(f"model.performer.redraw_every={self.redraw_every} must be >= 0 (0 = never redraw)")

  def feature_count(self) -> int:
    return self.num_features

  def projection(self, step) -> jax.Array:
    """W [m, head_dim] in force at `step` (a constant of the step, not of any parameter)."""
    key = feature_key(self.feature_seed, self.spec.layer_index, step, self.redraw_every)
    return orthogonal_random_features(key, self.num_features, self.spec.head_dim)

  def features(self, q_btnh, k_btnh, ctx: MixContext):
    return favor_features(q_btnh, k_btnh, self.projection(ctx.step), ctx.segment_ids != 0, causal=self.spec.causal)
