"""The block-sparse Pallas kernels, GPU (kernels/block_sparse_pallas.py) and TPU
(kernels/block_sparse_tpu.py), against their references.

Twin: the pure-JAX engine `layers.attention.block_sparse.block_sparse_attention` (same
arguments); truth: `reference_block_sparse_attention`, the table expanded to an explicit
[B, N, T, T] mask and dense attention head by head. Forward values and gradients, fp32 and
bf16, causal and bidirectional, packed segments + padding, a length that is not a multiple
of the block, grouped-query heads with per-query-head, per-kv-head and shared tables, a
band, a table computed under jit, and a NaN probe that proves unlisted blocks are never
loaded. On CPU the kernels run in Pallas interpret mode and the TPU interpreter (shapes are
tiny); the Triton and Mosaic lowerings are checked on any host.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_sparse_pallas import block_sparse_attention_pallas
from kernels.common import compact_table, merge_rows, transpose_table
from kernels.block_sparse_tpu import block_sparse_attention_tpu
from layers.attention import block_sparse as bs
from tests.helpers import values_and_grads

REL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
KERNELS = {"triton": block_sparse_attention_pallas, "tpu": block_sparse_attention_tpu}
B, T, N, KV, H, BLOCK = 2, 70, 4, 2, 16, 16  # 70 = 4 full blocks + 6 rows: the last block is padded
# Block size per kernel: the TPU interpreter's cost grows with grid steps, so its cases use
# 32-row blocks (70 = 2 full blocks + 6 rows there).
BLOCKS = {"triton": BLOCK, "tpu": 2 * BLOCK}


def _case(dtype=jnp.float32, seed=0, t=T):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(B, t, N, H)), dtype)
  k = jnp.asarray(r.normal(size=(B, t, KV, H)), dtype)
  v = jnp.asarray(r.normal(size=(B, t, KV, H)), dtype)
  seg = np.ones((B, t), np.int32)
  seg[0, t // 2:] = 2  # row 0: two packed segments, then padding
  seg[0, t - 5:] = 0
  seg[1, t - 12:] = 0
  w = jnp.asarray(r.normal(size=(B, t, N, H)), jnp.float32)
  return q, k, v, seg, w


def _check(name, got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
  report = f"{name}: rel {rel:.2e}, max err {np.abs(got - want).max():.2e}"
  print(report)
  assert rel < REL[dtype], report


def _tables(kind: str, causal: bool, nb: int):
  rng = np.random.default_rng(11)
  if kind == "random_per_query_head":  # [1, N, C, M]: every query head its own random blocks
    return bs.stack_heads([bs.pack_rows(bs.random_rows(nb, causal, 2, rng)) for _ in range(N)])
  if kind == "random_per_kv_head":  # [1, K, C, M]: shared by the query heads of a group
    return bs.stack_heads([bs.pack_rows(bs.random_rows(nb, causal, 1, rng)) for _ in range(KV)])
  if kind == "strided_shared":  # [1, 1, C, M]
    return bs.stack_heads([bs.pack_rows(bs.strided_rows(nb, causal, 1, 2))])
  raise ValueError(kind)


@pytest.mark.parametrize("kernel,kind,causal,band,dtype,seed", [
    ("triton", "random_per_query_head", True, None, jnp.float32, 1),
    ("triton", "random_per_kv_head", False, None, jnp.float32, 2),
    ("triton", "strided_shared", True, (9, 0), jnp.float32, 3),
    ("triton", "strided_shared", False, (5, 3), jnp.float32, 4),
    ("triton", "random_per_query_head", True, None, jnp.bfloat16, 6),
    ("tpu", "random_per_query_head", True, None, jnp.float32, 1),
    ("tpu", "random_per_kv_head", False, (5, 3), jnp.float32, 2),
    ("tpu", "strided_shared", True, (9, 0), jnp.bfloat16, 3),
])
def test_matches_engine_and_dense_reference(kernel, kind, causal, band, dtype, seed):
  q, k, v, seg, w = _case(dtype, seed=seed)
  block = BLOCKS[kernel]
  nb = bs.num_blocks(T, block)
  blocks, valid = _tables(kind, causal, nb)
  kw = dict(block=block, causal=causal, band=band)
  got, g_got = values_and_grads(lambda q, k, v: KERNELS[kernel](q, k, v, seg, blocks, valid, **kw), q, k, v, w)
  f32 = lambda x: x.astype(jnp.float32)
  want, g_want = values_and_grads(
      lambda q, k, v: bs.reference_block_sparse_attention(q, k, v, seg, blocks, valid, **kw), f32(q), f32(k), f32(v), w)
  assert got.shape == q.shape and got.dtype == dtype
  _check("out vs dense", got, want, dtype)
  for name, a, b in zip("qkv", g_got, g_want):
    assert a.dtype == dtype
    _check(f"d{name} vs dense", a, b, dtype)
  if dtype == jnp.float32:
    twin, g_twin = values_and_grads(lambda q, k, v: bs.block_sparse_attention(q, k, v, seg, blocks, valid, **kw),
                                     q, k, v, w)
    _check("out vs engine", got, twin, dtype)
    for name, a, b in zip("qkv", g_got, g_twin):
      _check(f"d{name} vs engine", a, b, dtype)
  pad = seg == 0  # padding rows see nothing: exactly zero output and zero dq
  assert np.all(np.asarray(got, np.float32)[pad] == 0) and np.all(np.asarray(g_got[0], np.float32)[pad] == 0)


@pytest.mark.parametrize("kind,causal,band,dtype,q_tile,kv_tile", [
    ("random_per_query_head", True, None, jnp.float32, 2, 1),
    ("random_per_kv_head", False, None, jnp.float32, 1, 2),
    ("strided_shared", True, (9, 0), jnp.float32, 4, 2),
    ("random_per_query_head", True, None, jnp.bfloat16, 2, 4),
])
def test_multi_block_tiles_match_dense_reference(kind, causal, band, dtype, q_tile, kv_tile):
  """Programs of q_tile / kv_tile table blocks (the union of their rows, each tile's rows masked
  by the blocks that list it) give the dense reference's values and gradients. 5 blocks of 16:
  the block count is padded to the tile with empty rows."""
  q, k, v, seg, w = _case(dtype, seed=30 + q_tile)
  nb = bs.num_blocks(T, BLOCK)
  blocks, valid = _tables(kind, causal, nb)
  kw = dict(block=BLOCK, causal=causal, band=band)
  got, g_got = values_and_grads(lambda q, k, v: block_sparse_attention_pallas(
      q, k, v, seg, blocks, valid, q_tile=q_tile, kv_tile=kv_tile, **kw), q, k, v, w)
  f32 = lambda x: x.astype(jnp.float32)
  want, g_want = values_and_grads(
      lambda q, k, v: bs.reference_block_sparse_attention(q, k, v, seg, blocks, valid, **kw), f32(q), f32(k), f32(v), w)
  assert got.dtype == dtype
  _check("out", got, want, dtype)
  for name, a, b in zip("qkv", g_got, g_want):
    _check(f"d{name}", a, b, dtype)
  pad = seg == 0
  assert np.all(np.asarray(got, np.float32)[pad] == 0) and np.all(np.asarray(g_got[0], np.float32)[pad] == 0)


@pytest.mark.parametrize("kernel,tiles", [("triton", {}), ("triton", dict(q_tile=2)), ("triton", dict(kv_tile=2)),
                                          ("triton", dict(q_tile=4, kv_tile=4)), ("tpu", {})])
def test_unlisted_blocks_are_never_loaded(kernel, tiles):
  """No row lists key block 2, so its K and V are NaN: a kernel that loaded the tile (even to
  mask it) would produce NaN (0 * NaN in P V, dP = dO V^T). Results must be finite, equal the
  dense reference on clean inputs, and dK/dV of block 2 must be exactly zero - also when a
  dK/dV program's own multi-block tile holds block 2 beside listed blocks."""
  q, k, v, seg, w = _case(seed=5)
  seg = np.ones_like(seg)
  block = BLOCKS[kernel]
  nb = bs.num_blocks(T, block)
  rows = [[j for j in range(nb) if j != 2 and j <= i] for i in range(nb)]
  rows[2] = [0, 1]  # query block 2 keeps two earlier blocks only
  blocks, valid = bs.stack_heads([bs.pack_rows(rows)])
  poisoned = slice(2 * block, 3 * block)
  k_nan, v_nan = k.at[:, poisoned].set(jnp.nan), v.at[:, poisoned].set(jnp.nan)
  kw = dict(block=block, causal=True)
  got, (dq, dk, dv) = values_and_grads(
      lambda q, k, v: KERNELS[kernel](q, k, v, seg, blocks, valid, **kw, **tiles), q, k_nan, v_nan, w)
  want, (dq_r, dk_r, dv_r) = values_and_grads(
      lambda q, k, v: bs.reference_block_sparse_attention(q, k, v, seg, blocks, valid, **kw), q, k, v, w)
  _check("out", got, want, jnp.float32)
  _check("dq", dq, dq_r, jnp.float32)
  _check("dk", dk, dk_r, jnp.float32)
  _check("dv", dv, dv_r, jnp.float32)
  assert np.all(np.asarray(dk[:, poisoned]) == 0) and np.all(np.asarray(dv[:, poisoned]) == 0)


