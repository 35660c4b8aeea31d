"""Combiner-Fixed and Swin against their dense twins (values, gradients), plus the properties
that define them: Combiner's full attention support, Swin's cyclic-shift windows."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from kernels.reference import make_mask, reference_attention
from layers import mixers
from layers.attention.exact import rope
from layers.functional import FunctionalModel
from layers.mixer_base import MixContext, MixerSpec
from layers.models import ModelSpec, build_model
from layers.attention import combiner as C
from layers.attention import swin as S

TOL = {jnp.float32: dict(atol=3e-5, rtol=3e-5), jnp.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def _case(b=2, t=23, n=4, kv=2, h=8, seed=0, dtype=jnp.float32):
  """Row 0: two packed segments then padding; row 1: one segment then padding."""
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=(b, t, m, h)), dtype) for m in (n, kv, kv))
  seg = np.ones((b, t), np.int32)
  seg[0, 10:] = 2
  seg[0, t - 4:] = 0
  seg[-1, t - 3:] = 0
  return q, k, v, seg


def _close(a, b, dtype, what=""):
  err = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **TOL[dtype],
                             err_msg=f"{what}: max err {err.max():.2e}, mean err {err.mean():.2e}")


def _check_values_and_grads(fast, dense, args, dtype=jnp.float32):
  """Values and the gradients (w.r.t. every argument) of a random projection of the output."""
  w = jnp.asarray(np.random.default_rng(7).normal(size=args[0].shape), dtype)

  def with_grads(f):
    def run(*a):
      out, pullback = jax.vjp(f, *a)
      return out, pullback(w.astype(out.dtype))
    return jax.jit(run)

  (got, g_got), (want, g_want) = with_grads(fast)(*args), with_grads(dense)(*args)
  _close(got, want, dtype, "values")
  assert float(jnp.abs(want.astype(jnp.float32)).max()) > 0.1  # not a vacuous comparison of zeros
  for i, (a, b) in enumerate(zip(g_got, g_want)):
    _close(a, b, dtype, f"grad of argument {i}")


def _dense_mask(seg, causal):
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  return make_mask(seg, seg, idx, idx, causal)


# ------------------------------------------------------------------ Combiner


@pytest.mark.parametrize("causal,span,summary", [
    (True, 4, "identity-max"), (False, 5, "relu-mean")])
def test_combiner_matches_the_dense_factorised_probabilities(causal, span, summary):
  q, k, v, seg = _case()
  kw = dict(span=span, causal=causal, summary=summary)
  _check_values_and_grads(lambda q, k, v: C.combiner_attention(q, k, v, seg, **kw),
                          lambda q, k, v: C.reference_combiner(q, k, v, seg, **kw), (q, k, v))


def test_combiner_bf16():
  q, k, v, seg = _case(dtype=jnp.bfloat16)
  kw = dict(span=4, causal=True)
  got = jax.jit(lambda q, k, v: C.combiner_attention(q, k, v, seg, **kw))(q, k, v)
  _close(got, C.reference_combiner(q, k, v, seg, **kw), jnp.bfloat16, "bf16 values")


@pytest.mark.parametrize("causal,summary", [(True, "identity-max"), (False, "identity-sum")])
def test_combiner_has_full_attention_support(causal, summary):
  """p(j|i) > 0 exactly on the support (same segment, j <= i if causal), rows sum to 1, padding
  rows are empty, and the sub-quadratic output is P V."""
  q, k, v, seg = _case(t=23)
  p = jax.jit(lambda q, k: C.combiner_probabilities(q, k, seg, span=4, causal=causal, summary=summary))(q, k)
  p = np.asarray(p, np.float64)  # [B, N, T, T]
  support = np.asarray(_dense_mask(seg, causal))[:, None]
  assert (p[np.broadcast_to(support, p.shape)] > 0).all(), "a key of the support gets no probability"
  assert (p[~np.broadcast_to(support, p.shape)] == 0).all(), "probability outside the support"
  row_sum = p.sum(-1)
  valid = np.broadcast_to((seg > 0)[:, None], row_sum.shape)
  np.testing.assert_allclose(row_sum[valid], 1.0, atol=1e-5)
  assert (row_sum[~valid] == 0).all()
  # Not plain attention: spans are reached through summaries.
  dense = np.asarray(jax.nn.softmax(jnp.where(support, jnp.einsum("binh,bjnh->bnij", q, jnp.repeat(k, 2, 2)) /
                                              math.sqrt(8), -1e30), axis=-1))
  assert np.abs(np.where(support, p - dense, 0)).max() > 1e-2
  out = jax.jit(lambda q, k, v: C.combiner_attention(q, k, v, seg, span=4, causal=causal, summary=summary))(q, k, v)
  _close(out, jnp.einsum("bnij,bjnh->binh", p.astype(np.float32), jnp.repeat(v, 2, 2)), jnp.float32, "P V")


def test_combiner_with_span_one_is_exact_causal_attention():
  """Span 1: every summary is one token (key k_j, value v_j), so Combiner = softmax attention."""
  q, k, v, seg = _case()
  _check_values_and_grads(lambda q, k, v: C.combiner_attention(q, k, v, seg, span=1, causal=True),
                          lambda q, k, v: reference_attention(q, k, v, _dense_mask(seg, True)), (q, k, v))


def test_combiner_ignores_the_future_and_other_segments():
  q, k, v, seg = _case(b=1, t=23)
  f = jax.jit(lambda q, k, v: C.combiner_attention(q, k, v, seg, span=4, causal=True))
  base = np.asarray(f(q, k, v))
  bump = lambda x, sl: x.at[:, sl].add(1.0)
  future = np.asarray(f(bump(q, slice(13, None)), bump(k, slice(13, None)), bump(v, slice(13, None))))
  np.testing.assert_array_equal(base[:, :13], future[:, :13])
  assert np.abs(base[:, 13:19] - future[:, 13:19]).max() > 1e-3
  g = jax.jit(lambda q, k, v: C.combiner_attention(q, k, v, seg, span=4, causal=False))
  base = np.asarray(g(q, k, v))
  other = np.asarray(g(bump(q, slice(0, 10)), bump(k, slice(0, 10)), bump(v, slice(0, 10))))  # all of segment 1
  np.testing.assert_allclose(base[:, 10:], other[:, 10:], atol=1e-6)
  assert np.abs(base[:, :10] - other[:, :10]).max() > 1e-3


def largest_intermediate(fn, *args) -> int:
  """Elements of the largest array in the jaxpr of fn (sub-jaxprs of loops, conds and custom
  derivatives included)."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      best = max([best] + [math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars])
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (tuple, list)) else (param,)):
          if isinstance(sub, jex_core.ClosedJaxpr):
            best = max(best, walk(sub.jaxpr))
          elif isinstance(sub, jex_core.Jaxpr):
            best = max(best, walk(sub))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_combiner_never_builds_a_t_by_t_array(causal):
  """Forward and backward at T = 1024 stay below T^2/8 elements (the dense twin needs T^2)."""
  t = 1024
  q = jnp.zeros((1, t, 1, 8))
  seg = jnp.ones((1, t), jnp.int32)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v))
  grad = lambda f: jax.grad(loss(f), argnums=(0, 1, 2))
  fast = lambda q, k, v: C.combiner_attention(q, k, v, seg, span=32, causal=causal)
  dense = lambda q, k, v: C.reference_combiner(q, k, v, seg, span=32, causal=causal)
  assert largest_intermediate(grad(fast), q, q, q) < t * t // 8
  assert largest_intermediate(grad(dense), q, q, q) >= t * t  # the check can fail


