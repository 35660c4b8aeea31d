"""Performer (FAVOR+, layers/linear/performer.py).

References: exact softmax attention (kernels.reference.reference_attention) for the
approximation trend; the naive masked linear form (core.reference_linear_attention) on
FAVOR+ features written out plainly here, without any stabiliser, for the mixer's
wiring (values and gradients); the unbiasedness of the kernel estimate; the feature
schedule; prefill + decode against the full forward.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from kernels.reference import make_mask, reference_attention
from layers.linear.core import reference_linear_attention
from layers.linear.performer import Performer, orthogonal_random_features
from layers.mixer_base import MixContext, MixerSpec, use_sequence_parallel
from parallel.sequence import SequenceParallel
from parallel import mesh as mesh_lib


def _spec(causal, d_model=16, heads=2, layer_index=0, **options):
  return MixerSpec(d_model=d_model, num_heads=heads, num_kv_heads=heads, causal=causal, positions="none",
                   layer_index=layer_index, num_layers=2, max_len=64, options=tuple(sorted(options.items())))


def _segments(b, t):
  """Row 0: two packed examples then padding; row 1: one example, short padding."""
  seg = np.ones((b, t), np.int32)
  seg[0, 12:] = 2
  seg[0, t - 4:] = 0
  seg[1, t - 2:] = 0
  return jnp.asarray(seg)


def _ctx(seg, step=None, decode=False):
  return MixContext(segment_ids=seg, positions=jnp.zeros_like(seg), step=step, decode=decode)


def plain_favor(x_btnh, w_fh):
  """exp(W x' - |x'|^2/2) / sqrt(m), x' = x / d^{1/4}: no stabiliser, no masking."""
  d, m = x_btnh.shape[-1], w_fh.shape[0]
  x = x_btnh / d ** 0.25
  return jnp.exp(jnp.einsum("btnh,fh->btnf", x, w_fh) - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / math.sqrt(m)


def test_error_to_exact_softmax_attention_shrinks_as_features_grow():
  """Bidirectional and causal; mean abs error over 6 feature draws for m = 16 ... 1024."""
  b, t, n, h = 2, 29, 2, 16
  r = np.random.default_rng(0)
  q, k = (jnp.asarray(r.normal(size=(b, t, n, h)) * 0.5, jnp.float32) for _ in range(2))
  v = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
  seg = _segments(b, t)
  idx = jnp.broadcast_to(jnp.arange(t), seg.shape)
  modes = (False, True)
  exact = [reference_attention(q, k, v, make_mask(seg, seg, idx, idx, causal)) for causal in modes]
  sizes = (16, 64, 256, 1024)
  errs = np.zeros((len(modes), len(sizes)))
  for j, m in enumerate(sizes):
    mixers = [Performer(_spec(c, d_model=n * h, features=m, redraw_every=1), rngs=nnx.Rngs(0)) for c in modes]

    @jax.jit
    def err(step):
      out = []
      for mixer, causal, want in zip(mixers, modes, exact):
        phi_q, phi_k = mixer.features(q, k, _ctx(seg, step))
        got = reference_linear_attention(phi_q, phi_k, v, seg, causal=causal)
        out.append(jnp.mean(jnp.abs(got - want)))
      return jnp.stack(out)

    # redraw_every=1: each step is an independent draw of the features
    errs[:, j] = np.mean([np.asarray(err(jnp.int32(s))) for s in range(6)], axis=0)
  for i, causal in enumerate(modes):
    scale = float(jnp.mean(jnp.abs(exact[i])))
    for small, large in zip(errs[i, :-1], errs[i, 1:]):
      assert large < 0.8 * small, f"causal={causal}: errors by m={sizes}: {errs[i]}"
    assert errs[i, -1] < 0.15 * scale, f"causal={causal}: m=1024 error {errs[i, -1]:.3g}, mean |out| {scale:.3g}"


def test_kernel_estimate_is_unbiased_and_features_are_orthogonal():
  d, m = 8, 65532  # the last block has 4 rows
  w = np.asarray(jax.jit(lambda key: orthogonal_random_features(key, m, d))(jax.random.key(3)))
  for block in (slice(0, 8), slice(8, 16), slice(m - 4, m)):
    g = w[block] @ w[block].T
    np.testing.assert_allclose(g - np.diag(np.diag(g)), 0.0, atol=1e-4)
  norms2 = np.sum(w ** 2, 1)
  np.testing.assert_allclose([norms2.mean(), norms2.var()], [d, 2 * d], rtol=0.05)  # chi^2_d: mean d, var 2d
  r = np.random.default_rng(1)
  x, y = (jnp.asarray(r.normal(size=(1, 5, 1, d)) * 0.5, jnp.float32) for _ in range(2))
  exact = np.asarray(jnp.exp(jnp.einsum("btnh,bsnh->ts", x, y) / math.sqrt(d)))
  est = np.asarray(jnp.einsum("btnf,bsnf->ts", plain_favor(x, w), plain_favor(y, w)))
  rel = np.abs(est / exact - 1.0)
  assert rel.mean() < 0.01 and rel.max() < 0.05, f"relative error mean {rel.mean():.3g} max {rel.max():.3g}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mixer_equals_naive_linear_attention_on_its_features(causal):
  # The reference features have no stabilisers; those cancel exactly except against eps, so eps ~ 0.
  mixer = Performer(_spec(causal, features=24, chunk=4, redraw_every=100, eps=1e-12), rngs=nnx.Rngs(0))
  r = np.random.default_rng(5)
  x = jnp.asarray(r.normal(size=(2, 23, 16)), jnp.float32)
  seg = _segments(2, 23)
  step = jnp.int32(1234)
  # The schedule, restated: key(feature_seed=0) -> fold in layer 0 -> fold in window 1234 // 100.
  w = orthogonal_random_features(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 12), 24, 8)

  def ref(m, x):
    q, k, v = m.query(x), m.key(x), m.value(x)
    phi_q, phi_k = plain_favor(q, w), plain_favor(k, w)
    return m.out(reference_linear_attention(phi_q, phi_k, v, seg, causal=causal, eps=1e-12))

  graph, params = nnx.split(mixer, nnx.Param)

  def loss(fn):
    def f(p, x):
      y = fn(nnx.merge(graph, p), x)
      return jnp.sum(jnp.sin(3.0 * y)), y
    return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))

  g_got, got = loss(lambda m, x: m(x, _ctx(seg, step)))(params, x)
  g_want, want = loss(ref)(params, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  assert np.abs(np.asarray(jax.tree.leaves(g_got)[0])).max() > 0


def test_features_follow_the_redraw_schedule():
  m = Performer(_spec(True, features=12, redraw_every=1000, feature_seed=7), rngs=nnx.Rngs(0))
  w = jax.jit(m.projection)
  same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(m.projection(None), w(jnp.int32(0)), rtol=1e-5, atol=1e-6)  # None is step 0
  assert same(w(jnp.int32(0)), w(jnp.int32(999)))  # one window
  assert same(w(jnp.int32(1000)), w(jnp.int32(1999)))
  assert not same(w(jnp.int32(999)), w(jnp.int32(1000)))  # next window
  assert not same(w(jnp.int32(1000)), w(jnp.int32(2000)))
  fresh = Performer(_spec(True, features=12, redraw_every=1000, feature_seed=7), rngs=nnx.Rngs(5))
  assert same(jax.jit(fresh.projection)(jnp.int32(1500)), w(jnp.int32(1500)))  # a function of the step only
  other_layer = Performer(_spec(True, layer_index=1, features=12, feature_seed=7), rngs=nnx.Rngs(0))
  other_seed = Performer(_spec(True, features=12, feature_seed=8), rngs=nnx.Rngs(0))
  assert not same(other_layer.projection(0), m.projection(0))
  assert not same(other_seed.projection(0), m.projection(0))
  never = Performer(_spec(True, features=12, redraw_every=0), rngs=nnx.Rngs(0))
  assert same(never.projection(jnp.int32(0)), never.projection(jnp.int32(10 ** 6)))
  # and the mixer's output follows its features
  x = jax.random.normal(jax.random.key(1), (1, 9, 16))
  seg = jnp.ones((1, 9), jnp.int32)
  f = jax.jit(lambda s: m(x, _ctx(seg, s)))
  np.testing.assert_array_equal(f(jnp.int32(5)), f(jnp.int32(700)))
  assert not np.allclose(f(jnp.int32(5)), f(jnp.int32(1005)))
  # W is no state at all: the only variables are the four projection kernels.
  paths = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(
      nnx.state(m), is_leaf=lambda z: isinstance(z, nnx.Variable))[0]]
  assert sorted(paths) == [(name, "kernel") for name in ("key", "out", "query", "value")], paths


