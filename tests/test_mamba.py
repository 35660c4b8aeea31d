"""Mamba: the three selective scans against a plain loop (values, gradients, resets, incoming
state); the whole mixer against a per-segment token loop (causal and bidirectional, packed
rows and padding); prefill + decode == full forward; the chunked scan's compiled memory."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.mixer_base import MixContext, MixerSpec
from layers.ssm.mamba import INNERS, SCANS, Mamba, chunk_decay, combine, selective_scan

B, T, D, S = 2, 13, 5, 3  # T = 13: not a multiple of the chunk sizes below

scan = jax.jit(selective_scan, static_argnames=("impl", "chunk", "inner"))
# Every scan implementation, the chunked one with each algorithm inside a chunk.
VARIANTS = [("sequential", "auto"), ("associative", "auto"), ("chunked", "associative"), ("chunked", "sequential")]


def _scan_inputs(seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(B, T, D)).astype(np.float32)
  delta = (0.05 + np.abs(r.normal(size=(B, T, D)))).astype(np.float32) * 0.5
  a = -np.exp(r.normal(size=(D, S))).astype(np.float32)
  b = r.normal(size=(B, T, S)).astype(np.float32)
  c = r.normal(size=(B, T, S)).astype(np.float32)
  h0 = r.normal(size=(B, D, S)).astype(np.float32)
  reset = np.zeros((B, T), bool)
  reset[0, 4] = reset[0, 9] = True  # row 0: three segments; row 1: one
  return x, delta, a, b, c, h0, reset


def loop_scan_numpy(x, delta, a, b, c, reset, h0):
  """h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t (h := 0 first where reset), y_t = C_t h_t; float64."""
  x, delta, a, b, c, h0 = (np.asarray(v, np.float64) for v in (x, delta, a, b, c, h0))
  y = np.zeros(x.shape)
  h_last = np.zeros(h0.shape)
  for bi in range(x.shape[0]):
    h = h0[bi].copy()
    for t in range(x.shape[1]):
      if reset[bi, t]:
        h = np.zeros_like(h)
      for d in range(x.shape[2]):
        for s in range(a.shape[1]):
          h[d, s] = math.exp(delta[bi, t, d] * a[d, s]) * h[d, s] + delta[bi, t, d] * b[bi, t, s] * x[bi, t, d]
        y[bi, t, d] = sum(h[d, s] * c[bi, t, s] for s in range(a.shape[1]))
    h_last[bi] = h
  return y, h_last


def loop_scan_jnp(x, delta, a, b, c, reset, h0):
  """The same loop in jnp (python loop over tokens), for gradients."""
  h, ys = h0, []
  for t in range(x.shape[1]):
    h = jnp.where(reset[:, t, None, None], 0.0, h)
    h = jnp.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * x[:, t])[..., None] * b[:, t, None, :]
    ys.append(jnp.sum(h * c[:, t, None, :], axis=-1))
  return jnp.stack(ys, axis=1), h


@pytest.mark.parametrize("impl, chunk, inner", [("sequential", 0, "auto"), ("associative", 0, "auto"),
                                                ("chunked", 4, "associative"), ("chunked", 64, "associative"),
                                                ("chunked", 4, "sequential"), ("chunked", 64, "sequential")])
def test_scans_equal_numpy_loop(impl, chunk, inner):
  x, delta, a, b, c, h0, reset = _scan_inputs()
  for rs, h in ((reset, h0), (np.zeros_like(reset), np.zeros_like(h0))):
    y, h_last = scan(x, delta, a, b, c, reset_bt=rs, h0_bds=h, impl=impl, chunk=chunk, inner=inner)
    want_y, want_h = loop_scan_numpy(x, delta, a, b, c, rs, h)
    assert np.abs(np.asarray(y) - want_y).max() < 1e-5, np.abs(np.asarray(y) - want_y).max()
    assert np.abs(np.asarray(h_last) - want_h).max() < 1e-5


def test_scan_gradients_agree_with_loop():
  x, delta, a, b, c, h0, reset = _scan_inputs(1)
  w = np.random.default_rng(9).normal(size=(B, T, D)).astype(np.float32)
  wh = np.random.default_rng(10).normal(size=(B, D, S)).astype(np.float32)

  def grads(fn):
    def f(x, delta, a, b, c, h0):
      y, h = fn(x, delta, a, b, c, h0)
      return jnp.sum(y * w) + jnp.sum(h * wh)
    return jax.grad(f, argnums=tuple(range(6)))

  want = grads(lambda *v: loop_scan_jnp(*v[:5], reset, v[5]))(x, delta, a, b, c, h0)  # eager
  every = jax.jit(lambda *v: [grads(lambda *u: selective_scan(*u[:5], reset_bt=reset, h0_bds=u[5], impl=impl,
                                                              chunk=4, inner=inner))(*v) for impl, inner in VARIANTS])
  assert {impl for impl, _ in VARIANTS} == set(SCANS) and {i for _, i in VARIANTS} | {"auto"} == set(INNERS)
  for (impl, inner), got in zip(VARIANTS, every(x, delta, a, b, c, h0)):
    for name, g, gw in zip(("x", "delta", "a", "b", "c", "h0"), got, want):
      err = np.abs(np.asarray(g) - np.asarray(gw)).max() / (1 + np.abs(np.asarray(gw)).max())
      assert err < 1e-5, f"{impl} ({inner}) d/d{name}: {err:.2e}"


def test_reset_and_incoming_state_split_the_scan():
  """Scanning [0, k) then [k, T) from the first part's h_last equals one scan; a reset at k
  equals scanning [k, T) from zero; and chunk_decay composes the summaries."""
  x, delta, a, b, c, _, _ = _scan_inputs(2)
  args = lambda sl: (x[:, sl], delta[:, sl], a, b[:, sl], c[:, sl])
  selective_scan = functools.partial(scan, impl="chunked", chunk=4)
  whole, h_whole = selective_scan(*args(slice(None)))
  first, h_first = selective_scan(*args(slice(0, 6)))
  second, h_second = selective_scan(*args(slice(6, None)), h0_bds=h_first)
  np.testing.assert_allclose(np.concatenate([first, second], 1), whole, atol=1e-5)
  np.testing.assert_allclose(h_second, h_whole, atol=1e-5)
  # The sequence-parallel summary: (decay, h_last from zero) composed with `combine`.
  second_zero, h_second_zero = selective_scan(*args(slice(6, None)))
  _, h_combined = combine((jnp.ones_like(h_first), h_first), (chunk_decay(delta[:, 6:], a), h_second_zero))
  np.testing.assert_allclose(h_combined, h_whole, atol=1e-5)
  # ... and y's correction for an incoming state is the scan of zeros from that state.
  corr, _ = selective_scan(np.zeros_like(x[:, 6:]), *args(slice(6, None))[1:], h0_bds=h_first)
  np.testing.assert_allclose(second_zero + corr, second, atol=1e-5)
  # A reset at k forgets everything before k.
  reset = np.zeros((B, T), bool)
  reset[:, 6] = True
  with_reset, _ = selective_scan(*args(slice(None)), reset_bt=reset, h0_bds=np.ones((B, D, S), np.float32))
  np.testing.assert_allclose(with_reset[:, 6:], second_zero, atol=1e-5)
  assert np.abs(np.asarray(with_reset[:, :6]) - np.asarray(first)).max() > 1e-3  # h0 = 1 matters before it


def test_chunked_scan_memory_is_far_below_associative():
  """Compile-only: at T = 16384 the chunked scan's temporaries (forward and grad) stay far below
  the associative scan's, which holds the whole [B, T, D, S] state."""
  sd = jax.ShapeDtypeStruct
  n = 16384
  args = (sd((1, n, 16), jnp.float32), sd((1, n, 16), jnp.float32), sd((16, 8), jnp.float32),
          sd((1, n, 8), jnp.float32), sd((1, n, 8), jnp.float32))

  def temp(kind, grad, inner="auto"):
    f = lambda *v: jnp.sum(selective_scan(*v, impl=kind, chunk=64, inner=inner)[0])
    f = jax.grad(f, argnums=(0, 1, 2, 3, 4)) if grad else f
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

  full_state = n * 16 * 8 * 4
  for grad in (False, True):
    assoc = temp("associative", grad)
    for inner in ("associative", "sequential"):
      chunked = temp("chunked", grad, inner)
      assert chunked < assoc / 4, (grad, inner, chunked, assoc)
      assert chunked < full_state, (grad, inner, chunked, full_state)


