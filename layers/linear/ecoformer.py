"""EcoFormer: attention through learned binary hash codes (docs/papers.md#ecoformer).

Per head, one shared query/key projection u = normalise(x W_qk) (unit rows) and values
v = x W_v. A token's code is

    h(u) = sign(A (kappa(u) - mu)) in {-1, +1}^b,   kappa_j(u) = exp(-|u - a_j|^2 / (2 sigma)),

with m anchors a_j, a centring mean mu [m], a projection A [b, m] and a bandwidth sigma,
all per head. Backward passes the gradient of sign straight through where |.| < 1
(zero elsewhere); anchors, A, mu and sigma get none.

Attention from codes, the positive-similarity ("sum_j") variant: with c = b + 1,

    s_ij = h_i . h_j + c  (>= 1),   out_i = sum_j s_ij v_j / sum_j s_ij,

i.e. the shared linear attention (layers/linear/core.py) with features
phi(u) = [h(u), sqrt(c)]: phi_i . phi_j = s_ij. This variant is chosen over the original
code's `num_i = h_i . sum_j h_j v_j + c v_i` (and `den_i = h_i . sum_j h_j + N c`)
because it is a genuine positive similarity (weights positive, rows summing to 1) and
a plain kernel: causal prefix sums, packed segments, decode and the sequence-parallel
scan come from the shared core unchanged, whereas the `c v_i` term is not of the
form phi(q_i) . phi(k_j) and its "N c" assumes every token sees N others.

sigma: the paper's code recomputes sigma per forward as the mean of |u - a_j|^2 over
the call's tokens and anchors. That makes a token's code depend on the other tokens
of the batch (future ones in causal mode) and change as decoding appends tokens. Here
sigma is fixed per layer and head when the hash is learned (the same mean, over the
fitting tokens), so codes are per-token functions: causal, packable and decodable.

The hash state (anchors, A, mu, sigma) is `HashState`, an nnx.Variable that is not a
Param (not trained; travels in checkpoints as extra state). It is initialised at
construction from the init rng, so deterministically per model seed: anchors uniform
on the unit sphere, A Gaussian, and sigma = 2, mu = the mean of kappa, the values a
fit gives for directions uniform on the sphere. The mixer is fully usable without ever
fitting (random kernelised hashing). `EcoFormer.fit_hash(x_btd, segment_ids)` refits
it from this mixer's inputs for one batch with `learn_hash` (kernel-based supervised
hashing, run once on the first training batch in the paper); whether and when to call
it is the trainer's choice.

Cost: O(T (m H + m b + b H)) time for codes and the scan (plus the causal chunk's
O(T C b)), O(T b + b H) memory beyond the projections.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers.linear.linear import KernelAttention
from layers.mixer_base import MixContext, MixerSpec


class HashState(nnx.Variable):
  """EcoFormer's hash (anchors, A, mu, sigma): fitted, never trained by gradients."""


@jax.custom_vjp
def sign_ste(z: jax.Array) -> jax.Array:
  """Exactly +-1 (z > 0 -> +1); gradient passed straight through where |z| < 1."""
  return jnp.where(z > 0, 1.0, -1.0).astype(z.dtype)


def _sign_ste_fwd(z):
  return sign_ste(z), z


def _sign_ste_bwd(z, g):
  return (jnp.where(jnp.abs(z) < 1.0, g, 0.0),)


sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


def binarize(z: jax.Array) -> jax.Array:
  return jnp.where(z > 0, 1.0, -1.0)


def l2_normalize(u: jax.Array) -> jax.Array:
  u = u.astype(jnp.float32)
  # The epsilon keeps all-zero rows (padding) finite in value and gradient.
  return u * jax.lax.rsqrt(jnp.sum(jnp.square(u), axis=-1, keepdims=True) + 1e-12)


