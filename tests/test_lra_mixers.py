"""Linformer, Reformer, Sinkhorn and Synthesizer (layers/lra) against dense references written from
their formulas: forward values and gradients w.r.t. inputs and parameters, causal and bidirectional,
padding and packed segments where supported, lengths that are not a multiple of any chunk/block."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.reference import make_mask, reference_attention
from layers import mixers
from layers.attention.exact import rope
from layers.functional import FunctionalModel
from layers.lra.linformer import Linformer, reference_linformer
from layers.lra.synthesizer import FixedRandom, Synthesizer
from layers.mixer_base import MixContext, MixerSpec
from layers.models import ModelSpec, build_model
from layers.lra import reformer as R
from layers.lra import sinkhorn as S

D, N, KV = 32, 4, 2


def _spec(causal, *, n=N, kv=KV, max_len=16, positions="rope", layer_index=1, **options):
  return MixerSpec(d_model=D, num_heads=n, num_kv_heads=kv, causal=causal, positions=positions,
                   layer_index=layer_index, num_layers=2, max_len=max_len, options=tuple(sorted(options.items())))


def _segments(t, layout):
  """[2, t] segment ids. "pad": row 0 one full segment, row 1 padding at the end. "packed":
  row 0 two segments then padding, row 1 one segment then padding. "full": no padding."""
  seg = np.ones((2, t), np.int32)
  if layout == "pad":
    seg[1, t - 4:] = 0
  elif layout == "packed":
    seg[0, 6:] = 2
    seg[0, t - 2:] = 0
    seg[1, t - 3:] = 0
  return seg


def _ctx(seg, index=None, **kw):
  pos = np.zeros_like(seg)
  for row in range(seg.shape[0]):  # position within the own segment
    for i in range(1, seg.shape[1]):
      pos[row, i] = pos[row, i - 1] + 1 if seg[row, i] == seg[row, i - 1] else 0
  return MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), index=index, **kw)


def _x(t, seed=1, b=2):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def _close(a, b, what, tol=3e-5):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  err = np.abs(a - b)
  np.testing.assert_allclose(a, b, atol=tol, rtol=tol,
                             err_msg=f"{what}: max err {err.max():.2e}, mean {err.mean():.2e}")


def _check_module(module, x, fast, ref, tol=3e-5):
  """Values and gradients (w.r.t. x and every parameter) of fast(m, x) and ref(m, x), the
  gradients of a fixed random projection of the output; each side compiled once."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  w = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)

  def grads(fn):
    def loss(p, x):
      out = fn(nnx.merge(graphdef, p, rest), x)
      return jnp.sum(out * w), out
    return jax.grad(loss, argnums=(0, 1), has_aux=True)

  (gp_fast, gx_fast), out_fast = jax.jit(grads(fast))(params, x)
  (gp_ref, gx_ref), out_ref = jax.jit(grads(ref))(params, x)
  _close(out_fast, out_ref, "values", tol)
  assert float(jnp.abs(out_ref).max()) > 1e-2  # not a comparison of zeros
  _close(gx_fast, gx_ref, "grad x", tol)
  flat_fast, flat_ref = nnx.to_flat_state(gp_fast), dict(nnx.to_flat_state(gp_ref))
  assert len(flat_fast) == len(flat_ref) > 0
  for path, g in flat_fast:
    _close(g[...], flat_ref[path][...], f"grad {'/'.join(map(str, path))}", tol)
  return out_fast


def _plain_mask(seg, causal):
  """[B, T, T] written per (i, j): same nonzero segment (and j <= i)."""
  b, t = seg.shape
  m = np.zeros((b, t, t), bool)
  for r in range(b):
    for i in range(t):
      for j in range(t):
        m[r, i, j] = seg[r, i] != 0 and seg[r, i] == seg[r, j] and (not causal or j <= i)
  return m