# -- the mixer ---------------------------------------------------------------------------------


def _spec(causal=True, **options):
  options = {"chunk": 4, "d_state": 4, **options}
  return MixerSpec(d_model=16, num_heads=2, num_kv_heads=2, causal=causal, positions="none", layer_index=0,
                   num_layers=2, max_len=64, options=tuple(sorted(options.items())))


apply_mixer = nnx.jit(lambda m, x, seg: m(x, MixContext(segment_ids=seg, positions=jnp.zeros_like(seg))))

SEG = np.array([[1] * 5 + [2] * 4 + [0] * 2, [0] * 2 + [1] * 9], np.int32)  # packed + right padding; left padding


def _branch_loop(br, x_in, seg, d_conv):
  """One direction, token by token over whole rows: the state restarts at zero and the conv
  window reads zeros wherever the token's segment has not begun yet (segment rules spelt out
  per token with numpy, not with the mixer's helpers)."""
  bsz, t, e = x_in.shape
  w, bias = br.conv_weight[...], br.conv_bias[...]
  a = -jnp.exp(br.a_log[...])
  h, ys = jnp.zeros((bsz, e, a.shape[1])), []
  for i in range(t):
    window = []
    for k in range(d_conv):  # tap k reads token i - (d_conv - 1) + k
      j = i - (d_conv - 1) + k
      same = np.array([j >= 0 and seg[bi, j] == seg[bi, i] for bi in range(bsz)])
      window.append(jnp.where(same[:, None], x_in[:, max(j, 0)], 0.0) * w[k])
    xc = jax.nn.silu(bias + sum(window))
    delta = jax.nn.softplus((xc @ br.x_dt.kernel[...]) @ br.dt_weight[...] + br.dt_bias[...])
    bt, ct = xc @ br.x_b.kernel[...], xc @ br.x_c.kernel[...]
    fresh = np.array([i == 0 or seg[bi, i] != seg[bi, i - 1] for bi in range(bsz)])
    h = jnp.where(fresh[:, None, None], 0.0, h)
    h = jnp.exp(delta[:, :, None] * a) * h + (delta * xc)[:, :, None] * bt[:, None, :]
    ys.append(jnp.einsum("bes,bs->be", h, ct) + br.skip[...] * xc)
  return jnp.stack(ys, axis=1)


