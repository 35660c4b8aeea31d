"""The TPU (Mosaic) flash attention kernels (kernels/flash_tpu.py) in the TPU interpreter.

Against the dense reference and the pure-JAX blockwise twin: out, lse and gradients through
both, fp32 and bf16, causal and bidirectional, grouped-query heads, packed segments and
padding, a length that is not a multiple of the blocks; causal tiles past the diagonal are
neither computed nor fetched (NaN probe); the kernels lower to Mosaic on any host. The
split-KV decode kernel (kernels/decode_tpu.py) against the dense and blockwise references.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.decode_tpu import decode_attention_tpu
from kernels.flash_pallas import reference_flash_attention_lse
from kernels.flash_tpu import flash_attention_tpu, flash_attention_tpu_lse, flash_chunk_grads_tpu
from kernels.reference import make_mask, reference_attention
from tests.helpers import values_and_grads, zigzag_index
from tests.kernel_checks import (attention_case, check_chunk_grads, check_decode, check_decode_segments,
                                 check_explicit_positions, check_rel, decode_case)


@pytest.mark.parametrize("dtype,causal", [(jnp.float32, True), (jnp.float32, False), (jnp.bfloat16, True)],
                         ids=["fp32-causal", "fp32-bidirectional", "bf16-causal"])
def test_values_lse_and_gradients_match_references(dtype, causal):
  q, k, v, seg = attention_case(b=2, t=45, n=4, kv=2, h=32, dtype=dtype, seed=1 + causal)
  r = np.random.default_rng(3)
  w_o, w_l = jnp.asarray(r.normal(size=q.shape), jnp.float32), jnp.asarray(r.normal(size=(2, 45, 4)), jnp.float32)
  (o1, l1), g1 = values_and_grads(lambda q, k, v: flash_attention_tpu_lse(q, k, v, seg, seg, causal=causal,
                                                                          block_q=16, block_k=24), q, k, v, w_o, w_l)
  f32 = lambda x: x.astype(jnp.float32)
  (o2, l2), g2 = values_and_grads(lambda q, k, v: reference_flash_attention_lse(q, k, v, seg, seg, causal=causal),
                                  f32(q), f32(k), f32(v), w_o, w_l)
  assert o1.dtype == dtype and o1.shape == q.shape and l1.shape == (2, 45, 4)
  np.testing.assert_array_equal(np.isneginf(np.asarray(l1)), np.broadcast_to((seg == 0)[..., None], l1.shape))
  fin = np.isfinite(np.asarray(l2))
  check_rel("lse", np.asarray(l1)[fin], np.asarray(l2)[fin], dtype)
  check_rel("out", o1, o2, dtype)
  for name, a, b_ in zip("qkv", g1, g2):
    assert a.dtype == dtype
    check_rel(f"d{name}", a, b_, dtype)
  idx = np.broadcast_to(np.arange(45), (2, 45))
  dense = reference_attention(f32(q), f32(k), f32(v), make_mask(seg, seg, idx, idx, causal))
  check_rel("out vs dense", o1, dense, dtype)
  pad = seg == 0
  assert np.all(np.asarray(o1, np.float32)[pad] == 0) and np.all(np.asarray(g1[0], np.float32)[pad] == 0)


def test_causal_tiles_beyond_the_diagonal_are_never_fetched():
  """Queries 0..31 against keys 0..63, causal: keys 32..63 are NaN. Any fetched tile past the
  diagonal (even masked) would poison the result; the clamped block index keeps them out."""
  q, k, v, _ = attention_case(b=1, t=32, s=64, n=2, kv=1, h=32, dtype=jnp.float32, seed=30, segments=False)
  poison = lambda x: x.at[:, 32:].set(jnp.nan)
  w = jnp.asarray(np.random.default_rng(31).normal(size=q.shape), jnp.float32)
  got, (dq, dk, dv) = values_and_grads(
      lambda q, k, v: flash_attention_tpu(q, poison(k), poison(v), causal=True, block_q=16, block_k=16), q, k, v, w)
  idx_q, idx_k = np.arange(32)[None], np.arange(32)[None]
  ones = np.ones((1, 32), np.int32)
  want, (dq_r, dk_r, dv_r) = values_and_grads(
      lambda q, k, v: reference_attention(q, k[:, :32], v[:, :32], make_mask(ones, ones, idx_q, idx_k, True)),
      q, k, v, w)
  check_rel("out", got, want, jnp.float32)
  check_rel("dq", dq, dq_r, jnp.float32)
  check_rel("dk", dk[:, :32], dk_r[:, :32], jnp.float32)
  check_rel("dv", dv[:, :32], dv_r[:, :32], jnp.float32)


def test_explicit_positions_and_chunk_grads_match_the_blockwise_twin():
  """Ring attention's two pieces on the TPU kernels: causal by true positions (NaN probe of the
  run-time tile skip included) and one key chunk's gradients from the final lse."""
  check_explicit_positions(lambda q, k, v, qs, ks, qi, ki: flash_attention_tpu_lse(
      q, k, v, qs, ks, causal=True, q_index=qi, kv_index=ki, block_q=24, block_k=32), empty_tiles_from=32)
  check_chunk_grads(lambda *a: flash_chunk_grads_tpu(*a, causal=True, block_q=32, block_k=32))


