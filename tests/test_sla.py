"""SLA (docs/papers.md#sla): the layer against a plainly written quadratic reference with the
depth-wise conv as an explicit Toeplitz matrix (forward and gradients; causal,
bidirectional, 1-D and 2-D grid; padding and packed segments; T not a multiple of the
chunk), normalised rows, segment isolation, decode == full forward, errors; and PRepBN
(schedule, padding-blind statistics, running statistics, eval == RepBN == folded affine,
gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from layers.linear.prepbn import PRepBN, prepbn_gamma
from layers.linear.sla import SLA, conv_taps
from layers.mixer_base import MixContext, MixerSpec, use_sequence_parallel
from parallel import mesh as mesh_lib
from parallel.sequence import SequenceParallel

from helpers import assert_close, check_values_and_grads, decode_in_pieces, decode_stepper

B, T, D, N = 2, 13, 16, 2
H = D // N
MAX_LEN = 32


def make_spec(causal, **options):
  return MixerSpec(d_model=D, num_heads=N, num_kv_heads=N, causal=causal, positions="none", layer_index=0,
                   num_layers=2, max_len=MAX_LEN, options=tuple(sorted(options.items())))


def positions_of(seg):
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for i in range(1, seg.shape[1]):
      pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
  return pos


def inputs(seed=0, t=T):
  x = np.random.default_rng(seed).normal(size=(B, t, D)).astype(np.float32)
  # Row 0: two packed segments then padding; row 1: one segment, no padding.
  seg = np.array([[1] * 5 + [2] * (t - 7) + [0] * 2, [1] * t], np.int32)
  return x, seg, positions_of(seg)


def ctx_of(seg, pos, **kw):
  return MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), **kw)


def randomize(layer, seed=1):
  """Nonzero positional embedding and conv bias, so that both matter in the comparisons."""
  r = np.random.default_rng(seed)
  layer.position[...] = jnp.asarray(r.normal(size=layer.position.shape) * 0.5, jnp.float32)
  layer.conv_bias[...] = jnp.asarray(r.normal(size=layer.conv_bias.shape) * 0.5, jnp.float32)
  return layer


DENSE = ("query", "key", "value", "out")
RAW = ("position", "conv_weight", "conv_bias")


def params_of(layer):
  p = {name: getattr(layer, name).kernel[...] for name in DENSE}
  p.update({name: getattr(layer, name)[...] for name in RAW})
  return p


def layer_fn(layer, seg, pos):
  graphdef, state = nnx.split(layer)

  def f(params, x):
    m = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))  # fresh variables inside this trace
    for name in DENSE:
      getattr(m, name).kernel[...] = params[name]
    for name in RAW:
      getattr(m, name)[...] = params[name]
    return m(x, ctx_of(seg, pos))

  return f


def conv_matrix(weight, seg, *, causal, grid):
  """Toeplitz form of the depth-wise conv: C[b, t, s, h] = w[offset(s - t)] if s is a tap of t
  in the same nonzero segment, else 0 (1-D: offsets along the row; 2-D: along both grid axes)."""
  t = seg.shape[1]
  k = weight.shape[0]
  left, _ = conv_taps(k, causal)
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if grid is None:
    off = np.arange(t)[None, :] - np.arange(t)[:, None] + left  # [t, s]
    ok = (off >= 0) & (off < k)
    taps = weight[np.clip(off, 0, k - 1)]  # [t, s, H]
  else:
    gw = grid[1]
    y, x = np.arange(t) // gw, np.arange(t) % gw
    oy = y[None, :] - y[:, None] + left
    ox = x[None, :] - x[:, None] + left
    ok = (oy >= 0) & (oy < k) & (ox >= 0) & (ox < k)
    taps = weight[np.clip(oy, 0, k - 1), np.clip(ox, 0, k - 1)]
  mask = jnp.asarray(same & ok[None])
  return jnp.where(mask[..., None], taps[None], 0.0)


def reference_sla(params, x, seg, pos, *, causal, grid=None, eps=1e-6):
  """Quadratic SLA: (phi(Q) phi(K + P)^T * M) V / row sums, + Toeplitz conv of V, output projection."""
  q = jnp.einsum("btd,dnh->btnh", x, params["query"])
  k = jnp.einsum("btd,dnh->btnh", x, params["key"]) + params["position"][pos]
  v = jnp.einsum("btd,dnh->btnh", x, params["value"])
  t = seg.shape[1]
  m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if causal:
    m &= np.tril(np.ones((t, t), bool))[None]
  a = jnp.einsum("binh,bjnh->bnij", jax.nn.relu(q), jax.nn.relu(k)) * jnp.asarray(m)[:, None]
  o = jnp.einsum("bnij,bjnh->binh", a, v) / (jnp.sum(a, axis=-1).transpose(0, 2, 1)[..., None] + eps)
  conv = jnp.einsum("btsh,bsnh->btnh", conv_matrix(params["conv_weight"], seg, causal=causal, grid=grid), v)
  valid = jnp.asarray(seg != 0)[:, :, None, None]
  o = jnp.where(valid, o + conv + params["conv_bias"], 0.0)
  return jnp.einsum("btnh,nhd->btd", o, params["out"])


@jax.jit(static_argnums=0)
def _apply(graphdef, state, x, seg, pos):
  return nnx.merge(graphdef, state)(x, ctx_of(seg, pos))


def apply(layer, x, seg, pos):
  graphdef, state = nnx.split(layer)
  return np.asarray(_apply(graphdef, state, jnp.asarray(x), jnp.asarray(seg), jnp.asarray(pos)))


# -- SLA ------------------------------------------------------------------------------------------


# Causal k = 3 (taps -2..0); bidirectional k = 4 (even: taps -2..1).
@pytest.mark.parametrize("causal,k", [(True, 3), (False, 4)], ids=["causal", "bidirectional"])
def test_layer_matches_reference(causal, k):
  x, seg, pos = inputs()
  layer = randomize(SLA(make_spec(causal, chunk=4, conv_kernel=k), rngs=nnx.Rngs(0)))
  check_values_and_grads(layer_fn(layer, seg, pos), lambda p, x: reference_sla(p, x, seg, pos, causal=causal),
                         params_of(layer), jnp.asarray(x), every_param_used=True)


def test_grid_matches_reference():
  """2-D depth-wise 3x3 conv on a 3 x 4 grid (row 0: its last two cells are padding)."""
  x, _, _ = inputs(t=12)
  seg = np.ones((B, 12), np.int32)
  seg[0, 10:] = 0
  pos = positions_of(seg)
  layer = randomize(SLA(make_spec(False, grid=(3, 4), conv_kernel=3), rngs=nnx.Rngs(0)))
  assert layer.conv_weight.shape == (3, 3, H)
  check_values_and_grads(layer_fn(layer, seg, pos),
                         lambda p, x: reference_sla(p, x, seg, pos, causal=False, grid=(3, 4)),
                         params_of(layer), jnp.asarray(x), every_param_used=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_rows_are_normalised(causal):
  """With V = 1 (and no conv term) every real row of the attention output is 1."""
  x, seg, pos = inputs()
  layer = SLA(make_spec(causal, chunk=4), rngs=nnx.Rngs(0))

  @jax.jit
  def attention_of_ones(x):
    q, k, _ = layer.projections(x)
    phi_q, phi_k = layer.features(q, k, ctx_of(seg, pos))
    return phi_q, phi_k, layer.mix(phi_q, phi_k, jnp.ones((B, T, N, H)), ctx_of(seg, pos))

  phi_q, phi_k, o = (np.asarray(a) for a in attention_of_ones(jnp.asarray(x)))
  m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if causal:
    m &= np.tril(np.ones((T, T), bool))[None]
  den = (np.einsum("binh,bjnh->bnij", phi_q, phi_k) * m[:, None]).sum(-1)
  ok = den.transpose(0, 2, 1) > 1e-2  # real rows whose denominator dwarfs the 1e-6
  assert ok.sum() > 20
  np.testing.assert_allclose(o[ok], 1.0, atol=1e-4)
  assert np.all(o[seg == 0] == 0)


def test_segments_are_isolated():
  """Perturbing the second packed segment (and the padding) leaves the first one's outputs unchanged."""
  x, seg, pos = inputs()
  layer = randomize(SLA(make_spec(False, chunk=4, conv_kernel=5), rngs=nnx.Rngs(0)))
  x2 = x.copy()
  x2[0, 5:] += 2.0
  a, b = apply(layer, x, seg, pos), apply(layer, x2, seg, pos)
  np.testing.assert_array_equal(a[0, :5], b[0, :5])
  assert np.abs(a[0, 5:11] - b[0, 5:11]).max() > 1e-3