def hash_logits(u_btnh, anchors_nmh, proj_nbm, mean_nm, sigma_n) -> jax.Array:
  """A (kappa(u) - mu) per head, [B, T, N, b] (fp32; the hash state gets no gradient)."""
  sg = jax.lax.stop_gradient
  anchors, proj, mean, sigma = sg(anchors_nmh), sg(proj_nbm), sg(mean_nm), sg(sigma_n)
  u = u_btnh.astype(jnp.float32)
  d2 = (jnp.sum(jnp.square(u), axis=-1, keepdims=True) - 2.0 * jnp.einsum("btnh,nmh->btnm", u, anchors)
        + jnp.sum(jnp.square(anchors), axis=-1))
  kappa = jnp.exp(-jnp.maximum(d2, 0.0) / (2.0 * sigma[:, None]))
  return jnp.einsum("btnm,nrm->btnr", kappa - mean, proj)


def similarity_targets(u_nh: jax.Array, valid_n: jax.Array, topk: int) -> jax.Array:
  """S0 [n, n]: +1 for each valid token's top-k most cosine-similar valid tokens, -1 for the
  top-k least similar (written second, so it wins on overlap), 0 elsewhere and on padding."""
  n = u_nh.shape[0]
  k = min(topk, n)
  cos = u_nh @ u_nh.T
  rows = jnp.arange(n)[:, None]
  _, most = jax.lax.top_k(jnp.where(valid_n[None, :], cos, -jnp.inf), k)
  _, least = jax.lax.top_k(jnp.where(valid_n[None, :], -cos, -jnp.inf), k)
  s0 = jnp.zeros((n, n), jnp.float32).at[rows, most].set(1.0).at[rows, least].set(-1.0)
  pair = valid_n[:, None] & valid_n[None, :]
  return jnp.where(pair, s0, 0.0)


def learn_hash(u_tokens: jax.Array, key: jax.Array, *, valid: jax.Array | None = None, anchors: int = 25,
               bits: int = 16, topk: int = 10, iters: int = 100, lr: float = 5e-4, momentum: float = 0.9,
               a_init: jax.Array | None = None):
  """Kernel-based supervised hashing for one head; returns (anchors [m, H], A [b, m], mu [m], sigma []).

  `u_tokens` [n, H] are unit-norm tokens (`valid` [n] marks real ones; padding is
  ignored). Anchors: m distinct random valid tokens. sigma: mean squared distance of
  tokens to anchors. mu: mean kernel vector. Targets S = b * S0 (`similarity_targets`).
  Bits are fitted greedily: bit r starts from row r of `a_init` (default: Gaussian from
  `key`), runs `iters` steps of Nesterov-momentum SGD on the relaxed objective with
  y = 2 sigmoid(kappa~ a) - 1, keeps the result only if the binarised objective
  improved, then deflates S <- S - y y^T with the kept binary code.
  """
  u = u_tokens.astype(jnp.float32)
  n, _ = u.shape
  valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
  if anchors > n:
    raise ValueError(f"learn_hash needs at least anchors={anchors} tokens, got {n}")
  k_anchor, k_proj = jax.random.split(key)
  # m distinct valid tokens, uniformly: Gumbel top-k with padding excluded.
  scores = jnp.where(valid, jax.random.gumbel(k_anchor, (n,)), -jnp.inf)
  anchor_h = u[jax.lax.top_k(scores, anchors)[1]]
  w = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w), 1.0)
  d2 = jnp.maximum(jnp.sum(u * u, -1, keepdims=True) - 2.0 * u @ anchor_h.T + jnp.sum(anchor_h ** 2, -1), 0.0)
  sigma = jnp.sum(d2 * w[:, None]) / (count * anchors)
  kappa = jnp.exp(-d2 / (2.0 * sigma))
  mu = jnp.sum(kappa * w[:, None], axis=0) / count
  kt = (kappa - mu) * w[:, None]  # padding rows: zero logits, and y is masked below
  s = bits * similarity_targets(u, valid, topk)
  if a_init is None:  # drawn flat: N-d random shapes cost XLA far more compile time
    a0 = jax.random.normal(k_proj, (bits * anchors,), jnp.float32).reshape(bits, anchors)
  else:
    a0 = a_init.astype(jnp.float32)
  scale = 1.0 / (count * bits)

  def relaxed(a, s):
    y = 2.0 * jax.nn.sigmoid(kt @ a) - 1.0
    return -(y @ s @ y) * scale

  def binary(a, s):
    y = binarize(kt @ a) * w
    return -(y @ s @ y) * scale, y

  def fit_bit(s, a_start):
    def sgd(_, carry):  # PyTorch's Nesterov SGD: buf = mu buf + g; a -= lr (g + mu buf)
      a, buf = carry
      g = jax.grad(relaxed)(a, s)
      buf = momentum * buf + g
      return a - lr * (g + momentum * buf), buf

    a_opt, _ = jax.lax.fori_loop(0, iters, sgd, (a_start, jnp.zeros_like(a_start)))
    loss_start, y_start = binary(a_start, s)
    loss_opt, y_opt = binary(a_opt, s)
    better = loss_opt < loss_start
    a = jnp.where(better, a_opt, a_start)
    y = jnp.where(better, y_opt, y_start)
    return s - jnp.outer(y, y), a

  _, proj = jax.lax.scan(fit_bit, s, a0)
  return anchor_h, proj, mu, sigma