# ------------------------------------------------------------------ Swin


def _paper_mask(t, window, grid, shifted):
  """Visibility by Swin's own construction, pair by pair: pad the grid to multiples of the
  window, roll it by -floor(M/2) (if the side is longer than M), cut windows, and label the
  regions of the last window row/column with the slices (0, -M), (-M, -s), (-s, None)."""
  hy, hx = (1, t) if grid is None else grid
  sides = []
  for dim, is_cols in ((hy, False), (hx, True)):
    m = min(window, dim) if (is_cols or grid is not None) else 1
    s = window // 2 if (shifted and dim > window and (is_cols or grid is not None)) else 0
    sides.append((dim, m, s, -(-dim // m) * m))

  def place(coord, side):
    dim, m, s, padded = side
    p = (coord - s) % padded  # position after the roll
    region = 0 if s == 0 or p < padded - m else (1 if p < padded - s else 2)
    return p // m, region

  out = np.zeros((t, t), bool)
  for i in range(t):
    for j in range(t):
      (wyi, ryi), (wxi, rxi) = place(i // hx, sides[0]), place(i % hx, sides[1])
      (wyj, ryj), (wxj, rxj) = place(j // hx, sides[0]), place(j % hx, sides[1])
      out[i, j] = (wyi, wxi, ryi, rxi) == (wyj, wxj, ryj, rxj)
  return out


@pytest.mark.parametrize("t,window,grid", [(23, 4, None), (23, 5, None), (35, 3, (5, 7)), (30, 4, (6, 5)),
                                           (16, 4, (4, 4))])
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_swin_mask_is_the_cyclic_shift_with_region_mask(t, window, grid, shifted):
  seg = np.ones((1, t), np.int32)
  bias = np.zeros((1, S.table_size(window, grid is not None)), np.float32)
  mask, _ = S.swin_mask_and_bias(seg, bias, window=window, grid=grid, shifted=shifted, causal=False)
  np.testing.assert_array_equal(np.asarray(mask[0]), _paper_mask(t, window, grid, shifted))


@pytest.mark.parametrize("t,window,grid,causal,shifted", [
    (23, 4, None, True, False), (23, 5, None, True, True), (23, 4, None, False, True),
    (35, 3, (5, 7), False, True), (30, 4, (6, 5), False, False), (30, 4, (6, 5), False, True)])
def test_swin_matches_dense_mask_plus_bias(t, window, grid, causal, shifted):
  q, k, v, seg = _case(t=t)
  bias = jnp.asarray(np.random.default_rng(5).normal(size=(4, S.table_size(window, grid is not None))), jnp.float32)
  kw = dict(window=window, grid=grid, shifted=shifted, causal=causal)
  _check_values_and_grads(lambda q, k, v, b: S.swin_attention(q, k, v, seg, b, **kw),
                          lambda q, k, v, b: S.reference_swin(q, k, v, seg, b, **kw), (q, k, v, bias))


def test_swin_bf16():
  q, k, v, seg = _case(t=35, dtype=jnp.bfloat16)
  bias = jnp.asarray(np.random.default_rng(5).normal(size=(4, 25)), jnp.float32)
  kw = dict(window=3, grid=(5, 7), shifted=True, causal=False)
  got = S.swin_attention(q, k, v, seg, bias, **kw)
  _close(got, S.reference_swin(q, k, v, seg, bias, **kw), jnp.bfloat16, "bf16 values")


def test_swin_reference_without_bias_is_exact_attention_with_the_window_mask():
  q, k, v, seg = _case(t=35)
  for grid, causal in ((None, True), ((5, 7), False)):
    bias = np.zeros((4, S.table_size(4, grid is not None)), np.float32)
    mask, _ = S.swin_mask_and_bias(seg, bias, window=4, grid=grid, shifted=True, causal=causal)
    _close(S.reference_swin(q, k, v, seg, bias, window=4, grid=grid, shifted=True, causal=causal),
           reference_attention(q, k, v, mask), jnp.float32, f"grid={grid}")


def test_swin_bias_is_indexed_by_relative_offset():
  """Bias of (i, j) is table[dy + M - 1, dx + M - 1] in 2-D and table[dx + M - 1] in 1-D."""
  m = 3
  table = np.arange(4 * (2 * m - 1) ** 2, dtype=np.float32).reshape(4, -1)
  _, bias = S.swin_mask_and_bias(np.ones((1, 20), np.int32), table, window=m, grid=(4, 5), shifted=False,
                                 causal=False)
  i, j = 7, 11  # (1, 2) and (2, 1): dy = -1, dx = +1
  assert float(bias[2, i, j]) == table[2, (-1 + m - 1) * (2 * m - 1) + (1 + m - 1)]
  _, bias1 = S.swin_mask_and_bias(np.ones((1, 9), np.int32), table[:, :2 * m - 1], window=m, grid=None,
                                  shifted=False, causal=False)
  assert float(bias1[1, 4, 5]) == table[1, -1 + m - 1]


def _changed(f, v, where):
  """Output positions that move when the value at `where` (a token index) moves."""
  delta = np.asarray(f(v.at[:, where].add(1.0)) - f(v))
  return set(np.flatnonzero(np.abs(delta).max(axis=(0, 2, 3)) > 1e-6).tolist())


def test_shifted_windows_mix_across_window_boundaries_and_plain_ones_do_not():
  q, k, v, _ = _case(b=1, t=16)
  seg = np.ones((1, 16), np.int32)
  bias = jnp.zeros((4, 7))
  layer = lambda shifted: jax.jit(lambda v: S.swin_attention(q, k, v, seg, bias, window=4, shifted=shifted,
                                                             causal=False))
  assert _changed(layer(False), v, 3) == {0, 1, 2, 3}  # window [0, 4)
  assert _changed(layer(True), v, 3) == {2, 3, 4, 5}  # shifted window [2, 6) crosses the boundary at 4
  # The cyclic shift puts tokens 14, 15 and 0, 1 in one window; the region mask keeps them apart.
  assert _changed(layer(True), v, 0) == {0, 1}
  # 2-D, 8 x 8 grid, M = 4: token (3, 3) reaches its window, or the shifted window (2..5, 2..5).
  q, k, v, _ = _case(b=1, t=64)
  seg = np.ones((1, 64), np.int32)
  bias = jnp.zeros((4, 49))
  layer = lambda shifted: jax.jit(lambda v: S.swin_attention(q, k, v, seg, bias, window=4, grid=(8, 8),
                                                             shifted=shifted, causal=False))
  assert _changed(layer(False), v, 3 * 8 + 3) == {y * 8 + x for y in range(4) for x in range(4)}
  assert _changed(layer(True), v, 3 * 8 + 3) == {y * 8 + x for y in range(2, 6) for x in range(2, 6)}


# ------------------------------------------------------------------ the mixers


def _spec(causal, layer_index=1, **options):
  return MixerSpec(d_model=32, num_heads=4, num_kv_heads=2, causal=causal, positions="rope", layer_index=layer_index,
                   num_layers=2, max_len=64, options=tuple(sorted(options.items())))


def test_mixers_wire_projections_rope_bias_and_options():
  _, _, _, seg = _case(t=30)
  pos = np.broadcast_to(np.arange(30, dtype=np.int32), seg.shape)
  ctx = MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
  x = jnp.asarray(np.random.default_rng(1).normal(size=seg.shape + (32,)), jnp.float32)
  ro = lambda a: rope(a, ctx.positions)
  sw = S.Swin(_spec(False, layer_index=3, window=4, grid=(6, 5)), rngs=nnx.Rngs(0))
  assert sw.shifted and sw.relative_bias.shape == (4, 49)
  want = jax.jit(lambda x: sw.out(S.reference_swin(ro(sw.query(x)), ro(sw.key(x)), sw.value(x), seg,
                                                   sw.relative_bias[...], window=4, grid=(6, 5), shifted=True,
                                                   causal=False)))(x)
  _close(jax.jit(lambda x: sw(x, ctx))(x), want, jnp.float32, "swin mixer")
  assert not S.Swin(_spec(True, layer_index=2, window=4), rngs=nnx.Rngs(0)).shifted
  cb = C.Combiner(_spec(True, span=4, summary="relu-max"), rngs=nnx.Rngs(0))
  want = jax.jit(lambda x: cb.out(C.reference_combiner(ro(cb.query(x)), ro(cb.key(x)), cb.value(x), seg, span=4,
                                                       causal=True, summary="relu-max")))(x)
  _close(jax.jit(lambda x: cb(x, ctx))(x), want, jnp.float32, "combiner mixer")


def test_causal_lm_with_combiner_and_swin_ignores_the_future(monkeypatch):
  monkeypatch.setitem(mixers.MIXERS, "combiner", C.Combiner)
  monkeypatch.setitem(mixers.MIXERS, "swin", S.Swin)
  options = (("combiner", (("span", 0), ("summary", "identity-max"))), ("swin", (("grid", 0), ("window", 4))))
  spec = ModelSpec(kind="lm", vocab_size=30, num_classes=30, max_len=16, mixers=("combiner", "swin"), d_model=16,
                   num_heads=2, num_kv_heads=1, mlp_ratio=2, mlp="gelu", norm="rmsnorm", positions="rope",
                   dropout=0.0, pooling="mean", tie_embeddings=True, dtype="float32", mixer_options=options)
  fm = FunctionalModel(build_model(spec, seed=0))
  params, extra = fm.init_params(), fm.init_extra()
  assert any(name.endswith("mixer/relative_bias") for name in params)
  apply = jax.jit(lambda ids: fm.apply(params, extra, {"inputs": ids, "segment_ids": jnp.ones_like(ids),
                                                        "positions": jnp.arange(13, dtype=jnp.int32)[None]})[0])
  ids = np.random.default_rng(0).integers(1, 30, size=(1, 13)).astype(np.int32)
  ids2 = ids.copy()
  ids2[0, 9:] = ids2[0, 9:] % 29 + 1
  base, out2 = np.asarray(apply(ids)), np.asarray(apply(ids2))
  np.testing.assert_array_equal(base[0, :9], out2[0, :9])
  assert np.abs(base[0, 9:] - out2[0, 9:]).max() > 1e-4


def test_alternation_counts_layers_of_the_same_mixer_in_a_mixed_schedule():
  """Swin shifts every second *Swin* layer and the Sparse Transformer's alternate mode flips
  every second of its own layers: in "swin,local,swin,sparse,swin,sparse" the global layer
  parity would leave every swin layer but one unshifted and both sparse layers on A2."""
  options = (("swin", (("grid", 0), ("window", 4))), ("sparse_transformer", (("head_mode", "alternate"),)))
  spec = ModelSpec(kind="lm", vocab_size=30, num_classes=30, max_len=16,
                   mixers=("swin", "local", "swin", "sparse_transformer", "swin", "sparse_transformer"), d_model=16,
                   num_heads=2, num_kv_heads=1, mlp_ratio=2, mlp="gelu", norm="rmsnorm", positions="rope",
                   dropout=0.0, pooling="mean", tie_embeddings=True, dtype="float32", mixer_options=options)
  blocks = build_model(spec, seed=0).encoder.blocks
  assert [b.mixer.shifted for b in blocks if isinstance(b.mixer, S.Swin)] == [False, True, False]
  sparse = [b.mixer.spec for b in blocks if b.mixer.spec.layer_index in (3, 5)]
  assert [(m.layer_index, m.alternation_index) for m in sparse] == [(3, 0), (5, 1)]


def test_user_errors_are_one_sentence():
  with pytest.raises(ValueError, match="only defined for the 1-D layout"):
    S.Swin(_spec(True, window=4, grid=(4, 4)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="swin.grid"):
    S.Swin(_spec(False, window=4, grid=(4, -1)), rngs=nnx.Rngs(0))
  sw = S.Swin(_spec(False, window=4, grid="4x4"), rngs=nnx.Rngs(0))
  assert sw.grid == (4, 4)
  x = jnp.zeros((1, 15, 32))
  ctx = MixContext(segment_ids=jnp.ones((1, 15), jnp.int32), positions=jnp.zeros((1, 15), jnp.int32))
  with pytest.raises(ValueError, match="16 cells but the sequence has 15 tokens"):
    sw(x, ctx)
  with pytest.raises(ValueError, match="combiner.summary='deepset-max'"):
    C.Combiner(_spec(True, summary="deepset-max"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="combiner decodes only causally"):  # causal: tests/test_sparse_decode.py
    C.Combiner(_spec(False), rngs=nnx.Rngs(0))(x, MixContext(segment_ids=ctx.segment_ids, positions=ctx.positions,
                                                             decode=True))
  with pytest.raises(NotImplementedError, match="Swin does not support incremental decoding"):
    S.Swin(_spec(True, window=4), rngs=nnx.Rngs(0))(x, MixContext(segment_ids=ctx.segment_ids,
                                                                   positions=ctx.positions, decode=True))
  from parallel import sequence
  assert sequence.supported(C.Combiner) == sequence.supported(S.Swin) == ("auto",)