def test_positional_embedding_starts_at_zero():
  layer = SLA(make_spec(False), rngs=nnx.Rngs(0))
  assert layer.position.shape == (MAX_LEN, N, H)
  assert np.all(np.asarray(layer.position[...]) == 0)


@pytest.mark.parametrize("k", [3, 1])
def test_decode_equals_full_forward(k):
  """Prefill 6 tokens, a 3-token call, then one token at a time (row 0: the second packed
  example starts inside the prefill)."""
  x, _, _ = inputs()
  seg = np.array([[1] * 5 + [2] * 8, [1] * 12 + [0]], np.int32)
  pos = positions_of(seg)
  layer = randomize(SLA(make_spec(True, chunk=4, conv_kernel=k), rngs=nnx.Rngs(0)))
  full = apply(layer, x, seg, pos)
  layer.init_cache(B, T, jnp.float32)
  got = decode_in_pieces(layer, x, seg, pos, [0, 6, 9] + list(range(10, T + 1)))
  valid = seg != 0
  assert_close(got[valid], full[valid], 2e-5, "decode vs full")


def test_ragged_prompts_decode_like_each_row_alone():
  """Prompts of 2 and 6 tokens right-padded into one prefill, then 5 shared steps: each row
  matches the full forward of its own sequence (the conv's taps skip the 4 padding slots)."""
  lens, width, steps = [2, 6], 6, 5
  x = np.random.default_rng(4).normal(size=(B, width + steps, D)).astype(np.float32)
  layer = randomize(SLA(make_spec(True, chunk=4, conv_kernel=3), rngs=nnx.Rngs(0)))
  own = np.zeros((B, width + steps), np.int32)
  for b, n in enumerate(lens):
    own[b, :n + steps] = 1
  seq = np.stack([np.concatenate([x[b, :n], x[b, width:], x[b, n:width]]) for b, n in enumerate(lens)])
  fulls = apply(layer, seq, own, np.broadcast_to(np.arange(width + steps), own.shape))
  layer.init_cache(B, width + steps, jnp.float32)
  state, step = decode_stepper(layer)
  seg = np.zeros((B, width), np.int32)
  for b, n in enumerate(lens):
    seg[b, :n] = 1
  state, pre = step(state, jnp.asarray(x[:, :width]), jnp.asarray(seg), jnp.broadcast_to(jnp.arange(width), (B, width)))
  for b, n in enumerate(lens):
    assert_close(np.asarray(pre)[b, :n], fulls[b, :n], 2e-5, "prefill")
  for i in range(steps):
    pos = np.array([[n + i] for n in lens], np.int32)
    state, y = step(state, jnp.asarray(x[:, width + i:width + i + 1]), jnp.ones((B, 1), jnp.int32), jnp.asarray(pos))
    for b, n in enumerate(lens):
      assert_close(np.asarray(y)[b, 0], fulls[b, n + i], 2e-5, f"step {i}")


