"""Checks shared by the kernel tests of every backend (tests/test_kernels.py: Triton;
tests/test_kernels_tpu.py: Mosaic), each against the pure-JAX blockwise twin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.reference import make_mask, reference_attention
from layers.attention.flash import flash_attention_lse, flash_chunk_grads
from tests.helpers import values_and_grads, zigzag_index

# ||got - want|| / ||want|| against an fp32 reference computed from the same (upcast) inputs:
# fp32 arithmetic lands far below 1e-5; bf16 operands (inputs, P and dS rounded to bf16) near 3e-3.
REL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def attention_case(b, t, n, kv, h, dtype, seed, s=None, segments=True):
  """q [b, t, n, h], k/v [b, s, kv, h] and segment ids: row 0 two packed sequences then
  padding, the last row padding at the end (None with segments=False)."""
  s = t if s is None else s
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(b, t, n, h)), dtype)
  k = jnp.asarray(r.normal(size=(b, s, kv, h)), dtype)
  v = jnp.asarray(r.normal(size=(b, s, kv, h)), dtype)
  seg = None
  if segments:
    seg = np.ones((b, t), np.int32)
    seg[0, t // 2:] = 2  # two packed sequences ...
    seg[0, t - 4:] = 0  # ... then padding
    seg[-1, t - 9:] = 0
  return q, k, v, seg


def check_rel(name, got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  err = np.abs(got - want)
  rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
  report = f"{name}: rel {rel:.2e}, max err {err.max():.2e}, mean err {err.mean():.2e}"
  print(report)
  assert rel < REL[dtype], report


def check_explicit_positions(lse_fn, empty_tiles_from: int):
  """lse_fn(q, k, v, q_seg, kv_seg, q_index, kv_index) -> (out, lse), causal by the indices.

  Zigzag-stored queries (48) against a zigzag-stored key chunk (64), as ring attention sees
  them: out, lse and gradients through both equal the blockwise twin's. Then the keys from
  `empty_tiles_from` on (whole tiles of the kernel) are placed after every query and
  poisoned with NaN: a kernel that skips empty tiles never multiplies them and stays finite.
  """
  q, _, _, seg = attention_case(b=2, t=48, n=4, kv=2, h=32, dtype=jnp.float32, seed=90)
  _, k, v, kseg = attention_case(b=2, t=64, n=4, kv=2, h=32, dtype=jnp.float32, seed=91)
  qidx, kidx = zigzag_index(2, 48, 2, 92), zigzag_index(2, 64, 4, 93)
  r = np.random.default_rng(94)
  w_o, w_l = jnp.asarray(r.normal(size=q.shape), jnp.float32), jnp.asarray(r.normal(size=(2, 48, 4)), jnp.float32)
  run = lambda fn: values_and_grads(fn, q, k, v, w_o, w_l)
  twin = lambda kidx: (lambda q, k, v: flash_attention_lse(q, k, v, seg, kseg, qidx, kidx, causal=True, block_q=16,
                                                           block_k=16))
  (o1, l1), g1 = run(lambda q, k, v: lse_fn(q, k, v, seg, kseg, qidx, kidx))
  (o2, l2), g2 = run(twin(kidx))
  np.testing.assert_array_equal(np.isneginf(np.asarray(l1)), np.isneginf(np.asarray(l2)))
  fin = np.isfinite(np.asarray(l2))
  check_rel("lse", np.asarray(l1)[fin], np.asarray(l2)[fin], jnp.float32)
  check_rel("out", o1, o2, jnp.float32)
  for name, a, b_ in zip("qkv", g1, g2):
    check_rel(f"d{name}", a, b_, jnp.float32)
  late = kidx.copy()
  late[:, empty_tiles_from:] = 1000
  poison = lambda x: x.at[:, empty_tiles_from:].set(jnp.nan)  # inside the loss: the test's grads stay clean
  (o3, _), g3 = run(lambda q, k, v: lse_fn(q, poison(k), poison(v), seg, kseg, qidx, late))
  (o4, _), g4 = run(twin(late))
  check_rel("out, late keys poisoned", o3, o4, jnp.float32)
  for name, a, b_ in zip("qkv", g3, g4):
    check_rel(f"d{name}, late keys poisoned", a, b_, jnp.float32)


def check_chunk_grads(grads_fn):
  """grads_fn(q, k, v, q_seg, kv_seg, q_index, kv_index, out, lse, d_out) -> (dq, dk, dv) of one
  key chunk given the final out and lse (ring attention's backward step): equal to
  `flash_chunk_grads`'s for both halves of a zigzag row, and summing to the full gradient."""
  q, k, v, seg = attention_case(b=2, t=64, n=4, kv=2, h=32, dtype=jnp.float32, seed=95)
  idx = zigzag_index(2, 64, 2, 96)
  d_out = jnp.asarray(np.random.default_rng(97).normal(size=q.shape), jnp.float32)
  full = lambda q, k, v: flash_attention_lse(q, k, v, seg, seg, idx, idx, causal=True, block_q=16, block_k=16)
  out, lse = full(q, k, v)
  want_dq, want_dk, want_dv = jax.vjp(lambda q, k, v: full(q, k, v)[0], q, k, v)[1](d_out)
  dq_sum = 0.0
  for lo, hi in ((0, 32), (32, 64)):
    chunk = (k[:, lo:hi], v[:, lo:hi], seg, seg[:, lo:hi], idx, idx[:, lo:hi], out, lse, d_out)
    got = jax.jit(lambda *a: grads_fn(q, *a))(*chunk)
    twin = flash_chunk_grads(q, *chunk, causal=True, block_q=16, block_k=16)
    for name, a, b_ in zip(("dq", "dk", "dv"), got, twin):
      check_rel(f"{name} [{lo}:{hi}] vs twin", a, b_, jnp.float32)
    check_rel(f"dk [{lo}:{hi}] vs full", got[1], want_dk[:, lo:hi], jnp.float32)
    check_rel(f"dv [{lo}:{hi}] vs full", got[2], want_dv[:, lo:hi], jnp.float32)
    dq_sum = dq_sum + got[0]
  check_rel("dq summed over chunks vs full", dq_sum, want_dq, jnp.float32)


def decode_case(tq, dtype, seed, s=128, n=8, kv=2, h=64, block=16, lengths=(37, 128, 5, 0)):
  """Ragged cache lengths (one full, one empty); entries that must never be read are NaN:
  K past each length, V past the length rounded up to the block (a loaded-but-masked V
  would still be multiplied by a zero probability, and 0 * NaN = NaN)."""
  r = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  b = len(lengths)
  q = jnp.asarray(r.normal(size=(b, tq, n, h)), dtype)
  k = r.normal(size=(b, s, kv, h))
  v = r.normal(size=(b, s, kv, h))
  pos = np.arange(s)[None, :, None, None]
  k_poison = np.where(pos >= lengths[:, None, None, None], np.nan, k)
  v_poison = np.where(pos >= -(-lengths // block * block)[:, None, None, None], np.nan, v)
  return q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(k_poison, dtype), \
      jnp.asarray(v_poison, dtype), jnp.asarray(lengths)


def dense_decode(q, k, v, lengths):
  b, tq = q.shape[:2]
  s = k.shape[1]
  lengths = np.asarray(lengths)
  q_index = lengths[:, None] - tq + np.arange(tq)[None, :]
  kv_index = np.broadcast_to(np.arange(s), (b, s))
  mask = make_mask(np.ones((b, tq), np.int32), (kv_index < lengths[:, None]).astype(np.int32), q_index, kv_index,
                   True)
  f32 = lambda x: x.astype(jnp.float32)
  return reference_attention(f32(q), f32(k), f32(v), mask)


def check_decode(decode, tq, dtype, seed, h):
  """decode(q, k_cache, v_cache, lengths) against the dense reference and the pure-JAX blockwise
  twin: ragged cache lengths (one full, one empty), grouped-query heads, entries never to be
  read poisoned with NaN, zeros for the empty cache."""
  from kernels.decode_pallas import reference_decode_attention
  q, k, v, k_nan, v_nan, lengths = decode_case(tq, dtype, seed=seed, h=h)
  got = jax.jit(decode)(q, k_nan, v_nan, lengths)
  assert got.shape == q.shape and got.dtype == dtype
  check_rel("decode vs dense", got, dense_decode(q, k, v, lengths), dtype)
  if tq > 1:
    check_rel("decode vs dense twin", got, reference_decode_attention(q, k, v, lengths), dtype)
  assert np.all(np.asarray(got, np.float32)[3] == 0)  # empty cache: zeros


def check_decode_segments(decode, dtype, seed, h, s=128, block=16):
  """decode(q, k, v, lengths, q_segment_ids=, kv_segment_ids=) with segment ids, as a model's
  batched cache holds them (one write position for every row): row 0 two packed prompts, the
  new tokens continuing the second; row 1 a short prompt, a padding gap, then its new tokens;
  row 2 a padding query (zeros); row 3 a one-token cache. Against the dense masked reference
  and the pure-JAX split-KV path; K of every padding slot poisoned with NaN (masked, never
  used), V finite there (a loaded-but-masked V is multiplied by a zero probability)."""
  from layers.attention.decode import reference_decode_attention, split_kv_decode_attention
  tq, n, kv = 2, 8, 2
  lengths = np.array([90, 90, 90, 1], np.int32)
  r = np.random.default_rng(seed)
  b = len(lengths)
  q = jnp.asarray(r.normal(size=(b, tq, n, h)), dtype)
  k, v = r.normal(size=(b, s, kv, h)), r.normal(size=(b, s, kv, h))
  kseg = np.zeros((b, s), np.int32)
  kseg[0, :40], kseg[0, 40:90] = 1, 2
  kseg[1, :17], kseg[1, 88:90] = 3, 3
  kseg[2, :50] = 1
  kseg[3, 0] = 1
  qseg = np.array([[2, 2], [3, 3], [0, 0], [1, 1]], np.int32)
  qseg[3, 0] = 0  # the one-token row's first query is padding too
  k_nan = np.where((kseg == 0)[:, :, None, None], np.nan, k)
  k, k_nan, v = (jnp.asarray(x, dtype) for x in (k, k_nan, v))
  got = jax.jit(decode)(q, k_nan, v, jnp.asarray(lengths), q_segment_ids=jnp.asarray(qseg),
                        kv_segment_ids=jnp.asarray(kseg))
  assert got.shape == q.shape and got.dtype == dtype
  f32 = lambda x: x.astype(jnp.float32)
  check_rel("decode with segments vs dense", got, reference_decode_attention(
      f32(q), f32(k), f32(v), lengths, q_segment_ids=qseg, kv_segment_ids=kseg), dtype)
  check_rel("decode with segments vs split-KV", got, split_kv_decode_attention(
      q, k, v, lengths, q_segment_ids=qseg, kv_segment_ids=kseg, chunk=32), dtype)
  got = np.asarray(got, np.float32)
  assert np.all(got[2] == 0) and np.all(got[3, 0] == 0)  # padding queries: zeros
