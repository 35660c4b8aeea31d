"""Exact attention against an independent per-head, per-query loop, and decode == full."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.reference import make_mask, reference_attention
from layers.functional import FunctionalModel
from layers.models import ModelSpec, build_model
from tests.helpers import attention_mixer_results


def naive_attention(q, k, v, seg, causal):
  """Loops over batch, head and query; softmax over the visible keys only (numpy)."""
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
  b, t, n, h = q.shape
  kvh = k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for ni in range(n):
      ki = ni // (n // kvh)
      for i in range(t):
        if seg[bi, i] == 0:
          continue
        js = [j for j in range(t) if seg[bi, j] == seg[bi, i] and (not causal or j <= i)]
        s = np.array([q[bi, i, ni] @ k[bi, j, ki] for j in js]) / math.sqrt(h)
        p = np.exp(s - s.max())
        p /= p.sum()
        out[bi, i, ni] = sum(pj * v[bi, j, ki] for pj, j in zip(p, js))
  return out


def _inputs(b=2, t=7, n=4, kv=2, h=8, seed=0):
  r = np.random.default_rng(seed)
  q = r.normal(size=(b, t, n, h)).astype(np.float32)
  k = r.normal(size=(b, t, kv, h)).astype(np.float32)
  v = r.normal(size=(b, t, kv, h)).astype(np.float32)
  # Row 0: two packed segments then padding; row 1: one segment, no padding.
  seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1] * 7], np.int32)[:b, :t]
  return q, k, v, seg


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_reference_matches_naive(causal, kv):
  q, k, v, seg = _inputs(kv=kv)
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  got = reference_attention(q, k, v, make_mask(seg, seg, idx, idx, causal))
  want = naive_attention(q, k, v, seg, causal)
  err = np.abs(np.asarray(got) - want)
  assert err.max() < 1e-5, f"max err {err.max():.2e} mean {err.mean():.2e}"
  assert np.all(np.asarray(got)[seg == 0] == 0)  # padding queries give zeros, not NaNs


@pytest.mark.parametrize("causal", [True, False])
def test_reference_gradients_match_naive_in_jax(causal):
  """Gradients of the masked-einsum path equal those of a per-query loop written in jnp."""
  q, k, v, seg = _inputs(kv=2)
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  mask = make_mask(seg, seg, idx, idx, causal)
  w = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)

  def loop(q, k, v):
    b, t, n, h = q.shape
    g = n // k.shape[2]
    rows = []
    for i in range(t):
      vis = (seg == seg[:, i:i + 1]) & (seg[:, i:i + 1] != 0)
      if causal:
        vis = vis & (np.arange(t)[None] <= i)
      kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
      s = jnp.einsum("bnh,bsnh->bns", q[:, i], kk) / math.sqrt(h)
      s = jnp.where(vis[:, None, :], s, -jnp.inf)
      p = jnp.where(vis[:, None, :], jax.nn.softmax(jnp.where(vis[:, None, :], s, -1e9), axis=-1), 0.0)
      rows.append(jnp.einsum("bns,bsnh->bnh", p, vv))
    return jnp.stack(rows, axis=1)

  f_ref = lambda q, k, v: jnp.sum(reference_attention(q, k, v, mask) * w)
  f_loop = lambda q, k, v: jnp.sum(loop(q, k, v) * w)
  for a, b in zip(jax.grad(f_ref, argnums=(0, 1, 2))(q, k, v), jax.grad(f_loop, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def _spec(**kw):
  base = dict(kind="lm", vocab_size=50, num_classes=50, max_len=16, mixers=("attention",) * 2, d_model=32,
              num_heads=4, num_kv_heads=2, mlp_ratio=2, mlp="swiglu", norm="rmsnorm", positions="rope", dropout=0.0,
              pooling="mean", tie_embeddings=True, dtype="float32")
  base.update(kw)
  return ModelSpec(**base)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_prefill_then_decode_equals_full_forward(positions):
  model = build_model(_spec(positions=positions), seed=3)
  t = 12
  ids = np.random.default_rng(0).integers(1, 50, size=(2, t)).astype(np.int32)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
  full = model({"inputs": ids, "segment_ids": np.ones_like(ids), "positions": pos})
  model.encoder.init_cache(batch=2, max_len=16)
  pre = 5
  decode = nnx.jit(lambda m, batch: m(batch, decode=True))  # compiled once per chunk length, not op by op
  outs = [decode(model, {"inputs": ids[:, :pre], "segment_ids": np.ones((2, pre), np.int32),
                         "positions": pos[:, :pre]})]
  for i in range(pre, t):
    outs.append(decode(model, {"inputs": ids[:, i:i + 1], "segment_ids": np.ones((2, 1), np.int32),
                               "positions": pos[:, i:i + 1]}))
  step = np.concatenate([np.asarray(o) for o in outs], axis=1)
  np.testing.assert_allclose(step, np.asarray(full), atol=2e-5, rtol=1e-5)


def test_causal_lm_ignores_the_future_and_other_segments():
  """Perturbing later tokens, or tokens of another packed segment, leaves logits unchanged."""
  fm = FunctionalModel(build_model(_spec(), seed=0))
  params, extra = fm.init_params(), fm.init_extra()
  ids = np.random.default_rng(0).integers(1, 50, size=(1, 10)).astype(np.int32)
  seg = np.array([[1] * 6 + [2] * 4], np.int32)
  pos = np.array([list(range(6)) + list(range(4))], np.int32)
  base = np.asarray(fm.apply(params, extra, {"inputs": ids, "segment_ids": seg, "positions": pos})[0])
  ids2 = ids.copy()
  ids2[0, 7:] = (ids2[0, 7:] % 49) + 1  # later tokens of segment 2
  out2 = np.asarray(fm.apply(params, extra, {"inputs": ids2, "segment_ids": seg, "positions": pos})[0])
  np.testing.assert_array_equal(base[0, :7], out2[0, :7])
  ids3 = ids.copy()
  ids3[0, :6] = (ids3[0, :6] % 49) + 1  # all of segment 1
  out3 = np.asarray(fm.apply(params, extra, {"inputs": ids3, "segment_ids": seg, "positions": pos})[0])
  np.testing.assert_allclose(base[0, 6:], out3[0, 6:], atol=1e-6)
  assert np.abs(base[0, :6] - out3[0, :6]).max() > 1e-3  # and the perturbation itself is visible


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_impls_agree_in_storage_and_permuted_order(causal):
  """model.attention_impl = xla (dense), flash (pure-JAX blocks) and pallas (the fused kernel,
  interpreted here) are one function: same outputs and input gradients, with packed segments
  and padding, in storage order and with rows stored permuted (ctx.index = true positions)."""
  results = attention_mixer_results(("xla", "flash", "pallas"), d=32, num_heads=4, num_kv_heads=2, causal=causal,
                                    dtype=jnp.float32)
  for order in ("storage", "permuted"):
    want_val, want_grad = results["xla", order]
    for impl in ("flash", "pallas"):
      val, grad = results[impl, order]
      np.testing.assert_allclose(float(val), float(want_val), rtol=2e-5, err_msg=f"{impl} {order}")
      np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), atol=2e-5, rtol=2e-5,
                                 err_msg=f"{impl} {order}")


def test_one_example_per_row_predicate():
  from layers.attention.ops import one_example_per_row
  yes = [[[1, 1, 1, 0]], [[3, 3, 0, 0], [1, 1, 1, 1]], [[0, 0, 0, 0], [2, 0, 0, 0]]]
  no = [[[1, 1, 2, 2]], [[0, 1, 1, 1]], [[1, 0, 1, 0]], [[1, 1, 0, 0], [1, 2, 0, 0]]]
  for seg in yes:
    assert bool(one_example_per_row(np.asarray(seg))), seg
  for seg in no:
    assert not bool(one_example_per_row(np.asarray(seg))), seg


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cudnn_path_equals_naive_for_padded_and_packed_batches(causal):
  """attention_impl=cudnn's wiring (per-row lengths into jax.nn.dot_product_attention, the
  blockwise path for packed batches, padding zeroed), run here through the same call's XLA
  implementation: values and gradients against the naive loop, GQA, both branches."""
  from layers.attention.ops import cudnn_attention, one_example_per_row
  b, t, n, kv, h = 2, 21, 4, 2, 8
  r = np.random.default_rng(11)
  q, k, v = (jnp.asarray(r.normal(size=(b, t, m, h)), jnp.float32) for m in (n, kv, kv))
  w = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
  padded = np.ones((b, t), np.int32)
  padded[0, 13:] = 0
  packed = padded.copy()
  packed[1, 9:] = 2
  for seg, fused in ((padded, True), (packed, False)):
    assert bool(one_example_per_row(seg)) == fused
    f = lambda q, k, v, seg=seg: jnp.sum(cudnn_attention(q, k, v, seg, causal=causal, block=8,
                                                         implementation="xla") * w)
    val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
    out = cudnn_attention(q, k, v, seg, causal=causal, block=8, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, seg, causal), atol=2e-5, rtol=2e-5)
    idx = np.broadcast_to(np.arange(t), (b, t))
    ref = lambda q, k, v, seg=seg: jnp.sum(reference_attention(q, k, v, make_mask(seg, seg, idx, idx, causal)) * w)
    want_val, want_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(float(val), float(want_val), rtol=2e-5)
    for g, wg in zip(grads, want_grads):
      np.testing.assert_allclose(np.asarray(g), np.asarray(wg), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="takes bfloat16 or float16 activations, got float32"):
    cudnn_attention(q, k, v, padded, causal=causal)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs an NVIDIA GPU")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cudnn_kernel_on_gpu_equals_reference(causal):
  """The real cuDNN kernel (bf16) through attention_impl=cudnn's wiring, padded and packed batches."""
  from layers.attention.ops import cudnn_attention
  b, t, n, kv, h = 2, 256, 8, 2, 64
  r = np.random.default_rng(12)
  q, k, v = (jnp.asarray(r.normal(size=(b, t, m, h)), jnp.bfloat16) for m in (n, kv, kv))
  seg = np.ones((b, t), np.int32)
  seg[0, 200:] = 0
  for packed in (False, True):
    if packed:
      seg[1, 100:] = 2
    got = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, seg, causal=causal))(q, k, v)
    idx = np.broadcast_to(np.arange(t), (b, t))
    want = reference_attention(q, k, v, make_mask(seg, seg, idx, idx, causal))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)