def _softmax_mix(logits_bnij, v_bjnh, mask_bij):
  logits = jnp.where(mask_bij[:, None], logits_bnij, -jnp.inf)
  anyk = mask_bij.any(-1)[:, None, :, None]
  probs = jnp.where(anyk, jax.nn.softmax(jnp.where(anyk, logits, 0.0), axis=-1), 0.0)
  return jnp.einsum("bnij,bjnh->binh", probs, v_bjnh)


# ------------------------------------------------------------------ Linformer


@pytest.mark.parametrize("share_kv", [False, True])
def test_linformer_matches_formula(share_kv):
  t, kproj = 13, 5
  seg = _segments(t, "pad")
  ctx = _ctx(seg)
  m = Linformer(_spec(False, k=kproj, share_kv=share_kv), rngs=nnx.Rngs(0))
  assert (m.f_proj is None) == share_kv

  def ref(m, x):
    q, k, v = rope(m.query(x), ctx.positions), rope(m.key(x), ctx.positions), m.value(x)
    e = m.e_proj[...]
    f = e if share_kv else m.f_proj[...]
    real = (seg != 0)[:, :, None, None]
    kz, vz = jnp.where(real, k, 0.0), jnp.where(real, v, 0.0)
    kp = jnp.einsum("rt,btkh->brkh", e[:, :t], kz)  # K' = E K, sliced to T columns
    vp = jnp.einsum("rt,btkh->brkh", f[:, :t], vz)
    kp, vp = jnp.repeat(kp, N // KV, axis=2), jnp.repeat(vp, N // KV, axis=2)  # query head n uses kv head n // 2
    s = jnp.einsum("btnh,brnh->bntr", q, kp) / math.sqrt(D // N)
    o = jnp.einsum("bntr,brnh->btnh", jax.nn.softmax(s, axis=-1), vp)
    return m.out(jnp.where(real, o, 0.0))

  out = _check_module(m, _x(t), lambda m, x: m(x, ctx), ref)

  @jax.jit
  def twin(x):  # the module's own reference twin agrees as well
    q, k, v = rope(m.query(x), ctx.positions), rope(m.key(x), ctx.positions), m.value(x)
    return m.out(reference_linformer(q, k, v, m.e_proj[...], (m.e_proj if share_kv else m.f_proj)[...], seg))

  _close(out, twin(_x(t)), "reference_linformer")


def test_linformer_padding_content_and_permuted_storage():
  t = 11
  seg = _segments(t, "pad")
  m = Linformer(_spec(False, k=4), rngs=nnx.Rngs(1))
  f = jax.jit(lambda x, seg, pos, idx: m(x, MixContext(segment_ids=seg, positions=pos, index=idx)))
  ctx = _ctx(seg)
  x = _x(t)
  base = f(x, ctx.segment_ids, ctx.positions, None)
  noisy = f(x.at[1, t - 4:].add(3.0), ctx.segment_ids, ctx.positions, None)  # change only the padded tokens
  np.testing.assert_array_equal(np.asarray(base[1, : t - 4]), np.asarray(noisy[1, : t - 4]))
  # Rows stored permuted (ctx.index = true positions): E's columns follow the tokens.
  perm = np.random.default_rng(0).permutation(t)
  idx = jnp.asarray(np.broadcast_to(perm, (2, t)).astype(np.int32))
  _close(f(x[:, perm], ctx.segment_ids[:, perm], ctx.positions[:, perm], idx), base[:, perm], "permuted storage")


def test_linformer_errors():
  with pytest.raises(ValueError, match="causal=True"):
    Linformer(_spec(True), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="k=0"):
    Linformer(_spec(False, k=0), rngs=nnx.Rngs(0))
  m = Linformer(_spec(False, max_len=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"max_len=8.*T=9"):
    m(_x(9), _ctx(np.ones((2, 9), np.int32)))
  with pytest.raises(NotImplementedError, match="decoding"):
    m.init_cache(1, 8, jnp.float32)
  with pytest.raises(NotImplementedError, match="decoding"):
    m(_x(4), _ctx(np.ones((2, 4), np.int32), decode=True))


# ------------------------------------------------------------------ Synthesizer


def _synth_reference(kind, causal, seg, pos):
  def ref(m, x):
    b, t = seg.shape
    bi, ni, ii, jj = np.meshgrid(np.arange(b), np.arange(N), np.arange(t), np.arange(t), indexing="ij")
    pb = pos[bi, jj]  # position of key j within its segment
    if kind == "dense":
      hid = jax.nn.relu(x @ m.w1.kernel[...] + m.w1.bias[...])
      full = jnp.einsum("btf,fnl->btnl", hid, m.w2.kernel[...]) + m.w2.bias[...]  # B_i in R^{N x max_len}
      logits = full[bi, ii, ni, pb]
    else:
      logits = m.table[...][ni, pos[bi, ii], pb]
    v = jnp.einsum("btd,dnh->btnh", x, m.value.kernel[...])
    return m.out(_softmax_mix(logits, v, _plain_mask(seg, causal)))
  return ref


@pytest.mark.parametrize("kind", ["dense", "random"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_synthesizer_matches_dense_reference(kind, causal):
  t = 11
  seg = _segments(t, "packed")
  ctx = _ctx(seg)
  m = Synthesizer(_spec(causal, kind=kind, hidden=24), rngs=nnx.Rngs(0))
  _check_module(m, _x(t), lambda m, x: m(x, ctx), _synth_reference(kind, causal, seg, np.asarray(ctx.positions)))


@pytest.mark.parametrize("kind", ["dense", "random"])
def test_synthesizer_packed_example_equals_the_example_alone(kind):
  """Logits are indexed by the position within the segment, so the second packed example of row 0
  gives exactly what it gives alone at the start of a row."""
  t = 11
  seg = _segments(t, "packed")
  m = Synthesizer(_spec(True, kind=kind), rngs=nnx.Rngs(2))
  f = jax.jit(lambda x, ctx: m(x, MixContext(segment_ids=ctx[0], positions=ctx[1])))
  ctx = _ctx(seg)
  x = _x(t)
  packed = f(x, (ctx.segment_ids, ctx.positions))
  alone_seg = np.zeros((2, t), np.int32)
  alone_seg[0, :3] = 1  # tokens 6..8 of row 0 (segment 2) moved to the front of a row
  alone_ctx = _ctx(alone_seg)
  alone = f(x.at[0, :3].set(x[0, 6:9]).at[0, 3:].set(0.0), (alone_ctx.segment_ids, alone_ctx.positions))
  _close(packed[0, 6:9], alone[0, :3], "packed vs alone")


def test_random_synthesizer_fixed_table_is_not_trained():
  seg = _segments(9, "pad")
  ctx = _ctx(seg)
  m = Synthesizer(_spec(False, kind="random", fixed=True), rngs=nnx.Rngs(0))
  assert isinstance(m.table, FixedRandom) and not isinstance(m.table, nnx.Param)
  assert not any("table" in str(p) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param)))
  # The fixed table still shapes the output: a different table, a different output.
  x = _x(9)
  run = nnx.jit(lambda m, x: m(x, ctx))
  before = run(m, x)
  m.table[...] = m.table[...] * 2.0
  assert float(jnp.abs(run(m, x) - before).max()) > 1e-3
  # Trained (default) table: a parameter with a nonzero gradient.
  m2 = Synthesizer(_spec(False, kind="random"), rngs=nnx.Rngs(0))
  g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, ctx) ** 2)))(m2)
  assert float(jnp.abs(g.table[...]).max()) > 0