RULES = (("batch", ("data", "fsdp")), ("length", "sequence"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("head_dim", None))


def test_sequence_parallel_scan_equals_single_device():
  """Length sharded 8 ways: the parallel scan for the attention, a halo exchange for the conv on V."""
  mesh = mesh_lib.make_mesh(ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=8)))
  sp = SequenceParallel(mesh, RULES, "scan")
  t = 32
  x = np.random.default_rng(3).normal(size=(1, t, D)).astype(np.float32)
  seg = np.ones((1, t), np.int32)
  seg[0, 11:] = 2  # a segment boundary inside a device's chunk ...
  seg[0, 29:] = 0  # ... and padding at the end
  pos = positions_of(seg)
  layer = randomize(SLA(make_spec(True, chunk=2, conv_kernel=3), rngs=nnx.Rngs(0)))
  want = apply(layer, x, seg, pos)
  graphdef, state = nnx.split(layer)

  def f(x, seg, pos):
    with use_sequence_parallel(sp):
      return nnx.merge(graphdef, state)(x, ctx_of(seg, pos))

  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "sequence")))
  assert_close(jax.jit(f)(put(x), put(seg), put(pos)), want, 2e-5)


@pytest.mark.parametrize("causal,options,match", [
    (True, dict(grid=(3, 4)), "bidirectional only"),
    (False, dict(conv_kernel=0), "model.sla.conv_kernel=0"),
    (False, dict(grid=(3, -1)), "model.sla.grid"),
])
def test_bad_options(causal, options, match):
  with pytest.raises(ValueError, match=match):
    SLA(make_spec(causal, **options), rngs=nnx.Rngs(0))