class EcoFormer(KernelAttention):
  """Kernelised hashing attention (config group `model.ecoformer`).

  Options: `anchors` (m, default 25), `bits` (b, default 16), `hash_topk` (10),
  `hash_iters` (100), `hash_lr` (5e-4), `hash_momentum` (0.9), `hash_tokens` (1024),
  `hash_seed` (0), `chunk`, `eps` (as `linear`). Causal and bidirectional, packed
  segments, decode (causal), sequence-parallel "scan".
  """

  LAYER_INDEXED = True  # the hash functions are seeded per layer

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    del self.key  # one shared query/key projection (`query`) instead
    self.num_anchors = int(spec.option("anchors", 25))
    self.bits = int(spec.option("bits", 16))
    self.hash_topk = int(spec.option("hash_topk", 10))
    self.hash_iters = int(spec.option("hash_iters", 100))
    self.hash_lr = float(spec.option("hash_lr", 5e-4))
    self.hash_momentum = float(spec.option("hash_momentum", 0.9))
    self.hash_tokens = int(spec.option("hash_tokens", 1024))
    self.hash_seed = int(spec.option("hash_seed", 0))
    for name, value in (("anchors", self.num_anchors), ("bits", self.bits), ("hash_topk", self.hash_topk),
                        ("hash_tokens", self.hash_tokens)):
      if value < 1:
        raise ValueError(f"model.ecoformer.{name}={value} must be >= 1")
    if self.hash_tokens < self.num_anchors:
      raise ValueError(f"model.ecoformer.hash_tokens={self.hash_tokens} must be >= anchors={self.num_anchors}")
    n, m, b, h = spec.num_heads, self.num_anchors, self.bits, spec.head_dim
    # One flat draw split in two (N-d random shapes cost XLA far more compile time).
    z = jax.random.normal(rngs.params(), (n * m * (h + b),), jnp.float32)
    anchors = l2_normalize(z[:n * m * h].reshape(n, m, h))
    proj = z[n * m * h:].reshape(n, b, m)
    # For u and a independent and uniform on the sphere, |u - a|^2 = 2 - 2 u.a has mean 2,
    # and E exp(u.a / 2) = 1 + 1/(8h) + O(h^-2): the sigma and mu a fit on such data gives.
    sigma = jnp.full((n,), 2.0, jnp.float32)
    mean = jnp.full((n, m), math.exp(-0.5) * (1.0 + 1.0 / (8.0 * h)), jnp.float32)
    head = (axes.HEADS,)
    self.hash_anchors = HashState(anchors, logical_axes=head + (None, None))
    self.hash_proj = HashState(proj, logical_axes=head + (None, None))
    self.hash_mean = HashState(mean, logical_axes=head + (None,))
    self.hash_sigma = HashState(sigma, logical_axes=head)

  def feature_count(self) -> int:
    return self.bits + 1

  def shared_projection(self, x_btd) -> jax.Array:
    """u [B, T, N, H]: the shared query/key projection, unit rows per head (fp32)."""
    return l2_normalize(self.query(x_btd))

  def projections(self, x_btd):
    u = self.shared_projection(x_btd)
    return u, u, self.value(x_btd)

  def codes(self, u_btnh) -> jax.Array:
    """h(u) in {-1, +1}^b per head, [B, T, N, b], straight-through gradient."""
    return sign_ste(hash_logits(u_btnh, self.hash_anchors[...], self.hash_proj[...], self.hash_mean[...],
                                self.hash_sigma[...]))

  def features(self, q_btnh, k_btnh, ctx: MixContext):
    del k_btnh  # the same tokens as q (shared projection)
    h = self.codes(q_btnh)
    const = jnp.full(h.shape[:-1] + (1,), math.sqrt(self.bits + 1.0), h.dtype)
    phi = jnp.concatenate([h, const], axis=-1)  # phi_i . phi_j = h_i . h_j + (b + 1)
    return phi, phi

  def prepare(self, x_btd: jax.Array, ctx: MixContext) -> None:
    """Learns the hash on the first training batch of a fresh run (the trainer calls this)."""
    b, t, _ = x_btd.shape
    if min(self.hash_tokens, b * t) >= self.num_anchors:  # too few tokens: keep the random hash
      self.fit_hash(x_btd, ctx.segment_ids)

  def fit_hash(self, x_btd: jax.Array, segment_ids: jax.Array | None = None, key: jax.Array | None = None) -> None:
    """Refits anchors, A, mu, sigma of every head from the mixer inputs of one batch.

    Uses up to `hash_tokens` tokens drawn at random from the valid (segment id != 0)
    ones; `key` defaults to one derived from (`hash_seed`, layer index). Jit-compatible
    (wrap in nnx.jit); needs at least `anchors` valid tokens.
    """
    b, t, _ = x_btd.shape
    n_tok = min(self.hash_tokens, b * t)
    if n_tok < self.num_anchors:
      raise ValueError(f"fit_hash needs at least anchors={self.num_anchors} tokens, got a batch of {b}x{t}")
    if key is None:
      key = jax.random.fold_in(jax.random.key(self.hash_seed), self.spec.layer_index)
    valid = jnp.ones((b * t,), bool) if segment_ids is None else (segment_ids != 0).reshape(b * t)
    u = jax.lax.stop_gradient(self.shared_projection(x_btd)).reshape(b * t, self.spec.num_heads, -1)
    k_pick, k_fit = jax.random.split(key)
    # Sample valid tokens first (Gumbel top-k); padding is picked only if too few are valid.
    pick = jax.lax.top_k(jax.random.gumbel(k_pick, (b * t,)) + jnp.where(valid, 0.0, -1e9), n_tok)[1]
    u, valid = u[pick], valid[pick]
    fit = lambda u_nh, k: learn_hash(u_nh, k, valid=valid, anchors=self.num_anchors, bits=self.bits,
                                     topk=self.hash_topk, iters=self.hash_iters, lr=self.hash_lr,
                                     momentum=self.hash_momentum)
    keys = jax.random.split(k_fit, self.spec.num_heads)
    anchors, proj, mean, sigma = jax.vmap(fit, in_axes=(1, 0))(u, keys)
    self.hash_anchors[...] = anchors
    self.hash_proj[...] = proj
    self.hash_mean[...] = mean
    self.hash_sigma[...] = sigma