def test_synthesizer_errors():
  with pytest.raises(ValueError, match="kind='factorized'"):
    Synthesizer(_spec(True, kind="factorized"), rngs=nnx.Rngs(0))
  m = Synthesizer(_spec(True, max_len=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"max_len=8.*T=10"):
    m(_x(10), _ctx(np.ones((2, 10), np.int32)))
  with pytest.raises(NotImplementedError, match="decoding"):
    m.init_cache(1, 8, jnp.float32)


# ------------------------------------------------------------------ Reformer


def _shared_qk_reference(causal, seg, ctx):
  """Dense shared-QK attention: logits q . (k / |k|) / sqrt(H), self logit -1e5, segment/causal mask."""
  def ref(m, x):
    qk, v = rope(m.qk(x), ctx.positions), m.value(x)
    k_hat = qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)
    s = jnp.einsum("binh,bjnh->bnij", qk, k_hat) / math.sqrt(D // N)
    s = jnp.where(np.eye(seg.shape[1], dtype=bool), -1e5, s)
    return m.out(_softmax_mix(s, v, _plain_mask(seg, causal)))
  return ref


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_reformer_one_bucket_one_chunk_is_shared_qk_attention(causal):
  t = 13
  seg = _segments(t, "packed")
  seg[1, 0] = 3  # a one-token segment: its only target is itself
  ctx = _ctx(seg)
  m = R.Reformer(_spec(causal, n_buckets=1, chunk=16, n_hashes=2), rngs=nnx.Rngs(0))
  _check_module(m, _x(t), lambda m, x: m(x, ctx), _shared_qk_reference(causal, seg, ctx))


@pytest.mark.parametrize("causal,dedup,same_bucket,chunk", [
    (False, True, False, 4), (True, True, True, 3), (False, False, True, 7)])
def test_lsh_attention_matches_dense_round_masks(causal, dedup, same_bucket, chunk):
  """Several buckets, rounds and chunks (T = 13 is no multiple of the chunk; chunk 7 gives two
  chunks, each the other's previous one): against the per-token key sets written out densely."""
  b, t, n, h = 2, 13, 2, 8
  r = np.random.default_rng(3)
  qk = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
  v = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
  seg = _segments(t, "packed")
  idx = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  buckets = np.asarray(R.lsh_buckets(qk, R.lsh_rotations(0, 0, 3, n, h, 4), 4))
  assert len(np.unique(buckets)) == 4  # the hash really splits the tokens
  kw = dict(chunk=chunk, causal=causal, dedup=dedup, same_bucket=same_bucket)
  w = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)

  def vg(fn):
    def loss(qk, v):
      out = fn(qk, v, seg, idx, buckets, **kw)
      return jnp.sum(out * w), out
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

  (gq_f, gv_f), out_f = vg(R.lsh_attention)(qk, v)
  (gq_s, gv_s), out_s = vg(R.reference_lsh_attention)(qk, v)
  _close(out_f, out_s, "values")
  assert float(jnp.abs(out_s).max()) > 0.1
  _close(gq_f, gq_s, "grad qk")
  _close(gv_f, gv_s, "grad v")