@pytest.mark.parametrize("kernel", ["triton", "tpu"])
def test_table_computed_under_jit(kernel):
  """A per-input table (as XAttention's) is a traced array: the kernel takes it as data, with
  the transposed table bounded by G * C entries (Triton: merged for 2-block tiles under jit too)."""
  q, k, v, seg, w = _case(seed=8)
  tiles = dict(q_tile=2, kv_tile=2) if kernel == "triton" else {}
  block = BLOCKS[kernel]
  nb = bs.num_blocks(T, block)

  def per_input(q, k, v):  # each query block keeps its diagonal block and the block with the largest key norm
    norms = jnp.sum(k.astype(jnp.float32) ** 2, axis=(2, 3))  # [B, T]
    per_block = bs.pad_length(norms, nb * block).reshape(B, nb, block).sum(-1)  # [B, C]
    best = jnp.argmax(per_block, axis=-1)  # [B]
    diag = jnp.broadcast_to(jnp.arange(nb), (B, nb))
    other = jnp.broadcast_to(best[:, None], (B, nb))
    blocks = jnp.stack([diag, other], -1)[:, None]  # [B, 1, C, 2]
    valid = jnp.stack([jnp.ones_like(diag, bool), other != diag], -1)[:, None]
    return blocks, valid

  def through_kernel(q, k, v):
    blocks, valid = per_input(q, k, v)
    return KERNELS[kernel](q, k, v, seg, jax.lax.stop_gradient(blocks), valid, block=block, causal=False, **tiles)

  def reference(q, k, v):
    blocks, valid = per_input(q, k, v)
    return bs.reference_block_sparse_attention(q, k, v, seg, blocks, valid, block=block, causal=False)

  got, g_got = values_and_grads(through_kernel, q, k, v, w)
  want, g_want = values_and_grads(reference, q, k, v, w)
  _check("out", got, want, jnp.float32)
  for name, a, b in zip("qkv", g_got, g_want):
    _check(f"d{name}", a, b, jnp.float32)


