"""Block-sparse attention (engine, block_sparse, xattention, local, bigbird) against dense references.

Every fast path is compared with a dense twin that materialises the equivalent explicit
[B, N, T, T] mask and calls `kernels.reference.reference_attention`: forward values and gradients,
causal and bidirectional, packed segments + padding, lengths that are not multiples of
the block, grouped-query heads. The patterns that cover every visible pair are also
compared with exact attention itself (full table, XAttention at threshold 1, a window
wider than the sequence, BigBird on 3 blocks), at the mixer and at the model level.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layers.mixers
from kernels.reference import make_mask, reference_attention
from layers.functional import FunctionalModel
from layers.mixer_base import MixContext, MixerSpec
from layers.models import ModelSpec, build_model
from layers.attention import block_sparse as bs
from layers.attention import local as lc

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=4e-2, rtol=4e-2)}
B, T, N, KV, H = 2, 37, 4, 2, 8  # T = 37: not a multiple of any block used here


def _case(t=T, n=N, kv=KV, h=H, seed=0, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(B, t, n, h)), dtype)
  k = jnp.asarray(r.normal(size=(B, t, kv, h)), dtype)
  v = jnp.asarray(r.normal(size=(B, t, kv, h)), dtype)
  seg = np.ones((B, t), np.int32)
  seg[0, t // 2:] = 2  # row 0: two packed segments, then padding
  seg[0, t - 4:] = 0
  seg[1, t - 9:] = 0  # row 1: one segment, then padding
  return q, k, v, seg


def _exact(q, k, v, seg, causal):
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  return reference_attention(q, k, v, make_mask(seg, seg, idx, idx, causal))


def _err(a, b):
  e = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  return f"max err {e.max():.2e}, mean err {e.mean():.2e}"


def _value_and_vjp(f, w):
  """f(q, k, v) and the gradients of sum(f * w), in one compiled program (compiling whole is far
  cheaper on CPU than dispatching every small op eagerly)."""

  def run(q, k, v):
    out, pull = jax.vjp(f, q, k, v)
    return out, pull(w.astype(out.dtype))

  return jax.jit(run)


def assert_same_values_and_grads(fast, dense, q, k, v, tol=TOL[jnp.float32]):
  """fast(q, k, v) == dense(q, k, v), and so are d/dq, d/dk, d/dv of a random projection."""
  w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  got, g_got = _value_and_vjp(fast, w)(q, k, v)
  want, g_want = _value_and_vjp(dense, w)(q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol,
                             err_msg=f"values: {_err(got, want)}")
  for name, a, b in zip("qkv", g_got, g_want):
    assert np.abs(np.asarray(b, np.float32)).max() > 0, f"d{name} of the reference is zero: the test is vacuous"
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol,
                               err_msg=f"d{name}: {_err(a, b)}")
  return got


def _ctx(seg):
  return MixContext(segment_ids=jnp.asarray(seg), positions=jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape))


def _mixer(cls, causal, layer_index=0, **options):
  spec = MixerSpec(d_model=N * H, num_heads=N, num_kv_heads=KV, causal=causal, positions="rope",
                   layer_index=layer_index, num_layers=2, max_len=64, options=tuple(sorted(options.items())))
  return cls(spec, rngs=nnx.Rngs(0))


def _ragged_table(nb, heads, causal, seed):
  """A different random table per batch row and head; rows keep 1..4 distinct blocks."""
  r = np.random.default_rng(seed)
  blocks = np.zeros((B, heads, nb, 4), np.int32)
  valid = np.zeros((B, heads, nb, 4), bool)
  for idx in np.ndindex(B, heads, nb):
    pick = r.choice(nb, size=r.integers(1, min(4, nb) + 1), replace=False)
    blocks[idx][:len(pick)] = pick
    valid[idx][:len(pick)] = True
    blocks[idx][len(pick):] = r.integers(0, nb, size=4 - len(pick))  # garbage behind invalid entries
  if causal:  # keep the diagonal somewhere so most rows see something; the rest is random
    blocks[..., 0] = np.arange(nb)
    valid[..., 0] = True
    for idx in np.ndindex(B, heads, nb):
      row = blocks[idx]
      dup = [m for m in range(1, 4) if row[m] == row[0]]
      valid[idx][dup] = False
  return blocks, valid


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,heads,band,dtype,block", [
    (True, N, None, jnp.float32, 8), (False, N, None, jnp.float32, 8), (True, KV, (5, 3), jnp.float32, 8),
    (False, 1, None, jnp.bfloat16, 16)], ids=["per-query-head-causal", "per-query-head-bidirectional",
                                              "per-kv-head-band-causal", "shared-bf16-bidirectional"])
def test_engine_matches_dense_reference(causal, heads, band, dtype, block):
  """Random ragged tables (differing per batch row and head, 1-4 blocks per row, garbage behind
  invalid entries); heads = N: one table per query head, KV: per kv head, 1: shared."""
  q, k, v, seg = _case(dtype=dtype)
  blocks, valid = _ragged_table(bs.num_blocks(T, block), heads, causal, seed=heads)
  fast = lambda q, k, v: bs.block_sparse_attention(q, k, v, seg, blocks, valid, block=block, causal=causal,
                                                   band=band)
  dense = lambda q, k, v: bs.reference_block_sparse_attention(q, k, v, seg, blocks, valid, block=block,
                                                              causal=causal, band=band)
  out = assert_same_values_and_grads(fast, dense, q, k, v, TOL[dtype])
  assert np.all(np.asarray(out)[seg == 0] == 0)  # padding queries: zeros, not NaNs


def test_reference_mask_expansion_is_the_listed_set():
  """The dense twin's block mask is exactly the set of valid entries (checked by a loop)."""
  nb = 5
  blocks, valid = _ragged_table(nb, N, False, seed=3)
  got = np.asarray(bs.block_table_mask(blocks, valid, nb))
  want = np.zeros((B, N, nb, nb), bool)
  for bi, n, i, m in np.ndindex(*blocks.shape):
    if valid[bi, n, i, m]:
      want[bi, n, i, blocks[bi, n, i, m]] = True
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_block_sparse_full_table_equals_exact_attention(causal):
  q, k, v, seg = _case()
  mixer = _mixer(bs.BlockSparseAttention, causal, block=8, pattern="full")
  assert_same_values_and_grads(lambda *a: mixer.attend(*a, _ctx(seg)), lambda *a: _exact(*a, seg, causal), q, k, v)


