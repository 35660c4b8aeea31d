"""LMU: the Legendre system against its closed form and an independent expm; the four memory
forms (FFT, direct, chunked, recurrent) against a plain loop (values and gradients, resets,
incoming state); the LMUFormer mixer against a token loop (packed rows, padding, BatchNorm in
training and evaluation); prefill + decode == full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.mixer_base import MixContext, MixerSpec
from layers.ssm import lmu as L

memory = jax.jit(L.lmu_memory, static_argnames=("order", "theta", "impl", "chunk"))
Q, THETA = 6, 4.0


def test_continuous_system_matches_the_paper_closed_form():
  a, b = L.legendre_state_space(3, 1.0)
  np.testing.assert_array_equal(a, [[-1, -1, -1], [3, -3, -3], [-5, 5, -5]])
  np.testing.assert_array_equal(b, [1, -3, 5])
  a, b = L.legendre_state_space(5, 2.5)
  for i in range(5):
    assert b[i] == pytest.approx((2 * i + 1) * (-1) ** i / 2.5)
    for j in range(5):
      sign = -1 if i < j else (-1) ** (i - j + 1)
      assert a[i, j] == pytest.approx((2 * i + 1) / 2.5 * sign)


@pytest.mark.parametrize("order, theta", [(6, 4.0), (32, 128.0)])
def test_zero_order_hold_matches_an_independent_expm(order, theta):
  a, b = L.legendre_state_space(order, theta)
  abar, bbar = L.discrete_system(order, theta)
  want_a = np.asarray(jax.scipy.linalg.expm(jnp.asarray(a, jnp.float32)), np.float64)
  want_b = np.linalg.solve(a, abar - np.eye(order)) @ b  # Bbar = A^-1 (Abar - I) B
  assert np.abs(abar - want_a).max() < 1e-5
  assert np.abs(bbar - want_b).max() < 1e-9
  h = L.impulse_response(order, theta, 9)  # H_k = Abar^k Bbar
  for k in range(9):
    np.testing.assert_allclose(h[k], np.linalg.matrix_power(abar, k) @ bbar, atol=1e-12)


def loop_memory_numpy(u, reset, m0):
  abar, bbar = L.discrete_system(Q, THETA)
  out = np.zeros(u.shape + (Q,))
  for bi in range(u.shape[0]):
    m = np.asarray(m0[bi], np.float64)
    for t in range(u.shape[1]):
      if reset[bi, t]:
        m = np.zeros(Q)
      m = abar @ m + bbar * u[bi, t]
      out[bi, t] = m
  return out


def _memory_inputs(seed=0, t=23):
  r = np.random.default_rng(seed)
  u = r.normal(size=(2, t)).astype(np.float32)
  m0 = r.normal(size=(2, Q)).astype(np.float32)
  reset = np.zeros((2, t), bool)
  reset[0, 7] = reset[0, 16] = True  # row 0 packs three segments
  return u, reset, m0


FORMS = [("recurrent", 0), ("direct", 0), ("chunked", 4), ("chunked", 64), ("fft", 4)]


@pytest.mark.parametrize("impl, chunk", FORMS)
def test_memory_forms_equal_loop(impl, chunk):
  u, reset, m0 = _memory_inputs()
  no_reset = np.zeros_like(reset)
  # (resets + incoming state), (incoming state only: the FFT itself, not its packed-row fallback), (neither)
  for rs, h in ((reset, m0), (no_reset, m0), (no_reset, np.zeros_like(m0))):
    got, last = memory(u, order=Q, theta=THETA, reset_bt=rs, m0_bq=h, impl=impl, chunk=chunk)
    want = loop_memory_numpy(u, rs, h)
    assert np.abs(np.asarray(got) - want).max() < 1e-5, np.abs(np.asarray(got) - want).max()
    np.testing.assert_allclose(last, want[:, -1], atol=1e-5)


def test_memory_gradients_agree():
  u, reset, m0 = _memory_inputs(1)
  w = np.random.default_rng(2).normal(size=u.shape + (Q,)).astype(np.float32)
  abar, bbar = (jnp.asarray(v, jnp.float32) for v in L.discrete_system(Q, THETA))

  def loop(u, m0, rs):
    m, out = m0, []
    for t in range(u.shape[1]):
      m = jnp.where(rs[:, t, None], 0.0, m) @ abar.T + u[:, t, None] * bbar
      out.append(m)
    return jnp.stack(out, axis=1)

  for rs in (reset, np.zeros_like(reset)):
    want = jax.grad(lambda u, m0: jnp.sum(loop(u, m0, rs) * w), argnums=(0, 1))(u, m0)
    loss = lambda impl, chunk: lambda u, m0: jnp.sum(
        L.lmu_memory(u, order=Q, theta=THETA, reset_bt=rs, m0_bq=m0, impl=impl, chunk=chunk)[0] * w)
    every = jax.jit(lambda u, m0: [jax.grad(loss(*f), argnums=(0, 1))(u, m0) for f in FORMS])
    for (impl, chunk), got in zip(FORMS, every(u, m0)):
      for name, g, gw in zip(("u", "m0"), got, want):
        err = np.abs(np.asarray(g) - np.asarray(gw)).max()
        assert err < 1e-5, f"{impl}/{chunk} d/d{name}: {err:.2e}"


def test_split_rows_compose_for_sequence_parallelism():
  """Memory of [k, T) from the first part's last state == the whole; the summaries compose with
  chunk_transition, and propagate_state is the incoming state's share."""
  u, reset, _ = _memory_inputs(3)
  reset[1, 15] = True  # a reset inside the second part of row 1 (row 0 has one at 16)
  run = lambda u, rs, m0=None: memory(u, order=Q, theta=THETA, reset_bt=rs, m0_bq=m0, impl="chunked", chunk=4)
  whole, whole_last = run(u, reset)
  k = 10
  _, first_last = run(u[:, :k], reset[:, :k])
  second, _ = run(u[:, k:], reset[:, k:], first_last)
  np.testing.assert_allclose(second, whole[:, k:], atol=1e-5)
  second_zero, second_zero_last = run(u[:, k:], reset[:, k:])
  share = L.propagate_state(jnp.asarray(first_last), jnp.asarray(reset[:, k:]), Q, THETA)
  np.testing.assert_allclose(second_zero + share, whole[:, k:], atol=1e-5)
  trans = L.chunk_transition(jnp.asarray(reset[:, k:]), Q, THETA)
  np.testing.assert_allclose(jnp.einsum("bqr,br->bq", trans, first_last) + second_zero_last, whole_last, atol=1e-5)
  no_reset = np.zeros_like(reset)
  whole, whole_last = run(u, no_reset)
  trans = L.chunk_transition(jnp.asarray(no_reset[:, k:]), Q, THETA)
  _, first_last = run(u[:, :k], no_reset[:, :k])
  _, second_zero_last = run(u[:, k:], no_reset[:, k:])
  np.testing.assert_allclose(jnp.einsum("bqr,br->bq", trans, first_last) + second_zero_last, whole_last, atol=1e-5)


