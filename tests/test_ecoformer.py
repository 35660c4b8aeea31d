"""EcoFormer (layers/linear/ecoformer.py).

References: the hash written out in numpy (float64); the explicit T x T code-similarity
form sum_j (h_i.h_j + b + 1) v_j / sum_j (h_i.h_j + b + 1) over the visible keys, for
the mixer's values and gradients (padding, packed segments, causal and bidirectional);
permutation equivariance; the attention weights read off with one-hot values; the
hash-learning objective against the random projection it starts from; prefill + decode
against the full forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.linear.core import linear_attention
from layers.linear.ecoformer import (EcoFormer, HashState, binarize, l2_normalize, learn_hash, sign_ste,
                                     similarity_targets)
from layers.mixer_base import MixContext, MixerSpec


def _spec(causal, **options):
  return MixerSpec(d_model=16, num_heads=2, num_kv_heads=2, causal=causal, positions="none", layer_index=0,
                   num_layers=2, max_len=64, options=tuple(sorted(options.items())))


def _ctx(seg, decode=False):
  return MixContext(segment_ids=seg, positions=jnp.zeros_like(seg), decode=decode)


def _segments(b, t):
  """Row 0: two packed examples then padding; row 1: one example, short padding."""
  seg = np.ones((b, t), np.int32)
  seg[0, 10:] = 2
  seg[0, t - 4:] = 0
  seg[1, t - 2:] = 0
  return jnp.asarray(seg)


def numpy_codes(mixer, x):
  """sign(A (exp(-|u - a|^2 / (2 sigma)) - mu)) per head, float64, from the stored state."""
  wq = np.asarray(mixer.query.kernel[...], np.float64)
  u = np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), wq)
  u = u / np.linalg.norm(u, axis=-1, keepdims=True)
  a, proj = np.asarray(mixer.hash_anchors[...], np.float64), np.asarray(mixer.hash_proj[...], np.float64)
  mu, sigma = np.asarray(mixer.hash_mean[...], np.float64), np.asarray(mixer.hash_sigma[...], np.float64)
  d2 = np.sum((u[:, :, :, None, :] - a[None, None]) ** 2, axis=-1)  # [B, T, N, m]
  z = np.einsum("btnm,nrm->btnr", np.exp(-d2 / (2 * sigma[:, None])) - mu, proj)
  return np.where(z > 0, 1.0, -1.0), z


def quadratic_reference(mixer, x, seg, causal):
  """out_i = sum_j s_ij v_j / sum_j s_ij, s_ij = h_i.h_j + b + 1 over i's visible keys (T x T)."""
  h = mixer.codes(mixer.shared_projection(x))  # [B, T, N, b]
  v = mixer.value(x)
  t, bits = seg.shape[1], h.shape[-1]
  s = jnp.einsum("binr,bjnr->bnij", h, h) + (bits + 1.0)
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if causal:
    mask &= jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  s = s * mask[:, None]
  o = jnp.einsum("bnij,bjnh->binh", s, v) / jnp.maximum(jnp.sum(s, -1), 1.0).transpose(0, 2, 1)[..., None]
  return mixer.out(jnp.where((seg != 0)[:, :, None, None], o, 0.0))


def test_codes_are_exactly_plus_minus_one_and_match_numpy():
  mixer = EcoFormer(_spec(True), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 19, 16))
  h = np.asarray(nnx.jit(lambda m, x: m.codes(m.shared_projection(x)))(mixer, x))
  assert h.shape == (2, 19, 2, 16)
  assert set(np.unique(h)) == {-1.0, 1.0}
  want, z = numpy_codes(mixer, x)
  clear = np.abs(z) > 1e-4  # away from the sign boundary, where fp32 and fp64 may disagree
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(h[clear], want[clear])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_form_equals_explicit_code_similarity_form(causal):
  mixer = EcoFormer(_spec(causal, chunk=4), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 23, 16))
  seg = _segments(2, 23)
  graph, params, rest = nnx.split(mixer, nnx.Param, ...)

  def loss(fn):
    def f(p, x):
      y = fn(nnx.merge(graph, p, rest), x)
      return jnp.sum(jnp.sin(3.0 * y)), y
    return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))

  g_got, got = loss(lambda m, x: m(x, _ctx(seg)))(params, x)
  g_want, want = loss(lambda m, x: quadratic_reference(m, x, seg, causal))(params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[np.asarray(seg) == 0] == 0)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(g_got[0]["query"]["kernel"])).max() > 0  # the codes pass gradient to W_qk


