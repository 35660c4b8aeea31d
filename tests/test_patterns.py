"""Sparse Transformer and Longformer against their dense-mask twins (values, gradients), and the
dense masks against the papers' set definitions, written out per (i, j)."""

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
from layers.mixer_base import MixContext, MixerSpec
from layers.models import ModelSpec, build_model
from layers.attention import patterns as P

TOL = {jnp.float32: dict(atol=3e-5, rtol=3e-5), jnp.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def _case(b=2, t=23, n=4, kv=2, h=8, seed=0, dtype=jnp.float32):
  """t not a multiple of any stride/window used below; row 0: two packed segments then
  padding, row 1: one segment then padding."""
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=(b, t, m, h)), dtype) for m in (n, kv, kv))
  seg = np.ones((b, t), np.int32)
  seg[0, 10:] = 2
  seg[0, t - 4:] = 0
  seg[-1, t - 3:] = 0
  return q, k, v, seg


def _report(a, b):
  err = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  return f"max err {err.max():.2e}, mean err {err.mean():.2e}"


def _close(a, b, dtype, what=""):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **TOL[dtype],
                             err_msg=f"{what}: {_report(a, b)}")


def _check_values_and_grads(fast, dense, args, dtype=jnp.float32):
  """Forward values and the gradients of a random projection of the output, for every argument
  (each side compiled once: values and gradients from one jitted function)."""
  w = jnp.asarray(np.random.default_rng(7).normal(size=args[0].shape), dtype)
  argnums = tuple(range(len(args)))

  def with_grads(f):
    def run(*a):
      out, pullback = jax.vjp(f, *a)
      return out, pullback(w.astype(out.dtype))
    return jax.jit(run)

  (got, g_got), (want, g_want) = with_grads(fast)(*args), with_grads(dense)(*args)
  _close(got, want, dtype, "values")
  assert float(jnp.abs(want.astype(jnp.float32)).max()) > 0.1  # not a vacuous comparison of zeros
  for i, a, b in zip(argnums, g_got, g_want):
    _close(a, b, dtype, f"grad of argument {i}")


# ------------------------------------------------------------------ band helper


@pytest.mark.parametrize("lo,hi,keep", [(0, 6, 3), (-3, 5, None)])
def test_band_attention_matches_dense_values_lse_and_gradients(lo, hi, keep):
  q, k, v, seg = _case()
  b, t = seg.shape
  kv_seg = seg.copy()
  kv_seg[:, 5] = 0  # a key hidden from everyone (as Longformer hides global keys from the window)
  keep_fn = None if keep is None else (lambda d: d % keep != 0)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  band = (i - j >= lo) & (i - j <= hi) & (True if keep is None else (i - j) % keep != 0)
  idx = np.broadcast_to(np.arange(t), (b, t))
  mask = make_mask(seg, kv_seg, idx, idx, False) & band
  fast = lambda q, k, v: P.band_attention_lse(q, k, v, seg, kv_seg, lo=lo, hi=hi, keep_offset=keep_fn)[0]
  _check_values_and_grads(fast, lambda q, k, v: reference_attention(q, k, v, mask), (q, k, v))
  # lse against a direct log-sum-exp of the masked dense scores (-inf where a row sees nothing)
  lse = P.band_attention_lse(q, k, v, seg, kv_seg, lo=lo, hi=hi, keep_offset=keep_fn)[1]
  s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) / math.sqrt(q.shape[-1])
  want = jax.nn.logsumexp(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
  want = jnp.moveaxis(want, 1, 2)
  np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(want)))
  fin = np.isfinite(np.asarray(want))
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(want)[fin], atol=2e-5)


# ------------------------------------------------------------------ Sparse Transformer


