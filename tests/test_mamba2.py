"""Mamba-2 (SSD): both scans against a float64 loop (values, final state, resets, incoming state,
groups) and against Mamba-1's selective scan with A tied per head; gradients against a jnp loop;
the whole mixer against a per-segment token loop written from the parameters (causal and
bidirectional, packed rows and padding, values and gradients); prefill + decode == one pass;
the initialisations; the weight-decay mask; one-sentence refusals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.mixer_base import MixContext, MixerSpec
from layers.ssm.mamba import selective_scan
from layers.ssm.mamba2 import Mamba2, ssd, ssd_chunk_decay

B, T, H, P, G, N = 2, 13, 4, 3, 2, 5  # T = 13: not a multiple of the chunks below; 2 heads per group


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(B, T, H, P)).astype(np.float32)
  dt = (0.05 + np.abs(r.normal(size=(B, T, H))) * 0.5).astype(np.float32)
  a = -np.exp(r.normal(size=(H,))).astype(np.float32)
  b = r.normal(size=(B, T, G, N)).astype(np.float32)
  c = r.normal(size=(B, T, G, N)).astype(np.float32)
  h0 = r.normal(size=(B, H, P, N)).astype(np.float32)
  reset = np.zeros((B, T), bool)
  reset[0, 4] = reset[0, 9] = True  # row 0: three segments, one starting right after a chunk start
  reset[1, 3] = True
  return x, dt, a, b, c, reset, h0


def loop_numpy(x, dt, a, b, c, reset, h0):
  """h[h] <- exp(dt A_h) h[h] + dt x B^T (zeroed first where reset), y = h C; float64, scalar loops."""
  x, dt, a, b, c, h0 = (np.asarray(v, np.float64) for v in (x, dt, a, b, c, h0))
  bsz, t, nh, p = x.shape
  per_group = nh // b.shape[2]
  y, h_last = np.zeros(x.shape), np.zeros(h0.shape)
  for bi in range(bsz):
    h = h0[bi].copy()
    for ti in range(t):
      if reset[bi, ti]:
        h[:] = 0.0
      for hi in range(nh):
        gi = hi // per_group
        decay = math.exp(dt[bi, ti, hi] * a[hi])
        for pi in range(p):
          for ni in range(b.shape[3]):
            h[hi, pi, ni] = decay * h[hi, pi, ni] + dt[bi, ti, hi] * x[bi, ti, hi, pi] * b[bi, ti, gi, ni]
          y[bi, ti, hi, pi] = sum(h[hi, pi, ni] * c[bi, ti, gi, ni] for ni in range(b.shape[3]))
    h_last[bi] = h
  return y, h_last


@pytest.mark.parametrize("impl, chunk", [("sequential", 0), ("chunked", 1), ("chunked", 4), ("chunked", 64)])
def test_ssd_equals_numpy_loop(impl, chunk):
  x, dt, a, b, c, reset, h0 = _inputs()
  want_y, want_h = loop_numpy(x, dt, a, b, c, reset, h0)
  y, h = ssd(x, dt, a, b, c, reset_bt=reset, h0_bhpn=h0, impl=impl, chunk=chunk)
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(h, want_h, rtol=1e-4, atol=1e-5)


def test_ssd_is_mamba1_with_one_decay_per_head():
  """Mamba-1's selective scan with every channel of a head given the head's dt and A (and one
  group) computes the same recurrence: an independent implementation agrees."""
  x, dt, a, b, c, reset, _ = _inputs(1)
  y, h = ssd(x, dt, a, b[:, :, :1], c[:, :, :1], reset_bt=reset, chunk=4)
  e = H * P
  y1, h1 = selective_scan(x.reshape(B, T, e), np.repeat(dt, P, axis=2), np.repeat(a, P)[:, None] * np.ones((1, N)),
                          b[:, :, 0], c[:, :, 0], reset_bt=reset, impl="sequential")
  np.testing.assert_allclose(y.reshape(B, T, e), y1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h.reshape(B, e, N), h1, rtol=1e-5, atol=1e-5)


def test_ssd_gradients_agree_with_loop():
  x, dt, a, b, c, reset, h0 = map(jnp.asarray, _inputs(2))
  w = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, H, P)), jnp.float32)

  def loop(x, dt, a, b, c, h0):
    per_group = H // G
    bh, ch = jnp.repeat(b, per_group, axis=2), jnp.repeat(c, per_group, axis=2)
    h, ys = h0, []
    for t in range(T):
      h = jnp.where(reset[:, t, None, None, None], 0.0, h)
      h = jnp.exp(dt[:, t] * a)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * bh[:, t, :, None]
      ys.append(jnp.sum(h * ch[:, t, :, None], axis=-1))
    return jnp.stack(ys, axis=1), h

  def loss(fn):
    def f(*args):
      y, h = fn(*args)
      return jnp.sum(y * w) + jnp.sum(h * h0)
    return jax.grad(f, argnums=tuple(range(6)))

  want = loss(loop)(x, dt, a, b, c, h0)
  got = jax.jit(loss(lambda *v: ssd(*v[:5], reset_bt=reset, h0_bhpn=v[5], chunk=4)))(x, dt, a, b, c, h0)
  for name, g1, g2 in zip("x dt a b c h0".split(), got, want):
    np.testing.assert_allclose(g1, g2, rtol=2e-4, atol=2e-5, err_msg=name)


def test_chunk_decay_composes_two_halves():
  """(decay, state) of the first half combined with the second half's equals the whole row."""
  from layers.ssm.mamba import combine
  x, dt, a, b, c, reset, _ = _inputs(4)
  reset[:] = False
  reset[1, 9] = True  # row 1 resets in the second half
  halves = [slice(0, 6), slice(6, T)]
  parts = [(ssd_chunk_decay(dt[:, s], a, reset[:, s]),
            ssd(x[:, s], dt[:, s], a, b[:, s], c[:, s], reset_bt=reset[:, s], chunk=4)[1]) for s in halves]
  _, h = combine(*parts)
  np.testing.assert_allclose(h, ssd(x, dt, a, b, c, reset_bt=reset, chunk=4)[1], rtol=1e-5, atol=1e-5)