def test_tables_compact_and_transpose():
  """Valid entries first, then -1; the transposed table lists exactly the (head, query block)
  pairs whose rows list each key block, for concrete (numpy) and traced tables alike."""
  nb = 5
  blocks = np.array([[[[3, 0, 1], [1, 4, 4], [2, 2, 0], [0, 0, 0], [4, 1, 3]]]])  # [1, 1, C, 3]
  valid = np.array([[[[True, False, True], [True, True, False], [False, True, True], [False] * 3,
                      [True, True, True]]]])
  rows = compact_table(blocks, valid, num_heads=2, num_kv_heads=1, num_blocks=nb)
  assert isinstance(rows, np.ndarray) and rows.shape == (1, 2, nb, 16)
  assert rows[0, 0, :, :3].tolist() == [[3, 1, -1], [1, 4, -1], [2, 0, -1], [-1, -1, -1], [4, 1, 3]]
  assert np.all(rows[..., 3:] == -1) and np.all(rows[0, 1] == rows[0, 0])  # one table for both heads
  cols = transpose_table(rows, num_kv_heads=1)
  listers = {j: sorted(int(e) for e in cols[0, 0, j] if e >= 0) for j in range(nb)}
  # Entries g * C + i: head 0 rows i, head 1 rows C + i.
  want = {j: sorted([i for i in range(nb) if j in rows[0, 0, i]] + [nb + i for i in range(nb) if j in rows[0, 0, i]])
          for j in range(nb)}
  assert listers == want
  traced = jax.jit(lambda b, v: transpose_table(compact_table(b, v, 2, 1, nb), 1))(jnp.asarray(blocks),
                                                                                 jnp.asarray(valid))
  assert {j: sorted(int(e) for e in np.asarray(traced)[0, 0, j] if e >= 0) for j in range(nb)} == want