def reference_mamba(m, x, seg):
  """The mixer from its parameters; bidirectional adds the backward branch on flipped rows."""
  xz = x @ m.in_proj.kernel[...].reshape(x.shape[-1], -1)
  x_in, z = xz[..., :m.d_inner], xz[..., m.d_inner:]
  y = _branch_loop(m.forward_ssm, x_in, seg, m.d_conv)
  if m.backward_ssm is not None:
    y = y + _branch_loop(m.backward_ssm, x_in[:, ::-1], seg[:, ::-1], m.d_conv)[:, ::-1]
  out = (y * jax.nn.silu(z)) @ m.out_proj.kernel[...]
  return jnp.where(seg[..., None] != 0, out, 0.0)


def _value_and_grads(fn, graph, params, x, w):
  """fn's output and the gradients of sum(fn * w) w.r.t. params and x, in one pass."""
  out, vjp = jax.vjp(lambda p, x: fn(nnx.merge(graph, p), x), params, x)
  return out, vjp(w)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mixer_equals_per_segment_loop(causal):
  """Forward and gradients (params and input); the scans themselves are compared with each other above."""
  mixer = Mamba(_spec(causal), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 11, 16)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(4).normal(size=(2, 11, 16)), jnp.float32)
  ctx = MixContext(segment_ids=jnp.asarray(SEG), positions=jnp.zeros_like(SEG))
  graph, params = nnx.split(mixer, nnx.Param)
  got = jax.jit(lambda p, x: _value_and_grads(lambda m, x: m(x, ctx), graph, p, x, w))(params, x)
  want = _value_and_grads(lambda m, x: reference_mamba(m, x, SEG), graph, params, x, w)  # eager: no compile
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_mixer_isolates_segments_and_padding():
  mixer = Mamba(_spec(True), rngs=nnx.Rngs(1))
  seg = jnp.asarray(SEG)
  x = np.random.default_rng(5).normal(size=(2, 11, 16)).astype(np.float32)
  base = np.asarray(apply_mixer(mixer, jnp.asarray(x), seg))
  x2 = x.copy()
  x2[0, :5] += 1.0  # segment 1 of row 0
  x2[:, 9:] += 1.0  # padding of row 0, last tokens of row 1
  x2[1, :2] += 1.0  # left padding of row 1
  out = np.asarray(apply_mixer(mixer, jnp.asarray(x2), seg))
  np.testing.assert_allclose(out[0, 5:], base[0, 5:], atol=1e-6)
  np.testing.assert_allclose(out[1, :9], base[1, :9], atol=1e-6)
  assert np.abs(out[0, :5] - base[0, :5]).max() > 1e-3 and np.all(out[0, 9:] == 0)


