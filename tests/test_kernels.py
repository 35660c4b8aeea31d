"""Pallas attention kernels (kernels/flash_pallas.py, kernels/decode_pallas.py) against the dense and
blockwise references.

On CPU the kernels run in Pallas interpret mode; on a GPU (scripts/gpu_check.sh runs this
file with JAX_PLATFORMS=cuda) the same tests run the Triton-compiled kernels. Shapes are
tiny so interpret mode stays fast; tiles are 16-32 so that several blocks, the causal
diagonal split and the padding of odd lengths are all exercised.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.decode_pallas import decode_attention_pallas
from kernels.flash_pallas import (Tiling, default_tiling, flash_attention_pallas, flash_attention_pallas_lse,
                                  flash_chunk_grads_pallas, reference_flash_attention_lse)
from kernels.reference import MASK_VALUE, make_mask, reference_attention
from tests.helpers import values_and_grads
from tests.kernel_checks import (attention_case, check_chunk_grads, check_decode, check_decode_segments,
                                 check_explicit_positions, check_rel, decode_case, dense_decode)

# Small blocks, different in every kernel (bq != bk) so the causal bounds are exercised off the square.
TILES = Tiling(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=32)
# The one-kernel backward: dQ added by the dK/dV programs (atomics), no dQ kernel.
FUSED = dataclasses.replace(TILES, fused_dq=True)


def _dense(q, k, v, seg, causal):
  """The dense fp32 reference on upcast inputs: the 'true' answer for either input dtype."""
  b, t = q.shape[:2]
  s = k.shape[1]
  qseg = np.ones((b, t), np.int32) if seg is None else seg
  kseg = np.ones((b, s), np.int32) if seg is None else seg
  mask = make_mask(qseg, kseg, np.broadcast_to(np.arange(t), (b, t)), np.broadcast_to(np.arange(s), (b, s)), causal)
  f32 = lambda x: x.astype(jnp.float32)
  return reference_attention(f32(q), f32(k), f32(v), mask)


@pytest.mark.parametrize("dtype,causal,case,fused", [
    (jnp.float32, True, "gqa_segments_odd", False),
    (jnp.float32, False, "gqa_segments_odd", False),
    (jnp.bfloat16, True, "gqa_segments_odd", False),
    (jnp.bfloat16, False, "mha_aligned", False),
    (jnp.float32, True, "gqa_segments_odd", True),
    (jnp.bfloat16, False, "gqa_segments_odd", True),
    (jnp.bfloat16, True, "mha_aligned", True),
], ids=["fp32-causal-gqa_segments_odd", "fp32-bidir-gqa_segments_odd", "bf16-causal-gqa_segments_odd",
        "bf16-bidir-mha_aligned", "fp32-causal-gqa_segments_odd-fused_dq", "bf16-bidir-gqa_segments_odd-fused_dq",
        "bf16-causal-mha_aligned-fused_dq"])
def test_values_and_gradients_match_dense_reference(dtype, causal, case, fused):
  if case == "gqa_segments_odd":  # 45 = not a multiple of 16 or 32; 2 query heads per kv head
    q, k, v, seg = attention_case(b=2, t=45, n=4, kv=2, h=64, dtype=dtype, seed=1 + causal)
  else:  # no segment ids, no padding: the kernels' unmasked fast path
    q, k, v, seg = attention_case(b=1, t=64, n=2, kv=2, h=64, dtype=dtype, seed=3 + causal, segments=False)
  w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  pallas = lambda q, k, v: flash_attention_pallas(q, k, v, seg, seg, causal=causal, tiling=FUSED if fused else TILES)
  got, g_got = values_and_grads(pallas, q, k, v, w)
  want, g_want = values_and_grads(lambda q, k, v: _dense(q, k, v, seg, causal), q, k, v, w)
  assert got.dtype == dtype and got.shape == q.shape
  check_rel("out", got, want, dtype)
  for name, a, b in zip("qkv", g_got, g_want):
    assert a.dtype == dtype
    check_rel(f"d{name}", a, b, dtype)
  if seg is not None:  # padding rows see nothing: exactly zero output and zero dq
    pad = seg == 0
    assert np.all(np.asarray(got, np.float32)[pad] == 0) and np.all(np.asarray(g_got[0], np.float32)[pad] == 0)


def _dense_with_lse(q, k, v, seg, causal):
  """(dense out, dense lse [B, T, N]) in fp32; lse = -inf on rows that see no key. Scores are
  masked with a finite value so gradients stay finite on those rows."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  idx = np.broadcast_to(np.arange(t), (b, t))
  mask = make_mask(seg, seg, idx, idx, causal)
  s = jnp.einsum("btkgh,bskh->btkgs", q.reshape(b, t, kv, n // kv, h), k) / np.sqrt(h)
  s = jnp.where(mask[:, :, None, None, :], s, MASK_VALUE)
  lse = jnp.where(mask.any(-1)[:, :, None], jax.nn.logsumexp(s, axis=-1).reshape(b, t, n), -jnp.inf)
  return _dense(q, k, v, seg, causal), lse


def test_lse_and_its_gradient_match_dense_reference():
  """lse equals the dense log-sum-exp and the blockwise twin's (with -inf on padding rows), and a
  loss through lse as well as out (what ring attention's merge backpropagates) has the same
  gradients."""
  q, k, v, seg = attention_case(b=2, t=45, n=4, kv=2, h=64, dtype=jnp.float32, seed=11)
  b, t = seg.shape
  r = np.random.default_rng(12)
  w_o, w_l = jnp.asarray(r.normal(size=q.shape), jnp.float32), jnp.asarray(r.normal(size=(b, t, 4)), jnp.float32)

  run = lambda fn, q=q, k=k, v=v: values_and_grads(fn, q, k, v, w_o, w_l)

  (o1, l1), g1 = run(lambda q, k, v: flash_attention_pallas_lse(q, k, v, seg, seg, causal=True, tiling=TILES))
  (o2, l2), g2 = run(lambda q, k, v: _dense_with_lse(q, k, v, seg, True))
  assert l1.shape == (b, t, 4) and l1.dtype == jnp.float32
  np.testing.assert_array_equal(np.isneginf(np.asarray(l1)), np.broadcast_to((seg == 0)[..., None], l1.shape))
  fin = np.isfinite(np.asarray(l2))
  check_rel("lse", np.asarray(l1)[fin], np.asarray(l2)[fin], jnp.float32)
  check_rel("out", o1, o2, jnp.float32)
  for name, a, b_ in zip("qkv", g1, g2):
    check_rel(f"d{name} (through out and lse)", a, b_, jnp.float32)
  o3, l3 = jax.jit(lambda q, k, v: reference_flash_attention_lse(q, k, v, seg, seg, causal=True))(q, k, v)
  check_rel("out vs dense twin", o1, o3, jnp.float32)
  check_rel("lse vs dense twin", np.asarray(l1)[fin], np.asarray(l3)[fin], jnp.float32)


@pytest.mark.parametrize("tiling", [TILES, FUSED], ids=["dq_kernel", "fused_dq"])
def test_explicit_positions_match_the_blockwise_twin(tiling):
  """Causal masking by true positions (ring chunks, zigzag rows): values, lse and gradients
  equal the blockwise twin's, and tiles with no visible pair are skipped (NaN probe)."""
  check_explicit_positions(lambda q, k, v, qs, ks, qi, ki: flash_attention_pallas_lse(
      q, k, v, qs, ks, causal=True, q_index=qi, kv_index=ki, tiling=tiling), empty_tiles_from=32)


@pytest.mark.parametrize("tiling", [TILES, FUSED], ids=["dq_kernel", "fused_dq"])
def test_chunk_grads_match_the_blockwise_twin(tiling):
  """Ring attention's backward step on the kernels: one key chunk's gradients from the final lse."""
  check_chunk_grads(lambda *a: flash_chunk_grads_pallas(*a, causal=True, tiling=tiling))


@pytest.mark.parametrize("h,causal", [(128, False), (256, True), (96, True)])
def test_head_dims_with_default_tiles(h, causal):
  """Head dims 128 and 256 with the GPU default tiles (clamped to the short length), and 96,
  which is zero-padded to 128 inside; bf16 with grouped-query heads and segments."""
  q, k, v, seg = attention_case(b=1, t=40, n=4, kv=1, h=h, dtype=jnp.bfloat16, seed=20 + h)
  pallas = lambda q, k, v: flash_attention_pallas(q, k, v, seg, seg, causal=causal)
  dense = lambda q, k, v: _dense(q, k, v, seg, causal)
  if h == 96:  # the padding happens outside the kernels: forward values suffice
    got, want = jax.jit(pallas)(q, k, v), dense(q, k, v)
    assert got.shape == q.shape
    check_rel("out", got, want, jnp.bfloat16)
    return
  w = jnp.asarray(np.random.default_rng(21).normal(size=q.shape), jnp.float32)
  got, g_got = values_and_grads(pallas, q, k, v, w)
  want, g_want = values_and_grads(dense, q, k, v, w)
  check_rel("out", got, want, jnp.bfloat16)
  for name, a, b in zip("qkv", g_got, g_want):
    check_rel(f"d{name}", a, b, jnp.bfloat16)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled kernels at GPU-sized tiles; too slow to interpret")
@pytest.mark.parametrize("h,causal,fused", [(64, True, False), (128, True, False), (128, False, False),
                                            (256, True, False), (128, True, True), (128, False, True)])
def test_gpu_default_tiles_at_realistic_length(h, causal, fused):
  """The default GPU tiles (64-128 rows, 4-8 warps) unclamped: T = 1000 pads to 1024, several
  query and key blocks per program, grouped-query heads, packed segments, bf16."""
  q, k, v, seg = attention_case(b=2, t=1000, n=8, kv=2, h=h, dtype=jnp.bfloat16, seed=50 + h + causal)
  w = jnp.asarray(np.random.default_rng(51).normal(size=q.shape), jnp.float32)
  tiling = dataclasses.replace(default_tiling(h), fused_dq=fused)  # the fused-dQ backward compiled with atomics
  got, g_got = values_and_grads(lambda q, k, v: flash_attention_pallas(q, k, v, seg, seg, causal=causal,
                                                                       tiling=tiling), q, k, v, w)
  want, g_want = values_and_grads(lambda q, k, v: _dense(q, k, v, seg, causal), q, k, v, w)
  check_rel("out", got, want, jnp.bfloat16)
  for name, a, b in zip("qkv", g_got, g_want):
    check_rel(f"d{name}", a, b, jnp.bfloat16)


@pytest.mark.parametrize("tiling", [TILES, FUSED], ids=["dq_kernel", "fused_dq"])
def test_causal_tiles_beyond_the_diagonal_are_never_loaded(tiling):
  """Keys 32..63 are invisible to queries 0..31 (causal). Filling them with NaN poisons any
  tile that is loaded, even if masked (0 * NaN = NaN in P V and in dP = dO V^T): finite,
  correct results prove the loops stop at the diagonal rather than mask past it."""
  q, k, v, _ = attention_case(b=1, t=32, s=64, n=2, kv=1, h=64, dtype=jnp.float32, seed=30, segments=False)
  k = k.at[:, 32:].set(jnp.nan)
  v = v.at[:, 32:].set(jnp.nan)
  w = jnp.asarray(np.random.default_rng(31).normal(size=q.shape), jnp.float32)
  got, (dq, dk, dv) = values_and_grads(
      lambda q, k, v: flash_attention_pallas(q, k, v, causal=True, tiling=tiling), q, k, v, w)
  want, (dq_r, dk_r, dv_r) = values_and_grads(
      lambda q, k, v: _dense(q, k, v, None, True), q, k[:, :32], v[:, :32], w)
  check_rel("out", got, want, jnp.float32)
  check_rel("dq", dq, dq_r, jnp.float32)
  check_rel("dk", dk[:, :32], dk_r, jnp.float32)
  check_rel("dv", dv[:, :32], dv_r, jnp.float32)
  assert np.all(np.asarray(dk[:, 32:]) == 0) and np.all(np.asarray(dv[:, 32:]) == 0)


def test_lowers_to_triton_for_gpu():
  """The compiled path lowers to three Triton kernels with the intended grids, on any host
  (lowering runs in Python; only the final Triton compile needs a GPU): forward and dQ over
  (query blocks, query heads, batch), dK/dV over (key blocks, kv heads, batch) - GQA shares
  K/V through index maps, so the dK/dV grid has K, not N, heads."""
  b, t, n, kv, h = 2, 1000, 8, 2, 128
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(
      flash_attention_pallas(q, k, v, s, s, causal=True, interpret=False).astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()
  grids = re.findall(r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32.*?name = "(\w+)"', text)
  got = {name: tuple(int(x) for x in g) for *g, name in grids}
  # Defaults for H=128: forward 128-row query tiles, dQ 64, dK/dV 64-row key tiles; 1000 -> 1024.
  assert got == {"flash_fwd": (8, n, b), "flash_bwd_dq": (16, n, b), "flash_bwd_dkv": (16, kv, b)}, got
  # The one-kernel backward: no dQ kernel, and the dK/dV kernel's dQ adds lower to Triton atomics.
  fused = dataclasses.replace(default_tiling(h), fused_dq=True)
  loss_fused = lambda q, k, v, s: jnp.sum(
      flash_attention_pallas(q, k, v, s, s, causal=True, interpret=False, tiling=fused).astype(jnp.float32))
  text = jax.jit(jax.grad(loss_fused, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(
      lowering_platforms=("cuda",)).as_text()
  grids = re.findall(r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32.*?name = "(\w+)"', text)
  got = {name: tuple(int(x) for x in g) for *g, name in grids}
  assert got == {"flash_fwd": (8, n, b), "flash_bwd_dkv_dq": (16, kv, b)}, got
  # With explicit positions (ring attention's chunks) the run-time tile skip lowers too.
  loss_idx = lambda q, k, v, s: jnp.sum(flash_attention_pallas(
      q, k, v, s, s, causal=True, q_index=s, kv_index=s, interpret=False).astype(jnp.float32))
  text = jax.jit(jax.grad(loss_idx, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(
      lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r'name = "flash_(fwd|bwd_dq|bwd_dkv)"', text)) == 3


def test_rejects_bad_arguments():
  q, k, v, seg = attention_case(b=1, t=32, n=4, kv=2, h=64, dtype=jnp.float32, seed=40)
  with pytest.raises(ValueError, match="powers of two"):
    flash_attention_pallas(q, k, v, seg, seg, causal=True, block_q=24)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    flash_attention_pallas(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), causal=True)
  with pytest.raises(ValueError, match="both"):
    flash_attention_pallas(q, k, v, seg, None, causal=True)


# ----------------------------------------------------------------------------- split-KV decode


@pytest.mark.parametrize("tq,dtype,splits", [(1, jnp.float32, 8), (3, jnp.float32, 3), (1, jnp.bfloat16, 1)],
                         ids=["tq1-fp32-8splits", "tq3-fp32-3splits", "tq1-bf16-1split"])
def test_decode_matches_references_with_ragged_lengths(tq, dtype, splits):
  """Against the dense reference and the pure-JAX blockwise twin, whatever the split count (one
  block per split up to a single split); grouped-query heads packed into rows; never-read
  cache entries poisoned with NaN."""
  check_decode(lambda *a: decode_attention_pallas(*a, block_k=16, num_splits=splits), tq, dtype, seed=60 + tq, h=64)



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_decode_with_segment_ids(dtype):
  """Packed and padded caches as the model's decoding keeps them: a query sees only its own
  segment; padding queries give zeros; padding slots' K (NaN) are never used."""
  check_decode_segments(lambda *a, **kw: decode_attention_pallas(*a, **kw, block_k=16, num_splits=3), dtype, seed=95, h=64)

def test_decode_lowers_to_triton_for_gpu():
  """Grid (splits, kv heads, batch): K/V are read once per kv head, not per query head."""
  b, s, n, kv, h = 2, 4096, 32, 8, 128
  q = jax.ShapeDtypeStruct((b, 1, n, h), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((b, s, kv, h), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
  f = lambda q, k, v, l: decode_attention_pallas(q, k, v, l, block_k=64, num_splits=16, interpret=False)
  text = jax.jit(f).trace(q, cache, cache, lengths).lower(lowering_platforms=("cuda",)).as_text()
  grids = re.findall(r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32.*?name = "(\w+)"', text)
  assert [(tuple(int(x) for x in g), name) for *g, name in grids] == [((16, kv, b), "flash_decode")]
  segs = jax.ShapeDtypeStruct((b, 1), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32)
  f = lambda q, k, v, l, qs, ks: decode_attention_pallas(q, k, v, l, q_segment_ids=qs, kv_segment_ids=ks, block_k=64,
                                                         num_splits=16, interpret=False)
  text = jax.jit(f).trace(q, cache, cache, lengths, *segs).lower(lowering_platforms=("cuda",)).as_text()
  assert re.findall(r'name = "(flash_decode)"', text) == ["flash_decode"]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled kernel at GPU-sized tiles; too slow to interpret")
def test_gpu_decode_at_realistic_length():
  """Default tiles and split count on the device: S = 4096, 32 query heads on 8 kv heads, bf16."""
  q, k, v, k_nan, v_nan, lengths = decode_case(1, jnp.bfloat16, seed=80, s=4096, n=32, kv=8, h=128, block=64,
                                                 lengths=(4096, 1000, 37, 0))
  got = jax.jit(decode_attention_pallas)(q, k_nan, v_nan, lengths)
  check_rel("decode vs dense", got, dense_decode(q, k, v, lengths), jnp.bfloat16)