def _pattern_rule(pattern, causal, nb, radius=1, stride=3):
  i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
  if pattern == "local":
    rule = np.abs(i - j) <= radius
  else:
    rule = (np.abs(i - j) <= radius) | ((i - j) % stride == 0)
  return rule & (j <= i) if causal else rule


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", ["local", "strided", "random"])
def test_block_sparse_patterns(pattern, causal):
  """Each config pattern's table is the set its rule defines, and the mixer equals the dense twin."""
  q, k, v, seg = _case()
  mixer = _mixer(bs.BlockSparseAttention, causal, block=4, pattern=pattern, radius=1, stride=3, num_random=2, seed=5)
  nb = bs.num_blocks(T, 4)
  blocks, valid = mixer.block_table(nb)
  got = np.asarray(bs.block_table_mask(blocks, valid, nb))[0]
  if pattern == "random":
    assert got.shape[0] == N and all(got[n, i, i] for n in range(N) for i in range(nb))
    counts = got.sum(-1) - 1
    avail = np.arange(nb) if causal else np.full(nb, nb - 1)
    np.testing.assert_array_equal(counts, np.broadcast_to(np.minimum(2, avail), counts.shape))
    assert not all(np.array_equal(got[0], got[n]) for n in range(N)), "random blocks should differ per head"
    other_layer = _mixer(bs.BlockSparseAttention, causal, layer_index=1, block=4, pattern=pattern, num_random=2,
                         seed=5).block_table(nb)
    assert not np.array_equal(np.asarray(bs.block_table_mask(*other_layer, nb)), got[None])
    assert np.array_equal(mixer.block_table(nb)[0], blocks)  # fixed per layer: same table every call
    if causal:
      assert not np.any(np.triu(got, 1))
  else:
    np.testing.assert_array_equal(got[0], _pattern_rule(pattern, causal, nb))
  if pattern == "random" and not causal:  # the engine tests cover causal per-head tables and shared ones
    dense = lambda *a: bs.reference_block_sparse_attention(*a, seg, blocks, valid, block=4, causal=causal)
    assert_same_values_and_grads(lambda *a: mixer.attend(*a, _ctx(seg)), dense, q, k, v)