def test_prefill_then_decode_equals_full_forward():
  mixer = Mamba(_spec(True), rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(3), (3, 13, 16))
  # A segment starting inside the prefill, one starting during decoding, left padding, one segment.
  seg = jnp.asarray([[1] * 3 + [2] * 6 + [3] * 4, [0] * 2 + [1] * 11, [1] * 13], jnp.int32)
  full = apply_mixer(mixer, x, seg)
  mixer.init_cache(3, 13, jnp.float32)
  step = nnx.jit(lambda m, x, s: m(x, MixContext(segment_ids=s, positions=jnp.zeros_like(s), decode=True)))
  outs = [step(mixer, x[:, :5], seg[:, :5])]
  outs += [step(mixer, x[:, i:i + 1], seg[:, i:i + 1]) for i in range(5, 13)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_initialisation_follows_the_paper():
  mixer = Mamba(_spec(True, d_state=6, dt_min=0.001, dt_max=0.1), rngs=nnx.Rngs(0))
  dt = jax.nn.softplus(mixer.forward_ssm.dt_bias[...])
  assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
  assert float(dt.max()) / float(dt.min()) > 5  # spread over the log range, not constant
  np.testing.assert_allclose(-jnp.exp(mixer.forward_ssm.a_log[...]), -np.tile(np.arange(1, 7), (32, 1)), rtol=1e-6)
  np.testing.assert_array_equal(mixer.forward_ssm.skip[...], 1.0)
  assert mixer.dt_rank == 1 and mixer.d_inner == 32  # ceil(16 / 16), expand 2


def _init_spec(init, branches=1, causal=True):
  return MixerSpec(d_model=256, num_heads=4, num_kv_heads=4, causal=causal, positions="none", layer_index=0,
                   num_layers=4, max_len=64, options=(("init", init),), residual_branches=branches)


@pytest.mark.parametrize("branches", [1, 2])
def test_reference_init_is_pytorchs_uniform_with_the_residual_rescaling(branches):
  """`model.mamba.init=reference`: W_in and W_x ~ U(+-1/sqrt(fan_in)) (std 1/sqrt(3 fan_in)),
  W_out the same / sqrt(branches * layers); W_dt, b_dt, the conv, A and D as by default."""
  m = Mamba(_init_spec("reference", branches, causal=False), rngs=nnx.Rngs(0))
  default = Mamba(_init_spec("default", branches, causal=False), rngs=nnx.Rngs(0))
  d, e = 256, m.d_inner
  for w, fan_in, scale in [(m.in_proj.kernel, d, 1.0), (m.forward_ssm.x_dt.kernel, e, 1.0),
                           (m.backward_ssm.x_b.kernel, e, 1.0), (m.forward_ssm.x_c.kernel, e, 1.0),
                           (m.out_proj.kernel, e, 1.0 / math.sqrt(branches * 4))]:
    w = np.asarray(w[...])
    bound = scale / math.sqrt(fan_in)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert np.std(w) == pytest.approx(bound / math.sqrt(3), rel=0.05)
  for branch, ref in ((m.forward_ssm, default.forward_ssm), (m.backward_ssm, default.backward_ssm)):
    for name in ("dt_weight", "dt_bias", "conv_weight", "conv_bias", "a_log", "skip"):
      np.testing.assert_array_equal(getattr(branch, name)[...], getattr(ref, name)[...], err_msg=name)


def test_zoology_init_is_normal_002_with_zero_biases():
  """`model.mamba.init=zoology`: every projection (W_dt included) ~ N(0, 0.02), W_out ~
  N(0, 0.02 / sqrt(2 layers)), b_dt = 0 (delta starts at softplus(x W_dt) ~ softplus(0))."""
  m = Mamba(_init_spec("zoology"), rngs=nnx.Rngs(0))
  f = m.forward_ssm
  for w in (m.in_proj.kernel, f.x_dt.kernel, f.x_b.kernel, f.x_c.kernel):
    w = np.asarray(w[...])
    assert abs(np.mean(w)) < 0.002 and np.std(w) == pytest.approx(0.02, rel=0.05)
  assert np.std(np.asarray(f.dt_weight[...])) == pytest.approx(0.02, rel=0.2)  # [dt_rank 16, 512]
  assert np.std(np.asarray(m.out_proj.kernel[...])) == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
  np.testing.assert_array_equal(f.dt_bias[...], 0.0)
  np.testing.assert_allclose(-jnp.exp(f.a_log[...]), -np.tile(np.arange(1, 17), (m.d_inner, 1)), rtol=1e-6)


def test_weight_decay_falls_where_the_reference_puts_it():
  """The reference decays every parameter of two or more dimensions except A_log and D (its
  `_no_weight_decay`), and no bias: here the projections, W_dt and the conv kernel."""
  from layers.functional import FunctionalModel
  from layers.models import ModelSpec, build_model
  from trainer.optim import decay_mask

  spec = ModelSpec(kind="lm", vocab_size=20, num_classes=20, max_len=16, mixers=("mamba",), d_model=16,
                   num_heads=2, num_kv_heads=2, mlp_ratio=2, mlp="none", norm="rmsnorm", positions="none",
                   dropout=0.0, pooling="mean", tie_embeddings=True, dtype="float32")
  fm = FunctionalModel(build_model(spec, seed=0))
  mask = decay_mask(fm.init_params(), fm.no_decay)
  got = sorted(n.split("mixer/", 1)[1] for n, on in mask.items() if on and "/mixer/" in n)
  assert got == ["forward_ssm/conv_weight", "forward_ssm/dt_weight", "forward_ssm/x_b/kernel",
                 "forward_ssm/x_c/kernel", "forward_ssm/x_dt/kernel", "in_proj/kernel", "out_proj/kernel"]


def test_a_bad_init_is_one_sentence(tmp_path, capsys):
  from tests.helpers import train
  assert train(str(tmp_path / "run"), "--config.model.mixer=mamba", "--config.model.mamba.init=pytorch") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model.mamba.init='pytorch'" in err[0] and "zoology" in err[0], err
  assert not (tmp_path / "run").exists()


def test_errors_are_plain():
  with pytest.raises(ValueError, match="scan='parallel'"):
    Mamba(_spec(True, scan="parallel"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="causal=False"):
    Mamba(_spec(False), rngs=nnx.Rngs(0)).init_cache(1, 8, jnp.float32)
  mixer = Mamba(_spec(True), rngs=nnx.Rngs(0))
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="init_cache"):
    mixer(jnp.zeros((1, 4, 16)), MixContext(segment_ids=seg, positions=seg, decode=True))
  with pytest.raises(ValueError, match="storage order"):
    mixer(jnp.zeros((1, 4, 16)), MixContext(segment_ids=seg, positions=seg, index=seg))
  with pytest.raises(ValueError, match="impl='fast'"):
    selective_scan(np.zeros((1, 2, 1)), np.zeros((1, 2, 1)), -np.ones((1, 1)), np.zeros((1, 2, 1)),
                   np.zeros((1, 2, 1)), impl="fast")
  with pytest.raises(ValueError, match="inner='tree'"):
    selective_scan(np.zeros((1, 2, 1)), np.zeros((1, 2, 1)), -np.ones((1, 1)), np.zeros((1, 2, 1)),
                   np.zeros((1, 2, 1)), inner="tree")


def test_bfloat16_tracks_float32():
  """Same parameters, bf16 activations: output and input gradient within bf16 tolerances (every scan
  computes in fp32 after the same casts; the cheapest to compile stands for all)."""
  mixer = Mamba(_spec(True, scan="sequential"), rngs=nnx.Rngs(6))
  graph, params = nnx.split(mixer, nnx.Param)
  seg = jnp.asarray(SEG)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 11, 16)), jnp.float32)

  @jax.jit
  def run(p, x):
    f = lambda x: nnx.merge(graph, p)(x, MixContext(segment_ids=seg, positions=seg))
    out, vjp = jax.vjp(f, x)
    return out.astype(jnp.float32), vjp(jnp.ones_like(out))[0].astype(jnp.float32)

  want, got = run(params, x), run(params, x.astype(jnp.bfloat16))
  for a, b in zip(got, want):
    rel = np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()
    assert rel < 3e-2, rel