# -- the mixer ---------------------------------------------------------------------------------


def _spec(causal=True, **options):
  options = {"memory_size": Q, "theta": THETA, "chunk": 4, **options}
  return MixerSpec(d_model=16, num_heads=2, num_kv_heads=2, causal=causal, positions="none", layer_index=0,
                   num_layers=2, max_len=64, options=tuple(sorted(options.items())))


SEG = np.array([[1] * 5 + [2] * 4 + [0] * 2, [0] * 2 + [1] * 9], np.int32)  # packed + right padding; left padding


def reference_lmu(m, x, seg, training):
  """Token loop with the segment rules spelt out: memory restarts whenever the segment id changes."""
  abar, bbar = (jnp.asarray(v, jnp.float32) for v in L.discrete_system(m.order, m.theta))
  real = seg != 0
  u = jnp.where(real, jax.nn.relu(x @ m.encoder.kernel[...][:, 0] + m.encoder.bias[...][0]), 0.0)
  mem, ms = jnp.zeros((x.shape[0], m.order)), []
  for t in range(x.shape[1]):
    fresh = np.array([t == 0 or seg[bi, t] != seg[bi, t - 1] for bi in range(x.shape[0])])
    mem = jnp.where(fresh[:, None], 0.0, mem) @ abar.T + u[:, t, None] * bbar
    ms.append(mem)
  mem = jnp.stack(ms, axis=1)
  h = jax.nn.relu(mem @ m.hidden_m.kernel[...] + m.hidden_m.bias[...] + x @ m.hidden_x.kernel[...])
  y = h @ m.proj.kernel[...] + m.proj.bias[...]
  if m.norm is not None:
    if training:
      rows = y[real]
      mean, var = rows.mean(axis=0), rows.var(axis=0)
    else:
      mean, var = m.norm.mean[...], m.norm.var[...]
    y = (y - mean) / jnp.sqrt(var + 1e-5) * m.norm.scale[...] + m.norm.bias[...]
  return jnp.where(real[..., None], y, 0.0)


@pytest.mark.parametrize("impl, training", [("auto", True), ("fft", False), ("chunked", True)])
def test_mixer_equals_token_loop(impl, training):
  """Forward and gradients w.r.t. params and input; BatchNorm statistics in training mode."""
  mixer = L.LMU(_spec(impl=impl), rngs=nnx.Rngs(0))
  mixer.norm.mean[...] = jnp.linspace(-0.5, 0.5, 16)  # non-trivial running statistics for evaluation
  mixer.norm.var[...] = jnp.linspace(0.5, 2.0, 16)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 11, 16)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(4).normal(size=(2, 11, 16)), jnp.float32)
  seg = jnp.asarray(SEG)
  graph, params, rest = nnx.split(mixer, nnx.Param, ...)

  def value_and_grads(fn, p, x):
    # Fresh BatchStat variables inside this trace: training mode updates them.
    out, vjp = jax.vjp(lambda p, x: fn(nnx.merge(graph, p, jax.tree.map(lambda v: v, rest)), x), p, x)
    return out, vjp(w)

  ctx = MixContext(segment_ids=seg, positions=jnp.zeros_like(seg), training=training)
  got = jax.jit(lambda p, x: value_and_grads(lambda m, x: m(x, ctx), p, x))(params, x)
  want = value_and_grads(lambda m, x: reference_lmu(m, x, SEG, training), params, x)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  assert np.abs(np.asarray(got[0])).max() > 0.1