def test_reformer_is_causal_and_rotations_are_fixed_per_layer():
  t = 14
  seg = np.ones((2, t), np.int32)
  m = R.Reformer(_spec(True, n_buckets=4, chunk=4, n_hashes=2), rngs=nnx.Rngs(0))
  f = jax.jit(lambda x: m(x, _ctx(seg)))
  x = _x(t)
  base, moved = f(x), f(x.at[:, 9:].add(np.random.default_rng(2).normal(size=(2, t - 9, D))))
  np.testing.assert_allclose(np.asarray(base[:, :9]), np.asarray(moved[:, :9]), atol=1e-6)
  assert float(jnp.abs(base[:, 9:] - moved[:, 9:]).max()) > 1e-3
  same = R.Reformer(_spec(True, n_buckets=4, n_hashes=2), rngs=nnx.Rngs(5)).rotations()  # other param seed
  np.testing.assert_array_equal(m.rotations(), same)
  other = R.Reformer(_spec(True, n_buckets=4, n_hashes=2, layer_index=0), rngs=nnx.Rngs(0)).rotations()
  assert m.rotations().shape == (2, N, D // N, 2) and not np.allclose(m.rotations(), other)
  assert not np.allclose(m.rotations()[0], m.rotations()[1])  # per hash round


def test_lsh_attention_gradient_is_finite_for_a_zero_token():
  """A real token whose shared qk is exactly 0 (e.g. a zero input) has a zero key direction:
  its gradient must stay finite, not 0 * inf from the key normalisation."""
  b, t, n, h = 1, 8, 1, 4
  r = np.random.default_rng(0)
  qk = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32).at[:, 3].set(0.0)
  v = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
  seg = np.ones((b, t), np.int32)
  idx = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  buckets = np.asarray(R.lsh_buckets(qk, R.lsh_rotations(0, 0, 2, n, h, 2), 2))
  for causal in (True, False):
    g = jax.grad(lambda qk, v: jnp.sum(R.lsh_attention(qk, v, seg, idx, buckets, chunk=4, causal=causal,
                                                       dedup=True, same_bucket=False) ** 2), (0, 1))(qk, v)
    assert all(np.isfinite(np.asarray(x)).all() for x in g), f"causal={causal}: non-finite gradient"