def _paper_sets(pattern, l, c, causal, t):
  """A1, A2 for each query as Python sets, straight from Child et al. section 4.2 (causal)
  and our stated bidirectional analogue."""
  a1, a2 = [], []
  for i in range(t):
    keys = range(0, i + 1) if causal else range(t)
    if pattern == "strided":
      if causal:
        a1.append({j for j in keys if max(0, i - l) <= j <= i})
      else:
        a1.append({j for j in keys if abs(i - j) <= l // 2})
      a2.append({j for j in keys if (i - j) % l == 0})
    else:
      a1.append({j for j in keys if j // l == i // l})
      a2.append({j for j in keys if j % l in range(l - c, l)})
  return a1, a2


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_sparse_transformer_masks_are_the_papers_sets(pattern, causal):
  t, l, c = 19, 4, 2
  seg = np.ones((1, t), np.int32)
  m1, m2 = P.sparse_transformer_masks(seg, pattern=pattern, stride=l, c=c, causal=causal)
  a1, a2 = _paper_sets(pattern, l, c, causal, t)
  for i in range(t):
    assert set(np.flatnonzero(np.asarray(m1)[0, i])) == a1[i], (i, "A1")
    assert set(np.flatnonzero(np.asarray(m2)[0, i])) == a2[i], (i, "A2")


@pytest.mark.parametrize("pattern,causal,head_mode,layer", [
    ("strided", True, "split", 0), ("fixed", True, "merged", 0), ("strided", False, "merged", 0),
    ("fixed", False, "split", 0), ("strided", True, "alternate", 1)])
def test_sparse_transformer_matches_dense_mask(pattern, causal, head_mode, layer):
  q, k, v, seg = _case()
  kw = dict(pattern=pattern, stride=4, c=2, causal=causal, head_mode=head_mode, layer_index=layer)
  _check_values_and_grads(lambda q, k, v: P.sparse_transformer_attention(q, k, v, seg, **kw),
                          lambda q, k, v: P.reference_sparse_transformer(q, k, v, seg, **kw), (q, k, v))


@pytest.mark.parametrize("n,kv", [(6, 2), (3, 1)])  # a grouped-query group straddling the head split
def test_sparse_transformer_head_split_with_grouped_kv(n, kv):
  q, k, v, seg = _case(n=n, kv=kv, t=17)
  kw = dict(pattern="strided", stride=5, c=1, causal=True)
  got = jax.jit(lambda q, k, v: P.sparse_transformer_attention(q, k, v, seg, **kw))(q, k, v)
  _close(got, P.reference_sparse_transformer(q, k, v, seg, **kw), jnp.float32)
  # the two head groups really use different patterns: head 0 (window) sees i-1, the last head does not
  m1, m2 = P.sparse_transformer_masks(seg, pattern="strided", stride=5, c=1, causal=True)
  assert bool(m1[1, 7, 6]) and not bool(m2[1, 7, 6])


def test_strided_two_hops_reach_every_earlier_token():
  """The paper's point: A2 then A1 connects every j <= i (a two-layer receptive field of all
  earlier positions), while each set alone has O(sqrt T) keys."""
  t, l = 30, 5
  m1, m2 = (np.asarray(m[0], np.int32) for m in
            P.sparse_transformer_masks(np.ones((1, t), np.int32), pattern="strided", stride=l, c=1, causal=True))
  reach = (m2 @ m1) > 0
  np.testing.assert_array_equal(reach, np.tril(np.ones((t, t), bool)))
  assert m1.sum(1).max() <= l + 1 and m2.sum(1).max() <= -(-t // l)


# ------------------------------------------------------------------ Longformer


def test_longformer_mask_is_window_plus_global():
  t, w = 16, 4
  seg = np.ones((1, t), np.int32)
  for causal in (True, False):
    for d in (1, 2):
      local, full, is_global = P.longformer_mask(seg, window=w, global_positions=(0, 9, 99), causal=causal,
                                                 dilation=d)
      assert is_global.tolist() == [i in (0, 9) for i in range(t)]
      for i in range(t):
        keys = range(i + 1) if causal else range(t)
        offsets = range(0, w) if causal else range(-(w // 2), w // 2 + 1)
        want = {j for j in keys if j in (0, 9) or any(i - j == d * o for o in offsets)}
        assert set(np.flatnonzero(np.asarray(local)[0, i])) == want, (causal, d, i)
        assert set(np.flatnonzero(np.asarray(full)[0, i])) == set(keys)


@pytest.mark.parametrize("causal,window,dilation,glob", [
    (True, 4, 2, (0, 3)), (False, 5, 1, (0, 11, 40)), (False, 3, 3, ())])
def test_longformer_matches_dense_mask(causal, window, dilation, glob):
  q, k, v, seg = _case()
  r = np.random.default_rng(3)
  qg, kg, vg = (jnp.asarray(r.normal(size=a.shape), jnp.float32) for a in (q, k, v))
  kw = dict(window=window, global_positions=glob, causal=causal, dilation=dilation)
  _check_values_and_grads(lambda *a: P.longformer_attention(*a, seg, **kw),
                          lambda *a: P.reference_longformer(*a, seg, **kw), (q, k, v, qg, kg, vg))


def test_longformer_bf16():
  q, k, v, seg = _case(dtype=jnp.bfloat16)
  qg, kg, vg = q[..., ::-1], k * 0.5, v[:, ::-1]
  kw = dict(window=4, global_positions=(0, 7), causal=False)
  _check_values_and_grads(lambda *a: P.longformer_attention(*a, seg, **kw),
                          lambda *a: P.reference_longformer(*a, seg, **kw), (q, k, v, qg, kg, vg), jnp.bfloat16)


def test_longformer_global_token_reaches_across_the_window():
  """Perturbing one far value changes its window and the global token's output, nothing else."""
  q, k, v, _ = _case(b=1, t=20)
  seg = np.ones((1, 20), np.int32)
  f = jax.jit(lambda v: P.longformer_attention(q, k, v, q, k, v, seg, window=2, global_positions=(0,), causal=False))
  changed = np.abs(np.asarray(f(v.at[:, 15].add(1.0)) - f(v))).max(axis=(0, 2, 3)) > 1e-6
  assert np.flatnonzero(changed).tolist() == [0, 14, 15, 16]


# ------------------------------------------------------------------ the mixers inside models


def _spec(causal, n=4, kv=2, **options):
  return MixerSpec(d_model=32, num_heads=n, num_kv_heads=kv, causal=causal, positions="rope", layer_index=1,
                   num_layers=2, max_len=32, options=tuple(sorted(options.items())))


def _ctx(seg):
  pos = np.zeros_like(seg)
  for row in range(seg.shape[0]):  # per-segment positions
    for i in range(1, seg.shape[1]):
      pos[row, i] = pos[row, i - 1] + 1 if seg[row, i] == seg[row, i - 1] else 0
  return MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))


def test_mixers_wire_projections_rope_and_options_to_the_pattern():
  causal = False  # the causal flag is exercised inside a model below
  _, _, _, seg = _case()
  ctx = _ctx(seg)
  x = jnp.asarray(np.random.default_rng(1).normal(size=seg.shape + (32,)), jnp.float32)
  st = P.SparseTransformer(_spec(causal, pattern="fixed", stride=4, c=2, head_mode="alternate"), rngs=nnx.Rngs(0))
  q, k, v = (rope(st.query(x), ctx.positions), rope(st.key(x), ctx.positions), st.value(x))
  want = st.out(P.reference_sparse_transformer(q, k, v, seg, pattern="fixed", stride=4, c=2, causal=causal,
                                               head_mode="alternate", layer_index=1))
  _close(jax.jit(lambda x: st(x, ctx))(x), want, jnp.float32, "sparse_transformer mixer")
  lf = P.Longformer(_spec(causal, window=4, global_positions=(0, 5)), rngs=nnx.Rngs(0))
  ro = lambda a: rope(a, ctx.positions)
  args = (ro(lf.query(x)), ro(lf.key(x)), lf.value(x), ro(lf.query_global(x)), ro(lf.key_global(x)),
          lf.value_global(x))
  want = lf.out(P.reference_longformer(*args, seg, window=4, global_positions=(0, 5), causal=causal))
  _close(jax.jit(lambda x: lf(x, ctx))(x), want, jnp.float32, "longformer mixer")


def test_causal_lm_with_both_mixers_ignores_the_future(monkeypatch):
  """Registered by name, configured through model.<mixer>.* options, one layer of each."""
  monkeypatch.setitem(mixers.MIXERS, "sparse_transformer", P.SparseTransformer)
  monkeypatch.setitem(mixers.MIXERS, "longformer", P.Longformer)
  options = (("longformer", (("global_positions", (0,)), ("window", 3))),
             ("sparse_transformer", (("c", 2), ("pattern", "strided"), ("stride", 3))))
  spec = ModelSpec(kind="lm", vocab_size=30, num_classes=30, max_len=16, mixers=("sparse_transformer", "longformer"),
                   d_model=16, num_heads=2, num_kv_heads=1, mlp_ratio=2, mlp="gelu", norm="rmsnorm",
                   positions="rope", dropout=0.0, pooling="mean", tie_embeddings=True, dtype="float32",
                   mixer_options=options)
  fm = FunctionalModel(build_model(spec, seed=0))
  params, extra = fm.init_params(), fm.init_extra()
  assert any(name.endswith("mixer/query_global/kernel") for name in params)
  apply = jax.jit(lambda ids: fm.apply(params, extra, {"inputs": ids, "segment_ids": jnp.ones_like(ids),
                                                        "positions": jnp.arange(13, dtype=jnp.int32)[None]})[0])
  ids = np.random.default_rng(0).integers(1, 30, size=(1, 13)).astype(np.int32)
  ids2 = ids.copy()
  ids2[0, 9:] = ids2[0, 9:] % 29 + 1
  base, out2 = np.asarray(apply(ids)), np.asarray(apply(ids2))
  np.testing.assert_array_equal(base[0, :9], out2[0, :9])
  assert np.abs(base[0, 9:] - out2[0, 9:]).max() > 1e-4


def test_user_errors_are_one_sentence():
  with pytest.raises(ValueError, match="pattern='dilated'"):
    P.SparseTransformer(_spec(True, pattern="dilated"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads >= 2"):
    P.SparseTransformer(_spec(True, n=1, kv=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="window"):
    P.Longformer(_spec(True, window=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="global_positions"):
    P.Longformer(_spec(True, window=2, global_positions=(-1,)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="longformer decodes only causally"):  # causal: tests/test_sparse_decode.py
    P.Longformer(_spec(False, window=2), rngs=nnx.Rngs(0)).init_cache(1, 8, jnp.float32)
  # Attention's ring / all-to-all paths would ignore the pattern: only "auto" is offered, and a
  # permuted (zigzag) layout is refused rather than silently scrambling the pattern.
  from parallel import sequence
  assert sequence.supported(P.SparseTransformer) == sequence.supported(P.Longformer) == ("auto",)
  seg = jnp.ones((1, 6), jnp.int32)
  ctx = MixContext(segment_ids=seg, positions=seg, index=seg)
  with pytest.raises(NotImplementedError, match="storage order"):
    P.SparseTransformer(_spec(True, stride=2), rngs=nnx.Rngs(0))(jnp.zeros((1, 6, 32)), ctx)