# -- the mixer ---------------------------------------------------------------------------------


def _spec(causal=True, layers=2, **options):
  options = {"chunk": 4, "d_state": 4, "head_dim": 8, "groups": 2, **options}
  return MixerSpec(d_model=16, num_heads=2, num_kv_heads=2, causal=causal, positions="none", layer_index=0,
                   num_layers=layers, max_len=64, options=tuple(sorted(options.items())))


apply_mixer = nnx.jit(lambda m, x, seg: m(x, MixContext(segment_ids=seg, positions=jnp.zeros_like(seg))))

SEG = np.array([[1] * 5 + [2] * 4 + [0] * 2, [0] * 2 + [1] * 9], np.int32)  # packed + right padding; left padding


def _branch_loop(br, xbc, dt_raw, seg, m):
  """One direction, token by token over whole rows, from the parameters: the conv window reads
  zeros where the token's segment has not begun (numpy rules per token), the state restarts at
  every segment start, heads 2g and 2g+1 read group g's B and C."""
  bsz, t, _ = xbc.shape
  k, h, p, g, n = m.d_conv, m.heads, m.head_dim, m.groups, m.d_state
  w = jnp.concatenate([br.conv_x_weight[...].reshape(k, -1), br.conv_bc_weight[...].reshape(k, -1)], axis=1)
  bias = jnp.concatenate([br.conv_x_bias[...].reshape(-1), br.conv_bc_bias[...].reshape(-1)])
  a = -jnp.exp(br.a_log[...])
  state, ys = jnp.zeros((bsz, h, p, n)), []
  for i in range(t):
    acc = bias
    for tap in range(k):
      j = i - (k - 1) + tap
      same = np.array([j >= 0 and seg[bi, j] == seg[bi, i] for bi in range(bsz)])
      acc = acc + jnp.where(same[:, None], xbc[:, max(j, 0)], 0.0) * w[tap]
    v = jax.nn.silu(acc)
    x, bt, ct = v[:, :h * p].reshape(bsz, h, p), v[:, h * p:h * p + g * n], v[:, h * p + g * n:]
    dt = jax.nn.softplus(dt_raw[:, i] + br.dt_bias[...])  # [B, H]
    fresh = np.array([i == 0 or seg[bi, i] != seg[bi, i - 1] for bi in range(bsz)])
    state = jnp.where(fresh[:, None, None, None], 0.0, state)
    group_of_head = np.arange(h) // (h // g)  # heads 2g and 2g+1 read group g
    bh, ch = bt.reshape(bsz, g, n)[:, group_of_head], ct.reshape(bsz, g, n)[:, group_of_head]  # [B, H, N]
    state = (jnp.exp(dt * a)[:, :, None, None] * state
             + (dt[:, :, None] * x)[..., None] * bh[:, :, None, :])  # [B, H, P, N]
    ys.append(jnp.einsum("bhpn,bhn->bhp", state, ch) + br.skip[...][None, :, None] * x)
  return jnp.stack(ys, axis=1)  # [B, T, H, P]


