"""The Hopper (Mosaic GPU) flash kernels of kernels/flash_mgpu.py (forward, dQ, dK/dV) against
the dense reference.

On CPU the kernels run in Pallas's GPU interpret mode: their three warpgroups, TMA copies and
barriers are simulated (a barrier phase that no thread waits on is an error there), and only
the matrix products are plain dots instead of wgmma (see the module docstring). The wgmma
variant is checked by lowering it to Mosaic GPU, which validates every register layout. On a
GPU (scripts/gpu_check.sh) the same tests run the compiled kernels.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import flash_mgpu
from kernels.flash_pallas import Tiling, flash_attention_pallas, flash_attention_pallas_lse, mgpu_tiling
from tests.helpers import attention_mixer_results, values_and_grads
from tests.kernel_checks import attention_case, check_rel
from tests.test_kernels import _dense, _dense_with_lse

pytestmark = pytest.mark.skipif(not flash_mgpu.available(), reason="this jax has no Mosaic GPU Pallas backend")

# Every Mosaic GPU program owns 128 rows (2 consumer warpgroups x 64) and streams 64-row tiles.
MGPU = Tiling(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=128, block_q_dq=128, block_k_dq=64, num_stages=2,
              num_stages_bwd=2, forward="mgpu", backward="mgpu")
# The one-kernel backward: the dK/dV programs also reduce-add dS K into fp32 dQ buffers.
MGPU_FUSED = dataclasses.replace(MGPU, fused_dq=True)
# The Mosaic GPU forward with the Triton backward (small tiles, as in test_kernels).
MGPU_FWD = Tiling(block_q=128, block_k=64, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=32,
                  num_stages=2, forward="mgpu")


@pytest.mark.parametrize("causal,case,h,tiling", [
    (True, "gqa_segments_odd", 64, MGPU), (False, "gqa_segments_odd", 64, MGPU), (True, "mha_aligned", 128, MGPU),
    (False, "mha_aligned", 128, MGPU), (True, "gqa_segments_odd", 64, MGPU_FWD),
    (False, "mha_aligned", 128, MGPU_FUSED)],
    ids=["causal-gqa_segments_odd-64", "bidir-gqa_segments_odd-64", "causal-mha_aligned-128",
         "bidir-mha_aligned-128", "causal-gqa_segments_odd-64-triton_backward",
         "bidir-mha_aligned-128-fused_dq"])
def test_values_lse_and_gradients_match_dense_reference(causal, case, h, tiling):
  """bf16; GQA with packed segments and a length (150) that pads to two 128-row programs and
  three 64-row key tiles, or an aligned 256 with no segment ids (the unmasked path); out, lse and
  gradients through both (the backward's lse cotangent enters its delta). The last case feeds the
  Mosaic GPU forward's out and lse to the Triton backward kernels; the fused_dq case takes dQ
  from the dK/dV programs' reduce-adds (the race test below runs it causal, with GQA and
  segments)."""
  if case == "gqa_segments_odd":
    q, k, v, seg = attention_case(b=2, t=150, n=2, kv=1, h=h, dtype=jnp.bfloat16, seed=1 + causal)
  else:
    q, k, v, seg = attention_case(b=1, t=256, n=2, kv=2, h=h, dtype=jnp.bfloat16, seed=3 + causal, segments=False)
  b, t, n, _ = q.shape
  if seg is None:
    seg = np.ones((b, t), np.int32)
  r = np.random.default_rng(7)
  w_o, w_l = jnp.asarray(r.normal(size=q.shape), jnp.float32), jnp.asarray(r.normal(size=(b, t, n)), jnp.float32)
  pick_seg = (lambda s: s) if case == "gqa_segments_odd" else (lambda s: None)
  mgpu = lambda q, k, v: flash_attention_pallas_lse(q, k, v, pick_seg(seg), pick_seg(seg), causal=causal,
                                                    tiling=tiling)
  (out, lse), grads = values_and_grads(mgpu, q, k, v, w_o, w_l)
  (out_r, lse_r), grads_r = values_and_grads(
      lambda q, k, v: _dense_with_lse(*(x.astype(jnp.float32) for x in (q, k, v)), seg, causal), q, k, v, w_o, w_l)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape and lse.shape == (b, t, n)
  check_rel("out", out, out_r, jnp.bfloat16)
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(lse_r)))
  fin = np.isfinite(np.asarray(lse_r))
  check_rel("lse", np.asarray(lse)[fin], np.asarray(lse_r)[fin], jnp.bfloat16)
  for name, a, b_ in zip("qkv", grads, grads_r):
    check_rel(f"d{name} (through out and lse)", a, b_, jnp.bfloat16)
  pad = seg == 0  # padding rows see nothing: exactly zero output
  assert np.all(np.asarray(out, np.float32)[pad] == 0)


def test_same_as_the_triton_forward():
  """The two forwards of one call site agree (same padded inputs, same contract)."""
  q, k, v, seg = attention_case(b=1, t=200, n=2, kv=1, h=64, dtype=jnp.bfloat16, seed=5)
  triton = dataclasses.replace(MGPU_FWD, block_q=32, forward="triton")
  for causal in (True, False):
    o1, l1 = flash_attention_pallas_lse(q, k, v, seg, seg, causal=causal, tiling=MGPU)
    o2, l2 = flash_attention_pallas_lse(q, k, v, seg, seg, causal=causal, tiling=triton)
    check_rel(f"out causal={causal}", o1, o2, jnp.bfloat16)
    fin = np.isfinite(np.asarray(l2))
    check_rel(f"lse causal={causal}", np.asarray(l1)[fin], np.asarray(l2)[fin], jnp.bfloat16)


@pytest.mark.parametrize("tiling", [MGPU, MGPU_FUSED], ids=["two_kernel", "fused_dq"])
def test_causal_tiles_beyond_the_diagonal_are_never_loaded(tiling):
  """Keys 128..255 are invisible to queries 0..127. Filled with NaN they poison any tile a
  producer streams in (0 * NaN = NaN in P V and in dP = dO V^T): finite, correct values and
  gradients prove the forward's and dQ's key loops stop at the diagonal and the dK/dV programs
  of those keys stream no query tile (with fused_dq they would add NaN into dQ). The
  bidirectional forward must load them (the probe can fail)."""
  q, k, v, _ = attention_case(b=1, t=128, s=256, n=2, kv=1, h=64, dtype=jnp.bfloat16, seed=30, segments=False)
  k, v = k.at[:, 128:].set(jnp.nan), v.at[:, 128:].set(jnp.nan)
  w = jnp.asarray(np.random.default_rng(31).normal(size=q.shape), jnp.float32)
  got, (dq, dk, dv) = values_and_grads(lambda q, k, v: flash_attention_pallas(q, k, v, causal=True, tiling=tiling),
                                       q, k, v, w)
  want, (dq_r, dk_r, dv_r) = values_and_grads(lambda q, k, v: _dense(q, k, v, None, True), q, k[:, :128],
                                              v[:, :128], w)
  check_rel("out", got, want, jnp.bfloat16)
  check_rel("dq", dq, dq_r, jnp.bfloat16)
  check_rel("dk", dk[:, :128], dk_r, jnp.bfloat16)
  check_rel("dv", dv[:, :128], dv_r, jnp.bfloat16)
  assert np.all(np.asarray(dk[:, 128:], np.float32) == 0) and np.all(np.asarray(dv[:, 128:], np.float32) == 0)
  assert not np.all(np.isfinite(np.asarray(flash_attention_pallas(q, k, v, causal=False, tiling=MGPU), np.float32)))


def _lowered(causal, seg, h, block_k, grad=False, backward="mgpu", **tiles):
  b, t, n, kv = 2, 1000, 8, 2
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
  s = jax.ShapeDtypeStruct((b, t), jnp.int32)
  tiling = dataclasses.replace(mgpu_tiling(h, backward), block_k=block_k, block_k_dq=block_k, **tiles)
  attend = lambda q, k, v, s: flash_attention_pallas(q, k, v, s if seg else None, s if seg else None,
                                                     causal=causal, tiling=tiling, interpret=False)
  f = attend
  if grad:
    f = jax.grad(lambda q, k, v, s: jnp.sum(attend(q, k, v, s).astype(jnp.float32)), argnums=(0, 1, 2))
  return jax.jit(f).trace(q, k, k, s).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("causal,seg,h,block_k", [(True, False, 128, 128), (False, True, 128, 128),
                                                  (True, True, 64, 64), (False, False, 64, 128)])
def test_wgmma_kernel_lowers_to_mosaic_gpu(causal, seg, h, block_k):
  """The compiled variant (wgmma from shared memory and from registers, in-place accumulator,
  layouts of the row statistics and masks) lowers to one Mosaic GPU kernel on any host; the
  Mosaic GPU lowering checks every register layout and shared-memory tiling here."""
  text = _lowered(causal, seg, h, block_k)
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1, text[:2000]


@pytest.mark.parametrize("causal,seg,h,block_k", [(True, True, 128, 64), (False, False, 128, 128),
                                                  (True, False, 64, 128), (False, True, 64, 64)])
def test_backward_lowers_to_mosaic_gpu(causal, seg, h, block_k):
  """The gradient: three Mosaic GPU kernels (forward, dQ, dK/dV) and no Triton kernel."""
  text = _lowered(causal, seg, h, block_k, grad=True)
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3
  assert not re.findall(r'name = "(flash_\w+)"', text)


@pytest.mark.parametrize("causal,seg,h,block_q", [(True, True, 128, 64), (False, False, 64, 128)])
def test_fused_backward_lowers_to_one_mosaic_gpu_kernel(causal, seg, h, block_q):
  """fused_dq: the gradient is two Mosaic GPU kernels (forward; dK/dV with dQ by TMA reduce-add
  from a transposed shared-memory dS) and no Triton kernel. The reduce-add and the transposed
  operand exist only compiled, so this lowering is their check on CPU."""
  text = _lowered(causal, seg, h, 128, grad=True, fused_dq=True, block_q_dkv=block_q)
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 2
  assert not re.findall(r'name = "(flash_\w+)"', text)


def test_gradient_lowers_to_the_mosaic_forward_and_triton_backward():
  text = _lowered(True, True, 128, 128, grad=True, backward="triton")
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1
  assert sorted(re.findall(r'name = "(flash_\w+)"', text)) == ["flash_bwd_dkv", "flash_bwd_dq"]


def test_refuses_what_it_cannot_run():
  q, k, v, seg = attention_case(b=1, t=64, n=2, kv=1, h=64, dtype=jnp.bfloat16, seed=40)
  with pytest.raises(ValueError, match="dtype=float32"):
    flash_attention_pallas(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=True,
                           tiling=MGPU)
  with pytest.raises(ValueError, match="head_dim=32"):
    flash_attention_pallas(q[..., :32], k[..., :32], v[..., :32], causal=True, tiling=MGPU)
  with pytest.raises(ValueError, match="block_q=64"):
    flash_attention_pallas(q, k, v, causal=True, tiling=dataclasses.replace(MGPU, block_q=64))
  with pytest.raises(ValueError, match="q_index"):
    flash_attention_pallas(q, k, v, seg, seg, causal=True, q_index=seg, kv_index=seg, tiling=MGPU)
  with pytest.raises(ValueError, match=r"block_q=64, num_stages=3, head_dim=128: needs 243 KiB"):
    jax.grad(lambda q: flash_attention_pallas(q, q, q, causal=True, tiling=dataclasses.replace(
        MGPU_FUSED, num_stages_bwd=3)).astype(jnp.float32).sum())(jnp.zeros((1, 128, 1, 128), jnp.bfloat16))
  with pytest.raises(ValueError, match="'cutlass'"):
    flash_attention_pallas(q, k, v, causal=True, tiling=dataclasses.replace(MGPU, forward="cutlass"))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled kernels at GPU-sized shapes; too slow to interpret")
@pytest.mark.parametrize("h,causal", [(128, True), (128, False), (64, True)])
def test_gpu_default_tiles_at_realistic_length(h, causal):
  """`mgpu_tiling` unchanged, compiled: T = 1000 pads to 1024 (8 query programs, 16 key tiles),
  grouped-query heads, packed segments, bf16; values and gradients."""
  q, k, v, seg = attention_case(b=2, t=1000, n=8, kv=2, h=h, dtype=jnp.bfloat16, seed=50 + h + causal)
  w = jnp.asarray(np.random.default_rng(51).normal(size=q.shape), jnp.float32)
  got, g_got = values_and_grads(lambda q, k, v: flash_attention_pallas(q, k, v, seg, seg, causal=causal,
                                                                       tiling=mgpu_tiling(h)), q, k, v, w)
  want, g_want = values_and_grads(lambda q, k, v: _dense(q, k, v, seg, causal), q, k, v, w)
  check_rel("out", got, want, jnp.bfloat16)
  for name, a, b in zip("qkv", g_got, g_want):
    check_rel(f"d{name}", a, b, jnp.bfloat16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_impl_mgpu_is_the_same_function(causal):
  """The `attention` mixer with model.attention_impl=mgpu (the Hopper kernels for the
  full-sequence pass; rows stored permuted fall back to the Triton kernels, which take
  explicit positions) equals attention_impl=xla in bf16: values and input gradients, packed
  segments and padding, head dim 64, grouped-query heads."""
  results = attention_mixer_results(("xla", "mgpu"), d=128, num_heads=2, num_kv_heads=1, causal=causal,
                                    dtype=jnp.bfloat16)
  for order in ("storage", "permuted"):
    (want_val, want_grad), (val, grad) = results["xla", order], results["mgpu", order]
    check_rel(f"value {order}", val, want_val, jnp.bfloat16)
    check_rel(f"dx {order}", grad, want_grad, jnp.bfloat16)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the race detector is the GPU interpreter's")
@pytest.mark.parametrize("fused_dq", [False, True], ids=["two_kernel", "fused_dq"])
def test_no_data_races_between_the_warpgroups_and_the_copies(monkeypatch, fused_dq):
  """The interpreter's happens-before race detector over a forward and backward (causal, packed
  segments, two query heads per kv head, 3-slot rings of 64-row tiles that wrap): every
  shared-memory read by a consumer is ordered after the TMA copy that filled it, and every copy
  into a slot after both consumers released it. The interpreter keeps one detector per kernel
  launch, so every detector made is recorded and checked (three launches: forward, dQ, dK/dV;
  with fused_dq two, its dQ then added by both query heads of the group from every key program).
  Releasing a slot one product too early in any kernel makes this fail."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  detectors = []

  class Recorded(gpu_callbacks.RaceDetectionState):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      detectors.append(self)

  monkeypatch.setattr(gpu_callbacks, "RaceDetectionState", Recorded)
  monkeypatch.setattr(flash_mgpu, "INTERPRET_OPTIONS", {"detect_races": True})
  q, k, v, seg = attention_case(b=1, t=384, n=2, kv=1, h=64, dtype=jnp.bfloat16, seed=60)
  tiling = dataclasses.replace(MGPU, num_stages=3, num_stages_bwd=3, fused_dq=fused_dq)
  w = jnp.asarray(np.random.default_rng(61).normal(size=q.shape), jnp.float32)
  out, grads = values_and_grads(lambda q, k, v: flash_attention_pallas(q, k, v, seg, seg, causal=True,
                                                                       tiling=tiling), q, k, v, w)
  assert len(detectors) == 3 - fused_dq and not any(d.races_found for d in detectors), [d.races_found for d in detectors]
  want, grads_r = values_and_grads(lambda q, k, v: _dense(q, k, v, seg, True), q, k, v, w)
  check_rel("out", out, want, jnp.bfloat16)
  for name, a, b_ in zip("qkv", grads, grads_r):
    check_rel(f"d{name}", a, b_, jnp.bfloat16)