def test_merge_rows_lists_each_block_once_with_the_rows_that_list_it():
  """Merged row i: every entry of rows i*r .. i*r + r - 1 once, as e * 2^r + bits (bit s: row
  i*r + s lists e), then -1; the same for a table traced under jit."""
  rng = np.random.default_rng(3)
  c, m, r = 8, 5, 4
  rows = np.full((2, 3, c, 16), -1, np.int32)
  for idx in np.ndindex(2, 3, c):
    n_valid = rng.integers(0, m + 1)
    rows[idx][:n_valid] = rng.choice(12, n_valid, replace=False)
  for merged in (merge_rows(rows, r), np.asarray(jax.jit(lambda x: merge_rows(x, r))(jnp.asarray(rows)))):
    assert merged.shape[2] == c // r and merged.shape[-1] % 16 == 0
    for idx in np.ndindex(2, 3, c // r):
      entries = merged[idx]
      valid = entries[entries >= 0]
      assert np.all(entries[len(valid):] == -1), "valid entries first"
      got = {int(e) >> r: int(e) & ((1 << r) - 1) for e in valid}
      assert len(got) == len(valid), "an entry listed twice"
      want = {}
      for s_ in range(r):
        for e in rows[idx[0], idx[1], idx[2] * r + s_]:
          if e >= 0:
            want[int(e)] = want.get(int(e), 0) | (1 << s_)
      assert got == want
  assert merge_rows(rows, 1) is rows


@pytest.mark.parametrize("t,tiles,want", [
    (1000, {}, (16, 16, 16)),  # 16 blocks of 64, one block per program
    (900, dict(q_tile=2, kv_tile=4), (8, 8, 4)),  # 15 blocks padded to 16: 2-block / 4-block programs
])
def test_lowers_to_triton_for_gpu(t, tiles, want):
  """Three Triton kernels: forward and dQ over (query programs, query heads, batch), dK/dV over
  (key programs, kv heads, batch)."""
  b, n, kv, h, block = 2, 8, 2, 128, 64
  nb = bs.num_blocks(t, block)
  blocks, valid = bs.stack_heads([bs.pack_rows(bs.local_rows(nb, True, 2, 0))])
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(block_sparse_attention_pallas(
      q, k, v, s, blocks, valid, block=block, causal=True, interpret=False, **tiles).astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()
  grids = re.findall(r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32.*?name = "(\w+)"', text)
  got = {name: tuple(int(x) for x in g) for *g, name in grids}
  assert got == {"block_sparse_fwd": (want[0], n, b), "block_sparse_bwd_dq": (want[1], n, b),
                 "block_sparse_bwd_dkv": (want[2], kv, b)}, got


def test_lowers_to_mosaic_for_tpu():
  """Three Mosaic kernels (forward, dQ, dK/dV) whose grids walk the scalar-prefetched tables."""
  b, t, n, kv, h, block = 2, 1000, 8, 2, 128, 128
  nb = bs.num_blocks(t, block)
  blocks, valid = bs.stack_heads([bs.pack_rows(bs.local_rows(nb, True, 2, 0))])
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(block_sparse_attention_tpu(
      q, k, v, s, blocks, valid, block=block, causal=True, interpret=False).astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=("tpu",)).as_text()
  assert sorted(re.findall(r'kernel_name = "(\w+)"', text)) == ["block_sparse_tpu_bwd_dkv", "block_sparse_tpu_bwd_dq",
                                                               "block_sparse_tpu_fwd"]


def test_rejects_bad_arguments():
  q, k, v, seg, _ = _case()
  nb = bs.num_blocks(T, BLOCK)
  blocks, valid = bs.stack_heads([bs.pack_rows(bs.local_rows(nb, True, 1, 0))])
  with pytest.raises(ValueError, match="block=24"):
    block_sparse_attention_pallas(q, k, v, seg, *bs.stack_heads([bs.pack_rows(bs.local_rows(3, True, 1, 0))]),
                                  block=24, causal=True)
  with pytest.raises(ValueError, match="does not fit"):
    block_sparse_attention_pallas(q, k, v, seg, blocks[:, :, :-1], valid[:, :, :-1], block=BLOCK, causal=True)
  with pytest.raises(ValueError, match="q_tile=3"):
    block_sparse_attention_pallas(q, k, v, seg, blocks, valid, block=BLOCK, causal=True, q_tile=3)
  with pytest.raises(ValueError, match="block=12"):
    block_sparse_attention_tpu(q, k, v, seg, blocks, valid, block=12, causal=True)
  with pytest.raises(ValueError, match="does not fit"):
    block_sparse_attention_tpu(q, k, v, seg, blocks[:, :, :-1], valid[:, :, :-1], block=BLOCK, causal=True)


@pytest.mark.parametrize("kernel,name,options", [
    ("triton", "block_sparse", dict(block=16, pattern="random", num_random=1)),
    ("triton", "xattention", dict(block=16, stride=4, threshold=0.9)),
    ("triton", "local", dict(window=20, block=16)),
    ("triton", "bigbird", dict(block=16, num_global=2, num_random=1)),
    ("tpu", "block_sparse", dict(block=32, pattern="random", num_random=1)),
])
def test_mixers_run_the_kernel_with_attention_impl_pallas(kernel, name, options, monkeypatch):
  """The block-sparse mixers with model.attention_impl=pallas call the kernel of their backend
  (Triton: block a power of two >= 16; a TPU, faked here with the kernel interpreted: a
  multiple of 8) and give the pure-JAX engine's outputs and input gradients, causal, with
  packed segments and padding."""
  from flax import nnx

  import kernels.block_sparse_pallas as triton_module
  import kernels.block_sparse_tpu as tpu_module
  import layers.mixers
  from layers.mixer_base import MixContext, MixerSpec
  calls = []
  module, fn = ((triton_module, "block_sparse_attention_pallas") if kernel == "triton" else
                (tpu_module, "block_sparse_attention_tpu"))
  real, real_backend = getattr(module, fn), jax.default_backend
  force = {} if kernel == "triton" else {"interpret": True}
  monkeypatch.setattr(module, fn, lambda *a, **k: calls.append(1) or real(*a, **dict(k, **force)))
  t, d = 70, 32
  r = np.random.default_rng(21)
  x = jnp.asarray(r.normal(size=(B, t, d)), jnp.float32)
  w = jnp.asarray(r.normal(size=(B, t, d)), jnp.float32)
  _, _, _, seg, _ = _case()
  ctx = MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(np.broadcast_to(np.arange(t), (B, t))))
  results = []
  for impl in ("flash", "pallas"):
    spec = MixerSpec(d_model=d, num_heads=N, num_kv_heads=KV, causal=True, positions="rope", layer_index=0,
                     num_layers=1, max_len=128, attention_impl=impl, options=tuple(sorted(options.items())))
    mixer = layers.mixers.MIXERS[name](spec, rngs=nnx.Rngs(0))
    if kernel == "tpu" and impl == "pallas":
      monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    results.append(jax.jit(jax.value_and_grad(lambda x, m=mixer: jnp.sum(m(x, ctx) * w)))(x))
    monkeypatch.setattr(jax, "default_backend", real_backend)
  (v1, g1), (v2, g2) = results
  assert calls, f"attention_impl=pallas did not reach the {kernel} block-sparse kernel"
  np.testing.assert_allclose(float(v2), float(v1), rtol=2e-5)
  _check("dx", g2, g1, jnp.float32)