def test_errors_at_call_and_decode():
  x, seg, pos = inputs()
  with pytest.raises(ValueError, match=r"grid=\(3, 4\) has 12 cells but the sequence has 13"):
    SLA(make_spec(False, grid=(3, 4)), rngs=nnx.Rngs(0))(jnp.asarray(x), ctx_of(seg, pos))
  with pytest.raises(ValueError, match="decodes only causally"):
    SLA(make_spec(False), rngs=nnx.Rngs(0)).init_cache(B, T, jnp.float32)


# -- PRepBN ---------------------------------------------------------------------------------------


def test_gamma_schedule():
  kw = dict(total_steps=100, warmup_steps=10)
  expect = {0: 1.0, 9: 1.0, 10: 1.0, 35: 0.75, 60: 0.5, 109: 0.01, 110: 0.0, 500: 0.0}
  for step, g in expect.items():
    assert float(prepbn_gamma(step, **kw)) == pytest.approx(g, abs=1e-6), step
  # r0 scales the ramp but not the warm-up (pure LN).
  for step, g in {5: 1.0, 10: 0.5, 60: 0.25, 200: 0.0}.items():
    assert float(prepbn_gamma(step, r0=0.5, **kw)) == pytest.approx(g, abs=1e-6), step
  assert float(prepbn_gamma(None, total_steps=4)) == 1.0  # step None = 0, no warm-up: gamma = r0


def reference_prepbn(x, seg, step, p, *, total, warm, eps=1e-5):
  """gamma LN + (1 - gamma) (BN over the real tokens only + eta x), written from the formulas."""
  real = x[seg != 0]  # [n, D], gathered with a concrete mask
  mean, var = real.mean(0), real.var(0)
  bn = (x - mean) / jnp.sqrt(var + eps) * p["bn_scale"] + p["bn_bias"]
  ln = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + eps) * p["ln_scale"] + p["ln_bias"]
  g = 1.0 if step < warm else min(1.0, max(0.0, (total - (step - warm)) / total))
  return g * ln + (1 - g) * (bn + p["eta"] * x)


PREPBN_PARAMS = ("ln_scale", "ln_bias", "bn_scale", "bn_bias", "eta")


def make_prepbn(seed=0, **kw):
  m = PRepBN(D, total_steps=100, warmup_steps=10, rngs=nnx.Rngs(seed), **kw)
  r = np.random.default_rng(seed + 5)
  for name in PREPBN_PARAMS:
    shape = getattr(m, name).shape
    getattr(m, name)[...] = jnp.asarray(1.0 + 0.3 * r.normal(size=shape), jnp.float32)
  return m


def prepbn_data(seed=0):
  x = (np.random.default_rng(seed).normal(size=(B, T, D)) * 2.0 + 0.5).astype(np.float32)
  seg = np.ones((B, T), np.int32)
  seg[0, 9:] = 0
  seg[1, 11:] = 0
  return x, seg