def test_lowers_to_mosaic():
  """The three kernels lower to Mosaic TPU custom calls on any host (compiling them needs a TPU)."""
  b, t, n, kv, h = 2, 1000, 8, 2, 128
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(flash_attention_tpu(q, k, v, s, s, causal=True, interpret=False).astype(
      jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=("tpu",)).as_text()
  assert sorted(re.findall(r'kernel_name = "(\w+)"', text)) == ["flash_tpu_bwd_dkv", "flash_tpu_bwd_dq",
                                                               "flash_tpu_fwd"]


def test_rejects_bad_arguments():
  q, k, v, seg = attention_case(b=1, t=32, n=4, kv=2, h=32, dtype=jnp.float32, seed=40)
  with pytest.raises(ValueError, match="multiples of 8"):
    flash_attention_tpu(q, k, v, seg, seg, causal=True, block_q=12)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    flash_attention_tpu(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), causal=True)
  with pytest.raises(ValueError, match="both"):
    flash_attention_tpu(q, k, v, seg, None, causal=True)


def test_attention_auto_on_a_tpu_runs_these_kernels(monkeypatch):
  """With a TPU backend, `attention_impl=auto` sends attention to these kernels, in storage
  order and with rows stored permuted (explicit positions). The backend is faked here and
  the kernels interpreted; results equal the dense mixer's."""
  from flax import nnx

  import kernels.flash_tpu as tpu_module
  from layers.attention.exact import Attention
  from layers.mixer_base import MixContext, MixerSpec
  calls = []
  real, real_backend = tpu_module.flash_attention_tpu_lse, jax.default_backend
  monkeypatch.setattr(tpu_module, "flash_attention_tpu_lse",
                      lambda *a, **k: calls.append(1) or real(*a, **dict(k, interpret=True)))
  b, t, d = 2, 24, 32
  r = np.random.default_rng(7)
  x = jnp.asarray(r.normal(size=(b, t, d)), jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, 10:] = 2
  seg[1, 20:] = 0
  perm = np.broadcast_to(np.arange(t)[::-1].copy(), (b, t))
  outs = {}
  for impl in ("xla", "auto"):
    spec = MixerSpec(d_model=d, num_heads=4, num_kv_heads=2, causal=True, positions="rope", layer_index=0,
                     num_layers=1, max_len=64, attention_impl=impl)
    mixer = Attention(spec, rngs=nnx.Rngs(0))
    for order, index in (("storage", None), ("permuted", jnp.asarray(perm, jnp.int32))):
      pos = np.broadcast_to(np.arange(t), (b, t)) if index is None else index
      ctx = MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), index=index)
      if impl == "auto":
        monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
      outs[impl, order] = np.asarray(mixer(x, ctx))
      monkeypatch.setattr(jax, "default_backend", real_backend)
  assert len(calls) == 2  # storage order and permuted
  for order in ("storage", "permuted"):
    np.testing.assert_allclose(outs["auto", order], outs["xla", order], atol=2e-5, rtol=2e-5, err_msg=order)