def test_reformer_errors():
  with pytest.raises(ValueError, match="n_buckets=3"):
    R.Reformer(_spec(True, n_buckets=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="chunk=0"):
    R.Reformer(_spec(True, chunk=0), rngs=nnx.Rngs(0))
  m = R.Reformer(_spec(True), rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="decoding"):
    m.init_cache(1, 8, jnp.float32)
  with pytest.raises(NotImplementedError, match="decoding"):
    m(_x(4), _ctx(np.ones((2, 4), np.int32), decode=True))


# ------------------------------------------------------------------ Sinkhorn


def _sinkhorn_reference(m, causal, seg, ctx):
  """The whole Sinkhorn computation rebuilt from its definition: block sums by a loop, the
  sorting MLP from its weights, probability-space balancing, the per-block attention loop."""
  def ref(m, x):
    b, t = seg.shape
    bs, tp, nb = S.block_geometry(t, m.block)
    real = jnp.asarray(seg != 0, jnp.float32)[..., None]
    sums = [jnp.sum((x * real)[:, i * bs:(i + 1) * bs], axis=1) for i in range(nb)]
    if causal:
      sums = [sum(sums[:i], jnp.zeros_like(sums[0])) for i in range(nb)]
    summary = jnp.stack(sums, 1)  # [B, nb, D]
    hid = jax.nn.relu(summary @ m.sort_in.kernel[...] + m.sort_in.bias[...])
    r = jnp.einsum("bif,fkj->bkij", hid, m.sort_out.kernel[...]) + m.sort_out.bias[...][None, :, None]
    r = r[..., :nb]
    block_real = np.zeros((b, tp), bool)
    block_real[:, :t] = seg != 0
    block_real = block_real.reshape(b, nb, bs).any(-1)
    mask = block_real[:, None, :, None] & block_real[:, None, None, :]
    if causal:
      mask = mask & (np.arange(nb)[None, :] < np.arange(nb)[:, None])
    p = S.reference_sinkhorn_permutation(r / m.temperature, mask, m.iters, causal)
    q, k, v = rope(m.query(x), ctx.positions), rope(m.key(x), ctx.positions), m.value(x)
    return m.out(S.reference_sinkhorn_attention(q, k, v, seg, p, block=m.block, causal=causal))
  return ref


@pytest.mark.parametrize("causal,layout,block", [(False, "pad", 4), (True, "pad", 4)])
def test_sinkhorn_matches_dense_construction(causal, layout, block):
  t = 10
  seg = _segments(t, layout)
  ctx = _ctx(seg)
  m = S.Sinkhorn(_spec(causal, block=block, iters=2, hidden=8), rngs=nnx.Rngs(0))
  _check_module(m, _x(t), lambda m, x: m(x, ctx), _sinkhorn_reference(m, causal, seg, ctx), tol=5e-5)


@pytest.mark.parametrize("causal,layout", [(False, "pad"), (True, "packed")])
def test_sinkhorn_one_block_is_exact_attention(causal, layout):
  """One block: the sorted block is the block itself (bidirectional: every key twice, same
  softmax) or absent (causal: block 0 has no earlier block)."""
  t = 11
  seg = _segments(t, layout)
  ctx = _ctx(seg)
  m = S.Sinkhorn(_spec(causal, block=16), rngs=nnx.Rngs(0))

  def ref(m, x):
    q, k, v = rope(m.query(x), ctx.positions), rope(m.key(x), ctx.positions), m.value(x)
    idx = np.broadcast_to(np.arange(t), seg.shape)
    return m.out(reference_attention(q, k, v, make_mask(seg, seg, idx, idx, causal)))

  _check_module(m, _x(t), lambda m, x: m(x, ctx), ref)


def test_sinkhorn_balancing_log_space_equals_probability_space():
  r = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 5)) * 2, jnp.float32)
  valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], bool)
  for causal in (False, True):
    mask = S.permutation_mask(jnp.asarray(valid), causal)
    got = jnp.where(mask, jnp.exp(S.sinkhorn_log(r, mask, 4, causal)), 0.0)
    _close(got, S.reference_sinkhorn_permutation(r, mask, 4, causal), f"causal={causal}")
  # Bidirectional balancing converges to a doubly stochastic matrix on the support.
  mask = S.permutation_mask(jnp.asarray(valid), False)
  p = np.asarray(jnp.where(mask, jnp.exp(S.sinkhorn_log(r, mask, 200, False)), 0.0))
  np.testing.assert_allclose(p[0].sum(-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(p[0].sum(-2), 1.0, atol=1e-4)
  np.testing.assert_allclose(p[1, :, :4, :4].sum(-1), 1.0, atol=1e-4)
  assert np.all(p[1, :, 4] == 0) and np.all(p[1, :, :, 4] == 0)


def test_sinkhorn_is_causal():
  t = 14
  seg = np.ones((2, t), np.int32)
  m = S.Sinkhorn(_spec(True, block=4, iters=3), rngs=nnx.Rngs(3))
  f = jax.jit(lambda x: m(x, _ctx(seg)))
  x = _x(t)
  # Token 9 is inside block 2, whose sorted block mixes blocks 0 and 1 (a single earlier block
  # would hide leaks: a row's scale cancels in the sorted mean), so query 8 sees the whole scheme.
  noise = jnp.asarray(np.random.default_rng(2).normal(size=(2, t - 9, D)), jnp.float32)
  base, moved = f(x), f(x.at[:, 9:].add(noise))
  np.testing.assert_allclose(np.asarray(base[:, :9]), np.asarray(moved[:, :9]), atol=1e-6)
  assert float(jnp.abs(base[:, 9:] - moved[:, 9:]).max()) > 1e-3


def test_sinkhorn_gumbel_noise_only_in_training():
  t = 12
  seg = np.ones((2, t), np.int32)
  m = S.Sinkhorn(_spec(False, block=4, gumbel=True), rngs=nnx.Rngs(0))
  x = _x(t)
  run = jax.jit(lambda x, rng, training: m.permutation(x, _ctx(seg, dropout_rng=rng, training=training)),
                static_argnums=2)
  plain = run(x, jax.random.key(1), False)  # evaluation: no noise even with an rng
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(run(x, jax.random.key(2), False)))
  noisy = run(x, jax.random.key(1), True)
  assert float(jnp.abs(noisy - plain).max()) > 1e-4


def test_sinkhorn_gradient_is_finite_for_a_nearly_hard_permutation():
  """A slot whose sorted mixture holds real tokens only through ~1e-22 of P (a nearly hard P
  pointing at a block that is padding there) keeps finite values and gradients."""
  t, block = 10, 4  # blocks [0-3], [4-7], [8-9 + 2 padding slots]
  r = np.random.default_rng(0)
  q = jnp.asarray(r.normal(size=(1, t, 2, 4)), jnp.float32)
  k = jnp.asarray(r.normal(size=(1, t, 1, 4)), jnp.float32)
  v = jnp.asarray(r.normal(size=(1, t, 1, 4)), jnp.float32)
  seg = np.ones((1, t), np.int32)
  p = jnp.asarray(np.eye(3)[::-1].copy(), jnp.float32)[None, None]  # block i sorted from block 2 - i
  p = jnp.maximum(p, 1e-22)  # row 0 points at block 2, whose slots 2 and 3 are padding

  def loss(q, k, v, p):
    return jnp.sum(S.sinkhorn_attention(q, k, v, seg, p, block=block, causal=False) ** 2)

  val, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, p)
  assert np.isfinite(float(val))
  assert all(np.isfinite(np.asarray(x)).all() for x in grads), [bool(np.isfinite(np.asarray(x)).all()) for x in grads]