def test_batchnorm_running_statistics_use_real_tokens_only():
  mixer = L.LMU(_spec(), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 11, 16)), jnp.float32)
  seg = jnp.asarray(SEG)
  mixer(x, MixContext(segment_ids=seg, positions=seg, training=True))
  no_norm = L.LMU(_spec(norm="none"), rngs=nnx.Rngs(0))  # same seed: same weights, no BN
  y = np.asarray(no_norm(x, MixContext(segment_ids=seg, positions=seg)))[SEG != 0]
  np.testing.assert_allclose(mixer.norm.mean[...], 0.1 * y.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(mixer.norm.var[...], 0.9 + 0.1 * y.var(0, ddof=1), rtol=1e-4)


def test_mixer_is_causal_and_isolates_segments():
  mixer = L.LMU(_spec(impl="fft"), rngs=nnx.Rngs(1))
  apply = nnx.jit(lambda m, x, s: m(x, MixContext(segment_ids=s, positions=s)))
  seg = jnp.asarray(SEG)
  x = np.random.default_rng(5).normal(size=(2, 11, 16)).astype(np.float32)
  base = np.asarray(apply(mixer, jnp.asarray(x), seg))
  x2 = x.copy()
  x2[0, :5] += 1.0  # segment 1 of row 0
  x2[:, 9:] += 1.0  # padding of row 0, the last tokens of row 1
  x2[1, :2] += 1.0  # left padding of row 1
  out = np.asarray(apply(mixer, jnp.asarray(x2), seg))
  np.testing.assert_allclose(out[0, 5:], base[0, 5:], atol=1e-6)
  np.testing.assert_allclose(out[1, :9], base[1, :9], atol=1e-6)
  assert np.abs(out[0, :5] - base[0, :5]).max() > 1e-3 and np.all(out[0, 9:] == 0)
  # causal=False is defined as the same causal memory (as LMUFormer classifies).
  bidir = L.LMU(_spec(False, impl="fft"), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(apply(bidir, jnp.asarray(x), seg)), base)


@pytest.mark.parametrize("impl", ["auto", "fft"])
def test_prefill_then_decode_equals_full_forward(impl):
  mixer = L.LMU(_spec(impl=impl), rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(3), (3, 14, 16))
  # A segment starting inside the prefill, one starting during decoding, left padding, one segment.
  seg = jnp.asarray([[1] * 3 + [2] * 6 + [3] * 5, [0] * 2 + [1] * 12, [1] * 14], jnp.int32)
  step = nnx.jit(lambda m, x, s, d: m(x, MixContext(segment_ids=s, positions=s, decode=d)), static_argnums=3)
  full = step(mixer, x, seg, False)
  mixer.init_cache(3, 14, jnp.float32)
  # Prefill 4, three single tokens, a 3-token call continuing from the cached memory, then single tokens.
  cuts = [0, 4, 5, 6, 7, 10, 11, 12, 13, 14]
  outs = [step(mixer, x[:, a:b], seg[:, a:b], True) for a, b in zip(cuts[:-1], cuts[1:])]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_errors_are_plain():
  with pytest.raises(ValueError, match="impl='conv'"):
    L.LMU(_spec(impl="conv"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="norm='layernorm'"):
    L.LMU(_spec(norm="layernorm"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="theta=0.0"):
    L.LMU(_spec(theta=0.0), rngs=nnx.Rngs(0))
  mixer = L.LMU(_spec(), rngs=nnx.Rngs(0))
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="init_cache"):
    mixer(jnp.zeros((1, 4, 16)), MixContext(segment_ids=seg, positions=seg, decode=True))
  with pytest.raises(ValueError, match="storage order"):
    mixer(jnp.zeros((1, 4, 16)), MixContext(segment_ids=seg, positions=seg, index=seg))


def test_bfloat16_tracks_float32():
  """Same parameters, bf16 activations (memory in fp32): output and input gradient within bf16 tolerances."""
  mixer = L.LMU(_spec(impl="fft"), rngs=nnx.Rngs(6))
  graph, params, rest = nnx.split(mixer, nnx.Param, ...)
  seg = jnp.asarray(SEG)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 11, 16)), jnp.float32)

  @jax.jit
  def run(p, x):
    f = lambda x: nnx.merge(graph, p, jax.tree.map(lambda v: v, rest))(x, MixContext(segment_ids=seg, positions=seg))
    out, vjp = jax.vjp(f, x)
    return out.astype(jnp.float32), vjp(jnp.ones_like(out))[0].astype(jnp.float32)

  want, got = run(params, x), run(params, x.astype(jnp.bfloat16))
  for a, b in zip(got, want):
    rel = np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()
    assert rel < 3e-2, rel
