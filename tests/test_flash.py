"""Blockwise (flash) attention against the dense reference: values, gradients, lse, merge, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.reference import make_mask, merge_partials, reference_attention
from layers.attention.flash import flash_accumulate, flash_attention, flash_attention_lse, flash_finish
from layers.functional import FunctionalModel
from layers.models import ModelSpec, build_model

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _case(b=2, t=37, n=4, kv=2, h=8, seed=0, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(b, t, n, h)), dtype)
  k = jnp.asarray(r.normal(size=(b, t, kv, h)), dtype)
  v = jnp.asarray(r.normal(size=(b, t, kv, h)), dtype)
  seg = np.ones((b, t), np.int32)
  seg[0, t // 2:] = 2  # two packed segments ...
  seg[0, t - 4:] = 0  # ... then padding
  seg[1, t - 9:] = 0
  return q, k, v, seg


def _dense(q, k, v, seg, causal):
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  return reference_attention(q, k, v, make_mask(seg, seg, idx, idx, causal))


def _report(a, b):
  err = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  return f"max err {err.max():.2e}, mean err {err.mean():.2e}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kv,blocks", [(4, (8, 16)), (2, (16, 8)), (1, (64, 64)), (2, (5, 7))])
def test_values_and_gradients_match_dense(dtype, causal, kv, blocks):
  q, k, v, seg = _case(kv=kv, dtype=dtype)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), dtype)
  flash = lambda q, k, v: flash_attention(q, k, v, seg, seg, causal=causal, block_q=blocks[0], block_k=blocks[1])
  dense = lambda q, k, v: _dense(q, k, v, seg, causal)
  got, want = flash(q, k, v), dense(q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype],
                             err_msg=_report(got, want))
  loss = lambda f: lambda q, k, v: jnp.sum((f(q, k, v) * w).astype(jnp.float32))
  g_got = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
  g_want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", g_got, g_want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **TOL[dtype],
                               err_msg=f"d{name}: {_report(a, b)}")


@pytest.mark.parametrize("causal", [True, False])
def test_lse_and_merge_of_disjoint_key_halves_equal_the_whole(causal):
  """Attention over keys [0, s) merged with keys [s, T) equals attention over all keys,
  in values and in gradients (the gradients flow through lse: the ring-attention path)."""
  q, k, v, seg = _case(t=40)
  b, t = seg.shape
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  split = 17
  w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

  def halves(q, k, v):
    o1, l1 = flash_attention_lse(q, k[:, :split], v[:, :split], seg, seg[:, :split], idx, idx[:, :split],
                                 causal=causal, block_q=8, block_k=8)
    o2, l2 = flash_attention_lse(q, k[:, split:], v[:, split:], seg, seg[:, split:], idx, idx[:, split:],
                                 causal=causal, block_q=8, block_k=8)
    return merge_partials(o1, l1, o2, l2)

  def whole(q, k, v):
    return flash_attention_lse(q, k, v, seg, seg, idx, idx, causal=causal, block_q=8, block_k=8)

  (o_h, l_h), (o_w, l_w) = halves(q, k, v), whole(q, k, v)
  np.testing.assert_allclose(np.asarray(o_h), np.asarray(_dense(q, k, v, seg, causal)), atol=2e-5)
  np.testing.assert_allclose(np.asarray(o_h), np.asarray(o_w), atol=2e-5)
  # lse against a direct log-sum-exp of the dense masked scores
  mask = make_mask(seg, seg, idx, idx, causal)
  qg = q.reshape(b, t, 2, 2, 8)
  s = jnp.einsum("btkgh,bskh->btkgs", qg, k) / np.sqrt(8)
  s = jnp.where(mask[:, :, None, None, :], s, -jnp.inf)
  lse_dense = jax.scipy.special.logsumexp(s, axis=-1).reshape(b, t, 4)
  np.testing.assert_allclose(np.asarray(l_w), np.asarray(lse_dense), atol=2e-5)
  np.testing.assert_allclose(np.asarray(l_h), np.asarray(lse_dense), atol=2e-5)
  assert np.all(np.isneginf(np.asarray(l_w))[seg == 0])  # padding rows: empty partials
  g_h = jax.grad(lambda *a: jnp.sum(halves(*a)[0] * w), argnums=(0, 1, 2))(q, k, v)
  g_d = jax.grad(lambda *a: jnp.sum(_dense(*a, seg, causal) * w), argnums=(0, 1, 2))(q, k, v)
  for a, b_ in zip(g_h, g_d):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_accumulating_key_chunks_in_any_order_equals_the_whole(causal):
  """`flash_accumulate` over three uneven key chunks, visited in a rotated order as ring
  attention visits them (keys stored out of order, padding inside a chunk), then
  `flash_finish`: the same out and lse as one flash call over all keys, and as dense."""
  q, k, v, seg = _case(t=40)
  b, t = seg.shape
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  cuts = [(23, 40), (0, 9), (9, 23)]  # a rotation of [0, 9), [9, 23), [23, 40)
  state = None
  for lo, hi in cuts:
    state = flash_accumulate(q, k[:, lo:hi], v[:, lo:hi], seg, seg[:, lo:hi], idx, idx[:, lo:hi], state,
                             causal=causal, block_q=8, block_k=4)
  out, lse = flash_finish(state, t, q.shape[2])
  o_w, l_w = flash_attention_lse(q, k, v, seg, seg, idx, idx, causal=causal, block_q=8, block_k=8)
  np.testing.assert_allclose(np.asarray(out), np.asarray(_dense(q, k, v, seg, causal)), atol=2e-5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(o_w, np.float32), atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(l_w), atol=2e-5)
  assert np.all(np.isneginf(np.asarray(lse))[seg == 0]) and np.all(np.asarray(out)[seg == 0] == 0)


def test_flash_mixer_model_equals_attention_mixer():
  spec = dict(kind="lm", vocab_size=40, num_classes=40, max_len=48, d_model=32, num_heads=4, num_kv_heads=2,
              mlp_ratio=2, mlp="gelu", norm="rmsnorm", positions="rope", dropout=0.0, pooling="mean",
              tie_embeddings=True, dtype="float32")
  dense = FunctionalModel(build_model(ModelSpec(mixers=("attention",) * 2, **spec), seed=0))
  flash = FunctionalModel(build_model(ModelSpec(mixers=("flash",) * 2, **spec), seed=0))
  params = dense.init_params()
  ids = np.random.default_rng(0).integers(1, 40, size=(2, 45)).astype(np.int32)
  seg = np.ones_like(ids)
  seg[1, 30:] = 0
  batch = {"inputs": ids, "segment_ids": seg, "positions": np.broadcast_to(np.arange(45), ids.shape)}
  loss = lambda fm: lambda p: jnp.sum(fm.apply(p, {}, batch)[0] * (seg[..., None] > 0))
  (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(loss(fm)))(params) for fm in (flash, dense))
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
  for name in g1:
    np.testing.assert_allclose(np.asarray(g1[name]), np.asarray(g2[name]), atol=1e-4, rtol=1e-4, err_msg=name)


def test_compiled_memory_is_linear_in_length():
  """Forward+backward temp memory at T=16k: flash is at most 1/20 of dense (deterministic, compile only)."""
  b, t, n, h = 1, 16384, 2, 32
  shape = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp(fn):
    loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape, seg).compile() \
        .memory_analysis().temp_size_in_bytes

  dense = temp(lambda q, k, v, s: _dense(q, k, v, s, True))
  flash = temp(lambda q, k, v, s: flash_attention(q, k, v, s, s, causal=True))
  assert flash * 20 <= dense, f"flash {flash / 2**20:.1f} MiB vs dense {dense / 2**20:.1f} MiB"
  assert flash < 64 * 2**20  # O(T): a few arrays of [B, T, N, H]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_per_row_skipping_gives_the_same_values_and_gradients(causal):
  q, k, v, seg = _case()
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
  f = lambda per_row: lambda q, k, v: jnp.sum(flash_attention_lse(
      q, k, v, seg, seg, idx, idx, causal=causal, block_q=8, block_k=8, per_row=per_row)[0] * w)
  np.testing.assert_allclose(f(True)(q, k, v), f(False)(q, k, v), rtol=1e-5)
  for a, b in zip(jax.grad(f(True), argnums=(0, 1, 2))(q, k, v), jax.grad(f(False), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