def test_prefill_then_decode_equals_full_forward_with_packed_segments():
  mixer = Performer(_spec(True, features=32, chunk=4, redraw_every=10), rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 13, 16))
  seg = jnp.asarray([[1] * 6 + [2] * 7, [1] * 11 + [0] * 2], jnp.int32)
  step = jnp.int32(37)  # generation at one fixed step (features of window 3)
  full = nnx.jit(lambda m, x: m(x, _ctx(seg, step)))(mixer, x)
  mixer.init_cache(2, 13, jnp.float32)
  call = nnx.jit(lambda m, x, s: m(x, _ctx(s, step, decode=True)))
  outs = [call(mixer, x[:, :5], seg[:, :5])]
  outs += [call(mixer, x[:, i:i + 1], seg[:, i:i + 1]) for i in range(5, 13)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_large_activations_stay_finite():
  """The stabilisers keep exp in range where plain features overflow (query norms ~ 40)."""
  x = 60.0 * jax.random.normal(jax.random.key(3), (1, 11, 16))
  seg = jnp.asarray([[1] * 9 + [0] * 2], jnp.int32)
  for causal in (True, False):
    mixer = Performer(_spec(causal, features=16), rngs=nnx.Rngs(0))
    y, g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(mixer(x, _ctx(seg)) ** 2)))(x)
    assert np.isfinite(float(y)) and np.all(np.isfinite(np.asarray(g))), f"causal={causal}"