def test_ring_backward_step_dispatches_to_these_kernels_on_a_tpu(monkeypatch):
  """The `pallas` backend's ring backward step (`ops.backend("pallas").ring_backward`) runs
  `flash_chunk_grads_tpu` on a TPU backend (faked here; interpreted)."""
  import kernels.flash_tpu as tpu_module
  from layers.attention import ops
  calls = []
  real = tpu_module.flash_chunk_grads_tpu
  monkeypatch.setattr(tpu_module, "flash_chunk_grads_tpu",
                      lambda *a, **k: calls.append(1) or real(*a, **dict(k, interpret=True)))
  q, k, v, seg = attention_case(b=1, t=32, n=2, kv=1, h=32, dtype=jnp.float32, seed=98)
  idx = zigzag_index(1, 32, 2, 99)
  out, lse = flash_attention_tpu_lse(q, k, v, seg, seg, causal=True, q_index=idx, kv_index=idx, block_q=16,
                                     block_k=16)
  args = (q, k, v, seg, seg, idx, idx, out, lse, jnp.ones_like(q))
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  init, add, finish = ops.backend("pallas").ring_backward(q, k, seg, idx, out, lse, jnp.ones_like(q), causal=True,
                                                          options=ops.Options())
  got = finish(add((k, v, seg, idx), init()))
  monkeypatch.undo()
  assert calls == [1]
  for name, a, b_ in zip(("dq", "dk", "dv"), got, real(*args, causal=True, interpret=True)):
    check_rel(name, a, b_, jnp.float32)


# ----------------------------------------------------------------------------- split-KV decode


@pytest.mark.parametrize("tq,dtype,splits", [(1, jnp.float32, 8), (3, jnp.float32, 3), (1, jnp.bfloat16, 1)],
                         ids=["tq1-fp32-8splits", "tq3-fp32-3splits", "tq1-bf16-1split"])
def test_decode_matches_references_with_ragged_lengths(tq, dtype, splits):
  """The TPU decode kernel against the dense reference and the pure-JAX blockwise twin: ragged
  cache lengths (one full, one empty), grouped-query heads packed into rows, cache entries
  past each length poisoned with NaN (blocks past it are never fetched)."""
  check_decode(lambda *a: decode_attention_tpu(*a, block_k=16, num_splits=splits), tq, dtype, seed=70 + tq, h=128)



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_decode_with_segment_ids(dtype):
  """Packed and padded caches as the model's decoding keeps them: a query sees only its own
  segment; padding queries give zeros; padding slots' K (NaN) are never used."""
  check_decode_segments(lambda *a, **kw: decode_attention_tpu(*a, **kw, block_k=16, num_splits=3), dtype, seed=95, h=128)

def test_decode_lowers_to_mosaic_and_rejects_bad_shapes():
  b, s, n, kv, h = 2, 4096, 32, 8, 128
  q = jax.ShapeDtypeStruct((b, 1, n, h), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((b, s, kv, h), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
  f = lambda q, k, v, l: decode_attention_tpu(q, k, v, l, block_k=512, interpret=False)
  text = jax.jit(f).trace(q, cache, cache, lengths).lower(lowering_platforms=("tpu",)).as_text()
  assert re.findall(r'kernel_name = "(\w+)"', text) == ["decode_tpu"]
  segs = jax.ShapeDtypeStruct((b, 1), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32)
  f = lambda q, k, v, l, qs, ks: decode_attention_tpu(q, k, v, l, q_segment_ids=qs, kv_segment_ids=ks, block_k=512,
                                                      interpret=False)
  text = jax.jit(f).trace(q, cache, cache, lengths, *segs).lower(lowering_platforms=("tpu",)).as_text()
  assert re.findall(r'kernel_name = "(\w+)"', text) == ["decode_tpu"]
  q, k, v, _, _, lengths = decode_case(1, jnp.float32, seed=79)  # head dim 64
  with pytest.raises(ValueError, match="multiple of 128"):
    decode_attention_tpu(q, k, v, lengths, block_k=16)