def test_permutation_equivariance_bidirectional():
  mixer = EcoFormer(_spec(False), rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 17, 16))
  seg = jnp.ones((2, 17), jnp.int32)
  perm = np.random.default_rng(0).permutation(17)
  f = nnx.jit(lambda m, x: m(x, _ctx(seg)))
  y, y_perm = f(mixer, x), f(mixer, x[:, perm])
  np.testing.assert_allclose(y_perm, y[:, perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_weights_are_positive_and_rows_sum_to_one(causal):
  """One-hot values read the weights off the core: out_i = sum_j w_ij e_j."""
  mixer = EcoFormer(_spec(causal, chunk=4), rngs=nnx.Rngs(5))
  x = jax.random.normal(jax.random.key(6), (2, 21, 16))
  seg = _segments(2, 21)
  eye = jnp.broadcast_to(jnp.eye(21)[None, :, None, :], (2, 21, 2, 21))

  @nnx.jit
  def weights(m, x):
    u = m.shared_projection(x)
    phi_q, phi_k = m.features(u, u, _ctx(seg))
    return linear_attention(phi_q, phi_k, eye, seg, causal=causal, chunk=4)[0]

  w = np.asarray(weights(mixer, x))  # [B, T(i), N, T(j)]
  s = np.asarray(seg)
  vis = (s[:, :, None] == s[:, None, :]) & (s[:, :, None] != 0)
  if causal:
    vis &= np.tril(np.ones((21, 21), bool))[None]
  vis = np.broadcast_to(vis[:, :, None, :], w.shape)
  bits = mixer.bits
  assert np.all(w[vis] >= 1.0 / (21 * (2 * bits + 1)))  # s_ij >= 1 and <= 2b + 1
  np.testing.assert_array_equal(w[~vis], 0.0)
  sums = w.sum(-1)[s != 0]
  np.testing.assert_allclose(sums, 1.0, rtol=1e-5)


def test_learn_hash_improves_the_binarised_objective_over_its_random_start():
  r = np.random.default_rng(0)
  n, h, bits, m = 96, 8, 8, 12
  centers = r.normal(size=(6, h))
  u = l2_normalize(jnp.asarray(centers[r.integers(0, 6, n)] + 0.3 * r.normal(size=(n, h)), jnp.float32))
  valid = jnp.asarray(np.arange(n) < 90)  # 6 padding tokens, ignored
  a0 = jax.random.normal(jax.random.key(5), (bits, m))

  def residual(anchors, proj, mu, sigma):
    """||Y Y^T - b S0||^2 over valid pairs: what the greedy deflated per-bit losses sum to."""
    d2 = jnp.sum((u[:, None] - anchors[None]) ** 2, -1)
    y = binarize((jnp.exp(-d2 / (2 * sigma)) - mu) @ proj.T)
    s0 = similarity_targets(u, valid, 10)
    pair = valid[:, None] & valid[None]
    return float(jnp.sum(jnp.where(pair, y @ y.T - bits * (s0 + s0.T) / 2, 0.0) ** 2))

  fit = jax.jit(lambda a, lr: learn_hash(u, jax.random.key(1), valid=valid, anchors=m, bits=bits, lr=lr,
                                         a_init=a))
  anchors, proj, mu, sigma = fit(a0, 5e-4)  # the paper's settings
  assert bool(jnp.all(valid[jnp.argmax((u @ anchors.T), axis=0)]))  # anchors are valid tokens
  np.testing.assert_allclose(jnp.linalg.norm(anchors, axis=-1), 1.0, rtol=1e-5)
  d2 = jnp.sum((u[:90, None] - anchors[None]) ** 2, -1)
  np.testing.assert_allclose(sigma, jnp.mean(d2), rtol=1e-5)
  np.testing.assert_allclose(mu, jnp.mean(jnp.exp(-d2 / (2 * sigma)), 0), rtol=1e-5)
  start, learned = residual(anchors, a0, mu, sigma), residual(anchors, proj, mu, sigma)
  assert learned < 0.97 * start, (learned, start)
  stronger = residual(*fit(a0, 5e-2))
  assert stronger < 0.8 * start, (stronger, start)


def test_straight_through_gradient_is_finite_and_passes_only_inside_the_unit_interval():
  z = jnp.asarray([-3.0, -0.7, -0.1, 0.0, 0.2, 0.99, 1.5])
  w = jnp.arange(1.0, 8.0)
  np.testing.assert_array_equal(sign_ste(z), [-1, -1, -1, -1, 1, 1, 1])
  g = jax.grad(lambda z: jnp.sum(w * sign_ste(z)))(z)
  np.testing.assert_array_equal(g, [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0])
  mixer = EcoFormer(_spec(True), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(7), (1, 9, 16))
  x = x.at[0, 7:].set(0.0)  # zero rows (as padding often is) must not give NaN gradients
  g = np.asarray(jax.grad(lambda x: jnp.sum(mixer.codes(mixer.shared_projection(x)) * jnp.arange(16.0)))(x))
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_prefill_then_decode_equals_full_forward_with_packed_segments():
  mixer = EcoFormer(_spec(True, chunk=4), rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 13, 16))
  seg = jnp.asarray([[1] * 6 + [2] * 7, [1] * 11 + [0] * 2], jnp.int32)
  full = nnx.jit(lambda m, x: m(x, _ctx(seg)))(mixer, x)
  mixer.init_cache(2, 13, jnp.float32)
  assert mixer.cached_kv.shape == (2, 2, 17, 9)  # F = b + 1 features, H + 1 columns
  call = nnx.jit(lambda m, x, s: m(x, _ctx(s, decode=True)))
  outs = [call(mixer, x[:, :5], seg[:, :5])]
  outs += [call(mixer, x[:, i:i + 1], seg[:, i:i + 1]) for i in range(5, 13)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_fit_hash_refits_the_state_deterministically():
  mixer = EcoFormer(_spec(True, anchors=6, bits=4, hash_iters=3, hash_tokens=40), rngs=nnx.Rngs(0))
  twin = EcoFormer(_spec(True, anchors=6, bits=4, hash_iters=3, hash_tokens=40), rngs=nnx.Rngs(0))
  state = lambda m: [np.asarray(v) for v in jax.tree.leaves(nnx.state(m, HashState))]
  before = state(mixer)
  assert len(before) == 4 and "hash_proj" not in nnx.state(mixer, nnx.Param)  # not parameters
  x = jax.random.normal(jax.random.key(8), (2, 25, 16))
  seg = _segments(2, 25)
  fit = nnx.jit(lambda m, x: m.fit_hash(x, seg))
  fit(mixer, x)
  fit(twin, x)
  after = state(mixer)
  assert all(not np.array_equal(a, b) for a, b in zip(before, after))
  for a, b in zip(after, state(twin)):
    np.testing.assert_array_equal(a, b)
  # anchors are valid tokens of the batch (unit rows of the shared projection)
  u = np.asarray(mixer.shared_projection(x))[np.asarray(seg) != 0]  # [tokens, N, H]
  anchors = np.asarray(mixer.hash_anchors[...])
  for head in range(2):
    dist = np.abs(anchors[head][:, None, :] - u[None, :, head, :]).max(-1).min(-1)
    np.testing.assert_allclose(dist, 0.0, atol=1e-6)
  y = nnx.jit(lambda m, x: m(x, _ctx(seg)))(mixer, x)
  assert np.all(np.isfinite(np.asarray(y)))


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="bits=0"):
    EcoFormer(_spec(True, bits=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="hash_tokens=4"):
    EcoFormer(_spec(True, hash_tokens=4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="bidirectional"):
    EcoFormer(_spec(False), rngs=nnx.Rngs(0)).init_cache(1, 8, jnp.float32)