def test_bidirectional_under_sequence_parallel_scan_equals_unsharded():
  """The bidirectional key stabiliser is a max over the whole row: it must span devices."""
  mesh = mesh_lib.make_mesh(ConfigDict(dict(data=2, fsdp=1, tensor=1, sequence=4)))
  rules = (("batch", ("data", "fsdp")), ("length", "sequence"), ("heads", "tensor"), ("head_dim", None))
  mixer = Performer(_spec(False, features=16, chunk=4), rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 16, 16))
  x = x.at[0, 13].multiply(4.0)  # one device holds the row's largest key exponent
  seg = jnp.asarray([[1] * 10 + [2] * 6, [1] * 13 + [0] * 3], jnp.int32)
  want = jax.jit(lambda x: mixer(x, _ctx(seg)))(x)
  sp = SequenceParallel(mesh, rules, "scan")

  @jax.jit
  def run(x, seg):
    with use_sequence_parallel(sp):
      return mixer(x, _ctx(seg))

  got = run(jax.device_put(x, NamedSharding(mesh, P("data", "sequence", None))),
            jax.device_put(seg, NamedSharding(mesh, P("data", "sequence"))))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_options_and_bidirectional_decode_are_refused():
  with pytest.raises(ValueError, match="features=0"):
    Performer(_spec(True, features=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="redraw_every=-1"):
    Performer(_spec(True, redraw_every=-1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="bidirectional"):
    Performer(_spec(False), rngs=nnx.Rngs(0)).init_cache(1, 8, jnp.float32)