def test_sinkhorn_errors():
  with pytest.raises(ValueError, match="temperature=0"):
    S.Sinkhorn(_spec(True, temperature=0.0), rngs=nnx.Rngs(0))
  m = S.Sinkhorn(_spec(True, block=4, max_len=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"max_len=8.*T=9"):
    m(_x(9), _ctx(np.ones((2, 9), np.int32)))
  seg = np.ones((2, 6), np.int32)
  with pytest.raises(NotImplementedError, match="storage order"):
    m(_x(6), _ctx(seg, index=jnp.asarray(np.broadcast_to(np.arange(6), (2, 6)))))
  with pytest.raises(NotImplementedError, match="decoding"):
    m.init_cache(1, 8, jnp.float32)


# ------------------------------------------------------------------ inside models


def test_mixers_run_inside_a_model(monkeypatch):
  """All four in one classifier, built through the registry and model options (max_len, layer
  index and options come from the model): finite outputs, padded tokens' content ignored end to end."""
  names = {"linformer": Linformer, "reformer": R.Reformer, "sinkhorn": S.Sinkhorn, "synthesizer": Synthesizer}
  for name, cls in names.items():
    monkeypatch.setitem(mixers.MIXERS, name, cls)
  options = (("linformer", (("k", 4),)), ("reformer", (("chunk", 4), ("n_buckets", 2), ("n_hashes", 1))),
             ("sinkhorn", (("block", 4), ("iters", 1))), ("synthesizer", (("kind", "random"),)))
  spec = ModelSpec(kind="classify", vocab_size=20, num_classes=3, max_len=16, mixers=tuple(names), d_model=D,
                   num_heads=N, num_kv_heads=KV, mlp_ratio=2, mlp="gelu", norm="rmsnorm", positions="rope",
                   dropout=0.0, pooling="mean", tie_embeddings=True, dtype="float32", mixer_options=options)
  model = build_model(spec, seed=0)
  kinds = [type(b.mixer).__name__ for b in model.encoder.blocks]
  assert kinds == ["Linformer", "Reformer", "Sinkhorn", "Synthesizer"]
  assert model.encoder.blocks[3].mixer.kind == "random" and model.encoder.blocks[1].mixer.chunk == 4
  fm = FunctionalModel(model)
  params, extra = fm.init_params(), fm.init_extra()
  seg = np.ones((2, 13), np.int32)
  seg[1, 10:] = 0
  apply = jax.jit(lambda ids: fm.apply(params, extra, {"inputs": ids, "segment_ids": seg, "positions": np.broadcast_to(
      np.arange(13, dtype=np.int32), seg.shape)})[0])
  ids = np.random.default_rng(0).integers(1, 20, size=(2, 13)).astype(np.int32)
  base = np.asarray(apply(ids))
  assert np.all(np.isfinite(base))
  padded, real = ids.copy(), ids.copy()
  padded[1, 11] = padded[1, 11] % 19 + 1  # a padding token: nothing may change
  real[1, 4] = real[1, 4] % 19 + 1
  np.testing.assert_allclose(np.asarray(apply(padded)), base, atol=1e-5)
  assert np.abs(np.asarray(apply(real))[1] - base[1]).max() > 1e-5