@pytest.mark.parametrize("step", [3, 60])
def test_prepbn_training_matches_reference_and_grads(step):
  x, seg = prepbn_data()
  m = make_prepbn()
  graphdef, state = nnx.split(m)

  def f_layer(p, x):
    mm = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    for name in PREPBN_PARAMS:
      getattr(mm, name)[...] = p[name]
    return mm(x, segment_ids=jnp.asarray(seg), training=True, step=jnp.asarray(step, jnp.int32))

  f_ref = lambda p, x: reference_prepbn(x, seg, step, p, total=100, warm=10)
  p = {name: getattr(m, name)[...] for name in PREPBN_PARAMS}
  w = np.random.default_rng(3).normal(size=x.shape) * (seg != 0)[..., None]  # loss on real tokens
  assert_close(jax.jit(f_layer)(p, x)[seg != 0], f_ref(p, x)[seg != 0], 2e-5, "forward")
  loss = lambda f: (lambda p, x: jnp.sum(f(p, x) * w))
  g_got = jax.jit(jax.grad(loss(f_layer), argnums=(0, 1)))(p, jnp.asarray(x))
  g_want = jax.jit(jax.grad(loss(f_ref), argnums=(0, 1)))(p, jnp.asarray(x))
  for name in PREPBN_PARAMS:
    assert_close(g_got[0][name], g_want[0][name], 1e-4, f"d{name}")
  assert_close(g_got[1], g_want[1], 1e-4, "dx")
  if step < 10:  # warm-up: pure LN, nothing flows into BN's affine
    assert np.all(np.asarray(g_got[0]["bn_scale"]) == 0)
  else:
    assert np.abs(np.asarray(g_got[0]["bn_scale"])).max() > 1e-3


def test_prepbn_statistics_ignore_padding():
  x, seg = prepbn_data()
  x2 = x.copy()
  x2[seg == 0] = 100.0 * np.random.default_rng(9).normal(size=x2[seg == 0].shape)
  outs = []
  for data in (x, x2):
    m = make_prepbn()
    y = m(jnp.asarray(data), segment_ids=jnp.asarray(seg), training=True, step=50)
    outs.append((np.asarray(y), np.asarray(m.running_mean[...]), np.asarray(m.running_var[...])))
  np.testing.assert_allclose(outs[0][0][seg != 0], outs[1][0][seg != 0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(outs[0][2], outs[1][2], rtol=1e-6, atol=1e-7)


def test_prepbn_running_statistics():
  x, seg = prepbn_data()
  real = x[seg != 0].astype(np.float64)
  m = make_prepbn()
  m(jnp.asarray(x), segment_ids=jnp.asarray(seg), training=False, step=50)  # evaluation: no update
  np.testing.assert_array_equal(np.asarray(m.running_mean[...]), 0.0)
  np.testing.assert_array_equal(np.asarray(m.running_var[...]), 1.0)
  m(jnp.asarray(x), segment_ids=jnp.asarray(seg), training=True, step=5)  # warm-up: BN unused, no update
  np.testing.assert_array_equal(np.asarray(m.running_mean[...]), 0.0)
  m(jnp.asarray(x), segment_ids=jnp.asarray(seg), training=True, step=50)
  np.testing.assert_allclose(np.asarray(m.running_mean[...]), 0.1 * real.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(m.running_var[...]), 0.9 + 0.1 * real.var(0, ddof=1), rtol=1e-5)


def test_prepbn_eval_is_repbn_and_folds():
  x, seg = prepbn_data()
  m = make_prepbn()
  for s in (20, 21, 22):
    m(jnp.asarray(x + 0.1 * s), segment_ids=jnp.asarray(seg), training=True, step=s)
  rm, rv = np.asarray(m.running_mean[...]), np.asarray(m.running_var[...])
  p = {name: np.asarray(getattr(m, name)[...]) for name in PREPBN_PARAMS}
  want = (x - rm) / np.sqrt(rv + 1e-5) * p["bn_scale"] + p["bn_bias"] + p["eta"] * x
  y = np.asarray(m(jnp.asarray(x), segment_ids=jnp.asarray(seg), training=False, step=None))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)  # every token, padding included: no batch statistics
  scale, shift = (np.asarray(a) for a in m.fold())
  np.testing.assert_allclose(x * scale + shift, want, rtol=1e-5, atol=1e-5)
  assert np.abs(y - np.asarray(m(jnp.asarray(x), segment_ids=jnp.asarray(seg), training=True, step=200))).max() > 1e-3


def test_prepbn_rejects_bad_schedule():
  with pytest.raises(ValueError, match="model.prepbn.total_steps=0"):
    PRepBN(D, total_steps=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.prepbn.warmup_steps=-1"):
    PRepBN(D, total_steps=10, warmup_steps=-1, rngs=nnx.Rngs(0))