def test_programmatic_table():
  q, k, v, seg = _case()
  nb = bs.num_blocks(T, 8)
  blocks, valid = _ragged_table(nb, N, False, seed=11)
  blocks, valid = blocks[:1], valid[:1]
  spec = MixerSpec(d_model=N * H, num_heads=N, num_kv_heads=KV, causal=False, positions="rope", layer_index=0,
                   num_layers=1, max_len=64, options=(("block", 8),))
  mixer = bs.BlockSparseAttention(spec, rngs=nnx.Rngs(0), table=lambda nb_: (blocks, valid))
  got = jax.jit(lambda q, k, v: mixer.attend(q, k, v, _ctx(seg)))(q, k, v)
  want = jax.jit(lambda q, k, v: bs.reference_block_sparse_attention(q, k, v, seg, blocks, valid, block=8,
                                                                     causal=False))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])


def test_bad_table_and_options_are_reported():
  q, k, v, seg = _case()
  with pytest.raises(ValueError, match="does not fit"):
    bs.block_sparse_attention(q, k, v, seg, np.zeros((1, 3, 5, 2), np.int32), np.ones((1, 3, 5, 2), bool), block=8,
                              causal=True)
  with pytest.raises(ValueError, match="pattern='diagonal'"):
    _mixer(bs.BlockSparseAttention, True, pattern="diagonal")
  with pytest.raises(ValueError, match="multiple of model.xattention.stride"):
    _mixer(bs.XAttention, True, block=12, stride=8)
  with pytest.raises(ValueError, match="selection='ahead' is not one of"):
    _mixer(bs.XAttention, True, selection="ahead")
  with pytest.raises(ValueError, match="selection='previous' is for causal models"):
    _mixer(bs.XAttention, False, selection="previous")
  with pytest.raises(ValueError, match="bigbird decodes only causally"):  # causal decoding: test_sparse_decode.py
    _mixer(lc.BigBirdAttention, False).init_cache(1, 8, jnp.float32)
  with pytest.raises(ValueError, match="decodes only causally"):  # local decodes, causally only
    _mixer(lc.LocalAttention, False).init_cache(1, 8, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# XAttention
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_xattention_threshold_one_equals_exact_attention(causal):
  q, k, v, seg = _case()
  mixer = _mixer(bs.XAttention, causal, block=8, stride=4, threshold=1.0)
  assert_same_values_and_grads(lambda *a: mixer.attend(*a, _ctx(seg)), lambda *a: _exact(*a, seg, causal), q, k, v)


def _unaligned_segments(t=64):
  """Row 0: segments [0, 18), [18, 45), [45, 61), then padding; row 1: one segment, padding from 50.
  No boundary is a multiple of the stride (4) or the block (8), so stride tiles and blocks straddle."""
  seg = np.ones((B, t), np.int32)
  seg[0, 18:], seg[0, 45:], seg[0, 61:] = 2, 3, 0
  seg[1, 50:] = 0
  return seg


XSEL_CASES = [(True, "previous", "aligned"), (True, "block", "aligned"), (False, "block", "aligned"),
              (True, "previous", "unaligned"), (True, "block", "unaligned"), (False, "block", "unaligned")]


@pytest.mark.parametrize("causal,selection,layout", XSEL_CASES, ids=["-".join(map(str, c)) for c in XSEL_CASES])
def test_xattention_selection_and_attention(causal, selection, layout):
  """At threshold 0.5 the selection equals a numpy loop of the rule, keeps each row's sink
  (its segment's first block) and diagonal, reaches the threshold, is minimal, and (causal)
  the mixer equals the dense twin with that (constant) table - gradients included, i.e. none
  flow through the selection. "unaligned": segment boundaries inside stride tiles and blocks."""
  t, block, stride, tau = 64, 8, 4, 0.5
  q, k, v, seg = _case(t=t, seed=3)
  if layout == "unaligned":
    seg = _unaligned_segments(t)
  q = q * 3.0  # sharper coarse softmax, so the threshold actually drops blocks
  mixer = _mixer(bs.XAttention, causal, block=block, stride=stride, threshold=tau, selection=selection)
  assert mixer.selection == selection
  nb = t // block
  blocks, valid = jax.jit(mixer.block_table)(q, k, jnp.asarray(seg))
  got = np.asarray(bs.block_table_mask(blocks, valid, nb))
  want = bs.reference_xattention_block_mask(q, k, seg, block=block, stride=stride, threshold=tau, causal=causal,
                                            selection=selection)
  np.testing.assert_array_equal(got, want)
  density = got.sum() / (B * N * (nb * (nb + 1) // 2 if causal else nb * nb))
  assert density < 0.8, f"threshold {tau} kept {density:.0%} of the blocks: the test would not see a sparse table"
  i = np.arange(nb)
  sink = np.zeros((B, nb), int)  # first block of the segment of each query block's first real token
  for b in range(B):
    for blk in range(nb):
      ids = seg[b, blk * block:(blk + 1) * block]
      if (ids > 0).any():
        sink[b, blk] = min(np.flatnonzero(seg[b] == ids[ids > 0].min())) // block
  assert np.take_along_axis(got, sink[:, None, :, None], axis=-1).all() and got[..., i, i].all()
  if causal:
    assert not np.any(np.triu(got, 1))
  # The mass each row was selected by: its own queries' (block) or the previous block's (previous).
  mass = np.asarray(jax.jit(lambda q, k: bs.xattention_block_mass(q, k, seg, block=block, stride=stride,
                                                                   causal=causal))(q, k), np.float64)
  if selection == "previous":
    mass = np.concatenate([np.zeros_like(mass[:, :, :1]), mass[:, :, :-1]], axis=2)
  vis = np.asarray(bs.tile_visible(jnp.asarray(seg), block, causal))[:, None]
  mass = np.where(vis, mass, 0.0)
  single = np.array([[len(set(seg[b, x * block:(x + 1) * block]) - {0}) <= 1 for x in range(nb)] for b in range(B)])
  rows = np.broadcast_to(single[:, None], got.shape[:3])  # rows that hold two examples keep every block
  kept = np.where(got, mass, 0).sum(-1)
  total = mass.sum(-1)
  assert np.all((kept >= tau * total - 1e-5)[rows])
  # Minimal: dropping the smallest kept non-forced block falls below the threshold.
  optional = got & ~((i[None, None, None, :] == sink[:, None, :, None]) | (i[None, :] == i[:, None]))
  smallest = np.where(optional, mass, np.inf).min(-1)
  has = np.isfinite(smallest) & rows
  assert has.any()
  assert np.all((kept - smallest)[has] < tau * total[has] + 1e-6)

  # max_blocks keeps the head of the same ranking (forced blocks, then by mass).
  if layout == "aligned":
    capped = _mixer(bs.XAttention, causal, block=block, stride=stride, threshold=tau, selection=selection,
                    max_blocks=2)
    cb, cv = jax.jit(capped.block_table)(q, k, jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(cb), np.asarray(blocks)[..., :2])
    np.testing.assert_array_equal(np.asarray(cv), np.asarray(valid)[..., :2])
  if causal:  # (bidirectional attention equality: the threshold-1 test and the engine tests)
    dense = lambda *a: bs.reference_block_sparse_attention(*a, seg, blocks, valid, block=block, causal=causal)
    assert_same_values_and_grads(lambda *a: mixer.attend(*a, _ctx(seg)), dense, q, k, v)


def _xattention_outputs(causal, selection, seg, q, k, v):
  mixer = _mixer(bs.XAttention, causal, block=8, stride=4, threshold=0.5, selection=selection)
  return np.asarray(jax.jit(lambda q, k, v: mixer.attend(q, k, v, _ctx(seg)))(q, k, v))


def test_xattention_previous_selection_is_causal_and_the_papers_is_not():
  """With selection=previous no output moves when later tokens change (cuts inside a block);
  the paper's rule (selection=block) moves earlier outputs of the same block, which is what
  this check is there to catch."""
  t = 64
  q, k, v, _ = _case(t=t, seed=3)
  q = q * 3.0
  seg = np.ones((B, t), np.int32)
  noise = np.random.default_rng(7).normal(size=(3, B, t) + q.shape[2:]) * 3.0
  leak = {}
  for selection in ("previous", "block"):
    base = _xattention_outputs(True, selection, seg, q, k, v)
    worst = 0.0
    for cut in (13, 27, 42, 59):
      later = np.arange(t) >= cut
      moved = [jnp.where(later[None, :, None, None], x + jnp.asarray(n[..., :x.shape[2], :], x.dtype), x)
               for x, n in zip((q, k, v), noise)]
      out = _xattention_outputs(True, selection, seg, *moved)
      worst = max(worst, float(np.abs(out[:, :cut] - base[:, :cut]).max()))
    leak[selection] = worst
  assert leak["previous"] < 1e-5, leak
  assert leak["block"] > 1e-2, leak


@pytest.mark.parametrize("causal,selection", [(True, "previous"), (True, "block"), (False, "block")])
def test_xattention_packed_examples_do_not_see_each_other(causal, selection):
  """Changing one packed example's q/k/v leaves every other example's outputs as they were, with
  boundaries inside stride tiles and blocks (the selection included)."""
  t = 64
  q, k, v, _ = _case(t=t, seed=3)
  q = q * 3.0
  seg = _unaligned_segments(t)
  base = _xattention_outputs(causal, selection, seg, q, k, v)
  noise = np.random.default_rng(8).normal(size=(3, B, t) + q.shape[2:]) * 3.0
  for example in (1, 2, 3):
    mine = jnp.asarray(seg == example)[:, :, None, None]
    moved = [jnp.where(mine, x + jnp.asarray(n[..., :x.shape[2], :], x.dtype), x) for x, n in zip((q, k, v), noise)]
    out = _xattention_outputs(causal, selection, seg, *moved)
    others = (seg != example) & (seg > 0)
    np.testing.assert_allclose(out[others], base[others], atol=1e-5, err_msg=f"example {example} leaked")
    assert np.abs(out[seg == example] - base[seg == example]).max() > 1e-2  # it did change its own outputs


def test_xattention_scores_are_antidiagonal_means():
  """A[i, j] = mean of the S antidiagonal entries of tile (i, j) of q k^T / sqrt(H): with
  stride = block the block mass is the coarse softmax itself, checked against the tiles."""
  t, s = 16, 4
  q, k, _, _ = _case(t=t, n=2, kv=2, seed=5)
  seg = np.ones((B, t), np.int32)
  mass = np.asarray(bs.xattention_block_mass(q, k, seg, block=s, stride=s, causal=False))
  logits = np.einsum("bqnh,bknh->bnqk", np.asarray(q), np.asarray(k)) / math.sqrt(H)
  r = t // s
  anti = np.zeros((B, 2, r, r))
  for i in range(r):
    for j in range(r):
      tile = logits[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s]
      anti[:, :, i, j] = np.mean([tile[:, :, s - 1 - u, u] for u in range(s)], axis=0)
  want = np.exp(anti - anti.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(mass, want, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# local and bigbird
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window,block", [(True, 8, 0), (False, 7, 3), (True, 100, 16)])
def test_local_equals_exact_with_window_mask(causal, window, block):
  q, k, v, seg = _case()
  mixer = _mixer(lc.LocalAttention, causal, window=window, block=block)
  dense = lambda *a: lc.reference_local_attention(*a, seg, window=window, causal=causal)
  assert_same_values_and_grads(lambda *a: mixer.attend(*a, _ctx(seg)), dense, q, k, v)
  band = lc.window_band(window, causal)
  blocks, _ = lc.local_block_table(bs.num_blocks(T, mixer.block), mixer.block, band)
  if window < T:  # O(T * w): each query block visits a constant number of key blocks
    assert blocks.shape[-1] <= 1 + math.ceil(band[0] / mixer.block) + math.ceil(band[1] / mixer.block)


def test_local_band_is_the_papers_window():
  """Causal: 0 <= i-j < w; bidirectional: |i-j| <= w/2 (checked on a few pairs)."""
  m = bs.band_mask(20, lc.window_band(5, True))
  assert m[10, 6] and m[10, 10] and not m[10, 5] and not m[10, 11]
  m = bs.band_mask(20, lc.window_band(6, False))
  assert m[10, 7] and m[10, 13] and not m[10, 6] and not m[10, 14]


@pytest.mark.parametrize("causal,num_global,num_random", [(True, 2, 2), (False, 3, 1)])
def test_bigbird_equals_exact_with_bigbird_mask(causal, num_global, num_random):
  q, k, v, seg = _case(t=45)  # 12 blocks of 4 (the last one partial)
  mixer = _mixer(lc.BigBirdAttention, causal, layer_index=1, block=4, num_global=num_global, num_random=num_random,
                 seed=3)
  rand = mixer.random_blocks(bs.num_blocks(45, 4))
  dense = lambda *a: lc.reference_bigbird_attention(*a, seg, block=4, num_global=num_global, random_blocks=rand,
                                                    causal=causal)
  assert_same_values_and_grads(lambda *a: mixer.attend(*a, _ctx(seg)), dense, q, k, v)


def test_bigbird_random_blocks():
  """Distinct, outside the sliding and global blocks, per head and per layer, reproducible."""
  nb, g, r = 12, 2, 3
  draw = lambda layer, causal=False, seed=0: lc.bigbird_random_blocks(nb, N, num_global=g, num_random=r, seed=seed,
                                                                      layer_index=layer, causal=causal)
  glob = set(lc.global_blocks(nb, g))
  assert glob == {0, nb - 1}
  for causal in (False, True):
    rand = draw(0, causal)
    for head in rand:
      for i, row in enumerate(head):
        assert len(set(row)) == len(row)
        assert not set(row) & (glob | {i - 1, i, i + 1})
        cand = [j for j in range(nb) if j not in glob and abs(j - i) > 1 and (not causal or j < i)]
        assert set(row) <= set(cand)
        assert len(row) == (0 if i in glob else min(r, len(cand)))
  assert draw(0) == draw(0) and draw(0) != draw(1) and draw(0) != draw(0, seed=1)
  assert draw(0)[0] != draw(0)[1], "random blocks should differ per head"


# ----------------------------------------------------------------------------------------------------------------
# Inside a model, and memory
# ----------------------------------------------------------------------------------------------------------------


MIXER_CLASSES = {"xattention": bs.XAttention, "bigbird": lc.BigBirdAttention}
COVERING_OPTIONS = (("bigbird", (("block", 16), ("num_global", 2), ("num_random", 1))),  # 3 blocks: all covered
                    ("xattention", (("block", 8), ("stride", 4), ("threshold", 1.0))))


def test_model_equals_attention_model_when_the_patterns_cover_everything(monkeypatch):
  """An LM with an xattention layer and a bigbird layer (options that cover every visible
  pair), registered by name with their config groups; same params and batch (packed + padded,
  GQA, RoPE): loss and gradients equal the exact `attention` model's - the mixers keep
  Attention's projections and rope. (`local` and `block_sparse` share that code path.)"""
  for name, cls in MIXER_CLASSES.items():
    monkeypatch.setitem(layers.mixers.MIXERS, name, cls)
  spec = dict(kind="lm", vocab_size=40, num_classes=40, max_len=48, d_model=32, num_heads=4, num_kv_heads=2,
              mlp_ratio=2, mlp="gelu", norm="rmsnorm", positions="rope", dropout=0.0, pooling="mean",
              tie_embeddings=True, dtype="float32")
  exact = FunctionalModel(build_model(ModelSpec(mixers=("attention",) * 2, **spec), seed=0))
  sparse = FunctionalModel(build_model(ModelSpec(mixers=("xattention", "bigbird"), mixer_options=COVERING_OPTIONS,
                                                 **spec), seed=0))
  params = exact.init_params()
  ids = np.random.default_rng(0).integers(1, 40, size=(2, 45)).astype(np.int32)
  seg = np.ones_like(ids)
  seg[0, 20:] = 2
  seg[1, 30:] = 0
  pos = np.where(seg == 2, np.arange(45) - 20, np.arange(45))
  batch = {"inputs": ids, "segment_ids": seg, "positions": pos}
  loss = lambda fm: jax.jit(jax.value_and_grad(lambda p: jnp.sum(fm.apply(p, {}, batch)[0] * (seg[..., None] > 0))))
  (l1, g1), (l2, g2) = loss(sparse)(params), loss(exact)(params)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  for key in g1:
    np.testing.assert_allclose(np.asarray(g1[key]), np.asarray(g2[key]), atol=1e-4, rtol=1e-4, err_msg=key)


def test_compiled_memory_is_far_below_dense():
  """Forward+backward temp memory at T=8192 (compile only) of the engine with a 3-block local
  table vs the dense reference: dense holds [T, T] scores, the engine one step's [T, block].
  The custom VJP also keeps it independent of M (autodiff of the loop would store every
  step's probabilities: 93 MiB at M=3 and 364 MiB at M=17 for these shapes)."""
  b, t, n, kv, h, block = 1, 8192, 2, 1, 32, 64
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  kk = jax.ShapeDtypeStruct((b, t, kv, h), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp(fn):
    loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kk, kk, seg).compile().memory_analysis() \
        .temp_size_in_bytes

  def sparse(radius):
    blocks, valid = bs.stack_heads([bs.pack_rows(bs.local_rows(t // block, False, radius, radius))])
    return temp(lambda q, k, v, s: bs.block_sparse_attention(q, k, v, s, blocks, valid, block=block, causal=False))

  narrow, wide = sparse(1), sparse(8)  # M = 3 and M = 17 blocks per row
  dense = temp(lambda q, k, v, s: _exact(q, k, v, s, False))
  print(f"T={t}: block-sparse fwd+bwd temp {narrow / 2**20:.1f} MiB (M=3), {wide / 2**20:.1f} MiB (M=17); "
        f"dense {dense / 2**20:.1f} MiB; ratio {dense / narrow:.0f}x")
  assert narrow * 50 <= dense, f"sparse {narrow / 2**20:.1f} MiB vs dense {dense / 2**20:.1f} MiB"
  assert wide <= 1.1 * narrow, f"temp grows with M: {narrow / 2**20:.1f} -> {wide / 2**20:.1f} MiB"
  # O(T * (H + block)) per head: a handful of [B, T, N, H]-sized arrays plus one step's [T, block] scores.
  assert narrow < 24 * b * t * n * max(h, block) * 4