def reference_mamba2(m, u, seg):
  d = u.shape[-1]
  zx = u @ m.in_zx.kernel[...].reshape(d, -1)
  e = m.d_inner
  z, x = zx[..., :e], zx[..., e:]
  xbc = jnp.concatenate([x, u @ m.in_bc.kernel[...].reshape(d, -1)], axis=-1)
  dt_raw = u @ m.in_dt.kernel[...]
  y = _branch_loop(m.forward_ssm, xbc, dt_raw, seg, m)
  if m.backward_ssm is not None:
    y = y + _branch_loop(m.backward_ssm, xbc[:, ::-1], dt_raw[:, ::-1], seg[:, ::-1], m)[:, ::-1]
  v = y.reshape(*y.shape[:2], e) * jax.nn.silu(z)
  per = e // m.groups
  normed = []
  for gi in range(m.groups):  # RMSNorm over each group's channels, eps 1e-5
    vg = v[..., gi * per:(gi + 1) * per]
    normed.append(vg / jnp.sqrt(jnp.mean(vg * vg, axis=-1, keepdims=True) + 1e-5))
  out = (jnp.concatenate(normed, axis=-1) * m.norm_weight[...].reshape(-1)) @ m.out_proj.kernel[...].reshape(e, d)
  return jnp.where(seg[..., None] != 0, out, 0.0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mixer_equals_per_segment_loop(causal):
  mixer = Mamba2(_spec(causal), rngs=nnx.Rngs(0))
  r = np.random.default_rng(3)
  x = jnp.asarray(r.normal(size=(2, 11, 16)), jnp.float32)
  w = jnp.asarray(r.normal(size=(2, 11, 16)), jnp.float32)
  ctx = MixContext(segment_ids=jnp.asarray(SEG), positions=jnp.zeros_like(SEG))
  graph, params = nnx.split(mixer, nnx.Param)

  def value_and_grads(fn, p, x):
    out, vjp = jax.vjp(lambda p, x: fn(nnx.merge(graph, p), x), p, x)
    return out, vjp(w)

  got = jax.jit(lambda p, x: value_and_grads(lambda m, x: m(x, ctx), p, x))(params, x)
  want = value_and_grads(lambda m, x: reference_mamba2(m, x, SEG), params, x)  # eager: no compile
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_mixer_isolates_segments_and_padding():
  mixer = Mamba2(_spec(True), rngs=nnx.Rngs(1))
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
  mixer = Mamba2(_spec(True), rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(3), (3, 13, 16))
  # A segment starting inside the prefill, one starting during decoding, left padding, one segment.
  seg = jnp.asarray([[1] * 3 + [2] * 6 + [3] * 4, [0] * 2 + [1] * 11, [1] * 13], jnp.int32)
  full = apply_mixer(mixer, x, seg)
  mixer.init_cache(3, 13, jnp.float32)
  step = nnx.jit(lambda m, x, s: m(x, MixContext(segment_ids=s, positions=jnp.zeros_like(s), decode=True)))
  outs = [step(mixer, x[:, :5], seg[:, :5])]
  outs += [step(mixer, x[:, i:i + 1], seg[:, i:i + 1]) for i in range(5, 13)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_initialisations():
  """A's magnitude uniform in [1, 16] per head, dt = softplus(b_dt) log-uniform in [dt_min, dt_max],
  D = 1, gain 1; W_in / W_out per init."""
  spec = lambda init, mlp_branches=2: MixerSpec(
      d_model=256, num_heads=2, num_kv_heads=2, causal=True, positions="none", layer_index=0, num_layers=4,
      max_len=64, residual_branches=mlp_branches,
      options=tuple(sorted({"head_dim": 2, "d_state": 4, "init": init}.items())))
  m = Mamba2(spec("default"), rngs=nnx.Rngs(0))  # 256 heads: enough draws for the statistics
  f = m.forward_ssm
  a = np.exp(np.asarray(f.a_log[...]))
  assert a.min() >= 1.0 and a.max() <= 16.0 and abs(a.mean() - 8.5) < 1.0
  dt = np.asarray(jax.nn.softplus(f.dt_bias[...]))
  assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
  assert abs(np.mean(np.log(dt)) - (math.log(0.001) + math.log(0.1)) / 2) < 0.3  # log-uniform
  np.testing.assert_array_equal(f.skip[...], 1.0)
  np.testing.assert_array_equal(m.norm_weight[...], 1.0)
  assert np.std(np.asarray(m.in_zx.kernel[...])) == pytest.approx(1 / 16, rel=0.05)  # N(0, 1/fan_in)
  ref = Mamba2(spec("reference", 1), rngs=nnx.Rngs(0))
  k = np.asarray(ref.in_zx.kernel[...])
  assert np.abs(k).max() <= 1 / 16 and np.std(k) == pytest.approx(1 / 16 / math.sqrt(3), rel=0.05)
  bound = 1 / math.sqrt(512) / math.sqrt(1 * 4)  # 1 residual branch (no MLP) x 4 layers
  w_out = np.asarray(ref.out_proj.kernel[...])
  assert np.abs(w_out).max() <= bound and np.std(w_out) == pytest.approx(bound / math.sqrt(3), rel=0.05)
  conv = np.asarray(f.conv_x_weight[...])  # PyTorch's depth-wise Conv1d: U(+-1/sqrt(d_conv)), d_conv 4
  assert np.abs(conv).max() <= 0.5 and np.std(conv) == pytest.approx(0.5 / math.sqrt(3), rel=0.05)
  zoo = Mamba2(spec("zoology"), rngs=nnx.Rngs(0))
  assert np.std(np.asarray(zoo.in_zx.kernel[...])) == pytest.approx(0.02, rel=0.05)
  assert np.std(np.asarray(zoo.out_proj.kernel[...])) == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
  np.testing.assert_array_equal(zoo.forward_ssm.dt_bias[...], m.forward_ssm.dt_bias[...])  # not a Linear bias


def test_weight_decay_falls_on_the_matrices_and_the_conv_only():
  """As the reference: A_log, D and dt's bias (its `_no_weight_decay`), the norm's gain and the
  conv biases are not decayed; the projections and the conv kernels are."""
  from layers.functional import FunctionalModel
  from layers.models import ModelSpec, build_model
  from trainer.optim import decay_mask

  spec = ModelSpec(kind="lm", vocab_size=20, num_classes=20, max_len=16, mixers=("mamba2",), d_model=16,
                   num_heads=2, num_kv_heads=2, mlp_ratio=2, mlp="none", norm="rmsnorm", positions="none",
                   dropout=0.0, pooling="mean", tie_embeddings=True, dtype="float32",
                   mixer_options=(("mamba2", (("d_state", 4), ("head_dim", 8))),))
  fm = FunctionalModel(build_model(spec, seed=0))
  mask = decay_mask(fm.init_params(), fm.no_decay)
  got = sorted(n.split("mixer/", 1)[1] for n, on in mask.items() if on and "/mixer/" in n)
  assert got == ["forward_ssm/conv_bc_weight", "forward_ssm/conv_x_weight", "in_bc/kernel", "in_dt/kernel",
                 "in_zx/kernel", "out_proj/kernel"], got


def test_errors_are_plain():
  with pytest.raises(ValueError, match="head_dim=5 must divide"):
    Mamba2(_spec(head_dim=5), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="groups=3 must divide the 4 heads"):
    Mamba2(_spec(groups=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="scan='associative'"):
    Mamba2(_spec(scan="associative"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="causal=False"):
    Mamba2(_spec(False), rngs=nnx.Rngs(0)).init_cache(1, 8, jnp.float32)
  mixer = Mamba2(_spec(True), rngs=nnx.Rngs(0))
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="init_cache"):
    mixer(jnp.zeros((1, 4, 16)), MixContext(segment_ids=seg, positions=seg, decode=True))


def test_a_bad_head_dim_is_one_sentence(tmp_path, capsys):
  from tests.helpers import train
  assert train(str(tmp_path / "run"), "--config.model.mixer=mamba2", "--config.model.mamba2.head_dim=48") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model.mamba2.head_dim=48" in err[0] and "= 64" in err[0], err
  assert not (tmp_path / "run").exists()


def test_bfloat16_tracks_float32():
  """Same parameters, bf16 activations: output and input gradient within bf16 tolerances (the
  scan computes in fp32 after the casts; the chunked form stands for both)."""
  mixer = Mamba2(_spec(True), rngs=nnx.Rngs(6))
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
